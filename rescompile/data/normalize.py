"""How pixels become model inputs. "image" is the seed's per-image standardisation
(tf.image.per_image_standardization, `augment.standardize`); "channel" subtracts each channel's
mean over the training split and divides by its standard deviation, as torchvision's
Normalize(mean, std) does with a data set's statistics. Either works on uint8 pixels and on
float images of any scale; the statistics travel in the checkpoint (`record.py`), so `eval`
and `predict` normalise as training did."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .augment import standardize

KINDS = ("image", "channel")
CHUNK = 1024  # images per pass when summing squared deviations: bounded float64 scratch


@dataclass(frozen=True)
class Normalization:
    kind: str = "image"
    mean: tuple[float, ...] = ()  # per channel, for "channel"
    std: tuple[float, ...] = ()

    @classmethod
    def fit(cls, kind: str, images: np.ndarray) -> Normalization:
        """The normalisation of `kind` with its statistics from `images` (NHWC)."""
        if kind == "image":
            return cls()
        mean, std = channel_moments(images)
        return cls(kind, tuple(mean.tolist()), tuple(std.tolist()))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """NHWC pixels -> float32 model inputs."""
        if self.kind == "image":
            return standardize(images)
        centred = images.astype(np.float64) - np.asarray(self.mean)
        return (centred / np.asarray(self.std)).astype(np.float32)


def channel_moments(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (biased) standard deviation in float64, two passes. A constant
    channel carries nothing to scale: its deviation is taken as 1, so it stays finite."""
    count = images.size // images.shape[-1]
    mean = images.sum(axis=(0, 1, 2), dtype=np.float64) / count
    squares = np.zeros_like(mean)
    for start in range(0, len(images), CHUNK):
        deviation = images[start:start + CHUNK].astype(np.float64) - mean
        squares += np.einsum("nhwc,nhwc->c", deviation, deviation)
    std = np.sqrt(squares / count)
    return mean, np.where(std > 0, std, 1.0)
