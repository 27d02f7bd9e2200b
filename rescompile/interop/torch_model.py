"""The same model as a PyTorch module: a spec's forward graph (as built, before passes) run op
by op in torch with the executable's weights, NCHW tensors in channels_last memory format.

Used as an outside numerical check in tests and as the baseline in benchmarks. Each IR op maps
to the torch call that computes the same thing; TensorFlow's SAME padding becomes an explicit
pad, since torch pads symmetrically.
"""

from __future__ import annotations

import numpy as np

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


def train_step_fn(module, spec, images, labels):
    """One step as the spec trains: mean cross-entropy plus weight decay on every DW, SGD with
    TensorFlow's momentum (torch's dampening-free momentum is the same update)."""
    import torch
    decayed = [getattr(module, key) for name, key in module.names.items()
               if name.endswith("/DW")]
    params = [p for p in module.parameters()]
    opt = torch.optim.SGD(params, lr=spec.train.lr_at(0), momentum=spec.train.momentum)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(module(images), labels)
        loss = loss + spec.train.weight_decay * sum((w * w).sum() / 2 for w in decayed)
        loss.backward()
        opt.step()
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


TORCH_OPS = {
    "conv2d": _conv,
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
