"""`rescompile eval`: test accuracy and confusion matrix of a checkpoint, on the folded
inference graph."""

from .common import add_backend, add_spec, resolve_spec
from .train import add_data


def register(sub) -> None:
    p = sub.add_parser("eval", help="test accuracy and confusion matrix of a checkpoint")
    add_spec(p)
    add_checkpoint(p)
    add_data(p)
    add_backend(p, default=None)
    p.set_defaults(func=run)


def add_checkpoint(p) -> None:
    p.add_argument("--checkpoint", metavar="DIR_OR_FILE", required=True,
                   help="a checkpoint file, or a directory (its newest checkpoint)")


def load_infer(args):
    """(spec, infer-mode executable) from the spec and checkpoint arguments."""
    from ..training import default_backend, load_for_spec, resolve
    spec = resolve_spec(args.spec)
    path = resolve(args.checkpoint)
    return spec, load_for_spec(path, spec, mode="infer", backend=args.backend or default_backend())


def run(args) -> int:
    from ..data import load_dataset
    from ..training import confusion_table, evaluate
    spec, exe = load_infer(args)
    data = load_dataset(args.data, args.data_dir, input_shape=spec.model.input,
                        num_classes=spec.model.num_classes)
    evaluation = evaluate(exe, data.test_images, data.test_labels, data.num_classes)
    print(f"{spec.name} at step {exe.step} on {data.name} test: accuracy "
          f"{evaluation.accuracy:.2%} ({evaluation.correct}/{evaluation.total})")
    print(confusion_table(evaluation.confusion))
    return 0
