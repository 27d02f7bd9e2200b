"""Which bfloat16 instructions the host's kernels use: extensions beside the vector ISA, AMX
only when its flags, Linux's permission and a smoke run agree (else a one-line note and the
next instruction set), `isa=` naming them, and `dump --kernels --asm --isa` generating the
kernels of an instruction set the host lacks without running them."""

import numpy as np
import pytest

import rescompile as rc
from rescompile.backends.cpu import amx, target as target_module
from rescompile.backends.cpu.target import (Target, generic_target, host_target, parse_isa,
                                            target_for)
from rescompile.errors import UsageError
from conftest import tiny_spec


class _Features(dict):
    """What llvmlite's get_host_cpu_features gives: a mapping with `flatten`."""

    def flatten(self) -> str:
        return ",".join(("+" if on else "-") + name for name, on in sorted(self.items()))


@pytest.fixture
def amx_host(monkeypatch):
    """The host as a CPU whose flags offer AVX-512, AVX512-BF16 and AMX."""
    flags = _Features({"avx512f": True, "fma": True, "avx2": True, "avx512bw": True,
                       "avx512bf16": True, "amx-tile": True, "amx-bf16": True})
    monkeypatch.setattr(target_module.llvm, "get_host_cpu_features", lambda: flags)
    host_target.cache_clear()
    amx.usable.cache_clear()
    yield
    monkeypatch.undo()
    host_target.cache_clear()
    amx.usable.cache_clear()


def test_refused_tile_state_falls_back_to_avx512_bf16_with_a_note(amx_host, monkeypatch,
                                                                  capsys):
    monkeypatch.setattr(amx, "request_tile_state",
                        lambda: "Linux refused the tile state (arch_prctl: Operation not "
                                "supported)")
    target = host_target()
    assert target.extensions == ("avx512_bf16",) and target.name == "avx512+avx512_bf16"
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and note[0].startswith("rescompile: note: AMX is not used: Linux "
                                                 "refused the tile state")


def test_a_smoke_run_that_traps_refuses_amx_once_per_machine(amx_host, monkeypatch, capsys,
                                                             tmp_path):
    """Permission granted but the smoke run dies (a hypervisor that traps AMX): refused,
    and the verdict is kept under the CPU's fingerprint, so the next process does not run
    it again."""
    runs = []
    monkeypatch.setattr(amx, "request_tile_state", lambda: None)
    monkeypatch.setattr(amx, "smoke_run", lambda target: runs.append(target) or
                        "the smoke run was killed by signal 4 (AMX traps here)")
    monkeypatch.setenv("RESCOMPILE_CACHE_DIR", str(tmp_path))
    assert not host_target().has("amx_bf16")
    assert "killed by signal 4" in capsys.readouterr().err
    plain = Target(host_target().isa, host_target().cpu, host_target().features)
    assert amx.refusal(plain) == "the smoke run was killed by signal 4 (AMX traps here)"
    assert len(runs) == 1 and list((tmp_path / "amx").glob("*.json"))


def test_amx_is_used_when_all_three_agree(amx_host, monkeypatch, tmp_path):
    monkeypatch.setattr(amx, "request_tile_state", lambda: None)
    monkeypatch.setattr(amx, "smoke_run", lambda target: None)
    monkeypatch.setenv("RESCOMPILE_CACHE_DIR", str(tmp_path))
    assert host_target().extensions == ("amx_bf16", "avx512_bf16")


@pytest.mark.skipif(host_target().has("amx_bf16"), reason="the host has AMX")
def test_the_real_smoke_run_refuses_amx_on_this_host():
    """The smoke subprocess itself, here: Linux grants no tile state on a CPU without AMX,
    so it exits with the reason and this process carries on."""
    why = amx.smoke_run(host_target())
    assert why is not None and "smoke run" in why


def test_isa_names_a_vector_isa_and_its_extensions():
    assert parse_isa("avx512+amx_bf16+avx512_bf16") == ("avx512", ("amx_bf16", "avx512_bf16"))
    assert generic_target("avx512+avx512_bf16+amx_bf16").name == "avx512+amx_bf16+avx512_bf16"
    with pytest.raises(UsageError, match="needs avx512 vectors"):
        generic_target("avx2+avx512_bf16")
    with pytest.raises(UsageError, match="unknown extension"):
        generic_target("avx512+amx_fp16")
    with pytest.raises(UsageError, match="isa must be one of"):
        parse_isa("sse9")
    host = host_target()
    plain = target_for(host.isa)  # the host's vector ISA without extensions
    assert plain.isa == host.isa and plain.extensions == () and plain.cpu == host.cpu
    if not host.has("amx_bf16"):
        with pytest.raises(ValueError, match="cannot run on this CPU"):
            target_for("avx512+amx_bf16+avx512_bf16")
        assert not target_for("avx512+amx_bf16+avx512_bf16", runnable=False).runs_here()


def test_a_bf16_model_on_the_plain_vector_isa_runs_fma_kernels():
    """isa='avx512' (or the host's plain vector ISA): bfloat16 storage, float32 FMAs."""
    from rescompile.backends.cpu.llvm.conv import ConvKernel
    exe = rc.compile(tiny_spec(), backend="cpu", dtype="bfloat16", isa=host_target().isa)
    dots = {s.kernel.dot for s in exe.program.schedule.kernel_steps
            if isinstance(s.kernel, ConvKernel)}
    assert dots == {"fma"}
    assert exe.forward(np.zeros((1, 8, 8, 3))).dtype == np.float32


def test_dump_shows_amx_kernels_of_a_host_without_amx(tmp_path, capsys):
    """`dump --kernels --asm --isa avx512+amx_bf16+avx512_bf16`: the AMX kernels generated
    and their assembly printed, on any host; none of them loaded."""
    from rescompile.cli import main
    spec = tmp_path / "tiny.toml"
    spec.write_text(tiny_spec(unit="bottleneck").to_toml())
    assert main(["dump", str(spec), "--dtype", "bfloat16", "--kernels", "--asm", "--isa",
                 "avx512+amx_bf16+avx512_bf16", "--node", "sub2"]) == 0
    out = capsys.readouterr().out
    assert "_amx_32x32_" in out
    for instruction in ("ldtilecfg", "tileloadd", "tdpbf16ps", "tilestored", "tilerelease"):
        assert instruction in out, instruction
