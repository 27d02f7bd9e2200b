"""Benchmarks: compile time (cold and warm), run time as median/min/max of several runs,
throughput, GFLOP/s and its share of the machine's FMA peak, memory, and the same model in the
runtimes a user would pick instead, in the same process, as ratios:

    pytorch        PyTorch eager, channels_last
    torch.compile  PyTorch's inductor with freezing (inference) or compiled train step
    onnxruntime    ONNX Runtime, all graph optimisations (inference)

With `dtype="bfloat16"` the PyTorch peers run under `torch.autocast("cpu", dtype=bfloat16)`
(bfloat16 convolutions, oneDNN's AMX or AVX512-BF16 kernels where the CPU has them), and ONNX
Runtime, which has no bfloat16 path on x86, runs float32 and is named so.

The peak is measured with the kernel library's own loop of the instruction the kernels multiply
with (FMAs; vdpbf16ps or AMX tiles for a bfloat16 model on a host that has them), on the same
number of threads (`backends/cpu/llvm/measure.py`), so "% of peak" is of this machine, now.
The machine is shared and noisy: implementations are timed in interleaved rounds (A B C, A B C:
drift hits all alike) and only medians and ratios measured in one run mean anything.
"""

from __future__ import annotations

import contextlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .dump import summary
from .precision import BFLOAT16, compute_dtype
from .runtime import compile


@dataclass
class Timing:
    median_s: float
    min_s: float
    max_s: float
    runs: int

    @classmethod
    def of_samples(cls, samples: list[float]) -> "Timing":
        return cls(float(np.median(samples)), min(samples), max(samples), len(samples))


@dataclass
class Peer:
    setup_s: float  # building it and its first call (torch.compile: the compile)
    timing: Timing


_MEMORY_SCRIPT = """
import json, sys
import numpy as np
from rescompile.spec import load_spec
from rescompile.bench import random_inputs, step_call, torch_runner
from rescompile.runtime import compile
spec = load_spec(json.loads(sys.argv[1]))
mode, batch, dtype, who = sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
images, labels = random_inputs(spec, batch, dtype)
exe = compile(spec, mode=mode, backend="cpu" if who == "rescompile" else "reference", dtype=dtype)
run = step_call(exe, mode, images, labels) if who == "rescompile" else torch_runner(
    spec, exe, mode, images, labels, 2)
def kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))
before = kib("VmRSS:")
run(); run()
print((kib("VmHWM:") - before) * 1024)
"""


def step_memory(spec, mode: str, batch: int, dtype: str, who: str) -> int | str:
    """Bytes a fresh process's peak resident memory grows by over two calls (the first builds
    rescompile's arena; PyTorch allocates as it goes), after the model and its variables
    exist: what the step itself costs in memory. (The peak is the process's VmHWM, which,
    unlike ru_maxrss, does not carry over the parent's peak through fork and exec.)"""
    try:
        out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, spec.to_json(), mode,
                              str(batch), dtype, who], capture_output=True, text=True,
                             check=True, timeout=1800)
        return int(out.stdout.strip().splitlines()[-1])
    except Exception as exc:  # a peer that cannot run is reported, not fatal
        return f"not measured: {type(exc).__name__}"


@dataclass
class Report:
    spec: str
    mode: str
    batch: int
    backend: str
    dtype: str
    threads: int
    target: str
    fma_peak_gflops: float  # the peak of `peak_instruction` (named so for older reports)
    compile_cold_s: float
    compile_warm_s: float | None
    timing: Timing
    gflop_per_call: float
    allocated_bytes: int | None
    max_rss_bytes: int
    peers: dict = field(default_factory=dict)  # name -> Peer, or why it did not run
    step_memory: dict = field(default_factory=dict)  # rescompile / pytorch -> bytes
    profile: list = field(default_factory=list)
    peak_instruction: str = "fma"

    @property
    def images_per_s(self) -> float:
        return self.batch / self.timing.median_s

    @property
    def gflops(self) -> float:
        return self.gflop_per_call / self.timing.median_s


def random_inputs(spec, batch: int, dtype: str):
    """Images as the user passes them (float32 for a bfloat16 model) and labels."""
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, *spec.model.input)).astype(compute_dtype(dtype))
    return images, np.arange(batch) % spec.model.num_classes


def compile_and_warm(spec, mode, backend, dtype, batch, cache_dir):
    """Compile and run once (Numba compiles its driver at the first call)."""
    images, labels = random_inputs(spec, batch, dtype)
    start = time.perf_counter()
    exe = compile(spec, mode=mode, backend=backend, dtype=dtype, cache_dir=cache_dir)
    step_call(exe, mode, images, labels)()
    return exe, time.perf_counter() - start


def step_call(exe, mode, images, labels):
    if mode == "infer":
        return lambda: exe.forward(images)
    return lambda: exe.train_step(images, labels)


def _warm_compile_time(spec, mode, backend, dtype, batch, cache_dir) -> float:
    """Compile time in a fresh process that finds every kernel in the cache."""
    code = ("import sys, json, time; from rescompile.bench import compile_and_warm; "
            "from rescompile.spec import load_spec; "
            "s = load_spec(json.loads(sys.argv[1])); "
            "print(compile_and_warm(s, *sys.argv[2:5], int(sys.argv[5]), sys.argv[6])[1])")
    out = subprocess.run([sys.executable, "-c", code, spec.to_json(), mode, backend, dtype,
                          str(batch), cache_dir], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


# Seconds to wait before timing the next implementation: the one before may have left threads
# spinning (OpenMP's in PyTorch, ONNX Runtime's pool), which would take the cores from the next.
SETTLE_S = 0.3


def interleaved(calls: dict, rounds: int, reps: int) -> dict[str, Timing]:
    """Each callable timed `reps` times per round, rounds interleaved, each after a pause and
    a warm-up call."""
    samples = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            time.sleep(SETTLE_S)
            fn()
            for _ in range(reps):
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
    return {name: Timing.of_samples(s) for name, s in samples.items()}


def bench(spec, mode="infer", batch=128, backend="cpu", dtype="float32", repeat=5,
          profile=False, peers=True, warm=True, threads=2, rounds=2) -> Report:
    from .backends.cpu.llvm.measure import peak_gflops, peak_instruction
    from .backends.cpu.target import host_target
    with tempfile.TemporaryDirectory(prefix="rescompile-bench-") as cache_dir:
        exe, cold = compile_and_warm(spec, mode, backend, dtype, batch, cache_dir)
        warm_s = _warm_compile_time(spec, mode, backend, dtype, batch, cache_dir) \
            if warm and backend != "reference" else None
    images, labels = random_inputs(spec, batch, dtype)
    ours = step_call(exe, mode, images, labels)
    runners = peer_runners(spec, exe, mode, images, labels, threads) if peers else {}
    ready = {name: r for name, r in runners.items() if not isinstance(r, str)}
    timings = interleaved({"rescompile": ours, **{n: fn for n, (fn, _) in ready.items()}},
                          rounds, max(1, repeat // rounds))
    target = getattr(exe.program, "target", None) or host_target()
    instruction = peak_instruction(target, dtype)
    report = Report(spec.name, mode, batch, backend, dtype, threads,
                    f"{target.name} ({host_target().cpu})",
                    peak_gflops(target, threads, dtype), cold, warm_s,
                    timings["rescompile"], gflop(exe, batch),
                    getattr(exe.program, "allocated_bytes", lambda b: None)(batch),
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                    peak_instruction=instruction)
    for name, runner in runners.items():
        report.peers[name] = Peer(runner[1], timings[name]) if name in ready else runner
    if peers and backend == "cpu":
        for who in ("rescompile", "pytorch"):
            report.step_memory[who] = step_memory(spec, mode, batch, dtype, who)
    if profile and hasattr(exe.program, "start_profile"):
        exe.program.start_profile()
        ours()
        report.profile = exe.program.profile_rows(batch)
        exe.program.profile = None
    return report


def gflop(exe, batch: int) -> float:
    flops = summary(exe.graph)["flops_per_image"]
    phases = ("forward",) if exe.mode == "infer" else ("forward", "loss", "backward", "update")
    return batch * sum(flops.get(p, 0.0) for p in phases) / 1e9


def peer_runners(spec, exe, mode, images, labels, threads) -> dict:
    """name -> (a call running the same model, seconds to build it and make its first call),
    or the reason it could not run."""
    results = {}
    for name, make in PEERS.items():
        try:
            start = time.perf_counter()
            fn = make(spec, exe, mode, images, labels, threads)
            fn()
            results[name] = (fn, time.perf_counter() - start)
        except Exception as exc:  # a missing or failing peer is reported, not fatal
            results[name] = f"not run: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return results


def torch_runner(spec, exe, mode, images, labels, threads, compiled: bool = False):
    """The same model in PyTorch (channels_last): a call returning the logits (infer) or
    running one train step. `compiled`: through torch.compile (inductor; with freezing in
    inference, which folds the weights into the generated code as ORT folds them). A
    bfloat16 model's peer runs under autocast to bfloat16 (float32 weights, as ours)."""
    import torch
    from .interop.torch_model import to_nchw, torch_module, train_step_fn
    torch.set_num_threads(threads)
    module = torch_module(spec, exe.params, mode, compute_dtype(exe.dtype))
    x = to_nchw(images)
    autocast = exe.dtype == BFLOAT16
    if mode == "train":
        return train_step_fn(torch.compile(module) if compiled else module, spec, x,
                             torch.from_numpy(labels), autocast=autocast)
    module.eval()
    if compiled:
        import torch._inductor.config as inductor
        inductor.freezing = True
        module = torch.compile(module)

    def infer():
        with torch.no_grad(), _autocast(autocast):
            return module(x).float().numpy()
    return infer


def _autocast(enabled: bool):
    """PyTorch's mixed precision on the CPU: bfloat16 convolutions and matmuls."""
    if not enabled:
        return contextlib.nullcontext()
    import torch
    return torch.autocast("cpu", dtype=torch.bfloat16)


def peer_label(name: str, dtype: str) -> str:
    """A peer as a bfloat16 report names it: PyTorch's run bfloat16 (autocast), ONNX
    Runtime's float32."""
    if dtype != BFLOAT16:
        return name
    return f"{name} fp32" if name == "onnxruntime" else f"{name} bf16"


def ort_runner(spec, exe, mode, images, labels, threads):
    if mode != "infer":
        raise RuntimeError("ONNX Runtime runs inference only here")
    from .interop.onnx_model import ort_runner as runner
    return runner(spec, exe.params, images, threads)


PEERS = {
    "pytorch": torch_runner,
    "torch.compile": lambda *args: torch_runner(*args, compiled=True),
    "onnxruntime": ort_runner,
}


def format_report(r: Report) -> str:
    peak = r.fma_peak_gflops
    instruction = {"fma": "FMA", "dpbf16": "vdpbf16ps", "amx": "AMX tdpbf16ps"}[
        r.peak_instruction]
    lines = [f"{r.spec} {r.mode} batch {r.batch} {r.dtype}, backend {r.backend}, "
             f"{r.threads} threads",
             f"target      {r.target}; {instruction} peak {peak:.0f} GFLOP/s on {r.threads} "
             f"threads (the kernel library's peak loop)",
             f"compile     cold {r.compile_cold_s:.1f} s" +
             (f", warm {r.compile_warm_s:.2f} s" if r.compile_warm_s is not None else "") +
             " (fresh process, first call included)",
             f"run         median {r.timing.median_s * 1e3:.2f} ms "
             f"(min {r.timing.min_s * 1e3:.2f}, max {r.timing.max_s * 1e3:.2f}, "
             f"{r.timing.runs} runs)",
             f"throughput  {r.images_per_s:.1f} images/s, {r.gflops:.1f} GFLOP/s "
             f"({100 * r.gflops / peak:.0f}% of {instruction} peak)",
             f"memory      allocated {(r.allocated_bytes or 0) / 2**20:.1f} MiB, "
             f"process max RSS {r.max_rss_bytes / 2**20:.0f} MiB"]
    if r.step_memory:
        lines.append("step memory " + ", ".join(
            f"{who} {m / 2**20:.0f} MiB" if isinstance(m, int) else f"{who} {m}"
            for who, m in r.step_memory.items()) + " (a fresh process's peak growth over two "
            "calls)")
    for name, peer in r.peers.items():
        name = peer_label(name, r.dtype)
        if isinstance(peer, Peer):
            gflops = r.gflop_per_call / peer.timing.median_s
            lines.append(f"{name:<18} median {peer.timing.median_s * 1e3:.2f} ms, "
                         f"{gflops:.1f} GFLOP/s ({100 * gflops / peak:.0f}% of peak), setup "
                         f"{peer.setup_s:.1f} s -> rescompile is "
                         f"{peer.timing.median_s / r.timing.median_s:.2f}x its throughput")
        else:
            lines.append(f"{name:<18} {peer}")
    if r.profile:
        lines.append(f"{'kernel (node)':<40} {'op':<16} {'calls':>5} {'ms':>8} {'wait':>6} "
                     f"{'%':>5} {'GFLOP/s':>8}")
        for row in r.profile:
            gf = f"{row['gflops']:.1f}" if row["gflops"] else "-"
            lines.append(f"{row['name'][:40]:<40} {row['op'][:16]:<16} {row['calls']:>5} "
                         f"{row['ms']:>8.3f} {row['wait_ms']:>6.3f} {row['percent']:>5.1f} "
                         f"{gf:>8}")
    return "\n".join(lines)


def report_json(r: Report) -> str:
    doc = asdict(r)
    doc.update(images_per_s=r.images_per_s, gflops=r.gflops)
    return json.dumps(doc, indent=1, default=str)
