"""GPU check for backend='cuda': parity against the reference, then timings beside PyTorch.

    python benchmarks/gpu_check.py --out gpu_check.json          # one H100, about 5 minutes
    NUMBA_ENABLE_CUDASIM=1 python benchmarks/gpu_check.py --quick  # a smoke run, no GPU

1. Parity at a medium size (seed-small: 16x16 images, 2 units per stage, batch 8), float32 and
   float64: forward in infer and train mode, loss and every gradient, one train step (new
   variables), each against the reference backend in float64, as the largest error relative to
   the tensor's max; the bound is 1e-4 in float32 and 1e-9 in float64 (ULP-level differences
   of reassociated sums over a few thousand terms, with room).
2. Timings (median of repeated calls, after warm-up; compile time reported apart): ResNet-164
   inference and a train step at batch 128, ResNet-50 inference at batch 32, with the launches
   per call and a profile of one more call (every launch synchronised and timed; the slowest
   nodes). PyTorch runs the same model with the same weights (the unoptimised rescompile graph
   interpreted op by op in torch, float32, TF32 off) on the same card in the same run; its rows
   are skipped when torch or its CUDA is missing.
Everything measured, with the card, driver and CUDA versions, goes into the --out JSON file.
Estimate on an H100-class card: under 2 minutes of compiling (about 25 distinct kernels, cold
Numba cache), parity in seconds, timings 3 cases x 12 calls of at most 0.5 s each beside torch:
within 5 minutes, the 8-minute device limit leaving room.
Needs only the project and, optionally, torch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import rescompile  # noqa: E402

PRESETS = ROOT / "rescompile" / "presets"
TINY = {"name": "tiny", "model": {
    "input": [8, 8, 3], "num_classes": 10, "stem": "cifar", "stem_filters": 4,
    "unit": "bottleneck", "preactivation": True, "stride_on": "conv1", "padding": "same",
    "stages": [{"filters": 8, "units": 1, "stride": 1}, {"filters": 16, "units": 1, "stride": 2}],
    "activate_before_residual": [True, False], "relu_leakiness": 0.1}}


def batch(spec_input, n, classes, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, *spec_input)).astype(np.float32),
            rng.integers(0, classes, n))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) or 1.0))


# -- parity -----------------------------------------------------------------------------------
BOUNDS = {"float32": 1e-4, "float64": 1e-9}
PROFILE_ROWS = 15


def parity(spec, n, dtype) -> dict:
    """Largest error relative to the tensor's max, per check, against float64 reference."""
    out = {}
    for mode in ("infer", "train"):
        cuda = rescompile.compile(spec, mode=mode, backend="cuda", dtype=dtype)
        ref = rescompile.compile(spec, mode=mode, backend="reference", dtype="float64")
        ref.load_state({k: v for k, v in cuda.state.items()})
        images, labels = batch(cuda.spec.model.input, n, cuda.spec.model.num_classes)
        out[f"{mode} forward"] = rel_err(cuda.forward(images), ref.forward(images))
        if mode == "train":
            loss_c, grads_c = cuda.loss_and_grads(images, labels)
            loss_r, grads_r = ref.loss_and_grads(images, labels)
            out["loss"] = rel_err(loss_c, loss_r)
            out["gradients"] = max(rel_err(grads_c[k], grads_r[k]) for k in grads_r)
            cuda.train_step(images, labels)
            ref.train_step(images, labels)
            out["train step"] = max(rel_err(cuda.state[k], ref.state[k]) for k in ref.state)
    return out


# -- PyTorch: the same graph, op by op ------------------------------------------------------------
def time_call(fn, sync, repeats) -> float:
    fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return float(np.median(samples)) * 1e3


def timings(spec, mode, n, repeats, torch_ok) -> list[dict]:
    from numba import cuda
    start = time.perf_counter()
    exe = rescompile.compile(spec, mode=mode, backend="cuda")
    images, labels = batch(exe.spec.model.input, n, exe.spec.model.num_classes)
    step = (lambda: exe.forward(images)) if mode == "infer" else \
        (lambda: exe.train_step(images, labels))
    step()
    cuda.synchronize()
    compile_s = time.perf_counter() - start
    counts = exe.program.launch_counts
    entry = "forward" if mode == "infer" else "train_step"
    what = f"{exe.spec.name} {'inference' if mode == 'infer' else 'train step'} batch {n}"
    rows = [{"case": what, "impl": "rescompile cuda", "ms": time_call(step, cuda.synchronize,
                                                                      repeats),
             "compile_s": compile_s, "launches": counts.get(entry),
             "profile": kernel_profile(exe, step)}]
    if torch_ok:
        rows.append({"case": what, "impl": "torch (fp32, no TF32)",
                     "ms": torch_time(spec, mode, exe, images, labels, repeats)})
    return rows


def kernel_profile(exe, step) -> list[dict]:
    """One more call with every launch timed: the slowest nodes, with their share."""
    exe.program.start_profile()
    step()
    table = exe.program.profile
    exe.program.profile = None
    total = sum(seconds for _, seconds in table.values()) or 1.0
    rows = sorted(table.items(), key=lambda item: -item[1][1])[:PROFILE_ROWS]
    return [{"node": node, "launches": n, "ms": seconds * 1e3, "share": seconds / total}
            for node, (n, seconds) in rows]


def torch_time(spec, mode, exe, images, labels, repeats) -> float:
    """The same graph and weights in torch on the GPU (rescompile.interop.torch_model)."""
    import torch
    from rescompile.interop.torch_model import to_nchw, torch_module, train_step_fn
    module = torch_module(spec, exe.params, mode, device="cuda")
    x = to_nchw(images, device="cuda")
    if mode == "train":
        step = train_step_fn(module, spec, x, torch.tensor(labels, device="cuda"))
        return time_call(step, torch.cuda.synchronize, repeats)
    module.eval()
    with torch.no_grad():
        return time_call(lambda: module(x), torch.cuda.synchronize, repeats)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model, batch 2, one repeat (a simulator smoke run)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    try:
        import torch
        torch_ok = torch.cuda.is_available() and not args.quick
        if torch_ok:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
    except ImportError:
        torch_ok = False
    from rescompile.backends.cuda import device
    medium = TINY if args.quick else PRESETS / "seed_small.toml"
    checks = {dtype: parity(medium, 2 if args.quick else 8, dtype) for dtype in BOUNDS}
    passed = all(err <= BOUNDS[dtype] for dtype, errs in checks.items() for err in errs.values())
    for dtype, errs in checks.items():
        for name, err in errs.items():
            print(f"parity {dtype} {name:<16} {err:.2e} "
                  f"{'ok' if err <= BOUNDS[dtype] else 'FAIL'}")
    repeats = 1 if args.quick else args.repeats
    cases = [(TINY, "infer", 2), (TINY, "train", 2)] if args.quick else [
        (PRESETS / "resnet164_cifar.toml", "infer", 128),
        (PRESETS / "resnet164_cifar.toml", "train", 128),
        (PRESETS / "resnet50_imagenet.toml", "infer", 32)]
    rows = [row for spec, mode, n in cases for row in timings(spec, mode, n, repeats, torch_ok)]
    print(f"\n{'case':<44} {'impl':<22} {'ms':>9} {'compile s':>10} {'launches':>9}")
    for r in rows:
        print(f"{r['case']:<44} {r['impl']:<22} {r['ms']:>9.2f} "
              f"{r.get('compile_s', float('nan')):>10.1f} {r.get('launches') or '':>9}")
    for r in rows:
        for p in r.get("profile", [])[:5]:
            print(f"  {r['case'][:30]:<30} {p['node']:<40} {p['ms']:>8.2f} ms {p['share']:>5.0%}")
    if args.out:
        Path(args.out).write_text(json.dumps({"card": device.describe(), "bounds": BOUNDS,
                                              "parity": checks, "passed": passed,
                                              "timings": rows}, indent=2))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
