"""The training loop: steps, periodic evaluation and checkpoints, and a checkpoint on Ctrl-C.

The executable's step is the one clock: the learning rate, the data stream's position and the
checkpoint names all follow it, so a run resumed from any checkpoint replays the same batches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..data import Prefetcher
from ..errors import ResourceError
from .evaluate import Evaluation, evaluate


@dataclass
class Run:
    exe: object                 # train-mode Executable
    infer: object               # infer-mode Executable of the same spec and backend
    trainer: object             # DataParallel over exe (one rank: exe's own step, in halves)
    world: object               # the job's ranks (distributed.world)
    dataset: object
    record: object              # DataRecord: the data's class names and normalisation
    stream: object              # BatchStream starting at exe.step
    stream_state: dict          # saved beside each checkpoint
    steps: int
    eval_every: int
    checkpoint_every: int
    checkpoints: object         # CheckpointDir, or None
    metrics: object             # MetricsLog
    progress: object            # Progress
    plot_format: str | None = None  # --plot's format, checked before the run; None: no plot


def train(run: Run) -> Evaluation | None:
    """Train up to run.steps; return the last evaluation. On KeyboardInterrupt, or a
    ResourceError (a full disk under the log, the other ranks gone), a checkpoint is saved
    (given a directory) before the error goes on up: the variables are those of the last
    step applied, which nothing of a failed step has reached."""
    evaluation = None
    batches = Prefetcher(run.stream)
    try:
        while run.exe.step < run.steps:
            evaluation = _step(run, batches) or evaluation
    except (KeyboardInterrupt, ResourceError) as exc:
        if isinstance(exc, KeyboardInterrupt):
            run.progress.note(f"interrupted at step {run.exe.step}")
        _save(run)
        raise
    finally:
        batches.close()
        run.progress.close()
    return evaluation


def _step(run: Run, batches) -> Evaluation | None:
    start = time.perf_counter()
    images, labels = next(batches)
    lr = run.exe.learning_rate()
    loss = run.trainer.train_step(images, labels)
    step_s = time.perf_counter() - start
    step = run.exe.step
    comm_s = run.trainer.comm_seconds
    run.progress.update(step, loss, lr, step_s, comm_s)
    record = {"step": step, "loss": loss, "lr": lr,
              "images_per_s": len(labels) * run.world.size / step_s}
    if run.world.size > 1:
        record.update(ranks=run.world.size, comm_ms=comm_s * 1e3)
    evaluation = None
    if step % run.eval_every == 0 or step == run.steps:
        evaluation = _evaluate(run)
        record["accuracy"] = evaluation.accuracy
    run.metrics.write(record)
    if run.checkpoints and (step % run.checkpoint_every == 0 or step == run.steps):
        _save(run)
    return evaluation


def _evaluate(run: Run) -> Evaluation:
    # The infer executable runs the folded inference graph; it only needs the current values.
    run.infer.load_params(run.exe.params)
    data = run.dataset
    evaluation = evaluate(run.infer, data.test_images, data.test_labels, data.num_classes,
                          run.world, run.record.normalization)
    run.progress.note(f"step {run.exe.step}: test accuracy {evaluation.accuracy:.2%} "
                      f"({evaluation.correct}/{evaluation.total})")
    return evaluation


def _save(run: Run) -> None:
    if run.world.rank != 0:
        return  # rank 0 writes for the job
    if run.checkpoints is None:
        run.progress.note(f"no --checkpoint directory: step {run.exe.step} not saved")
        return
    if run.checkpoints.newest() == run.exe.step:
        return  # already saved, e.g. interrupted right after a scheduled checkpoint
    path = run.checkpoints.save(run.exe, run.stream_state, run.record.to_dict())
    run.progress.note(f"saved {path}")
