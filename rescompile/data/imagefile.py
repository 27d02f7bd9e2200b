"""One PNG or JPEG file as a model input, the way image-folder training prepares it:

- read as a bounded, regular file (`fileio.read_bounded`), then decoded by Pillow, whose
  decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`) stays as Pillow sets it;
- converted to the input's channels: 1 is grayscale ("L"), 3 is RGB (alpha dropped);
- resized (bilinear) so that it just covers the input, i.e. its shorter side to the input for a
  square input, as torchvision's Resize(size) does; then centre-cropped to the input.

Pillow is optional (the `images` extra), imported when an image is first read.
"""

from __future__ import annotations

import io
import zlib

import numpy as np

from ..errors import optional_module
from ..fileio import read_bounded
from .errors import DataError

SUFFIXES = (".png", ".jpg", ".jpeg")
FORMATS = ("PNG", "JPEG")
MODES = {1: "L", 3: "RGB"}
MAX_IMAGE_BYTES = 64 << 20  # a 64 MiB PNG or JPEG is already tens of megapixels


def is_image_file(path) -> bool:
    return path.suffix.lower() in SUFFIXES


def check_channels(input_shape, what: str) -> None:
    """Image files give grayscale or RGB; refuse a model input of other channels up front."""
    if input_shape[2] not in MODES:
        raise DataError(f"{what}: PNG and JPEG images give 1 (grayscale) or 3 (RGB) channels; "
                        f"the model's input has {input_shape[2]}")


def read_image(path, input_shape) -> np.ndarray:
    """uint8 [H, W, C] of `input_shape`; DataError naming the file if it cannot be read or
    decoded (truncated, corrupt, not PNG or JPEG, beyond the bomb limit)."""
    image_module = optional_module("PIL.Image", "reading PNG and JPEG images", "images")
    height, width, channels = input_shape
    data = read_bounded(path, "image", MAX_IMAGE_BYTES,
                        "a bigger PNG or JPEG is far past any input size", DataError)
    try:
        with image_module.open(io.BytesIO(data), formats=FORMATS) as image:
            image = image.convert(MODES[channels])  # decodes: truncation shows here
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error,
            image_module.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: cannot decode as PNG or JPEG ({reason})") from None
    return _cover_and_crop(image_module, image, height, width).reshape(height, width, channels)


def _cover_and_crop(image_module, image, height: int, width: int) -> np.ndarray:
    w, h = image.size
    scale = max(height / h, width / w)
    size = (max(width, round(w * scale)), max(height, round(h * scale)))
    if size != (w, h):
        image = image.resize(size, image_module.Resampling.BILINEAR)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return np.asarray(image.crop((left, top, left + width, top + height)), dtype=np.uint8)
