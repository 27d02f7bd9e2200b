"""dtype="bfloat16" end to end: what the user sees (float32 in and out), the reference
backend's rounding, the CPU backend against float32 and against the bfloat16 reference on
random specs and on the TF oracle's model, training, memory, checkpoints, artifacts, the CLI,
and the cuda backend's refusal (1 and 2 threads: test_cpu_program.py).

Tolerances (README, Numerics), each measured here:
- logits within 2e-2 of float32's, relative to the largest: rounding every activation and
  weight to bfloat16 (8 bits of mantissa, half an ulp = 2^-9 = 2e-3 relative) leaves errors
  of a few 1e-3 in a ResNet's logits (PyTorch's autocast measured 3e-3 on ResNet-50 and 7e-3
  on ResNet-164; here about 1e-2 on the oracle's model, 1e-3 to 1e-2 on random specs).
- the CPU kernels against the bfloat16 reference: logits within 2e-2 as well (the two round
  at the same points; where a float32 sum lies near a rounding boundary, its different
  summation order moves it one ulp, and that spreads; measured up to 2e-3).
- random specs: 5e-2 against the bfloat16 reference, and against float32 no further than
  the reference is plus 5e-2. Their smallest nets (2 x 2 images of 1 channel, layers of 2 to
  8 channels into 4 classes) average nothing: the bfloat16 reference itself was 6.0e-2 from
  float32 on one of them (17 x 21 x 1 images, an ImageNet stem), and on another (8 x 8 x 1,
  leaky ReLU) the AVX2 kernels were 2.7e-2 from the reference, the SSE2 kernels 2e-3: the
  first layer where the two differ does so by one bfloat16 ulp in 3 of 32 values (a float32
  sum's order moving it across a rounding boundary), which the next layers' few channels
  amplify; real ResNets stay under 2e-2 (the oracle's model, above).
- the train-mode loss within 1e-2 of float32's (relative).
- gradients: cosine similarity to float32's of at least 0.98 for the whole gradient, and of
  at least 0.9 for every tensor. The 0.99 per tensor that was asked for does not hold for any
  bfloat16 scheme on these models at initialisation: the gradients of some batch-norm gammas
  and betas are nearly zero in exact arithmetic (a batch norm after a convolution removes a
  per-channel shift) and made of cancelling terms. Perturbing only the conv weights by a
  relative 1.1e-3 (bfloat16's rounding) in float64 moves the oracle model's worst tensor to
  cosine 0.978 and the whole gradient to 0.9955; PyTorch's autocast (bfloat16 convolutions,
  float32 batch norm) gives a worst tensor of 0.937 on the oracle's model and its 4 images,
  rescompile 0.954 per tensor and 0.988 for the whole gradient.
"""

import json
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import rescompile as rc
from rescompile.errors import UsageError
from conftest import oracle_params, random_bn_state, rel_err, tiny_spec
from strategies import small_specs

LOGITS_TOL = 2e-2
TINY_LOGITS_TOL = 5e-2  # random specs, down to 2 x 2 x 1 images (see above)
LOSS_TOL = 1e-2
GRADIENT_COSINE = 0.98  # the whole gradient (see above)
TENSOR_COSINE = 0.9  # each tensor (see above)


def cosine(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))


def assert_gradients_close(grads, expected):
    names = sorted(expected)
    whole = cosine(np.concatenate([np.ravel(grads[n]) for n in names]),
                   np.concatenate([np.ravel(expected[n]) for n in names]))
    assert whole >= GRADIENT_COSINE, whole
    worst = min(names, key=lambda n: cosine(grads[n], expected[n]))
    assert cosine(grads[worst], expected[worst]) >= TENSOR_COSINE, worst


def _compiled(spec, mode, backend, dtype, state=None, **options):
    exe = rc.compile(spec, mode=mode, backend=backend, dtype=dtype, seed=1, **options)
    exe.load_params(state if state is not None else random_bn_state(exe, seed=2))
    return exe


def test_the_user_sees_float32():
    """Images are taken as float32 (float64 too, cast), logits, gradients and params come back
    as float32, and the variables are kept in float32."""
    exe = _compiled(tiny_spec(), "train", "cpu", "bfloat16")
    x = np.random.default_rng(0).standard_normal((3, 8, 8, 3))
    assert exe.dtype == "bfloat16" and exe.forward(x).dtype == np.float32
    loss, grads = exe.loss_and_grads(x, [0, 1, 2])
    assert all(g.dtype == np.float32 for g in grads.values())
    assert all(v.dtype == np.float32 for v in exe.state.values())
    assert isinstance(exe.train_step(x, [0, 1, 2]), float)
    with pytest.raises(rc.InputError, match="beyond bfloat16's range"):
        exe.forward(np.full((1, 8, 8, 3), 3.39999e38, np.float32))


def test_a_call_converts_only_what_is_stored_narrower(monkeypatch):
    """A call feeds every variable; after the first, only the fed values stored in bfloat16
    (the images) are looked at and converted, not the hundreds of float32 variables."""
    from rescompile.backends.cpu.program import CpuProgram
    exe = rc.compile(tiny_spec(), backend="cpu", dtype="bfloat16")
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3))
    exe.forward(x)
    seen = []
    original = CpuProgram.stored
    monkeypatch.setattr(CpuProgram, "stored",
                        lambda self, name, array: seen.append(name) or original(self, name, array))
    logits = exe.forward(x)
    assert seen and all(exe.program.types.of(name) == "bfloat16" for name in seen)
    monkeypatch.undo()
    np.testing.assert_array_equal(logits, exe.forward(x))


def test_the_reference_rounds_where_the_kernels_store():
    """Every activation the reference backend makes is a bfloat16 value (its float32 bits end
    in 16 zeros); the variables are not rounded."""
    exe = _compiled(tiny_spec(unit="bottleneck"), "infer", "reference", "bfloat16")
    x = np.random.default_rng(1).standard_normal((2, 8, 8, 3)).astype(np.float32)
    exe.forward(x)
    values = exe.program.values("forward")
    activations = [v for v in values if exe.graph.values[v].shape[:1] == ("N",)
                   and len(exe.graph.values[v].shape) == 4]
    assert activations
    for name in activations:
        assert not (np.asarray(values[name], np.float32).view(np.uint32) & 0xFFFF).any(), name
    assert any(np.asarray(v, np.float32).view(np.uint32).any() & 0xFFFF
               for v in exe.params.values())


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_oracle_model_logits_and_gradients(backend, seed_spec, oracle):
    """The TF oracle's model and weights: bfloat16 logits against float32's, and training's
    loss and gradients."""
    results = {}
    for dtype in ("float32", "bfloat16"):
        exe = rc.compile(seed_spec, mode="train", backend=backend, dtype=dtype)
        exe.load_params(oracle_params(oracle, exe.params))
        logits = exe.forward(oracle["images"])
        results[dtype] = (logits,) + exe.loss_and_grads(oracle["images"],
                                                        oracle["label_index"])
    (logits32, loss32, grads32), (logits16, loss16, grads16) = results.values()
    assert rel_err(logits16, logits32) < LOGITS_TOL
    assert abs(loss16 - loss32) < LOSS_TOL * abs(loss32)
    assert_gradients_close(grads16, grads32)


def test_oracle_model_inference_cpu_against_the_bf16_reference(seed_spec, oracle):
    exes = [rc.compile(seed_spec, backend=b, dtype="bfloat16") for b in ("cpu", "reference")]
    for exe in exes:
        exe.load_params(oracle_params(oracle, exe.params))
    cpu, reference = (exe.forward(oracle["images"]) for exe in exes)
    assert rel_err(cpu, reference) < LOGITS_TOL


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=small_specs(), batch=st.integers(1, 5), seed=st.integers(0, 2 ** 16))
def test_random_specs_logits(spec, batch, seed):
    """Any stem, unit, padding, stride and odd size, at any batch: the CPU's bfloat16 logits
    against float32's and against the bfloat16 reference."""
    x = np.random.default_rng(seed).standard_normal((batch, *spec.model.input))
    float32 = _compiled(spec, "infer", "cpu", "float32")
    state = float32.params
    cpu = _compiled(spec, "infer", "cpu", "bfloat16", state)
    reference = _compiled(spec, "infer", "reference", "bfloat16", state)
    logits, expected, exact = cpu.forward(x), reference.forward(x), float32.forward(x)
    assert rel_err(logits, expected) < TINY_LOGITS_TOL
    assert rel_err(logits, exact) < rel_err(expected, exact) + TINY_LOGITS_TOL


@pytest.mark.parametrize("isa", [None, "avx512", "avx2", "portable"])
def test_every_instruction_set_against_the_bf16_reference(isa):
    """The host's kernels (vdpbf16ps where it has AVX512-BF16) and every narrower set (float32
    FMAs on bfloat16 storage): a training step's logits, loss and gradients, and inference."""
    from rescompile.backends.cpu.target import host_target, target_for
    if isa is not None:
        try:
            target_for(isa)
        except ValueError:
            pytest.skip(f"this CPU ({host_target().name}) cannot run {isa}")
    _train_against_the_reference(isa=isa)


def _train_against_the_reference(spec=None, **options):
    """A model's logits, loss and gradients on the cpu backend (compiled with `options`)
    against the bfloat16 reference, and its inference; the cpu executable. By default a
    bottleneck model."""
    spec = spec or tiny_spec(unit="bottleneck", input=[9, 9, 3])
    x = np.random.default_rng(3).standard_normal((4, *spec.model.input))
    reference = _compiled(spec, "train", "reference", "bfloat16")
    cpu = _compiled(spec, "train", "cpu", "bfloat16", reference.params, **options)
    assert rel_err(cpu.forward(x), reference.forward(x)) < LOGITS_TOL
    loss, grads = cpu.loss_and_grads(x, [0, 1, 2, 3])
    ref_loss, ref_grads = reference.loss_and_grads(x, [0, 1, 2, 3])
    assert abs(loss - ref_loss) < LOSS_TOL * abs(ref_loss)
    assert_gradients_close(grads, ref_grads)
    infer = _compiled(spec, "infer", "cpu", "bfloat16", reference.params, **options)
    expected = _compiled(spec, "infer", "reference", "bfloat16", reference.params).forward(x)
    assert rel_err(infer.forward(x), expected) < LOGITS_TOL
    return cpu


@pytest.mark.parametrize("optimize", [True, False])
def test_basic_units_with_the_pooled_shortcut_against_the_bf16_reference(optimize):
    """The seed's basic unit with its pooled, padded shortcut: read through its pool in the
    epilogue of the conv that adds it and spread back in one kernel (optimize=True), or pooled
    and padded by kernels of their own (optimize=False); every kernel reads and writes the
    shortcut and its gradient as stored, bfloat16."""
    from rescompile.backends.cpu.llvm.pixelwise import PoolPadKernel, SpreadKernel
    cpu = _train_against_the_reference(tiny_spec(unit="basic", shortcut="pool_pad"),
                                       optimize=optimize)
    steps = cpu.program.plan("train_step").schedule.kernel_steps
    pooled = [(s, o.role) for s in steps for chain in getattr(s.kernel, "chains", [])
              for o in chain.operands if o.kind == "pooled"]
    own = [s for s in steps if isinstance(s.kernel, PoolPadKernel)]
    assert (bool(pooled), bool(own)) == (optimize, not optimize)
    spread = [s for s in steps if isinstance(s.kernel, SpreadKernel)]
    assert spread
    for step, role in pooled:
        assert step.kernel.element(role) == "bfloat16", step.name
    for step in own + spread:
        assert {p.dtype for p in step.kernel.signature.pointers} == {"bfloat16"}, step.name


def test_the_host_uses_its_bf16_instructions():
    """Where the host has AVX512-BF16, every conv of a bfloat16 model with an even input
    channel count multiplies with vdpbf16ps, an odd one (the 3-channel images) with FMAs;
    float32 models never do."""
    from rescompile.backends.cpu.llvm.conv import ConvKernel
    from rescompile.backends.cpu.target import host_target
    if not host_target().has("avx512_bf16"):
        pytest.skip("the host has no AVX512-BF16")
    exe = rc.compile(tiny_spec(unit="bottleneck"), backend="cpu", dtype="bfloat16")
    convs = [s for s in exe.program.schedule.kernel_steps if isinstance(s.kernel, ConvKernel)]
    for step in convs:
        cin = step.fields["cin"]
        bf16_input = step.kernel.input_type == "bfloat16"
        assert step.kernel.dot == ("dpbf16" if bf16_input and cin % 2 == 0 else "fma"), step
    assert {s.kernel.dot for s in convs} == {"dpbf16", "fma"}
    float32 = rc.compile(tiny_spec(unit="bottleneck"), backend="cpu")
    assert {s.kernel.dot for s in float32.program.schedule.kernel_steps
            if isinstance(s.kernel, ConvKernel)} == {"fma"}


def test_the_host_pairs_the_pixels_of_bf16_weight_gradients():
    """Where the host has AVX512-BF16, every weight gradient of a bfloat16 train step (the
    stem's, on the 3-channel images, too) multiplies pairs of pixels with vdpbf16ps, with a
    prologue or without; a float32 step's never."""
    from rescompile.backends.cpu.llvm.wgrad import WgradKernel
    from rescompile.backends.cpu.target import host_target
    if not host_target().has("avx512_bf16"):
        pytest.skip("the host has no AVX512-BF16")
    dots = {}
    for dtype in ("bfloat16", "float32"):
        exe = rc.compile(tiny_spec(unit="bottleneck"), mode="train", backend="cpu", dtype=dtype)
        wgrads = [s.kernel for s in exe.program.plan("train_step").schedule.kernel_steps
                  if isinstance(s.kernel, WgradKernel)]
        assert any(k.prologue for k in wgrads) and any(not k.prologue for k in wgrads)
        dots[dtype] = {k.dot for k in wgrads}
    assert dots == {"bfloat16": {"dpbf16"}, "float32": {"fma"}}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_fma_kernels_stage_the_rows_of_bf16_one_by_one_convs(dtype):
    """On FMA kernels (AVX2 here) every 1 x 1 conv reading a bfloat16 input stages its rows
    widened to float32 (`ConvKernel.stages_rows`), so its k loop widens nothing; a wider
    window widens in its k loop. A float32 model stages only the rows a prologue makes."""
    from rescompile.backends.cpu.llvm.conv import ConvKernel
    from rescompile.backends.cpu.target import target_for
    try:
        target_for("avx2")
    except Exception:
        pytest.skip("this CPU cannot run avx2")
    staged = set()
    for mode in ("infer", "train"):
        exe = rc.compile(tiny_spec(unit="bottleneck"), mode=mode, backend="cpu", dtype=dtype,
                         isa="avx2")
        for plan in exe.program.plans.values():
            for step in plan.schedule.kernel_steps:
                kernel = step.kernel
                if type(kernel) is not ConvKernel:
                    continue
                one_by_one = step.fields["kh"] == step.fields["kw"] == 1
                widened = one_by_one and kernel.input_type == "bfloat16"
                assert kernel.stages_rows == (widened or bool(kernel.prologue)), step.name
                assert kernel.widens == (kernel.input_type == "bfloat16"
                                         and not kernel.stages_rows), step.name
                staged.add((one_by_one, kernel.stages_rows))
    assert (True, True) in staged and (False, False) in staged


def test_activations_take_half_the_bytes_of_float32():
    """bfloat16 is stored as bfloat16: every activation's buffer in the arena is exactly half
    of float32's (the pooled features and the logits, float32 in both, are not), and so is
    the per-thread region they fill; the weights of the pair kernels (vdpbf16ps, AMX) are
    half too (the FMA kernels read bfloat16 values held as float32)."""
    spec = tiny_spec(unit="bottleneck")
    arenas = {}
    for dtype in ("float32", "bfloat16"):
        exe = rc.compile(spec, backend="cpu", dtype=dtype)
        exe.forward(np.zeros((5, 8, 8, 3), np.float32))
        (arenas[dtype],) = exe.program.arenas.values()
    f32, bf16 = arenas["float32"], arenas["bfloat16"]
    graph = exe.graph
    activations = [v for v in f32.image_bytes
                   if len(graph.value(v.split(":")[0]).shape) == 4]
    assert len(activations) > 10
    for value in activations:
        assert 2 * bf16.image_bytes[value] == f32.image_bytes[value], value
    pairs = [s for s in bf16.schedule.kernel_steps if getattr(s.kernel, "dot", "fma") != "fma"]
    for step in pairs:
        assert 2 * bf16.program.packed_bytes(step.uses["w"]) == f32.program.packed_bytes(
            next(u for s in f32.schedule.kernel_steps if s.name == step.name
                 for r, u in s.uses.items() if r == "w"))
    assert bf16.thread_region.nbytes * 2 == pytest.approx(f32.thread_region.nbytes, rel=0.02)


def test_training_converges_and_stays_close_to_float32():
    """A few momentum steps in bfloat16 follow float32's losses (float32 master weights and
    optimizer slots; the update in float32)."""
    spec = tiny_spec(unit="bottleneck")
    rng = np.random.default_rng(4)
    x, labels = rng.standard_normal((8, 8, 8, 3)), rng.integers(0, 5, 8)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        exe = rc.compile(spec, mode="train", backend="cpu", dtype=dtype, seed=5)
        losses[dtype] = [exe.train_step(x, labels) for _ in range(6)]
    assert losses["bfloat16"][-1] < losses["bfloat16"][0]
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=LOSS_TOL)


def test_checkpoint_holds_float32_and_loads_in_either_dtype(tmp_path):
    """A bfloat16 checkpoint holds float32 variables and says bfloat16 in its manifest; it
    loads into a float32 executable and back, the variables unchanged."""
    exe = _compiled(tiny_spec(), "train", "cpu", "bfloat16")
    x = np.random.default_rng(6).standard_normal((2, 8, 8, 3))
    exe.train_step(x, [0, 1])
    exe.save(tmp_path / "ckpt.npz")
    with np.load(tmp_path / "ckpt.npz") as z:
        manifest = json.loads(z["__manifest__"].tobytes())
        assert manifest["dtype"] == "bfloat16"
        assert {z[k].dtype for k in z.files if k.startswith("var/")} == {np.dtype(np.float32)}
    as32 = rc.load(tmp_path / "ckpt.npz", backend="cpu", dtype="float32")
    assert as32.dtype == "float32" and as32.step == 1
    as32.save(tmp_path / "f32.npz")
    back = rc.load(tmp_path / "f32.npz", backend="cpu", dtype="bfloat16")
    again = rc.load(tmp_path / "ckpt.npz", backend="cpu")
    assert again.dtype == "bfloat16"
    for name, value in exe.state.items():
        np.testing.assert_array_equal(as32.state[name], value)
        np.testing.assert_array_equal(back.state[name], value)
    np.testing.assert_array_equal(back.forward(x), again.forward(x))


def test_artifact_records_bfloat16_and_loads_in_either_dtype(tmp_path):
    from rescompile.artifact import save_artifact
    exe = _compiled(tiny_spec(), "infer", "cpu", "bfloat16")
    save_artifact(exe, tmp_path / "m.rcx")
    with zipfile.ZipFile(tmp_path / "m.rcx") as z:
        assert json.loads(z.read("manifest.json"))["dtype"] == "bfloat16"
    x = np.random.default_rng(7).standard_normal((2, 8, 8, 3))
    loaded = rc.load(tmp_path / "m.rcx")
    assert loaded.dtype == "bfloat16"
    np.testing.assert_array_equal(loaded.forward(x), exe.forward(x))
    as32 = rc.load(tmp_path / "m.rcx", dtype="float32")
    assert as32.dtype == "float32" and rel_err(as32.forward(x), exe.forward(x)) < LOGITS_TOL


def test_cuda_refuses_bfloat16_in_one_line():
    with pytest.raises(UsageError, match="cuda backend does not run bfloat16") as caught:
        rc.compile(tiny_spec(), backend="cuda", dtype="bfloat16")
    assert "\n" not in str(caught.value)


def test_cli_takes_bfloat16(tmp_path, capsys):
    from rescompile.cli import main
    assert main(["run", "--dtype", "bfloat16", "--batch", "2", _spec_file(tmp_path)]) == 0
    assert "bfloat16" in capsys.readouterr().out
    out = tmp_path / "m.rcx"
    assert main(["compile", _spec_file(tmp_path), "--dtype", "bfloat16", "-o", str(out)]) == 0
    assert "bfloat16" in capsys.readouterr().out
    assert main(["check", _spec_file(tmp_path), "--dtype", "bfloat16"]) == 0


def _spec_file(tmp_path) -> str:
    path = tmp_path / "tiny.toml"
    if not path.exists():
        path.write_text(tiny_spec().to_toml())
    return str(path)


def test_the_readme_digits_job_in_bfloat16(capsys):
    """The README's first command with --dtype bfloat16: 400 steps of the digits ResNet reach
    at least 97% test accuracy (98.6% measured; float32 reaches 98%; about 25 s here)."""
    import re
    from pathlib import Path
    from rescompile.cli import main
    spec = Path(__file__).parents[1] / "examples" / "digits.toml"
    assert main(["train", str(spec), "--data", "digits", "--dtype", "bfloat16"]) == 0
    accuracy = re.findall(r"^test accuracy ([\d.]+)%", capsys.readouterr().out, re.M)
    assert accuracy and float(accuracy[-1]) >= 97.0, accuracy


def test_a_model_on_emulated_amx_kernels(monkeypatch):
    """The lowering as on an AMX host (every bfloat16 conv on AMX tiles, 32 x 32 blocks, the
    weights in AMX's layout, the data gradients' rotated ones too), with the tile
    instructions emulated (vdpbf16ps): inference and a training step's gradients against
    the bfloat16 reference, as every other instruction set."""
    import functools
    from rescompile.backends.cpu import kernel_steps
    from rescompile.backends.cpu.llvm.amx import AmxConvKernel
    from rescompile.backends.cpu.target import host_target
    if not host_target().has("avx512_bf16"):
        pytest.skip("the emulation runs on AVX512-BF16")
    monkeypatch.setattr(kernel_steps, "conv_dot", lambda types, target, x, cin:
                        "amx" if types.of(x) == "bfloat16" else "fma")
    monkeypatch.setattr(kernel_steps, "AmxConvKernel",
                        functools.partial(AmxConvKernel, emulated=True))
    cpu = _train_against_the_reference()
    assert "amx" in {s.kernel.dot for s in cpu.program.plan("train_step").schedule.kernel_steps
                     if hasattr(s.kernel, "dot")}
