"""Calling one micro-kernel from a test: named fields and pointers in, through ctypes, with
float64 NumPy references for what each kernel computes."""

from __future__ import annotations

import ctypes

import numpy as np

from rescompile.backends.cpu.llvm import abi, jit

_SIGNATURE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                              ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)


def call(kernel, fields: dict, pointers: dict, pixels: tuple, channels: tuple, cache_dir):
    """Run `kernel` on pixels [p0, p1) and channels [c0, c1): the fields and pointers its
    signature declares, by name (others in the dicts are left out), its placed fields the
    arena's defaults unless given (`abi.placed_values`: through the caches); scalars are
    passed as float64 bits, as the arena does."""
    signature = kernel.signature
    fields = {**abi.placed_values(signature), **fields}
    words = [np.float64(fields[f.name]).view(np.int64) if f.kind == "scalar"
             else int(fields[f.name]) for f in signature.fields]
    consts = np.array(words, np.int64)
    addresses = np.array([pointers[p.role].ctypes.data for p in signature.pointers], np.int64)
    fn = _SIGNATURE(jit.address(kernel, cache_dir))
    fn(consts.ctypes.data, addresses.ctypes.data, *pixels, *channels)


def strides(prefix: str, array: np.ndarray) -> dict:
    """Element strides of an [N, H, W, C] array ([N, C]: of 1 x 1 images), as the
    `<prefix>.image/row/pixel` fields."""
    _, h, w, c = array.shape if array.ndim == 4 else (array.shape[0], 1, 1, array.shape[1])
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
    """The epilogue steps (numbered from `first`) in float64, written out independently of the
    ops' definitions; operands and scalars by the kernel's names, `e<step>.<name>`."""
    for index, op in enumerate(steps, start=first):
        arg = lambda name: operands[f"e{index}.{name}"].astype(np.float64)  # noqa: E731
        scalar = lambda name: scalars[f"e{index}.{name}"]  # noqa: E731
        if op == "bias_add":
            value = value + arg("bias")
        elif op == "affine":
            value = value * arg("scale") + arg("shift")
        elif op == "relu":
            value = np.where(value < 0, scalar("alpha") * value, value)
        elif op == "add":
            value = value + arg("other")
        elif op == "relu_grad":
            value = np.where(arg("x") < 0, scalar("alpha") * value, value)
        elif op == "batch_normalize":
            inv = arg("gamma") / np.sqrt(arg("var") + scalar("epsilon"))
            value = value * inv + (arg("beta") - arg("mean") * inv)
        else:
            raise ValueError(op)
    return value


def close(got, expected) -> float:
    """Max error relative to the expected tensor's max magnitude."""
    scale = max(np.abs(expected).max(), 1e-30)
    return float(np.abs(np.asarray(got, np.float64) - expected).max() / scale)


def run_eltwise(kernel, x, out, out2, operands: dict, scalars: dict, cache_dir) -> None:
    """An elementwise kernel over every pixel and channel of x (into out and out2), with its
    epilogue operands (per-channel vectors, or tensors of x's shape) and scalars."""
    n, h, w, c = x.shape
    fields = dict(oh=h, ow=w, **strides("x", x), **strides("out", out),
                  **strides("out2", out2), **scalars)
    for name, array in operands.items():
        if array.ndim == 4:
            fields.update(strides(name, array))
    call(kernel, fields, dict(x=x, out=out, out2=out2, **operands), (0, n * h * w), (0, c),
         cache_dir)
