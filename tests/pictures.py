"""Small generated pictures for the image-folder tests: a coloured shape (circle, square or
cross) at a random place on a noisy background, as PNG or JPEG files, 16x24 so that reading
them resizes and crops."""

from pathlib import Path

import numpy as np
from PIL import Image

SHAPES = {"red circle": (220, 40, 40), "green square": (40, 200, 60), "blue cross": (50, 70, 230)}


def picture(rng, name: str, height: int = 16, width: int = 24) -> Image.Image:
    colour, shape = SHAPES[name], name.split()[1]
    pixels = rng.integers(0, 90, size=(height, width, 3)).astype(np.float64)
    cy, cx, r = rng.integers(5, height - 5), rng.integers(8, width - 8), rng.integers(3, 5)
    dy, dx = np.abs(np.mgrid[:height, :width] - np.array([cy, cx])[:, None, None])
    inside = {"circle": dy ** 2 + dx ** 2 <= r * r,
              "square": (dy <= r) & (dx <= r),
              "cross": ((dy <= 1) | (dx <= 1)) & (dy <= r) & (dx <= r)}[shape]
    pixels[inside] = np.array(colour) * rng.uniform(0.8, 1.0)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def save(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))
    return path


def shape_folder(root: Path, per_class: int, seed: int = 0) -> Path:
    """root/<class>/NNN.png (every sixth a .jpg) for each class of SHAPES."""
    rng = np.random.default_rng(seed)
    for name in SHAPES:
        for i in range(per_class):
            suffix = ".jpg" if i % 6 == 0 else ".png"
            save(picture(rng, name), root / name / f"{i:03d}{suffix}")
    return root
