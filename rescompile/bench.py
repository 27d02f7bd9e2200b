"""Benchmarks: compile time (cold and warm), run time as median/min/max of several runs,
throughput, GFLOP/s and its share of the machine's measured GEMM rate, memory, and the same
model in PyTorch (eager, channels_last) and ONNX Runtime in the same run, as ratios.

The machine is shared and noisy: only medians and ratios measured in one run mean anything.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .dump import summary
from .runtime import compile


@dataclass
class Timing:
    median_s: float
    min_s: float
    max_s: float
    runs: int

    @classmethod
    def of(cls, fn, repeats: int, warmup: int = 1) -> "Timing":
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return cls(float(np.median(times)), min(times), max(times), repeats)


@dataclass
class Report:
    spec: str
    mode: str
    batch: int
    backend: str
    dtype: str
    threads: int
    blas: str
    gemm_gflops: float
    compile_cold_s: float
    compile_warm_s: float | None
    timing: Timing
    gflop_per_call: float
    peak_activation_bytes: int | None
    max_rss_bytes: int
    baselines: dict = field(default_factory=dict)  # name -> Timing or reason it did not run
    profile: list = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.batch / self.timing.median_s

    @property
    def gflops(self) -> float:
        return self.gflop_per_call / self.timing.median_s


def blas_kernel() -> str:
    from threadpoolctl import threadpool_info
    infos = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    return "; ".join(f"{i.get('internal_api')} {i.get('architecture')} "
                     f"({i.get('num_threads')} threads)" for i in infos) or "unknown"


def gemm_rate(dtype: str = "float32", threads: int = 2, n: int = 1024, repeats: int = 5) -> float:
    """GFLOP/s of NumPy's BLAS on an n^3 GEMM with `threads` threads: the machine's peak as far
    as this process can reach it."""
    from threadpoolctl import threadpool_limits
    a = np.random.default_rng(0).standard_normal((n, n)).astype(dtype)
    with threadpool_limits(threads, user_api="blas"):
        timing = Timing.of(lambda: a @ a, repeats)
    return 2 * n ** 3 / timing.median_s / 1e9


def _inputs(spec, batch: int, dtype: str):
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, *spec.model.input)).astype(dtype)
    return images, np.arange(batch) % spec.model.num_classes


def _compile_and_warm(spec, mode, backend, dtype, batch, cache_dir):
    """Compile and run once (Numba compiles kernels at their first call)."""
    images, labels = _inputs(spec, batch, dtype)
    start = time.perf_counter()
    exe = compile(spec, mode=mode, backend=backend, dtype=dtype, cache_dir=cache_dir)
    _call(exe, mode, images, labels)()
    return exe, time.perf_counter() - start


def _call(exe, mode, images, labels):
    if mode == "infer":
        return lambda: exe.forward(images)
    return lambda: exe.train_step(images, labels)


def _warm_compile_time(spec, mode, backend, dtype, batch, cache_dir) -> float:
    """Compile time in a fresh process that finds every kernel in the cache."""
    code = ("import sys, json, time; from rescompile.bench import _compile_and_warm; "
            "from rescompile.spec import load_spec; "
            "s = load_spec(json.loads(sys.argv[1])); "
            "print(_compile_and_warm(s, *sys.argv[2:5], int(sys.argv[5]), sys.argv[6])[1])")
    out = subprocess.run([sys.executable, "-c", code, spec.to_json(), mode, backend, dtype,
                          str(batch), cache_dir], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench(spec, mode="infer", batch=128, backend="cpu", dtype="float32", repeats=5,
          profile=False, baselines=True, warm=True, threads=2) -> Report:
    with tempfile.TemporaryDirectory(prefix="rescompile-bench-") as cache_dir:
        exe, cold = _compile_and_warm(spec, mode, backend, dtype, batch, cache_dir)
        warm_s = _warm_compile_time(spec, mode, backend, dtype, batch, cache_dir) \
            if warm and backend != "reference" else None
    images, labels = _inputs(spec, batch, dtype)
    timing = Timing.of(_call(exe, mode, images, labels), repeats)
    report = Report(spec.name, mode, batch, backend, dtype, threads, blas_kernel(),
                    gemm_rate(dtype, threads), cold, warm_s, timing, _gflop(exe, batch),
                    _peak_bytes(exe, batch), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                    * 1024)
    if profile:
        report.profile = _profile(exe, _call(exe, mode, images, labels), batch)
    if baselines:
        report.baselines = baseline_timings(spec, exe, mode, images, labels, repeats, threads)
    return report


def _gflop(exe, batch: int) -> float:
    flops = summary(exe.graph)["flops_per_image"]
    phases = ("forward",) if exe.mode == "infer" else ("forward", "loss", "backward", "update")
    return batch * sum(flops.get(p, 0.0) for p in phases) / 1e9


def _peak_bytes(exe, batch: int):
    arenas = getattr(exe.program, "arenas", {})
    peaks = [a.plan.peak_bytes for (e, b), a in arenas.items() if b == batch]
    return max(peaks) if peaks else None


def _profile(exe, fn, batch: int) -> list[dict]:
    """Per node: calls, total ms, share, GFLOP/s (for nodes that do arithmetic)."""
    from .dump import node_flops
    exe.program.profile = {}
    fn()
    records, exe.program.profile = exe.program.profile, None
    nodes = {n.name: n for n in exe.graph.nodes}
    total = sum(seconds for _, seconds in records.values())
    rows = []
    for name, (calls, seconds) in sorted(records.items(), key=lambda kv: -kv[1][1]):
        group = exe.program.groups.get(name) if hasattr(exe.program, "groups") else None
        members = list(group.members) if group else [nodes[name]]
        flops = sum(node_flops(exe.graph, n) for n in members) * batch * calls
        op = members[0].op if len(members) == 1 else f"group of {len(members)}"
        rows.append({"name": name, "op": op, "calls": calls, "ms": seconds * 1e3,
                     "percent": 100 * seconds / total,
                     "gflops": flops / seconds / 1e9 if flops else None})
    return rows


def baseline_timings(spec, exe, mode, images, labels, repeats, threads) -> dict:
    results = {}
    for name, runner in (("pytorch", torch_runner), ("onnxruntime", ort_runner)):
        try:
            results[name] = Timing.of(runner(spec, exe, mode, images, labels, threads), repeats)
        except Exception as exc:  # a missing or failing baseline is reported, not fatal
            results[name] = f"not run: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return results


def torch_runner(spec, exe, mode, images, labels, threads):
    """The same model in PyTorch eager (channels_last): a call returning the logits (infer)
    or running one train step."""
    import torch
    from .interop.torch_model import to_nchw, torch_module, train_step_fn
    torch.set_num_threads(threads)
    module = torch_module(spec, exe.params, mode, exe.dtype)
    x = to_nchw(images)
    if mode == "train":
        return train_step_fn(module, spec, x, torch.from_numpy(labels))
    module.eval()

    def infer():
        with torch.no_grad():
            return module(x).numpy()
    return infer


def ort_runner(spec, exe, mode, images, labels, threads):
    if mode != "infer":
        raise RuntimeError("ONNX Runtime runs inference only here")
    from .interop.onnx_model import ort_runner
    return ort_runner(spec, exe.params, images, threads)


def format_report(r: Report) -> str:
    lines = [f"{r.spec} {r.mode} batch {r.batch} {r.dtype}, backend {r.backend}, "
             f"{r.threads} threads",
             f"BLAS        {r.blas}; measured GEMM peak {r.gemm_gflops:.0f} GFLOP/s",
             f"compile     cold {r.compile_cold_s:.1f} s" +
             (f", warm {r.compile_warm_s:.2f} s" if r.compile_warm_s is not None else ""),
             f"run         median {r.timing.median_s * 1e3:.2f} ms (min {r.timing.min_s * 1e3:.2f}, "
             f"max {r.timing.max_s * 1e3:.2f}, {r.timing.runs} runs)",
             f"throughput  {r.images_per_s:.1f} images/s, {r.gflops:.1f} GFLOP/s "
             f"({100 * r.gflops / r.gemm_gflops:.0f}% of GEMM peak)",
             f"memory      peak activations {(r.peak_activation_bytes or 0) / 1e6:.1f} MB, "
             f"process max RSS {r.max_rss_bytes / 1e6:.0f} MB"]
    for name, base in r.baselines.items():
        if isinstance(base, Timing):
            lines.append(f"{name:<11} median {base.median_s * 1e3:.2f} ms -> rescompile is "
                         f"{base.median_s / r.timing.median_s:.2f}x its throughput")
        else:
            lines.append(f"{name:<11} {base}")
    if r.profile:
        lines.append(f"{'kernel (node)':<44} {'op':<22} {'calls':>5} {'ms':>8} {'%':>5} "
                     f"{'GFLOP/s':>8}")
        for row in r.profile:
            gf = f"{row['gflops']:.1f}" if row["gflops"] else "-"
            lines.append(f"{row['name'][:44]:<44} {row['op'][:22]:<22} {row['calls']:>5} "
                         f"{row['ms']:>8.2f} {row['percent']:>5.1f} {gf:>8}")
    return "\n".join(lines)


def report_json(r: Report) -> str:
    doc = asdict(r)
    doc.update(images_per_s=r.images_per_s, gflops=r.gflops)
    return json.dumps(doc, indent=1, default=str)
