"""Convolution kernel layouts across frameworks: rescompile's are HWIO (TensorFlow's, [k, k,
in, out]), PyTorch's and ONNX's OIHW ([out, in, k, k])."""

import numpy as np


def hwio_from_oihw(kernel: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(kernel.transpose(2, 3, 1, 0))


def oihw_from_hwio(kernel: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
