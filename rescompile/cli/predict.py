"""`rescompile predict`: top classes and probabilities for images in a .npy file."""

import json
from pathlib import Path

import numpy as np

from ..errors import UsageError
from .common import add_backend, add_spec, positive_int
from .eval import add_checkpoint, load_infer

BATCH = 256


def register(sub) -> None:
    p = sub.add_parser("predict", help="classify images from a .npy file")
    add_spec(p)
    add_checkpoint(p)
    p.add_argument("images", metavar="IMAGES.npy", help="NHWC float images, or uint8 pixels "
                   "(fitted and standardized as for evaluation)")
    p.add_argument("--top", type=positive_int, default=1, metavar="K")
    p.add_argument("-o", "--output", metavar="OUT.json|OUT.npy", help=".json: top K classes "
                   "and probabilities per image; .npy: every class's probability [N, classes]")
    add_backend(p, default=None)
    p.set_defaults(func=run)


def run(args) -> int:
    if args.output and Path(args.output).suffix not in (".json", ".npy"):
        raise UsageError(f"-o {args.output}: the output must end in .json or .npy")
    spec, exe = load_infer(args)
    if not 1 <= args.top <= spec.model.num_classes:
        raise UsageError(f"--top must be between 1 and {spec.model.num_classes}, got {args.top}")
    images = _images(args.images, spec.model.input)
    logits = np.concatenate([exe.forward(images[i:i + BATCH])
                             for i in range(0, len(images), BATCH)])
    probabilities = _softmax(logits)
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :args.top]
    if args.output:
        _write(args.output, probabilities, top)
    else:
        for index, classes in enumerate(top):
            picks = ", ".join(f"{c} ({probabilities[index, c]:.3f})" for c in classes)
            print(f"{index}: {picks}")
    return 0


def _images(path, input_shape) -> np.ndarray:
    from ..archive import parse_npy
    from ..data import DataError, fit_images
    from ..data.augment import eval_transform
    from ..fileio import memory_limit, read_bounded
    data = read_bounded(path, "images", memory_limit(), "half the memory available",
                        DataError)
    images = parse_npy(path, "images", data, error=DataError)
    if images.ndim != 4 or not len(images):
        raise DataError(f"{path}: expected images [N, H, W, C] with N >= 1, got shape "
                        f"{list(images.shape)}")
    if images.dtype == np.uint8:
        return eval_transform(fit_images(images, input_shape, str(path)))
    return images  # floats go in as they are; the executable checks their shape


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _write(path, probabilities: np.ndarray, top: np.ndarray) -> None:
    from ..fileio import atomic_write
    if Path(path).suffix == ".npy":
        atomic_write(path, lambda f: np.save(f, probabilities))
        return
    rows = [{"classes": classes.tolist(), "probabilities": probabilities[i, classes].tolist()}
            for i, classes in enumerate(top)]
    atomic_write(path, lambda f: f.write(json.dumps(rows, indent=1).encode()))
