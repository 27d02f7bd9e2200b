"""Data-parallel training on MPI: 2 ranks x 1 thread against 1 process x 2 threads on this
machine, MPI's all-reduce time, and a model of the step time on K machines.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \\
        PYTHONPATH=. .venv/bin/python benchmarks/bench_distributed.py --out dist.json

Cases (float32, the cpu backend, synthetic images, the same global batch both ways):

    digits     the README's model (examples/digits.toml), batch 64
    r164       ResNet-164 (CIFAR), batch 128
    r164-sync  the same with synchronised batch norm (`[batch_norm] sync = true`)

Each layout runs in fresh processes (`worker` mode, under mpiexec for 2 ranks; --rounds
interleaved rounds), times --steps train steps after two warm-ups, each step started together
on every rank (a barrier), and reports the median step and the median time in the all-reduce
(which includes waiting for the slower rank). One process trains with its fused `train_step`;
ranks with its two halves (gradients, their mean over the ranks, the update): `DataParallel`.

All-reduce: `MpiWorld.mean` on buffers of ResNet-164's and ResNet-50's gradient bytes, 2 ranks.
Model of K machines of this one (one rank each, the global batch split K ways):
    T(K) = T_compute(B) / K + 2 (K - 1) / K * S / bandwidth + 2 (K - 1) * latency
(a ring all-reduce of S bytes), with T_compute from the one-process step measured here
(ResNet-50's from ResNet-164's measured GFLOP/s and ResNet-50's FLOPs: an estimate), for
network bandwidths of 10, 25 and 100 Gbit/s and 5 us latency. Compute scaling as 1/K is the
optimistic side: small per-rank batches run the kernels less efficiently.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
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
from rescompile.bench import gflop  # noqa: E402
from rescompile.distributed import joined  # noqa: E402
from rescompile.distributed.data_parallel import DataParallel  # noqa: E402
from rescompile.distributed.launch import failing_together, world_for  # noqa: E402

R164 = ROOT / "rescompile" / "presets" / "resnet164_cifar.toml"
CASES = {"digits": (ROOT / "examples" / "digits.toml", 64, False), "r164": (R164, 128, False),
         "r164-sync": (R164, 128, True)}  # case -> (spec, global batch, synchronised BN)
R50 = ROOT / "rescompile" / "presets" / "resnet50_imagenet.toml"
THREADS = 2
BANDWIDTHS_GBIT = (10, 25, 100)
LATENCY_S = 5e-6
RANKS = (1, 2, 4, 8, 16, 32)


# -- workers (one per process) -----------------------------------------------------------------
def case_spec(case: str):
    spec_path, _, sync = CASES[case]
    doc = json.loads(rescompile.load_spec(spec_path).to_json())
    doc["batch_norm"]["sync"] = sync
    return rescompile.load_spec(doc)


def train_worker(case: str, steps: int, out: str) -> None:
    spec_path, batch, _ = CASES[case]
    world = world_for(None)
    with failing_together(world), joined(world):
        exe = rescompile.compile(case_spec(case), mode="train", backend="cpu", dtype="float32")
        trainer = DataParallel(exe, world)
        rng = np.random.default_rng(0)
        images = rng.standard_normal((batch, *exe.spec.model.input)).astype(np.float32)
        labels = rng.integers(0, exe.spec.model.num_classes, batch)
        share = slice(world.rank * batch // world.size, (world.rank + 1) * batch // world.size)
        step_s, comm_s = [], []
        for k in range(2 + steps):
            world.barrier()
            start = time.perf_counter()
            trainer.train_step(images[share], labels[share])
            if k >= 2:
                step_s.append(time.perf_counter() - start)
                comm_s.append(trainer.comm_seconds)
        if world.rank == 0:
            Path(out).write_text(json.dumps({
                "case": case, "ranks": world.size, "threads": exe_threads(), "batch": batch,
                "step_ms": 1e3 * statistics.median(step_s),
                "comm_ms": 1e3 * statistics.median(comm_s),
                "gflop": gflop(exe, batch),
                "gradient_bytes": 4 * parameter_count(spec_path)}))


def exe_threads() -> int:
    import numba
    return numba.get_num_threads()


def parameter_count(spec) -> int:
    """Trainable elements: what a data-parallel step all-reduces (besides a few statistics)."""
    exe = rescompile.compile(spec, mode="train", backend="reference", dtype="float32")
    return sum(math.prod(exe.graph.value(v).shape) for v, role in exe.graph.inputs.items()
               if role == "param")


def allreduce_worker(out: str) -> None:
    world = world_for(True)
    rows = []
    for name, spec in (("ResNet-164", R164), ("ResNet-50", R50)):
        elements = parameter_count(spec)
        buffer = np.random.default_rng(world.rank).standard_normal(elements).astype(np.float32)
        samples = []
        for k in range(12):
            world.barrier()
            start = time.perf_counter()
            world.mean(buffer)
            if k >= 2:
                samples.append(time.perf_counter() - start)
        rows.append({"model": name, "elements": elements, "bytes": 4 * elements,
                     "ms": 1e3 * statistics.median(samples)})
    if world.rank == 0:
        Path(out).write_text(json.dumps(rows))


# -- the driver --------------------------------------------------------------------------------
def launch(args: list[str], ranks: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "out.json")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env.pop("NUMBA_NUM_THREADS", None)  # each rank takes its share of the cores
        command = [sys.executable, __file__, *args, out]
        if ranks > 1:
            mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent))
            command = [mpiexec, "-n", str(ranks), *command]
        subprocess.run(command, check=True, env=env, timeout=1800)
        return json.loads(Path(out).read_text())


def model_rows(measured: dict, reduce_rows: list[dict]) -> list[dict]:
    """Step time at K machines, per network bandwidth (the formula in the module doc)."""
    r164 = measured["r164"][1]
    rate = r164["gflop"] / (r164["step_ms"] / 1e3)  # GFLOP/s of one process here
    r50_spec = rescompile.compile(R50, mode="train", backend="reference", dtype="float32")
    computes = {"ResNet-164": (r164["step_ms"] / 1e3, 128),
                "ResNet-50": (gflop(r50_spec, 256) / rate, 256)}
    rows = []
    for reduced in reduce_rows:
        compute_s, batch = computes[reduced["model"]]
        for gbit in BANDWIDTHS_GBIT:
            for k in RANKS:
                comm = (2 * (k - 1) / k * reduced["bytes"] / (gbit * 1e9 / 8)
                        + 2 * (k - 1) * LATENCY_S)
                step = compute_s / k + comm
                rows.append({"model": reduced["model"], "batch": batch, "gbit": gbit, "ranks": k,
                             "step_s": step, "comm_share": comm / step,
                             "speedup": compute_s / step})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args(argv)
    results = {case: {1: [], 2: []} for case in args.cases}
    for _ in range(args.rounds):
        for case in args.cases:
            for ranks in (1, 2):
                results[case][ranks].append(launch(["train", case, str(args.steps)], ranks))
    measured = {case: {ranks: min(runs, key=lambda r: r["step_ms"]) | {
        "step_ms": statistics.median(r["step_ms"] for r in runs),
        "comm_ms": statistics.median(r["comm_ms"] for r in runs)}
        for ranks, runs in by_ranks.items()} for case, by_ranks in results.items()}
    print(f"{'case':<8} {'layout':<22} {'step ms':>9} {'img/s':>8} {'all-reduce ms':>14}")
    for case, by_ranks in measured.items():
        for ranks, r in by_ranks.items():
            layout = f"{ranks} rank(s) x {r['threads']} thread(s)"
            print(f"{case:<8} {layout:<22} {r['step_ms']:>9.1f} "
                  f"{r['batch'] / r['step_ms'] * 1e3:>8.0f} {r['comm_ms']:>14.1f}")
    reduce_rows = launch(["allreduce"], 2)
    for r in reduce_rows:
        print(f"all-reduce of {r['model']}'s gradients ({r['bytes'] / 1e6:.1f} MB), 2 ranks: "
              f"{r['ms']:.1f} ms")
    rows = model_rows(measured, reduce_rows) if "r164" in measured else []
    for r in rows:
        if r["gbit"] == 25:
            print(f"model {r['model']:<10} batch {r['batch']} on {r['ranks']:>2} machines, "
                  f"25 Gbit/s: {r['step_s'] * 1e3:8.0f} ms a step, {r['comm_share']:.0%} "
                  f"all-reduce, {r['speedup']:.1f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"measured": measured, "allreduce": reduce_rows,
                                              "model": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "train":
        train_worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif len(sys.argv) > 1 and sys.argv[1] == "allreduce":
        allreduce_worker(sys.argv[2])
    else:
        sys.exit(main())
