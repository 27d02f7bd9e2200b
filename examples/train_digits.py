"""Train the digits ResNet through the Python API: what `rescompile train examples/digits.toml
--data digits` does, without its checkpoint directory, progress bar and log.

    python examples/train_digits.py [--backend reference|cpu] [--steps N] [-o digits.npz]
"""

import argparse
import time
from pathlib import Path

import numpy as np

import rescompile as rc
from rescompile.data import BatchStream, Prefetcher, eval_batches, load_dataset

SPEC = Path(__file__).with_name("digits.toml")


def accuracy(infer, data) -> float:
    correct = sum(int((np.argmax(infer.forward(images), axis=1) == labels).sum())
                  for images, labels in eval_batches(data.test_images, data.test_labels, 256))
    return correct / len(data.test_labels)


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--backend", default="reference")
    args.add_argument("--steps", type=int, default=400)
    args.add_argument("-o", "--output", default="digits.npz")
    args = args.parse_args()

    spec = rc.load_spec(SPEC)
    data = load_dataset("digits", input_shape=spec.model.input,
                        num_classes=spec.model.num_classes)
    exe = rc.compile(spec, mode="train", backend=args.backend, seed=0)
    # Evaluation runs the folded inference graph, given the trained values.
    infer = rc.compile(spec, mode="infer", backend=args.backend)
    # No augmentation: mirroring or cropping 8x8 digits changes what they show.
    stream = BatchStream(data, spec.train.batch_size, seed=0, augment=False)

    start = time.perf_counter()
    with Prefetcher(stream) as batches:
        while exe.step < args.steps:
            loss = exe.train_step(*next(batches))
            if exe.step % 100 == 0:
                infer.load_params(exe.params)
                print(f"step {exe.step}: loss {loss:.4f}, lr {exe.learning_rate():g}, "
                      f"test accuracy {accuracy(infer, data):.2%}")
    print(f"{args.steps} steps in {time.perf_counter() - start:.1f} s")
    exe.save(args.output)  # rc.load(args.output, mode="infer") serves it
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
