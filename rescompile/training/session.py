"""A training run from a TrainConfig: check everything, then build the run, then train.

Every check (spec against checkpoint, settings against the saved stream, the data directory)
happens before anything is written, so a refused run leaves the checkpoint directory and the
log as they were.
"""

from __future__ import annotations

import sys
import time

from ..data import BatchStream, load_dataset
from ..errors import CheckpointError, UsageError
from ..fileio import check_writable
from ..runtime import compile
from .checkpoints import CheckpointDir, load_for_spec
from .config import DEFAULT_DTYPE, TrainConfig, default_backend, stream_settings, target_steps
from .loop import Run, train as train_loop
from .metrics import MetricsLog
from .plot import plot
from .progress import Progress


def train(config: TrainConfig, out=None):
    """Run training as configured; return (the run, its last evaluation or None)."""
    out = out or sys.stderr
    started = time.perf_counter()
    run = prepare(config, out)
    try:
        evaluation = train_loop(run)
    finally:
        run.metrics.close()
        if run.checkpoints:
            run.checkpoints.release()
    if config.plot:
        if plot(run.metrics.records, config.plot, lambda line: print(line, file=out)):
            print(f"plot written to {config.plot}", file=out)
    print(f"trained to step {run.exe.step} in {time.perf_counter() - started:.1f} s", file=out)
    return run, evaluation


def prepare(config: TrainConfig, out) -> Run:
    _check_counts(config)
    for flag, path in (("--log", config.log), ("--plot", config.plot)):
        if path:
            check_writable(path, flag)
    checkpoints = CheckpointDir(config.checkpoint, config.keep) if config.checkpoint else None
    resume_step = _resume_step(config, checkpoints, out)
    saved = checkpoints.stream_state(resume_step) if resume_step is not None else None
    settings = stream_settings(config, saved)
    backend = config.backend or default_backend()
    spec = config.spec
    dataset = load_dataset(settings["data"], config.data_dir, input_shape=spec.model.input,
                           num_classes=spec.model.num_classes, seed=settings["seed"])
    exe = _train_executable(config, checkpoints, resume_step, backend, settings["seed"])
    stream = BatchStream(dataset, settings["batch_size"], settings["seed"],
                         augment=settings["augment"], start_step=exe.step)
    steps = target_steps(config, stream.steps_per_epoch)
    if exe.step >= steps:
        out.write(f"already at step {exe.step}, at or past the {steps} steps asked for\n")
    infer = compile(spec, mode="infer", backend=backend, dtype=exe.dtype,
                    **compile_options(backend))
    if checkpoints:
        checkpoints.hold()  # checked and locked last, so a refused run leaves no trace
    return Run(exe=exe, infer=infer,
               dataset=dataset, stream=stream, stream_state=settings, steps=steps,
               eval_every=config.eval_every or stream.steps_per_epoch,
               checkpoint_every=config.checkpoint_every, checkpoints=checkpoints,
               metrics=MetricsLog(config.log, resume_step, note=lambda m: print(m, file=out)),
               progress=Progress(steps, exe.step, settings["batch_size"], out))


def _check_counts(config: TrainConfig) -> None:
    for flag, value in (("--eval-every", config.eval_every),
                        ("--checkpoint-every", config.checkpoint_every),
                        ("--batch-size", config.batch_size)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")


def _resume_step(config: TrainConfig, checkpoints, out) -> int | None:
    """The checkpoint step to resume from, None to start afresh. A fresh start into a
    directory that holds checkpoints is refused: it would prune and overwrite them."""
    newest = checkpoints.newest() if checkpoints else None
    if config.resume and checkpoints is None:
        raise UsageError("--resume needs --checkpoint DIR")
    if config.resume and newest is None:
        out.write(f"no checkpoint in {checkpoints.path} yet: starting from step 0\n")
    if not config.resume and newest is not None:
        raise CheckpointError(f"{checkpoints.path} already holds checkpoints (newest: step "
                              f"{newest}); pass --resume to continue, or choose another "
                              f"directory")
    return newest if config.resume else None


def compile_options(backend: str) -> dict:
    """A minute of silent compiling looks like a hang: the CPU backend says what it compiles."""
    return {"progress": True} if backend == "cpu" else {}


def _train_executable(config: TrainConfig, checkpoints, resume_step, backend: str, seed: int):
    if resume_step is None:
        return compile(config.spec, mode="train", backend=backend,
                       dtype=config.dtype or DEFAULT_DTYPE, seed=seed, **compile_options(backend))
    path = checkpoints.paths(resume_step)[0]
    exe = load_for_spec(path, config.spec, mode="train", backend=backend,
                        fresh_optimizer=config.fresh_optimizer, **compile_options(backend))
    if config.dtype and config.dtype != exe.dtype:
        raise CheckpointError(f"{path}: --dtype {config.dtype} differs from the checkpoint's "
                              f"{exe.dtype}")
    if exe.step != resume_step:
        raise CheckpointError(f"{path}: holds step {exe.step}, but its name says {resume_step}")
    return exe
