"""`rescompile train`: train a spec on a data set, with evaluation, checkpoints and progress."""

import argparse

from ..data import DATASETS, DEFAULT_VAL_FRACTION
from ..data.normalize import KINDS
from .common import (add_backend, add_dtype, add_spec, fraction, positive_float, positive_int,
                     resolve_spec, seed_int)


def register(sub) -> None:
    p = sub.add_parser("train", help="train on a data set, with checkpoints and progress")
    add_spec(p)
    add_data(p)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive_int, help="train up to this step (default: "
                        "the spec's total_steps, else twice the learning-rate schedule's last "
                        "decay step, else 10 epochs)")
    length.add_argument("--epochs", type=positive_int)
    p.add_argument("--batch-size", type=positive_int,
                   help="default: the spec's train.batch_size")
    add_backend(p, default=None)
    add_dtype(p, default=None)
    p.add_argument("--seed", type=seed_int, help="initial values, shuffling, augmentation (0)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction,
                   help="the seed's pad-crop-mirror augmentation (default: on, off for digits)")
    p.add_argument("--crop", action=argparse.BooleanOptionalAction,
                   help="of the augmentation, the random crop of the padded image (default: on)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction,
                   help="of the augmentation, the random mirroring (default: on)")
    p.add_argument("--normalize", choices=KINDS, help="image: per-image standardization (the "
                   "seed's, the default); channel: each channel's mean and std on the "
                   "training split")
    p.add_argument("--checkpoint", metavar="DIR", help="directory for step-NNNNNN.npz files")
    p.add_argument("--resume", action="store_true", help="continue from the newest in DIR")
    p.add_argument("--fresh-optimizer", action="store_true",
                   help="on --resume, accept a checkpoint without optimizer slots (zeros)")
    p.add_argument("--eval-every", type=positive_int, metavar="K",
                   help="steps (default: an epoch)")
    p.add_argument("--checkpoint-every", type=positive_int, metavar="K", default=1000)
    p.add_argument("--keep", type=positive_int, metavar="K", default=3,
                   help="checkpoints to keep")
    p.add_argument("--log", metavar="FILE", help="JSONL metrics log (continued on --resume)")
    p.add_argument("--overwrite-log", action="store_true",
                   help="replace an existing --log on a fresh run (else it is refused)")
    p.add_argument("--plot", metavar="FILE", help="PNG of loss and accuracy (needs matplotlib)")
    p.add_argument("--distributed", action=argparse.BooleanOptionalAction,
                   help="data-parallel on MPI (default: when started under mpiexec)")
    p.add_argument("--check-replicas", type=positive_int, metavar="K", default=0,
                   help="every K steps, check that all ranks hold the same variables")
    p.add_argument("--exchange-timeout", type=positive_float, metavar="S",
                   help="seconds a step's exchange waits for the other ranks before the job "
                        "ends naming them (default: 5 times the median step, at least 60)")
    add_recipe(p)
    p.set_defaults(func=run)


def add_data(p) -> None:
    p.add_argument("--data", choices=DATASETS, required=True)
    p.add_argument("--data-dir", metavar="D", help="cifar10/100: the folder of the binary "
                   "files; folder: the image folder; npz: the .npz file")
    p.add_argument("--val-fraction", type=fraction, metavar="F",
                   help=f"held out of an image folder without train/ and val/, or an npz "
                        f"without val arrays (default {DEFAULT_VAL_FRACTION}; eval: the "
                        f"checkpoint's)")


# The [train] fields a flag of the same name overrides (the value checked as the spec's).
RECIPE = {"schedule": (str, "step or cosine"),
          "warmup_steps": (int, "steps of linear warm-up to the peak rate"),
          "warmup_start": (float, "the warm-up's first rate, as a factor of the peak"),
          "total_steps": (int, "the run's length; the cosine schedule ends here"),
          "min_lr": (float, "the rate the cosine schedule ends at"),
          "label_smoothing": (float, "x: the loss's targets become labels * (1 - x) + "
                                     "x / classes"),
          "weight_decay_on": (str, "kernels (every DW, the seed's) or all trainables")}


def add_recipe(p) -> None:
    group = p.add_argument_group("recipe", "each overrides the spec's [train] field of the "
                                           "same name; the checkpoints keep the spec as trained")
    for field, (kind, text) in RECIPE.items():
        group.add_argument(f"--{field.replace('_', '-')}", type=kind, help=text)
    group.add_argument("--nesterov", action=argparse.BooleanOptionalAction,
                       help="Nesterov momentum (PyTorch's SGD(nesterov=True))")


def recipe_spec(spec, args):
    """The spec with the [train] fields the flags give."""
    overrides = {field: getattr(args, field) for field in (*RECIPE, "nesterov")
                 if getattr(args, field) is not None}
    return spec.replace(train=overrides) if overrides else spec


def run(args) -> int:
    from dataclasses import fields
    from ..training import TrainConfig, train
    # Every field of the configuration is the flag of its name.
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)
                            if f.name != "spec"}, spec=recipe_spec(resolve_spec(args.spec), args))
    run, evaluation = train(config)
    if evaluation is not None and run.world.rank == 0:
        print(f"test accuracy {evaluation.accuracy:.2%} ({evaluation.correct}/"
              f"{evaluation.total})")
    return 0
