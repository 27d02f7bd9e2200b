"""`rescompile predict`: top classes and probabilities for images in .npy, PNG or JPEG files,
prepared as the checkpoint's training prepared its images, and named by its class names."""

import json
from pathlib import Path

import numpy as np

from ..errors import UsageError
from .common import add_backend, add_dtype, add_spec, positive_int
from .eval import add_checkpoint, load_infer

BATCH = 256


def register(sub) -> None:
    p = sub.add_parser("predict", help="classify images from .npy, PNG or JPEG files")
    add_spec(p)
    add_checkpoint(p)
    p.add_argument("images", nargs="+", metavar="IMAGES", help=".npy files of NHWC images "
                   "(uint8 pixels, or floats on the training data's scale), or PNG/JPEG files; "
                   "fitted and normalised as the checkpoint's training data were")
    p.add_argument("--top", type=positive_int, default=1, metavar="K")
    p.add_argument("-o", "--output", metavar="OUT.json|OUT.npy", help=".json: per image its "
                   "file (and row), top K classes (and names) and probabilities; .npy: every "
                   "class's probability [N, classes]")
    add_backend(p, default=None)
    add_dtype(p, default=None, what="the checkpoint's")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data.inputs import load_inputs
    if args.output and Path(args.output).suffix not in (".json", ".npy"):
        raise UsageError(f"-o {args.output}: the output must end in .json or .npy")
    spec, exe, record = load_infer(args)
    if not 1 <= args.top <= spec.model.num_classes:
        raise UsageError(f"--top must be between 1 and {spec.model.num_classes}, got {args.top}")
    inputs, arrays = load_inputs(args.images, spec.model.input)
    images = np.concatenate([record.normalization(a) for a in arrays])
    logits = np.concatenate([exe.forward(images[i:i + BATCH])
                             for i in range(0, len(images), BATCH)])
    probabilities = _softmax(logits)
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :args.top]
    if args.output:
        _write(args.output, inputs, probabilities, top, record.classes)
    else:
        for label, p, classes in zip(inputs, probabilities, top):
            picks = ", ".join(f"{_name(c, record.classes)} ({p[c]:.3f})" for c in classes)
            print(f"{label}: {picks}")
    return 0


def _name(k: int, names) -> str:
    return names[k] if names else str(k)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _write(path, inputs, probabilities: np.ndarray, top: np.ndarray, names) -> None:
    from ..fileio import atomic_write
    if Path(path).suffix == ".npy":
        atomic_write(path, lambda f: np.save(f, probabilities))
        return
    rows = []
    for label, p, classes in zip(inputs, probabilities, top):
        row = {"input": label, "classes": classes.tolist(),
               "probabilities": p[classes].tolist()}
        if names:
            row["names"] = [names[c] for c in classes]
        rows.append(row)
    atomic_write(path, lambda f: f.write(json.dumps(rows, indent=1).encode()))
