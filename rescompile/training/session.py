"""A training run from a TrainConfig: check everything, then build the run, then train.

Every check (spec against checkpoint, settings against the saved stream, the data directory)
happens before anything is written, so a refused run leaves the checkpoint directory and the
log as they were.

Data-parallel (MPI): every rank makes the same checks on the same files and compiles the same
executable; rank 0 alone writes (checkpoints, log, plot) and reports. The global batch is
the spec's (or --batch-size), each rank taking an equal share of it.
"""

from __future__ import annotations

import io
import sys
import time

from ..data import BatchStream, DataRecord, Normalization, load_dataset
from ..data.classes import renamed
from ..distributed.data_parallel import DataParallel
from ..distributed.launch import failing_together, world_for
from ..distributed.world import joined
from ..errors import CheckpointError, UsageError
from ..fileio import check_writable
from ..runtime import compile
from .agreement import check_agreement
from .checkpoints import CheckpointDir, data_record, load_for_spec
from .config import DEFAULT_DTYPE, TrainConfig, default_backend, stream_settings, target_steps
from .loop import Run, train as train_loop
from .metrics import MetricsLog, check_log
from .plot import plot, plot_format
from .progress import Progress


def train(config: TrainConfig, out=None):
    """Run training as configured; return (the run, its last evaluation or None)."""
    world = world_for(config.distributed, config.exchange_timeout)
    with failing_together(world), joined(world):
        return _train(config, world, out or sys.stderr)


def _train(config: TrainConfig, world, out):
    started = time.perf_counter()
    check_agreement(config, world)
    if world.rank != 0:
        out = io.StringIO()  # rank 0 reports for the job
    run = prepare(config, out, world)
    try:
        evaluation = train_loop(run)
    finally:
        run.metrics.close()
        if run.checkpoints:
            run.checkpoints.release()
    if run.plot_format:
        plot(run.metrics.records, config.plot, run.plot_format)
        print(f"plot written to {config.plot}", file=out)
    print(f"trained to step {run.exe.step} in {time.perf_counter() - started:.1f} s", file=out)
    return run, evaluation


def prepare(config: TrainConfig, out, world) -> Run:
    _check_counts(config)
    writer = world.rank == 0
    for flag, path in (("--log", config.log), ("--plot", config.plot)):
        if path and writer:
            check_writable(path, flag)
    chart = plot_format(config.plot, lambda line: print(line, file=out)) \
        if config.plot and writer else None
    checkpoints = CheckpointDir(config.checkpoint, config.keep) if config.checkpoint else None
    # Rank 0 decides; a rank that cannot read that checkpoint (no shared file system) then
    # stops the job naming the file, instead of starting afresh beside the others.
    resume_step = world.broadcast(_resume_step(config, checkpoints, out) if writer else None)
    if config.log and writer:
        check_log(config.log, resume_step is not None, config.overwrite_log)
    saved = checkpoints.stream_state(resume_step) if resume_step is not None else None
    settings = stream_settings(config, saved)
    if saved is not None and saved["ranks"] != world.size:
        out.write(f"resuming a run of {saved['ranks']} rank(s) on {world.size}: the same global "
                  f"batch of {settings['batch_size']}; batch statistics are now each rank's "
                  f"share's unless batch_norm.sync is on\n")
    settings["ranks"] = world.size
    backend = config.backend or default_backend()
    spec = config.spec
    dataset = load_dataset(settings["data"], config.data_dir, input_shape=spec.model.input,
                           num_classes=spec.model.num_classes, seed=settings["seed"],
                           val_fraction=settings["val_fraction"])
    record = DataRecord(dataset.class_names,
                        Normalization.fit(settings["normalize"], dataset.train_images),
                        settings["val_fraction"])
    exe = _train_executable(config, checkpoints, resume_step, backend, settings["seed"], writer)
    if resume_step is not None:
        _check_classes(checkpoints.paths(resume_step)[0], spec, record)
    stream = BatchStream(dataset, settings["batch_size"], settings["seed"],
                         augment=settings["augment"], start_step=exe.step, rank=world.rank,
                         ranks=world.size, crop=settings["crop"], flip=settings["flip"],
                         normalize=record.normalization)
    steps = target_steps(config, stream.steps_per_epoch)
    if exe.step >= steps:
        out.write(f"already at step {exe.step}, at or past the {steps} steps asked for\n")
    infer = compile(spec, mode="infer", backend=backend, dtype=exe.dtype,
                    **compile_options(backend, writer))
    if world.size > 1:
        # mpiexec names a rank that dies by its pid and host: this line says which rank it was.
        places = ", ".join(f"rank {r}: pid {pid} on {host}"
                           for r, (host, pid) in enumerate(world.places()))
        out.write(f"data-parallel on {world.size} ranks: {stream.batch_size} images a step, "
                  f"{stream.batch_size // world.size} on each ({places})\n")
    trainer = DataParallel(exe, world, config.check_replicas)
    if checkpoints and writer:
        checkpoints.hold()  # checked and locked last, so a refused run leaves no trace
    return Run(exe=exe, infer=infer, trainer=trainer, world=world, dataset=dataset,
               record=record, stream=stream, stream_state=settings, steps=steps,
               eval_every=config.eval_every or stream.steps_per_epoch,
               checkpoint_every=config.checkpoint_every,
               checkpoints=checkpoints if writer else None,
               metrics=MetricsLog(config.log if writer else None, resume_step,
                                  note=lambda m: print(m, file=out)),
               progress=Progress(steps, exe.step, settings["batch_size"], out,
                                 ranks=world.size),
               plot_format=chart)


def _check_counts(config: TrainConfig) -> None:
    for flag, value in (("--eval-every", config.eval_every),
                        ("--checkpoint-every", config.checkpoint_every),
                        ("--batch-size", config.batch_size)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")


def _check_classes(path, spec, record) -> None:
    """A resumed run must see the classes the checkpoint learnt: folders renamed or added
    since would silently give its outputs other meanings."""
    difference = renamed(data_record(path, spec).classes, record.classes)
    if difference:
        raise CheckpointError(f"{path}: {difference}")


def _resume_step(config: TrainConfig, checkpoints, out) -> int | None:
    """The checkpoint step to resume from, None to start afresh. A fresh start into a
    directory that holds checkpoints is refused: it would prune and overwrite them; so is a
    directory another run is using."""
    if checkpoints:
        checkpoints.check_free()
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


def compile_options(backend: str, reporting: bool = True) -> dict:
    """A minute of silent compiling looks like a hang: the CPU backend says what it compiles."""
    return {"progress": True} if backend == "cpu" and reporting else {}


def _train_executable(config: TrainConfig, checkpoints, resume_step, backend: str, seed: int,
                      reporting: bool):
    options = compile_options(backend, reporting)
    if resume_step is None:
        return compile(config.spec, mode="train", backend=backend,
                       dtype=config.dtype or DEFAULT_DTYPE, seed=seed, **options)
    path = checkpoints.paths(resume_step)[0]
    exe = load_for_spec(path, config.spec, mode="train", backend=backend,
                        fresh_optimizer=config.fresh_optimizer, **options)
    if config.dtype and config.dtype != exe.dtype:
        raise CheckpointError(f"{path}: --dtype {config.dtype} differs from the checkpoint's "
                              f"{exe.dtype}")
    if exe.step != resume_step:
        raise CheckpointError(f"{path}: holds step {exe.step}, but its name says {resume_step}")
    return exe
