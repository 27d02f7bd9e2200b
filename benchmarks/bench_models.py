"""Whole-model CPU timings: rescompile's cpu backend beside PyTorch eager, torch.compile and
ONNX Runtime, with the same weights, timed two ways (every row says which):

    own process   each contender alone in a fresh process (batch-1 cases; `--own-process`
                  for every case): it warms up, then times its calls, with no other
                  framework's thread pool beside it
    interleaved   all of them in this process, in interleaved rounds

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \\
        PYTHONPATH=. .venv/bin/python benchmarks/bench_models.py --compile --out bench.json

Cases, all float32 on 2 threads:

    r164-infer-b128   ResNet-164 (CIFAR) inference, batch 128
    r164-infer-b1     ResNet-164 inference, batch 1
    r164-train-b128   ResNet-164 train step (forward, backward, momentum update), batch 128
    r50-infer-b1      ResNet-50 (ImageNet, 224x224) inference, batch 1

Peers (`rescompile.bench.PEERS`): PyTorch eager (channels_last), torch.compile (inductor; with
freezing in inference), ONNX Runtime (all graph optimisations, inference only), each given
`torch.set_num_threads(2)` / `intra_op_num_threads=2`. Timing, by either method: a warm-up
call, then `--reps` timed calls per implementation in each of `--rounds` rounds; median, min
and max over all timed calls. GFLOP/s and "% of peak" use the model's FLOPs and the FMA peak
measured by the kernel library's own loop on 2 threads in the same run. The output names the
CPU model, the LLVM CPU, the ISA the kernels were built for, the host's bfloat16 flags and the
date (`rescompile.bench.host_info`). For a train step, the memory it costs is
measured too: a fresh process's peak resident memory growth over two steps, for rescompile and
PyTorch eager (`rescompile.bench.step_memory`). `--compile` also times compiling
each model and mode of the cases in fresh processes, from `rescompile.compile`
to the end of the first call at batch 2 (Numba's import included): cold (empty kernel and
Numba caches) and warm (the same caches again).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import rescompile  # noqa: E402
from rescompile.backends.cpu.llvm.measure import fma_peak_gflops  # noqa: E402
from rescompile.backends.cpu.target import host_target  # noqa: E402
from rescompile.bench import (  # noqa: E402
    INTERLEAVED, OWN_PROCESS, PEERS, PROFILE_COLUMNS, Method, format_host, format_rows, gflop,
    host_info, interleaved_contenders, own_processes, peer_runners, step_memory, text_table,
    timing_rows)

PRESETS = ROOT / "rescompile" / "presets"
CASES = {  # name -> (preset file, mode, batch)
    "r164-infer-b128": ("resnet164_cifar.toml", "infer", 128),
    "r164-infer-b1": ("resnet164_cifar.toml", "infer", 1),
    "r164-train-b128": ("resnet164_cifar.toml", "train", 128),
    "r50-infer-b1": ("resnet50_imagenet.toml", "infer", 1),
}
THREADS = 2


def run_case(name, reps, rounds, peers, peak, own_process):
    preset, mode, n = CASES[name]
    spec = rescompile.load_spec(PRESETS / preset)
    methods = []
    if n == 1 or own_process:  # first: this process holds no peer's threads yet
        methods.append(Method(OWN_PROCESS, own_processes(
            spec, mode, n, "cpu", "float32", ("rescompile", *peers), THREADS, rounds, reps)))
    start = time.perf_counter()
    exe = rescompile.compile(spec, mode=mode, backend="cpu")
    rng = np.random.default_rng(0)
    images = rng.standard_normal((n, *spec.model.input)).astype(np.float32)
    labels = rng.integers(0, spec.model.num_classes, n)
    if mode == "infer":
        ours = lambda: exe.forward(images)  # noqa: E731
    else:
        initial = exe.state

        def ours():
            exe.load_state(initial)  # every timed step starts from the same variables
            return exe.train_step(images, labels)
    first = ours()
    compile_s = time.perf_counter() - start
    runners = peer_runners(spec, exe, mode, images, labels, THREADS, peers)
    agreement = {}
    if mode == "infer":
        for peer, runner in runners.items():
            if not isinstance(runner, str):
                got = runner[0]()
                agreement[peer] = float(np.abs(got - first).max() / np.abs(first).max())
    methods.append(Method(INTERLEAVED, interleaved_contenders(ours, compile_s, runners, rounds,
                                                              reps)))
    work = gflop(exe, n)
    memory = ({who: step_memory(spec, mode, n, "float32", who) for who in ("rescompile",
                                                                          "pytorch")}
              if mode == "train" and "pytorch" in peers else {})
    return {"case": name, "batch": n, "mode": mode, "gflop_per_call": work,
            "rows": timing_rows(methods, work, peak), "step_memory_bytes": memory,
            "max_rel_diff_vs_rescompile": agreement}, exe


def compile_times(cases) -> dict:
    """Fresh processes, the first call included: empty caches, then the same again, for each
    model and mode among `cases`."""
    script = ("import sys, time, numpy as np; sys.path.insert(0, {root!r}); "
              "import rescompile; t = time.perf_counter();"
              "s = rescompile.load_spec({preset!r});"
              "e = rescompile.compile(s, mode={mode!r}, backend='cpu', cache_dir={cache!r});"
              "x = np.random.default_rng(0).standard_normal((2, *s.model.input))"
              ".astype(np.float32);"
              "e.forward(x) if {mode!r} == 'infer' else e.train_step(x, [0, 1]);"
              "print(time.perf_counter() - t)")
    out = {}
    for preset, mode in dict.fromkeys(CASES[c][:2] for c in cases):
        with tempfile.TemporaryDirectory() as cache:
            for label in ("cold", "warm"):
                code = script.format(root=str(ROOT), preset=str(PRESETS / preset), mode=mode,
                                     cache=cache)
                env = dict(os.environ, NUMBA_CACHE_DIR=str(Path(cache) / "numba"))
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                      text=True, check=True, env=env)
                out[f"{preset.split('_')[0]}-{mode}-{label}"] = {
                    "compile_and_first_call_s": float(proc.stdout.split()[-1]),
                    "process_s": time.perf_counter() - t0}
    return out


def environment(peak: float) -> dict:
    import numba
    return {"loadavg_before": os.getloadavg(), "cpus": os.cpu_count(), **host_info(),
            "fma_peak_gflops": peak, "python": platform.python_version(),
            "numba": numba.__version__,
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
            "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--reps", type=int, default=3, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--own-process", action="store_true",
                        help="time every case in own processes too (batch 1 always is)")
    parser.add_argument("--profile", action="store_true",
                        help="also record rescompile's per-kernel profile (top 12 printed)")
    parser.add_argument("--compile", action="store_true",
                        help="time compiles cold and warm in fresh processes")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    peak = fma_peak_gflops(host_target(), THREADS)
    env = environment(peak)
    print(f"{format_host(env)}\nload average {env['loadavg_before']}, {env['cpus']} CPUs, "
          f"FMA peak {peak:.0f} GFLOP/s on {THREADS} threads")
    peers = () if args.no_peers else tuple(PEERS)
    results = []
    for name in args.cases:
        result, exe = run_case(name, args.reps, args.rounds, peers, peak, args.own_process)
        result["loadavg_after"] = os.getloadavg()
        results.append(result)
        print(f"{name} (load {result['loadavg_after'][0]:.2f})", flush=True)
        print("\n".join("  " + line for line in format_rows(result["rows"])), flush=True)
        for who, used in result["step_memory_bytes"].items():
            print(f"  step memory {who}: {used / 2**20:.0f} MiB" if isinstance(used, int)
                  else f"  step memory {who}: {used}")
        if args.profile and hasattr(exe.program, "start_profile"):
            result["profile"] = profile(exe, name)
    out = {"environment": env, "results": results}
    if args.compile:
        out["compile"] = compile_times(args.cases)
        for k, v in out["compile"].items():
            print(f"compile {k}: {v['compile_and_first_call_s']:.1f} s")
    out["loadavg_end"] = os.getloadavg()
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    return 0


def profile(exe, name) -> list:
    """Per-step milliseconds, FLOP rates and bytes of one more call, slowest first."""
    preset, mode, n = CASES[name]
    rng = np.random.default_rng(0)
    images = rng.standard_normal((n, *exe.spec.model.input)).astype(np.float32)
    exe.program.start_profile()
    if mode == "infer":
        exe.forward(images)
    else:
        exe.train_step(images, rng.integers(0, exe.spec.model.num_classes, n))
    rows = exe.program.profile_rows(n)
    exe.program.profile = None
    print(f"  profile {name}: {sum(r['ms'] for r in rows):.1f} ms in {len(rows)} steps")
    print("\n".join("    " + line for line in text_table(PROFILE_COLUMNS, rows[:12])))
    return rows


if __name__ == "__main__":
    sys.exit(main())
