"""The conv micro-kernel's own GFLOP/s on every distinct layer shape of a model, one thread.

    PYTHONPATH=. .venv/bin/python benchmarks/kernels/bench_layers.py [PRESET ...] [--reps 30]
        [--dtype bfloat16]

Each layer runs as in the depth-first schedule: one call per work item (the segment's images),
on the tuner's random arguments, again and again, so that its tensors come from the caches as
a segment's do. The time is the minimum over `--reps` calls (the machine is shared: the
minimum is the kernel, the rest is other load), beside the FMA peak loop's single-thread
GFLOP/s measured the same way, so the last column is the kernel's share of one core. With
`--dtype bfloat16` the kernels of a bfloat16 model (the host's: vdpbf16ps, or FMAs on
bfloat16 storage); run it beside float32 to see what bfloat16 costs or saves, layer by layer.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import rescompile as rc  # noqa: E402
from rescompile.backends.cpu.arena import Layout  # noqa: E402
from rescompile.backends.cpu.autotune import step_arguments  # noqa: E402
from rescompile.backends.cpu.llvm import jit, measure  # noqa: E402
from rescompile.backends.cpu.llvm.conv import ConvKernel  # noqa: E402
from rescompile.backends.cpu.schedule import build_schedule  # noqa: E402
from rescompile.backends.cpu.target import host_target  # noqa: E402
from rescompile.compiler import lower  # noqa: E402
from rescompile.entries import make_entries  # noqa: E402

_CALL = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                         ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)


def layers(preset: str, dtype: str):
    """(step, images per call, layouts) of every conv step, first of each distinct shape."""
    lowered = lower(rc.preset(preset), "infer", dtype)
    entry = make_entries(lowered.graph, "infer")["forward"]
    schedule = build_schedule(lowered.graph, entry, host_target(), dtype)
    seen = set()
    for segment in schedule.segments:
        for step in schedule.steps[segment.begin:segment.end]:
            if not isinstance(step.kernel, ConvKernel):
                continue
            layouts = {v: Layout(*schedule.shapes[v], schedule.pads.get(v, (0,) * 4))
                       for v in step.tensors.values()}
            key = (step.kernel, tuple(sorted(step.fields.items())),
                   tuple(layouts[v] for v in step.tensors.values()), segment.images)
            if key not in seen:
                seen.add(key)
                yield step, segment.images, layouts


def time_layer(step, images: int, layouts: dict, reps: int) -> float:
    """Seconds of one call on `images` images (the minimum over reps), on the tuner's random
    arguments (`autotune.step_arguments`)."""
    consts, pointers, keep = step_arguments(step, layouts, images)
    fn = _CALL(jit.address(step.kernel))
    args = (consts.ctypes.data, pointers.ctypes.data, 0, images * step.pixels, 0,
            step.channels)
    fn(*args)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - start)
    del keep
    return best


def layer_shape(step, images: int) -> str:
    f = step.fields
    window = f"{f['kh']}x{f['kw']}/{f['stride']}" if "kh" in f else "F(2x2,3x3)"
    return f"{window} {f['cin']}->{step.channels} {f['oh']}x{f['ow']}x{images}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("presets", nargs="*", default=["resnet164_cifar", "resnet50_imagenet"])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    peak = max(measure.fma_peak_gflops(host_target(), 1, seconds=0.05) for _ in range(5))
    print(f"{host_target().cpu} ({host_target().isa}): FMA peak {peak:.1f} GFLOP/s on one core")
    for preset in args.presets:
        print(f"\n{preset}, {args.dtype}")
        print(f"{'layer':<28} {'kernel':<42} {'shape':<26} {'GFLOP/s':>8} {'% core':>7}")
        for step, images, layouts in layers(preset, args.dtype):
            seconds = time_layer(step, images, layouts, args.reps)
            gflops = step.flops * images / seconds / 1e9
            print(f"{step.name[:28]:<28} {step.kernel.symbol[-42:]:<42} "
                  f"{layer_shape(step, images):<26} "
                  f"{gflops:>8.1f} {100 * gflops / peak:>6.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
