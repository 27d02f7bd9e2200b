"""The conv micro-kernel's own GFLOP/s on every distinct layer shape of a model, one thread.

    PYTHONPATH=. .venv/bin/python benchmarks/kernels/bench_layers.py [PRESET ...] [--reps 30]

Each layer runs as in the depth-first schedule: one call per work item (the segment's images),
cycling over 8 items' worth of inputs and outputs so that activations come from the caches
below L1 as they do in a real run; the weights are shared, as they are across images. The
time is the minimum over `--reps` passes (the machine is shared: the minimum is the kernel,
the rest is other load), beside the FMA peak loop's single-thread GFLOP/s measured the same
way, so the last column is the kernel's share of one core.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import rescompile as rc  # noqa: E402
from rescompile.backends.cpu.arena import Layout  # noqa: E402
from rescompile.backends.cpu.llvm import jit, measure  # noqa: E402
from rescompile.backends.cpu.llvm.conv import ConvKernel  # noqa: E402
from rescompile.backends.cpu.weights import pack_weights  # noqa: E402
from rescompile.backends.cpu.schedule import build_schedule  # noqa: E402
from rescompile.backends.cpu.target import host_target  # noqa: E402
from rescompile.compiler import lower  # noqa: E402
from rescompile.entries import make_entries  # noqa: E402

ITEMS = 8
_CALL = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                         ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)


def layers(preset: str):
    """(step, images per call, layouts) of every conv step, first of each distinct shape."""
    lowered = lower(rc.preset(preset), "infer", "float32")
    entry = make_entries(lowered.graph, "infer")["forward"]
    schedule = build_schedule(lowered.graph, entry, host_target(), "float32")
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
    """Seconds of one call on `images` images (the minimum over reps)."""
    kernel, rng = step.kernel, np.random.default_rng(0)
    fields = dict(step.fields)
    for role, value in step.tensors.items():
        lay = layouts[value]
        fields.update({f"{role}.image": lay.image, f"{role}.row": lay.row,
                       f"{role}.pixel": lay.c})
    words = np.array([np.float64(fields[n]).view(np.int64) if isinstance(fields[n], float)
                      else int(fields[n]) for n in kernel.fields], np.int64)
    cin, cout, k = step.fields["cin"], step.channels, step.fields["kh"]
    weights = pack_weights(rng.standard_normal((k, k, cin, cout)).astype(np.float32),
                           kernel.nr)
    items = []
    for _ in range(ITEMS):
        pointers = []
        for role in kernel.pointers:
            use = step.uses[role]
            if role == "w":
                pointers.append(weights.ctypes.data)
                continue
            lay = layouts.get(use.value)
            size = lay.image * images if lay else cout
            array = rng.standard_normal(size).astype(np.float32)
            items.append(array)  # kept alive
            offset = (lay.window(*use.pads) if use.how == "window" else lay.data) if lay else 0
            pointers.append(array.ctypes.data + 4 * offset)
        items.append(np.array(pointers, np.int64))
    blocks = [a for a in items if a.dtype == np.int64]
    fn = _CALL(jit.address(kernel))
    pixels = images * step.pixels
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for block in blocks:
            fn(words.ctypes.data, block.ctypes.data, 0, pixels, 0, cout)
        best = min(best, (time.perf_counter() - start) / len(blocks))
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("presets", nargs="*", default=["resnet164_cifar", "resnet50_imagenet"])
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args(argv)
    peak = max(measure.fma_peak_gflops(host_target(), 1, seconds=0.05) for _ in range(5))
    print(f"{host_target().cpu} ({host_target().isa}): FMA peak {peak:.1f} GFLOP/s on one core")
    for preset in args.presets:
        print(f"\n{preset}")
        print(f"{'layer':<28} {'kernel':<42} {'shape':<26} {'GFLOP/s':>8} {'% core':>7}")
        for step, images, layouts in layers(preset):
            seconds = time_layer(step, images, layouts, args.reps)
            gflops = step.flops * images / seconds / 1e9
            f = step.fields
            shape = (f"{f['kh']}x{f['kw']}/{f['stride']} {f['cin']}->{step.channels} "
                     f"{f['oh']}x{f['ow']}x{images}")
            print(f"{step.name[:28]:<28} {step.kernel.symbol[-42:]:<42} {shape:<26} "
                  f"{gflops:>8.1f} {100 * gflops / peak:>6.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
