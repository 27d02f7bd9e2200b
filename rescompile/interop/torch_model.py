"""The same model as a PyTorch module: a spec's forward graph (as built, before passes) run op
by op in torch with the executable's weights, NCHW tensors in channels_last memory format.

Used as an outside numerical check in tests and as the baseline in benchmarks. Each IR op maps
to the torch call that computes the same thing; TensorFlow's SAME padding becomes an explicit
pad, since torch pads symmetrically.
"""

from __future__ import annotations

import numpy as np

from ..autodiff import decayed_variables
from ..build import build
from ..padding import pads_2d
from .layouts import oihw_from_hwio


def torch_module(spec, params: dict, mode: str = "infer", dtype: str = "float32",
                 device: str = "cpu"):
    import torch

    graph = build(spec, mode, dtype).graph

    class SpecModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.graph = graph
            self.names = {}
            for name, role in graph.inputs.items():
                if role in ("param", "state"):
                    tensor = torch.tensor(_torch_layout(name, params[name]))
                    key = f"v{len(self.names)}"
                    self.names[name] = key
                    if role == "param":
                        self.register_parameter(key, torch.nn.Parameter(tensor))
                    else:
                        self.register_buffer(key, tensor)

        def forward(self, images):
            env = {"images": images}
            for name, key in self.names.items():
                env[name] = getattr(self, key)
            for node in self.graph.nodes:
                outs = TORCH_OPS[node.op](node.attrs, *[env[i] for i in node.inputs])
                env.update(zip(node.outputs, outs if isinstance(outs, tuple) else (outs,)))
            return env[self.graph.outputs["logits"]]

    return SpecModule().to(device=device, memory_format=torch.channels_last)


def train_step_fn(module, spec, images, labels, autocast: bool = False):
    """One step as the spec trains, in PyTorch's own terms: cross_entropy with the spec's
    label smoothing; SGD with its momentum (PyTorch's dampening-free momentum is TensorFlow's
    update) or Nesterov momentum, and weight decay on what `train.weight_decay_on` names
    (SGD's weight_decay adds wd * w to the gradient: the gradient of our wd * w**2 / 2); the
    learning rate from LambdaLR with lambda t: lr_at(t) / peak. Returns the cross-entropy.
    `autocast`: the forward pass and the loss under autocast to bfloat16 (PyTorch's mixed
    precision; the backward pass follows the forward's types, the update is float32)."""
    import contextlib

    import torch
    train = spec.train
    decayed = set(decayed_variables(build(spec, "train").variables, train.weight_decay_on))
    params = {name: getattr(module, key) for name, key in module.names.items()
              if isinstance(getattr(module, key), torch.nn.Parameter)}
    groups = [{"params": [p for n, p in params.items() if n in decayed],
               "weight_decay": train.weight_decay},
              {"params": [p for n, p in params.items() if n not in decayed], "weight_decay": 0}]
    peak = train.learning_rate[0][1]
    momentum = train.momentum if train.optimizer == "momentum" else 0.0
    opt = torch.optim.SGD([g for g in groups if g["params"]], lr=peak, momentum=momentum,
                          nesterov=train.nesterov)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: train.lr_at(t) / peak)

    def step():
        opt.zero_grad(set_to_none=True)
        with (torch.autocast("cpu", dtype=torch.bfloat16) if autocast
              else contextlib.nullcontext()):
            loss = torch.nn.functional.cross_entropy(module(images), labels,
                                                     label_smoothing=train.label_smoothing)
        loss.backward()
        opt.step()
        schedule.step()
        return float(loss.detach())
    return step


def _torch_layout(name: str, value: np.ndarray) -> np.ndarray:
    """Conv kernels HWIO -> OIHW; everything else as is."""
    if name.endswith("/DW") and value.ndim == 4:
        return oihw_from_hwio(value)
    return value


def _conv(attrs, x, w):
    import torch.nn.functional as F
    k, s = w.shape[2], attrs["stride"]
    t, b, l, r = pads_2d(x.shape[2], x.shape[3], k, s, attrs["padding"])
    if (t, l) == (b, r):
        return F.conv2d(x, w, stride=s, padding=(t, l))
    return F.conv2d(F.pad(x, (l, r, t, b)), w, stride=s)


def _batch_norm(attrs, x, gamma, beta, *stats):
    import torch.nn.functional as F
    if attrs["training"]:
        y = F.batch_norm(x, None, None, gamma, beta, True, 0.0, attrs["epsilon"])
        return y, None, None
    return F.batch_norm(x, stats[0], stats[1], gamma, beta, False, 0.0, attrs["epsilon"])


def _relu(attrs, x):
    import torch.nn.functional as F
    return F.relu(x) if attrs["alpha"] == 0 else F.leaky_relu(x, attrs["alpha"])


def _max_pool(attrs, x):
    import torch.nn.functional as F
    k, s = attrs["k"], attrs["stride"]
    t, b, l, r = pads_2d(x.shape[2], x.shape[3], k, s, attrs["padding"])
    return F.max_pool2d(F.pad(x, (l, r, t, b), value=float("-inf")), k, s)


def _avg_pool(attrs, x):
    import torch.nn.functional as F
    return F.avg_pool2d(x, attrs["k"], attrs["k"])


def _pad_channels(attrs, x):
    import torch.nn.functional as F
    return F.pad(x, (0, 0, 0, 0, attrs["before"], attrs["after"]))  # NCHW: W, H, then C


TORCH_OPS = {
    "conv2d": _conv,
    "avg_pool": _avg_pool,
    "pad_channels": _pad_channels,
    "batch_norm": _batch_norm,
    "relu": _relu,
    "add": lambda a, x, y: x + y,
    "max_pool": _max_pool,
    "global_avg_pool": lambda a, x: x.mean(dim=(2, 3)),
    "dense": lambda a, x, w, b: x @ w + b,
}


def to_nchw(images: np.ndarray, device: str = "cpu"):
    import torch
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2) \
        .contiguous(memory_format=torch.channels_last)
