"""`rescompile eval`: test accuracy and confusion matrix of a checkpoint, on the folded
inference graph."""

from pathlib import Path

from ..errors import CheckpointError
from .common import add_backend, add_dtype, add_spec, resolve_spec
from .train import add_data


def register(sub) -> None:
    p = sub.add_parser("eval", help="test accuracy and confusion matrix of a checkpoint")
    add_spec(p)
    add_checkpoint(p)
    add_data(p)
    add_backend(p, default=None)
    add_dtype(p, default=None, what="the checkpoint's")
    p.set_defaults(func=run)


def add_checkpoint(p) -> None:
    p.add_argument("--checkpoint", metavar="DIR_OR_FILE", required=True,
                   help="a checkpoint file, a directory (its newest checkpoint) or a compiled "
                        "artifact (.rcx)")


def load_infer(args):
    """(spec, infer-mode executable, DataRecord) from the spec and checkpoint (or artifact)
    arguments. The record says how training prepared its images and names the classes; an
    artifact keeps none, so it gets the default (per-image standardization, no names)."""
    from ..artifact import is_artifact
    from ..data import DataRecord
    from ..training import data_record, default_backend, load_for_spec, resolve
    spec = resolve_spec(args.spec)
    backend = args.backend or default_backend()
    dtype = getattr(args, "dtype", None)
    if Path(args.checkpoint).is_file() and is_artifact(args.checkpoint):
        return spec, _from_artifact(args.checkpoint, spec, backend, dtype), DataRecord()
    path = resolve(args.checkpoint)
    exe = load_for_spec(path, spec, mode="infer", backend=backend, dtype=dtype)
    return spec, exe, data_record(path, spec)


def _from_artifact(path, spec, backend: str, dtype: str | None = None):
    """An artifact of this spec, as an inference executable (a train artifact's variables
    move into one), in `dtype` (None: the artifact's)."""
    from ..artifact import load_artifact
    from ..runtime import compile
    from ..training.checkpoints import inference_spec
    exe = load_artifact(path, backend=backend, dtype=dtype)
    if exe.spec.digest() != inference_spec(spec, exe.spec).digest():
        raise CheckpointError(f"{path}: artifact of spec {exe.spec.name!r}, which differs from "
                              f"the given spec {spec.name!r}")
    if exe.mode == "infer":
        return exe
    infer = compile(spec, mode="infer", backend=backend, dtype=exe.dtype)
    infer.load_params(exe.params)
    infer.step = exe.step
    return infer


def run(args) -> int:
    from ..data import DataError, load_dataset
    from ..data.classes import renamed
    from ..training import confusion_table, evaluate
    spec, exe, record = load_infer(args)
    data = load_dataset(args.data, args.data_dir, input_shape=spec.model.input,
                        num_classes=spec.model.num_classes,
                        val_fraction=args.val_fraction or record.val_fraction)
    difference = renamed(record.classes, data.class_names) if data.class_names else None
    if difference:
        raise DataError(f"{args.data_dir}: {difference}")
    evaluation = evaluate(exe, data.test_images, data.test_labels, data.num_classes,
                          normalize=record.normalization)
    print(f"{spec.name} at step {exe.step} on {data.name} test: accuracy "
          f"{evaluation.accuracy:.2%} ({evaluation.correct}/{evaluation.total})")
    print(confusion_table(evaluation.confusion, record.classes or data.class_names))
    return 0
