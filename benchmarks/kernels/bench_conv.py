"""Time the fused convs of one ResNet-164 bottleneck unit per stage against PyTorch.

Run (AVX-512 OpenBLAS kernels; leave the variables set to see the Haswell ones):
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE NUMBA_THREADING_LAYER=workqueue \
        PYTHONPATH=. .venv/bin/python benchmarks/kernels/bench_conv.py [--batch 128] [--reps 15]

Shapes (NHWC float32, BN folded, pre-activation unit):
    conv1 1x1 C -> C/4, epilogue affine + relu
    conv2 3x3 C/4 -> C/4 (pads 1), epilogue affine + relu
    conv3 1x1 C/4 -> C, epilogue add (residual) + out2 = relu(affine(out))
with C = 64 / 128 / 256 at 32x32 / 16x16 / 8x8.

With --cpu-time: serial kernels + 1 BLAS thread against PyTorch at 1 thread,
timed in this thread's CPU time: per-core efficiency, robust to other load.

Each row also prints the minimum of each timed variant (same order, i2c only
for 3x3): the machine is shared, so compare medians only at low load average.

Variants: "par" = prange over images (workqueue), BLAS at 1 thread;
"ser1"/"ser2" = serial kernel, BLAS at 1/2 threads; "i2c" = 3x3 as chunked
im2col (par, BLAS 1) instead of shifted GEMMs.
PyTorch: channels_last conv2d, torch.set_num_threads(2), conv alone and with the
same epilogue as eager ops.  Medians of --reps calls after a warm-up call.
"""

import argparse
import os
import statistics
import time

import numpy as np

from rescompile.backends.cpu import blas
from rescompile.backends.cpu.conv_codegen import ConvSig, conv_kernel, kernel_arg_names

MINIMA = []  # min of each median_ms call, in call order (a noise check on a shared machine)
STAGES = [("stage1", 32, 64), ("stage2", 16, 128), ("stage3", 8, 256)]


def unit_layers(hw, c):
    b = c // 4
    bn_relu = (("affine",), ("relu", 0.0))
    return [
        ("conv1 1x1", dict(h=hw, w=hw, cin=c, cout=b, k=1, epilogue=bn_relu)),
        ("conv2 3x3", dict(h=hw, w=hw, cin=b, cout=b, k=3, pads=(1, 1, 1, 1), epilogue=bn_relu)),
        ("conv3 1x1", dict(h=hw, w=hw, cin=b, cout=c, k=1, epilogue=(("add",),),
                           has_out2=True)),
    ]


CLOCK = [time.perf_counter]  # --cpu-time swaps in time.thread_time


def median_ms(fn, reps):
    fn()
    times = []
    clock = CLOCK[0]
    for _ in range(reps):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    MINIMA.append(1e3 * min(times))
    return 1e3 * statistics.median(times)


def ours(sig, batch, rng, reps, blas_n=1):
    kernel = conv_kernel(sig)
    f = np.float32
    args = [rng.standard_normal((batch, sig.h, sig.w, sig.cin)).astype(f),
            rng.standard_normal((sig.k, sig.k, sig.cin, sig.cout)).astype(f)]
    for name in kernel_arg_names(sig)[2:]:
        if name.startswith(("res_", "out")):
            args.append(rng.standard_normal((batch, sig.oh, sig.ow, sig.cout)).astype(f))
        else:
            args.append(rng.standard_normal(sig.cout).astype(f))
    with blas.blas_threads(blas_n):
        return median_ms(lambda: kernel(*args), reps)


def torch_times(spec, batch, reps, threads=2):
    import torch
    torch.set_num_threads(threads)
    conv = torch.nn.Conv2d(spec["cin"], spec["cout"], spec["k"], padding=spec.get("pads", (0,))[0],
                           bias=False).to(memory_format=torch.channels_last).eval()
    x = torch.randn(batch, spec["cin"], spec["h"], spec["w"]).to(memory_format=torch.channels_last)
    scale = torch.randn(1, spec["cout"], 1, 1)
    shift = torch.randn(1, spec["cout"], 1, 1)
    res = torch.randn(batch, spec["cout"], spec["h"], spec["w"]).to(
        memory_format=torch.channels_last)

    def epilogue(y):
        if spec.get("has_out2"):
            y = y + res
            return y, torch.relu(y * scale + shift)
        return torch.relu(y * scale + shift)

    with torch.inference_mode():
        conv_only = median_ms(lambda: conv(x), reps)
        fused = median_ms(lambda: epilogue(conv(x)), reps)
    return conv_only, fused


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[128, 1])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--cpu-time", action="store_true",
                        help="one core each: serial kernel + 1 BLAS thread against PyTorch at 1 "
                             "thread, timed by this thread's CPU time (robust on a loaded machine)")
    args = parser.parse_args()
    if args.cpu_time:
        CLOCK[0] = time.thread_time
        return main_cpu_time(args)
    print("load average:", os.getloadavg())
    print("BLAS:", "; ".join(blas.blas_info()))
    print("OPENBLAS_CORETYPE =", os.environ.get("OPENBLAS_CORETYPE"),
          " NUMBA_THREADING_LAYER =", os.environ.get("NUMBA_THREADING_LAYER"))
    rng = np.random.default_rng(0)
    header = (f"{'batch':>5} {'stage':7} {'layer':10} {'GFLOP':>6} {'par ms':>7} {'ser1 ms':>7} {'ser2 ms':>7}"
              f" {'i2c ms':>7} {'torch':>7} {'torch+ep':>8} {'torch/best':>10} {'GFLOP/s':>7}")
    print(header)
    for batch in args.batch:
        for stage, hw, c in STAGES:
            for layer, spec in unit_layers(hw, c):
                gflop = 2 * batch * hw * hw * spec["k"] ** 2 * spec["cin"] * spec["cout"] / 1e9
                par = ours(ConvSig("forward", **spec), batch, rng, args.reps)
                ser1 = ours(ConvSig("forward", parallel=False, **spec), batch, rng, args.reps)
                ser = ours(ConvSig("forward", parallel=False, **spec), batch, rng, args.reps, 2)
                i2c = (ours(ConvSig("forward", strategy="im2col", **spec), batch, rng, args.reps)
                       if spec["k"] > 1 else float("nan"))
                t_conv, t_fused = torch_times(spec, batch, args.reps)
                mins = MINIMA[-6:] if spec["k"] > 1 else MINIMA[-5:]
                best = min(par, ser1, ser)
                print(f"{batch:5d} {stage:7} {layer:10} {gflop:6.3f} {par:7.3f} {ser1:7.3f} {ser:7.3f}"
                      f" {i2c:7.3f} {t_conv:7.3f} {t_fused:8.3f} {t_conv / best:9.2f}x"
                      f" {gflop / best * 1e3:7.1f}   min: " + " ".join(f"{m:.3f}" for m in mins))


def main_cpu_time(args):
    print("load average:", os.getloadavg())
    print("BLAS:", "; ".join(blas.blas_info()))
    print("CPU ms per call, one core each (min over reps in brackets)")
    print(f"{'batch':>5} {'stage':7} {'layer':10} {'ours':>15} {'torch conv':>15} {'torch+epi':>15}"
          f" {'torch/ours':>10} {'GFLOP/s':>7}")
    rng = np.random.default_rng(0)
    for batch in args.batch:
        for stage, hw, c in STAGES:
            for layer, spec in unit_layers(hw, c):
                gflop = 2 * batch * hw * hw * spec["k"] ** 2 * spec["cin"] * spec["cout"] / 1e9
                ours_ms = ours(ConvSig("forward", parallel=False, **spec), batch, rng, args.reps)
                ours_min = MINIMA[-1]
                t_conv, t_fused = torch_times(spec, batch, args.reps, threads=1)
                conv_min, fused_min = MINIMA[-2], MINIMA[-1]
                print(f"{batch:5d} {stage:7} {layer:10} {ours_ms:7.3f} [{ours_min:6.3f}]"
                      f" {t_conv:7.3f} [{conv_min:6.3f}] {t_fused:7.3f} [{fused_min:6.3f}]"
                      f" {t_conv / ours_ms:9.2f}x {gflop / ours_ms * 1e3:7.1f}")


if __name__ == "__main__":
    main()
