"""`rescompile run`: compile a spec, run one forward pass on a seeded batch, say what it did."""

import math
import time

import numpy as np

from ..dump import summary
from ..runtime import compile
from ..resources import check_fits
from .common import add_model, positive_int, resolve_spec, seed_int


def register(sub) -> None:
    p = sub.add_parser("run", help="compile and run a forward pass on a seeded random batch")
    add_model(p)
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--seed", type=seed_int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    spec = resolve_spec(args.spec)
    start = time.perf_counter()
    exe = compile(spec, mode=args.mode, backend=args.backend, dtype=args.dtype, seed=args.seed)
    compiled = time.perf_counter() - start
    # the images as the user passes them: float32 for a bfloat16 model
    check_fits(args.batch * math.prod(spec.model.input) * np.dtype(exe.array_dtype).itemsize
               * 2, f"--batch {args.batch}: the images")
    images = np.random.default_rng(args.seed).standard_normal(
        (args.batch, *spec.model.input)).astype(exe.array_dtype)
    start = time.perf_counter()
    logits = exe.forward(images)
    ran = time.perf_counter() - start
    info = summary(exe.lowered.model.graph)
    print(f"spec        {spec.name} ({args.mode}, {args.dtype}, backend {args.backend})")
    print(f"parameters  {info['trainable_params']:,} trainable")
    print(f"FLOPs       {info['flops_per_image']['forward'] / 1e9:.4g} G per image")
    print(f"graph       {len(exe.graph.nodes)} nodes after {exe.lowered.stages[-1][0]}")
    print(f"compile     {compiled:.2f} s")
    print(f"forward     batch {args.batch}: {ran * 1e3:.1f} ms -> logits {list(logits.shape)}")
    print(f"prediction  {np.argmax(logits, axis=1).tolist()}")
    return 0
