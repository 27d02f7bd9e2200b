"""Seeded variable initialisation, as the seed's model does it.

Conv kernels: He normal, stddev sqrt(2 / (k * k * out)). The dense weight: TF's
uniform_unit_scaling_initializer (factor 1): U(-sqrt(3 / in), sqrt(3 / in)). Biases and beta 0,
gamma 1, moving mean 0, moving variance 1.
"""

import zlib

import numpy as np


def _he_normal(rng, shape):
    k, _, _, out = shape
    return rng.normal(0.0, np.sqrt(2.0 / (k * k * out)), size=shape)


def _unit_scaling(rng, shape):
    limit = np.sqrt(3.0 / int(np.prod(shape[:-1])))
    return rng.uniform(-limit, limit, size=shape)


INITIALIZERS = {
    "he_normal": _he_normal,
    "unit_scaling": _unit_scaling,
    "zeros": lambda rng, shape: np.zeros(shape),
    "ones": lambda rng, shape: np.ones(shape),
}


def initial_values(variables, seed: int, dtype: str) -> dict[str, np.ndarray]:
    """Every variable's initial value; each draws from a stream keyed by its name, so adding a
    variable never changes another's values."""
    values = {}
    for var in variables.values():
        rng = np.random.default_rng([seed, zlib.crc32(var.name.encode())])
        values[var.name] = np.array(INITIALIZERS[var.init](rng, var.shape), dtype=dtype)
    return values
