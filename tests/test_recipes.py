"""The training recipes of the spec's [train] table against PyTorch: Nesterov momentum
(SGD(nesterov=True)), a cosine schedule with linear warm-up (LambdaLR), label smoothing
(cross_entropy(label_smoothing=)) and weight decay on every trainable, on the same weights
over several steps.

float64 throughout: after 6 steps the weights agree to 1e-10 relative, what two float64
implementations of the same arithmetic give (summation order differs); any recipe applied
differently (a missing smoothing term, a step of the schedule off by one, plain momentum for
Nesterov) moves them by 1e-3 or more.
"""

import numpy as np
import pytest

import rescompile as rc
from conftest import random_bn_state, rel_err, tiny_spec

torch = pytest.importorskip("torch")
from rescompile.interop.layouts import hwio_from_oihw  # noqa: E402
from rescompile.interop.torch_model import to_nchw, torch_module, train_step_fn  # noqa: E402

STEPS = 6
RECIPE = {"schedule": "cosine", "learning_rate": [[0, 0.2]], "warmup_steps": 2,
          "warmup_start": 0.25, "total_steps": 5, "min_lr": 0.01, "nesterov": True,
          "momentum": 0.8, "label_smoothing": 0.2, "weight_decay": 0.05,
          "weight_decay_on": "all"}


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_recipe_matches_pytorch(backend):
    spec = tiny_spec().replace(train=RECIPE)
    exe = rc.compile(spec, mode="train", backend=backend, dtype="float64", seed=1)
    exe.load_params(random_bn_state(exe, seed=2))
    rng = np.random.default_rng(3)
    images, labels = rng.standard_normal((4, 8, 8, 3)), np.array([0, 1, 4, 2])
    module = torch_module(spec, exe.params, "train", "float64")
    torch_step = train_step_fn(module, spec, to_nchw(images), torch.from_numpy(labels))
    for _ in range(STEPS):
        exe.train_step(images, labels)
        torch_step()
    compared = 0
    for name, key in module.names.items():
        param = getattr(module, key)
        if isinstance(param, torch.nn.Parameter):
            expected = param.detach().numpy()
            if expected.ndim == 4:
                expected = hwio_from_oihw(expected)
            assert rel_err(exe.params[name], expected) < 1e-10, name
            compared += 1
    assert compared == sum(1 for n in exe.params if "moving" not in n)
