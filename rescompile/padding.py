"""Spatial padding rules shared by every op with a window (conv, pooling).

"same" is TensorFlow's SAME: the output is ceil(in / stride) and the extra row or column of a
odd total padding goes after (bottom/right). "symmetric" is PyTorch's k//2 on both sides.
"""

PADDINGS = ("same", "symmetric")


def pads_1d(size: int, k: int, stride: int, padding: str) -> tuple[int, int]:
    """(before, after) padding of one spatial dimension."""
    if padding == "same":
        out = -(-size // stride)
        total = max((out - 1) * stride + k - size, 0)
        return total // 2, total - total // 2
    if padding == "symmetric":
        return k // 2, k // 2
    raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")


def window_out(size: int, k: int, stride: int, before: int, after: int) -> int:
    """How many positions a k-wide window takes, `stride` apart, over `size` padded by
    `before` and `after`: every window's output size is this one formula."""
    return (size + before + after - k) // stride + 1


def out_size(size: int, k: int, stride: int, padding: str) -> int:
    return window_out(size, k, stride, *pads_1d(size, k, stride, padding))


def pads_2d(h: int, w: int, k: int, stride: int, padding: str) -> tuple[int, int, int, int]:
    """(top, bottom, left, right)."""
    return pads_1d(h, k, stride, padding) + pads_1d(w, k, stride, padding)
