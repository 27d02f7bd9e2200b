"""What a training run is asked to do, and the defaults it falls back on.

None means "the default", or on --resume "what the checkpoint says": a resumed run takes the
data stream's settings from the checkpoint, and a value given again must agree with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data import DEFAULT_VAL_FRACTION
from ..errors import CheckpointError, UsageError
from ..manifest import MAX_COUNT

DEFAULT_SEED = 0
DEFAULT_DTYPE = "float32"
DEFAULT_EPOCHS = 10   # when the learning-rate schedule has no decay step to go by
# The seed's CIFAR augmentation (4-pixel pad-and-crop, mirroring) wrecks 8x8 digits: the crop
# can cut off a quarter of a digit, and a mirrored digit is another glyph.
NOT_AUGMENTED = {"digits"}
# What the data stream's other settings are by default, and were before a checkpoint kept them.
STREAM_DEFAULTS = {"crop": True, "flip": True, "normalize": "image",
                   "val_fraction": DEFAULT_VAL_FRACTION}


@dataclass
class TrainConfig:
    spec: object                    # ResNetSpec
    data: str
    data_dir: str | None = None
    steps: int | None = None        # the step to train up to (a resumed run counts from 0 too)
    epochs: int | None = None
    batch_size: int | None = None
    backend: str | None = None
    dtype: str | None = None
    seed: int | None = None
    augment: bool | None = None
    crop: bool | None = None        # each augmentation of `augment` on its own
    flip: bool | None = None
    normalize: str | None = None    # "image" (the seed's) or "channel"
    val_fraction: float | None = None  # held out of data without a split of their own
    checkpoint: str | None = None   # directory
    resume: bool = False
    fresh_optimizer: bool = False   # on resume, optimizer slots missing from it start at zero
    eval_every: int | None = None   # default: once an epoch
    checkpoint_every: int = 1000
    keep: int = 3
    log: str | None = None
    overwrite_log: bool = False     # a fresh run may replace an existing log
    plot: str | None = None
    distributed: bool | None = None  # MPI data-parallel; None: when started under mpiexec
    check_replicas: int = 0          # steps between cross-rank checks of the variables; 0: off
    exchange_timeout: float | None = None  # seconds an exchange waits for the other ranks


def default_backend() -> str:
    """"cpu" once rescompile.backends.cpu can compile programs, else "reference"."""
    try:
        from ..backends import cpu
    except ImportError:
        return "reference"
    return "cpu" if hasattr(cpu, "compile_program") else "reference"


def stream_settings(config: TrainConfig, saved: dict | None) -> dict:
    """The data stream's settings: given, else saved (on resume), else the defaults."""
    settings = {"data": config.data, "seed": config.seed, "batch_size": config.batch_size,
                "augment": config.augment, "crop": config.crop, "flip": config.flip,
                "normalize": config.normalize, "val_fraction": config.val_fraction}
    for key, given in settings.items():
        if saved is not None and given is not None and given != saved[key]:
            flag = "--data" if key == "data" else f"--{key.replace('_', '-')}"
            raise CheckpointError(f"{flag} {given} differs from the checkpoint's {saved[key]}; "
                                  f"drop it to resume as the checkpoint was trained")
    defaults = {"seed": DEFAULT_SEED, "batch_size": config.spec.train.batch_size,
                "augment": config.data not in NOT_AUGMENTED, **STREAM_DEFAULTS}
    if saved is not None:
        defaults = saved
    return {key: defaults[key] if given is None else given for key, given in settings.items()}


def target_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """--steps, else --epochs, else the spec's total_steps, else twice the schedule's last
    decay step (the decayed rate gets as many steps as came before it), else DEFAULT_EPOCHS
    epochs."""
    if config.steps is not None and config.epochs is not None:
        raise UsageError("give --steps or --epochs, not both")
    if config.steps is not None:
        steps = config.steps
    elif config.epochs is not None:
        steps = config.epochs * steps_per_epoch
    elif config.spec.train.total_steps:
        steps = config.spec.train.total_steps
    else:
        last_decay = config.spec.train.learning_rate[-1][0]
        steps = 2 * last_decay if last_decay else DEFAULT_EPOCHS * steps_per_epoch
    if steps < 1:
        raise UsageError(f"the number of steps must be >= 1, got {steps}")
    if steps > MAX_COUNT:  # a checkpoint of a later step could not be read back
        flag = "--steps" if config.steps is not None else "--epochs"
        raise UsageError(f"{flag}: {steps} steps is more than the {MAX_COUNT} a checkpoint "
                         f"records")
    return steps
