"""Benchmarks: compile time (cold and warm), run time as median/min/max of several runs,
throughput, GFLOP/s and its share of the machine's FMA peak, memory, and the same model in the
runtimes a user would pick instead, as ratios:

    pytorch        PyTorch eager, channels_last
    torch.compile  PyTorch's inductor with freezing (inference) or compiled train step
    onnxruntime    ONNX Runtime, all graph optimisations (inference), 2 intra-op threads

Two methods of timing, and every row says which:

    own process    each contender in a fresh process of its own, one after the other: it
                   warms up, then times its calls, with no other framework's thread pool
                   beside it, as a user's serving process runs a model (batch 1 by default)
    interleaved    all of them in this process, in interleaved rounds (A B C, A B C: drift
                   hits all alike); at batch 1 a peer's threads still spinning after its call
                   take cores from the next contender, which is what the other method avoids

With `dtype="bfloat16"` the PyTorch peers run under `torch.autocast("cpu", dtype=bfloat16)`
(bfloat16 convolutions, oneDNN's AMX or AVX512-BF16 kernels where the CPU has them), and ONNX
Runtime, which has no bfloat16 path on x86, runs float32; the rows name each peer's precision.

The peak is measured with the kernel library's own loop of the instruction the kernels multiply
with (FMAs; vdpbf16ps or AMX tiles for a bfloat16 model on a host that has them), on the same
number of threads (`backends/cpu/llvm/measure.py`), so "% of peak" is of this machine, now;
every report names the machine (`host_info`). The machine is shared and noisy: only medians
and ratios measured in one run mean anything.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .compiler import backend_options
from .dump import summary
from .precision import BFLOAT16, compute_dtype
from .runtime import compile
from .spec import load_spec


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
class Contender:
    setup_s: float  # building it and its first call (torch.compile: the compile)
    timing: Timing
    pid: int  # the process it ran in
    frameworks: list[str]  # the peers' frameworks imported in that process


OWN_PROCESS, INTERLEAVED = "own process", "interleaved"
PEER_FRAMEWORKS = ("torch", "onnxruntime")  # modules whose thread pools a peer brings


@dataclass
class Method:
    """The contenders timed one way: OWN_PROCESS or INTERLEAVED."""
    name: str
    contenders: dict  # name -> Contender, or why it did not run


_MEMORY_SCRIPT = """
import json, sys
from rescompile.spec import load_spec
from rescompile.bench import contender_call, random_inputs
spec = load_spec(json.loads(sys.argv[1]))
mode, batch, dtype, who = sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
images, labels = random_inputs(spec, batch, dtype)
run = contender_call(spec, who, mode, images, labels, "cpu", dtype, 2)
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
    host: dict  # host_info(): the CPU, the ISA the kernels were built for, the date
    fma_peak_gflops: float  # the peak of `peak_instruction` (named so for older reports)
    compile_cold_s: float
    compile_warm_s: float | None
    gflop_per_call: float
    allocated_bytes: int | None
    max_rss_bytes: int
    methods: list = field(default_factory=list)  # Method: own process (if run) first
    step_memory: dict = field(default_factory=dict)  # rescompile / pytorch -> bytes
    profile: list = field(default_factory=list)
    peak_instruction: str = "fma"

    @property
    def timing(self) -> Timing:
        """rescompile's timing by the first method: its own process where that ran."""
        return self.methods[0].contenders["rescompile"].timing

    @property
    def images_per_s(self) -> float:
        return self.batch / self.timing.median_s

    @property
    def gflops(self) -> float:
        return self.gflop_per_call / self.timing.median_s


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo (what lscpu reads)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    return next((line.split(":", 1)[1].strip() for line in lines
                 if line.startswith("model name")), platform.processor() or "unknown")


# The host's bfloat16 instructions, named as /proc/cpuinfo names them -> LLVM's feature name.
BF16_FLAGS = {"avx512_bf16": "avx512bf16", "amx_tile": "amx-tile", "amx_bf16": "amx-bf16"}


def host_info(target=None) -> dict:
    """What a table was measured on: the CPU model, the LLVM CPU name and the ISA the kernels
    were built for (`target`, the host's own by default; its name, with the extensions the
    kernels may use: "avx512+avx512_bf16"), which bfloat16 instructions the host has (as LLVM
    reads them), and when."""
    from .backends.cpu.target import host_target
    host = host_target()
    target = target or host
    features = set(host.features.split(","))
    return {"cpu_model": cpu_model(), "llvm_cpu": target.cpu, "isa": target.name,
            **{flag: f"+{llvm}" in features for flag, llvm in BF16_FLAGS.items()},
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def random_inputs(spec, batch: int, dtype: str):
    """Images as the user passes them (float32 for a bfloat16 model) and labels."""
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, *spec.model.input)).astype(compute_dtype(dtype))
    return images, np.arange(batch) % spec.model.num_classes


def compile_and_warm(spec, mode, backend, dtype, batch, cache_dir):
    """Compile and run once (Numba compiles its driver at the first call); `cache_dir` for a
    backend that caches kernels (the reference backend has none)."""
    images, labels = random_inputs(spec, batch, dtype)
    options = {"cache_dir": cache_dir} if "cache_dir" in backend_options(backend) else {}
    start = time.perf_counter()
    exe = compile(spec, mode=mode, backend=backend, dtype=dtype, **options)
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


def frameworks_loaded() -> list[str]:
    return [name for name in PEER_FRAMEWORKS if name in sys.modules]


def interleaved_contenders(ours, setup_s: float, runners: dict, rounds: int,
                           reps: int) -> dict:
    """rescompile's call (`setup_s` to make) and the ready peers of `runners`
    (`peer_runners`) timed in interleaved rounds in this process; a peer that could not run
    keeps its reason."""
    ready = {name: r for name, r in runners.items() if not isinstance(r, str)}
    timings = interleaved({"rescompile": ours, **{n: fn for n, (fn, _) in ready.items()}},
                          rounds, reps)
    here = (os.getpid(), frameworks_loaded())
    return {"rescompile": Contender(setup_s, timings["rescompile"], *here),
            **{name: Contender(r[1], timings[name], *here) if name in ready else r
               for name, r in runners.items()}}


_ALONE_SCRIPT = """
import json, sys
from rescompile.bench import time_alone
print(json.dumps(time_alone(*json.loads(sys.argv[1]))))
"""


def time_alone(spec_doc: dict, who: str, mode: str, batch: int, backend: str, dtype: str,
               threads: int, rounds: int, reps: int) -> dict:
    """In a fresh process: build one contender and make its first call, then time it as
    `interleaved` times one (a pause and a warm-up call before each round's calls)."""
    spec = load_spec(spec_doc)
    images, labels = random_inputs(spec, batch, dtype)
    start = time.perf_counter()
    call = contender_call(spec, who, mode, images, labels, backend, dtype, threads)
    call()
    setup_s = time.perf_counter() - start
    timing = interleaved({who: call}, rounds, reps)[who]
    return {"setup_s": setup_s, "timing": asdict(timing), "pid": os.getpid(),
            "frameworks": frameworks_loaded()}


def own_processes(spec, mode: str, batch: int, backend: str, dtype: str, names, threads: int,
                  rounds: int, reps: int) -> dict:
    """Each of `names` (rescompile and peers) timed in a fresh process of its own, one after
    the other: name -> Contender, or why a peer did not run (rescompile failing raises)."""
    contenders = {}
    for who in names:
        args = [json.loads(spec.to_json()), who, mode, batch, backend, dtype, threads, rounds,
                reps]
        try:
            proc = subprocess.run([sys.executable, "-c", _ALONE_SCRIPT, json.dumps(args)],
                                  capture_output=True, text=True, timeout=3600)
            if proc.returncode:
                raise RuntimeError((proc.stderr.strip().splitlines() or ["no output"])[-1])
            doc = json.loads(proc.stdout.strip().splitlines()[-1])
            contenders[who] = Contender(doc["setup_s"], Timing(**doc["timing"]), doc["pid"],
                                        doc["frameworks"])
        except Exception as exc:  # a missing or failing peer is reported, not fatal
            if who == "rescompile":
                raise
            contenders[who] = not_run(exc)
    return contenders


def peer_names(peers) -> tuple[str, ...]:
    """`peers`: True (every one), False (none), or the names of some."""
    if peers is True or peers is False:
        return tuple(PEERS) if peers else ()
    unknown = set(peers) - set(PEERS)
    if unknown:
        raise ValueError(f"unknown peers {sorted(unknown)}; known: {list(PEERS)}")
    return tuple(peers)


def bench(spec, mode="infer", batch=128, backend="cpu", dtype="float32", repeat=5,
          profile=False, peers=True, warm=True, threads=2, rounds=2,
          own_process: bool | None = None) -> Report:
    """`peers`: see `peer_names`. `own_process`: also time every contender in a process of
    its own (None: at batch 1 only); the interleaved method always runs."""
    from .backends.cpu.llvm.measure import peak_gflops, peak_instruction
    from .backends.cpu.target import host_target
    names = peer_names(peers)
    with tempfile.TemporaryDirectory(prefix="rescompile-bench-") as cache_dir:
        exe, cold = compile_and_warm(spec, mode, backend, dtype, batch, cache_dir)
        warm_s = _warm_compile_time(spec, mode, backend, dtype, batch, cache_dir) \
            if warm and backend != "reference" else None
    reps = max(1, repeat // rounds)
    methods = []
    # Before this process builds any peer: the children run beside no idle thread pool of ours.
    if batch == 1 if own_process is None else own_process:
        methods.append(Method(OWN_PROCESS, own_processes(
            spec, mode, batch, backend, dtype, ("rescompile", *names), threads, rounds, reps)))
    images, labels = random_inputs(spec, batch, dtype)
    ours = step_call(exe, mode, images, labels)
    runners = peer_runners(spec, exe, mode, images, labels, threads, names)
    methods.append(Method(INTERLEAVED, interleaved_contenders(ours, cold, runners, rounds,
                                                              reps)))
    target = getattr(exe.program, "target", None) or host_target()
    report = Report(spec.name, mode, batch, backend, dtype, threads, host_info(target),
                    peak_gflops(target, threads, dtype), cold, warm_s, gflop(exe, batch),
                    getattr(exe.program, "allocated_bytes", lambda b: None)(batch),
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, methods,
                    peak_instruction=peak_instruction(target, dtype))
    if backend == "cpu" and "pytorch" in names:  # the step's memory beside PyTorch eager's
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


def not_run(exc: Exception) -> str:
    first = (str(exc).splitlines() or [""])[0]
    return f"not run: {type(exc).__name__}: {first[:120]}"


def peer_runners(spec, exe, mode, images, labels, threads, names=None) -> dict:
    """name -> (a call running the same model, seconds to build it and make its first call),
    or the reason it could not run, for each of `names` (default: every peer)."""
    results = {}
    for name in PEERS if names is None else names:
        try:
            start = time.perf_counter()
            fn = PEERS[name](spec, exe, mode, images, labels, threads)
            fn()
            results[name] = (fn, time.perf_counter() - start)
        except Exception as exc:  # a missing or failing peer is reported, not fatal
            results[name] = not_run(exc)
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
    """A contender as a bfloat16 report names it: PyTorch's peers run bfloat16 (autocast),
    ONNX Runtime's float32; rescompile is the model the report is of."""
    if dtype != BFLOAT16 or name == "rescompile":
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
# The instruction each peak loop runs (`measure.peak_instruction`), as a report names it.
PEAK_INSTRUCTIONS = {"fma": "FMA", "dpbf16": "vdpbf16ps", "amx": "AMX tdpbf16ps"}


def contender_call(spec, who: str, mode: str, images, labels, backend: str, dtype: str,
                   threads: int):
    """A call running one contender, built in this process: rescompile on `backend`, or a peer
    on the weights the same seed gives (made by the reference backend: NumPy, no threads)."""
    exe = compile(spec, mode=mode, backend=backend if who == "rescompile" else "reference",
                  dtype=dtype)
    if who == "rescompile":
        return step_call(exe, mode, images, labels)
    return PEERS[who](spec, exe, mode, images, labels, threads)


def timing_rows(methods: list, gflop_per_call: float, peak: float,
                dtype: str = "float32") -> list[dict]:
    """A row per method and contender (named by `peer_label` for a `dtype` model): its
    timing, GFLOP/s and share of the peak, the process it ran in, and rescompile's
    throughput over its by the same method."""
    rows = []
    for method in methods:
        ours = method.contenders["rescompile"].timing.median_s
        for who, c in method.contenders.items():
            row = {"method": method.name, "contender": peer_label(who, dtype)}
            if isinstance(c, str):
                rows.append(dict(row, not_run=c))
                continue
            gflops = gflop_per_call / c.timing.median_s
            rows.append(dict(row, median_ms=c.timing.median_s * 1e3,
                             min_ms=c.timing.min_s * 1e3, max_ms=c.timing.max_s * 1e3,
                             runs=c.timing.runs, gflops=gflops,
                             percent_of_peak=100 * gflops / peak, setup_s=c.setup_s,
                             pid=c.pid, frameworks=c.frameworks,
                             rescompile_speedup=c.timing.median_s / ours))
    return rows


def text_table(columns: list[tuple], rows: list[dict]) -> list[str]:
    """A header and a line per row; a column is (title, format spec of its width, its cell
    of a row as text)."""
    return [" ".join(f"{title:{spec}}" for title, spec, _ in columns).rstrip()] + \
        [" ".join(f"{cell(row):{spec}}" for _, spec, cell in columns).rstrip() for row in rows]


def _or_dash(value, spec: str) -> str:
    """A figure a row may lack (None, or zero where it means "none"), as "-"."""
    return f"{value:{spec}}" if value else "-"


TIMING_COLUMNS = [
    ("method", "<12", lambda r: r["method"]),
    ("contender", "<18", lambda r: r["contender"]),
    ("median ms", ">10", lambda r: f"{r['median_ms']:.2f}"),
    ("min-max ms", ">17", lambda r: f"{r['min_ms']:.2f}-{r['max_ms']:.2f}"),
    ("GFLOP/s", ">8", lambda r: f"{r['gflops']:.1f}"),
    ("% peak", ">6", lambda r: f"{r['percent_of_peak']:.0f}"),
    ("setup s", ">7", lambda r: f"{r['setup_s']:.1f}"),
    ("pid", ">7", lambda r: str(r["pid"])),
    ("frameworks", "<17", lambda r: ",".join(r["frameworks"]) or "-"),
    ("rescompile vs it", "<16", lambda r: "" if r["contender"] == "rescompile"
     else f"{r['rescompile_speedup']:.2f}x"),
]

PROFILE_COLUMNS = [
    ("kernel (node)", "<40", lambda r: r["name"][:40]),
    ("op", "<16", lambda r: r["op"][:16]),
    ("calls", ">5", lambda r: str(r["calls"])),
    ("ms", ">8", lambda r: f"{r['ms']:.3f}"),
    ("wait", ">6", lambda r: f"{r['wait_ms']:.3f}"),
    ("%", ">5", lambda r: f"{r['percent']:.1f}"),
    ("GFLOP/s", ">8", lambda r: _or_dash(r["gflops"], ".1f")),
    ("read MB", ">8", lambda r: f"{r['bytes_read'] / 1e6:.3f}"),
    ("write MB", ">8", lambda r: f"{r['bytes_written'] / 1e6:.3f}"),
    ("FLOP/B", ">7", lambda r: _or_dash(r["flop_per_byte"], ".1f")),
]


def format_rows(rows: list[dict]) -> list[str]:
    """`timing_rows` as a table, the contenders that did not run after it."""
    ran = [r for r in rows if "not_run" not in r]
    return text_table(TIMING_COLUMNS, ran) + [
        f"{r['method']:<12} {r['contender']:<18} {r['not_run']}" for r in rows
        if "not_run" in r]


def format_host(host: dict) -> str:
    flags = ", ".join(f"{flag} {'yes' if host[flag] else 'no'}" for flag in BF16_FLAGS)
    return (f"{host['cpu_model']}; LLVM CPU {host['llvm_cpu']}, kernels for {host['isa']}; "
            f"{flags}; {host['date']}")


def format_report(r: Report) -> str:
    peak, method = r.fma_peak_gflops, r.methods[0].name
    instruction = PEAK_INSTRUCTIONS[r.peak_instruction]
    lines = [f"{r.spec} {r.mode} batch {r.batch} {r.dtype}, backend {r.backend}, "
             f"{r.threads} threads",
             f"host        {format_host(r.host)}",
             f"peak        {instruction} {peak:.0f} GFLOP/s on {r.threads} threads "
             f"(the kernel library's peak loop)",
             f"compile     cold {r.compile_cold_s:.1f} s" +
             (f", warm {r.compile_warm_s:.2f} s" if r.compile_warm_s is not None else "") +
             " (fresh process, first call included)",
             f"run         median {r.timing.median_s * 1e3:.2f} ms "
             f"(min {r.timing.min_s * 1e3:.2f}, max {r.timing.max_s * 1e3:.2f}, "
             f"{r.timing.runs} runs; {method})",
             f"throughput  {r.images_per_s:.1f} images/s, {r.gflops:.1f} GFLOP/s "
             f"({100 * r.gflops / peak:.0f}% of {instruction} peak; {method})",
             f"memory      allocated {(r.allocated_bytes or 0) / 2**20:.1f} MiB, "
             f"process max RSS {r.max_rss_bytes / 2**20:.0f} MiB"]
    if r.step_memory:
        lines.append("step memory " + ", ".join(
            f"{who} {m / 2**20:.0f} MiB" if isinstance(m, int) else f"{who} {m}"
            for who, m in r.step_memory.items()) + " (a fresh process's peak growth over two "
            "calls)")
    lines += format_rows(timing_rows(r.methods, r.gflop_per_call, peak, r.dtype))
    if r.profile:
        lines += text_table(PROFILE_COLUMNS, r.profile)
    return "\n".join(lines)


def report_json(r: Report) -> str:
    doc = asdict(r)
    del doc["methods"]  # in the rows, which say each contender's method
    doc.update(images_per_s=r.images_per_s, gflops=r.gflops, headline_method=r.methods[0].name,
               rows=timing_rows(r.methods, r.gflop_per_call, r.fma_peak_gflops, r.dtype))
    return json.dumps(doc, indent=1, default=str)
