"""Whole-model CPU timings: rescompile's cpu backend beside PyTorch eager and ONNX Runtime.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \\
        PYTHONPATH=. .venv/bin/python benchmarks/bench_models.py --out bench_models.json

(leave the two variables set to see OpenBLAS's forced Haswell kernels; the report says which
kernel ran). Cases, all float32 on 2 threads, same weights everywhere:

    r164-infer-b128   ResNet-164 (CIFAR) inference, batch 128
    r164-infer-b1     ResNet-164 inference, batch 1
    r164-train-b128   ResNet-164 train step (forward, backward, momentum update), batch 128
    r50-infer-b1      ResNet-50 (ImageNet, 224x224) inference, batch 1

PyTorch: the unoptimised rescompile graph run op by op with torch.nn.functional (eager),
channels_last, torch.set_num_threads(2); its train step is SGD with momentum and the same L2
term (rescompile.interop.torch_model). ONNX Runtime: the same unoptimised graph written as an
ONNX model (rescompile.interop.onnx_model: NCHW, BN unfolded; ORT fuses what it likes),
intra_op_num_threads=2, all graph optimisations. rescompile: the cpu
backend (its numba threads, BLAS held at one thread inside kernels).

Timing: a warm-up call, then `--reps` timed calls per implementation in each of `--rounds`
rounds (A B C, A B C: load drift on a shared machine hits all alike); median, min and max over
all timed calls. The report starts with the load average, CPU count and BLAS libraries.
`--compile` also times compiling ResNet-164 (infer and train) in fresh processes: cold (empty
kernel cache) and warm (the same cache again).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import rescompile  # noqa: E402
from rescompile.bench import ort_runner, torch_runner  # noqa: E402

PRESETS = ROOT / "rescompile" / "presets"
CASES = {  # name -> (preset file, mode, batch)
    "r164-infer-b128": ("resnet164_cifar.toml", "infer", 128),
    "r164-infer-b1": ("resnet164_cifar.toml", "infer", 1),
    "r164-train-b128": ("resnet164_cifar.toml", "train", 128),
    "r50-infer-b1": ("resnet50_imagenet.toml", "infer", 1),
}
THREADS = 2


# -- baselines: the same graph and weights (rescompile.bench, rescompile.interop) --------------
def torch_case(spec, mode, exe, images, labels):
    return torch_runner(spec, exe, mode, images, labels, THREADS)


def ort_case(spec, exe, images):
    return ort_runner(spec, exe, "infer", images, None, THREADS)


# -- timing ---------------------------------------------------------------------------------------
def stats(samples):
    ms = [s * 1e3 for s in samples]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms),
            "samples": len(ms)}


def run_case(name, reps, rounds, want_torch, want_ort, fuse_units):
    preset, mode, n = CASES[name]
    spec = rescompile.load_spec(PRESETS / preset)
    start = time.perf_counter()
    exe = rescompile.compile(spec, mode=mode, backend="cpu", fuse_units=fuse_units)
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
    impls = {"rescompile": ours}
    check = {}
    if want_torch:
        impls["torch"] = torch_case(spec, mode, exe, images, labels)
    if want_ort and mode == "infer":
        try:
            impls["onnxruntime"] = ort_case(spec, exe, images)
        except ImportError:
            pass
    for impl, fn in impls.items():
        got = fn()  # warm-up; also the agreement check
        if mode == "infer":
            check[impl] = float(np.abs(got - first).max() / max(np.abs(first).max(), 1e-30))
    samples = {impl: [] for impl in impls}
    for _ in range(rounds):
        for impl, fn in impls.items():
            fn()
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                samples[impl].append(time.perf_counter() - t0)
    result = {"case": name, "batch": n, "mode": mode, "compile_and_first_call_s": compile_s,
              "fuse_units": fuse_units, "impls": {k: stats(v) for k, v in samples.items()}}
    if check:
        result["max_rel_diff_vs_rescompile"] = check
    ours_ms = result["impls"]["rescompile"]["median_ms"]
    result["speedup_vs"] = {k: v["median_ms"] / ours_ms for k, v in result["impls"].items()
                            if k != "rescompile"}
    return result, exe


def compile_times(cases) -> dict:
    """Compile ResNet-164 infer and train in fresh processes: empty cache, then warm."""
    script = ("import sys, time, numpy as np; sys.path.insert(0, {root!r}); import rescompile;"
              "t = time.perf_counter();"
              "e = rescompile.compile(rescompile.load_spec({preset!r}), mode={mode!r},"
              " backend='cpu', cache_dir={cache!r});"
              "x = np.zeros((2, 32, 32, 3), np.float32);"
              "e.forward(x) if {mode!r} == 'infer' else e.train_step(x, [0, 1]);"
              "print(time.perf_counter() - t)")
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        for mode in ("infer", "train"):
            for label in ("cold", "warm"):
                code = script.format(root=str(ROOT), preset=str(PRESETS / "resnet164_cifar.toml"),
                                     mode=mode, cache=cache)
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                      text=True, check=True)
                out[f"r164-{mode}-{label}"] = {"compile_and_first_call_s":
                                               float(proc.stdout.split()[-1]),
                                               "process_s": time.perf_counter() - t0}
    return out


def environment() -> dict:
    from threadpoolctl import threadpool_info

    import numba
    from rescompile.backends.cpu import blas
    blas.set_blas_threads(1)
    return {
        "loadavg_before": os.getloadavg(), "cpus": os.cpu_count(), "python":
        platform.python_version(), "numba": numba.__version__,
        "numba_threading_layer": numba.config.THREADING_LAYER,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE"),
        "blas": [{k: lib.get(k) for k in ("filepath", "internal_api", "architecture",
                                           "version", "num_threads")}
                 for lib in threadpool_info() if lib["user_api"] == "blas"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--reps", type=int, default=3, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-ort", action="store_true")
    parser.add_argument("--no-fuse-units", action="store_true",
                        help="rescompile without cross-layer unit kernels")
    parser.add_argument("--profile", action="store_true",
                        help="also record rescompile's per-kernel profile (top 12 printed)")
    parser.add_argument("--compile", action="store_true",
                        help="time ResNet-164 compiles cold and warm in fresh processes")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    env = environment()
    print(f"load average {env['loadavg_before']}, {env['cpus']} CPUs, numba "
          f"{env['numba']} ({env['numba_threading_layer']})")
    print(f"OPENBLAS_CORETYPE={env['OPENBLAS_CORETYPE']} "
          f"OPENBLAS_L2_SIZE={env['OPENBLAS_L2_SIZE']}")
    for lib in env["blas"]:
        print(f"  BLAS {Path(lib['filepath']).name}: {lib['internal_api']} {lib['version']} "
              f"kernel={lib['architecture']} threads={lib['num_threads']}")
    results = []
    for name in args.cases:
        result, exe = run_case(name, args.reps, args.rounds, not args.no_torch, not args.no_ort,
                               not args.no_fuse_units)
        result["loadavg_after"] = os.getloadavg()
        results.append(result)
        line = "  ".join(f"{k} {v['median_ms']:.1f} ms [{v['min_ms']:.1f}-{v['max_ms']:.1f}]"
                         for k, v in result["impls"].items())
        ratios = "  ".join(f"{v:.2f}x vs {k}" for k, v in result["speedup_vs"].items())
        print(f"{name:16s} {line}  | rescompile {ratios} "
              f"(compile+first {result['compile_and_first_call_s']:.1f} s, "
              f"load {result['loadavg_after'][0]:.2f})", flush=True)
        if args.profile:
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


def profile(exe, name) -> dict:
    """Per-step seconds of one more call, by kernel step, largest first."""
    preset, mode, n = CASES[name]
    rng = np.random.default_rng(0)
    images = rng.standard_normal((n, *exe.spec.model.input)).astype(np.float32)
    exe.program.profile = {}
    if mode == "infer":
        exe.forward(images)
    else:
        exe.train_step(images, rng.integers(0, exe.spec.model.num_classes, n))
    prof, exe.program.profile = exe.program.profile, None
    total = sum(s for _, s in prof.values())
    top = sorted(prof.items(), key=lambda kv: -kv[1][1])
    print(f"  profile {name}: {total * 1e3:.1f} ms in {len(prof)} steps")
    for step, (calls, secs) in top[:12]:
        print(f"    {secs * 1e3:8.2f} ms  {step}")
    return {k: v[1] for k, v in prof.items()}


if __name__ == "__main__":
    sys.exit(main())
