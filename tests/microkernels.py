"""Calling one micro-kernel from a test: named fields and pointers in, through ctypes, with
float64 NumPy references for what each kernel computes."""

from __future__ import annotations

import ctypes

import numpy as np

from rescompile.backends.cpu.llvm import jit

_SIGNATURE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                              ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)


def call(kernel, fields: dict, pointers: dict, pixels: tuple, channels: tuple, cache_dir):
    """Run `kernel` on pixels [p0, p1) and channels [c0, c1); floats in `fields` are passed as
    float64 bits, as the arena does."""
    words = [np.float64(fields[n]).view(np.int64) if isinstance(fields[n], float)
             else int(fields[n]) for n in kernel.fields]
    consts = np.array(words, np.int64)
    addresses = np.array([pointers[n].ctypes.data for n in kernel.pointers], np.int64)
    fn = _SIGNATURE(jit.address(kernel, cache_dir))
    fn(consts.ctypes.data, addresses.ctypes.data, *pixels, *channels)


def strides(prefix: str, array: np.ndarray, pads=(0, 0)) -> dict:
    """Element strides of an [N, H, W, C] array, as the `<prefix>.image/row/pixel` fields."""
    _, h, w, c = array.shape
    return {f"{prefix}.image": h * w * c, f"{prefix}.row": w * c, f"{prefix}.pixel": c}


def padded(x: np.ndarray, pads, fill=0.0) -> np.ndarray:
    top, bottom, left, right = pads
    return np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=fill)


def conv_reference(x, w, stride, pads):
    """float64 NHWC convolution of x with HWIO w over explicit (top, bottom, left, right)."""
    xp = padded(x.astype(np.float64), pads)
    k = w.shape[0]
    oh = (xp.shape[1] - k) // stride + 1
    ow = (xp.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], oh, ow, w.shape[3]))
    for i in range(k):
        for j in range(k):
            taps = xp[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
            out += taps @ w[i, j].astype(np.float64)
    return out


def epilogue_reference(steps, first, value, operands, scalars):
    """The epilogue steps (numbered from `first`) in float64, operands by `s<i>.arg<j>`."""
    for index, op in enumerate(steps, start=first):
        arg = lambda j: operands[f"s{index}.arg{j}"].astype(np.float64)  # noqa: E731
        if op == "bias_add":
            value = value + arg(0)
        elif op == "affine":
            value = value * arg(0) + arg(1)
        elif op == "relu":
            alpha = scalars[f"s{index}.alpha"]
            value = np.where(value < 0, alpha * value, value)
        elif op == "add":
            value = value + arg(0)
        elif op == "relu_grad":
            value = np.where(arg(0) < 0, scalars[f"s{index}.alpha"] * value, value)
        elif op == "batch_normalize":
            inv = arg(0) / np.sqrt(arg(3) + scalars[f"s{index}.epsilon"])
            value = value * inv + (arg(1) - arg(2) * inv)
        else:
            raise ValueError(op)
    return value


def close(got, expected) -> float:
    """Max error relative to the expected tensor's max magnitude."""
    scale = max(np.abs(expected).max(), 1e-30)
    return float(np.abs(np.asarray(got, np.float64) - expected).max() / scale)
