"""Weights from PyTorch: a torchvision-layout ResNet (resnet18/34 with basic blocks,
resnet50/101/152 and the wide wide_resnet50_2/101_2 with bottlenecks) or a pre-activation CIFAR
ResNet, as a module or its state dict, as a spec and rescompile's variables (by their
TensorFlow names).

Layouts (module paths as the module names them; torchvision is not needed):

- torchvision: `conv1`, `bn1`, `layer{s}.{u}.conv{1,2,3}`, `.bn{1,2,3}` (a basic block has
  no conv3: two 3x3 convs, the stride on the first), `.downsample.{0,1}`, `fc`. ResNet v1
  with the stride on the 3x3 conv, symmetric padding, plain ReLU, batch-norm epsilon 1e-5 (a
  module's own epsilon when a module is given). A bottleneck's inner width (conv1's filters
  over conv3's) is the spec's `bottleneck_width`: 0.25, or 0.5 for the wide ones.
- preact (the common PyTorch CIFAR pre-activation ResNet, bottleneck or basic): `conv1`
  (3x3 stem), then `layer{s}.{u}.bn1`, `.conv1`, `.bn2`, `.conv2` (`.bn3`, `.conv3`),
  `.shortcut.0`, and the final `bn`, `linear`. The stride is on the 3x3 conv and a projection
  reads the activated input, as that code does.

Convolutions are converted from OIHW to HWIO and the classifier from [classes, features] to
[features, classes]; every tensor's shape is checked against the spec, and a missing,
leftover or mis-shaped tensor is refused by its module path. The spatial input size cannot be
read from weights: it is the given spec's, else `input` (default 224x224 for torchvision
models, 32x32 for CIFAR ones).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from ..build import ACTIVATION_SCOPES
from ..compiler import lower
from ..errors import InputError
from ..spec import ResNetSpec, load_spec
from .layouts import hwio_from_oihw

BN_FIELDS = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
             "running_var": "moving_variance"}
IGNORED = ("num_batches_tracked",)  # torch's counter of training steps: no weight
TORCHVISION_EPSILON, TORCH_MOMENTUM = 1e-5, 0.1


def from_torch(source, spec=None, input=None) -> tuple[ResNetSpec, dict[str, np.ndarray]]:
    """(spec, params) from a torch.nn.Module or a state dict; with `spec`, the weights must
    fit it (it is checked against what the weights say), else the spec is inferred."""
    state, epsilon = _state(source)
    layout = _layout(state)
    inferred = _infer_spec(state, layout, epsilon, input)
    spec = _checked(load_spec(spec), inferred) if spec is not None else inferred
    return spec, _params(state, layout, spec)


def _state(source) -> tuple[dict[str, np.ndarray], float | None]:
    """The tensors as float arrays by key, and the batch norms' epsilon if a module says."""
    epsilon = None
    if hasattr(source, "state_dict") and callable(source.state_dict):
        epsilons = {m.eps for m in source.modules() if hasattr(m, "running_var")}
        if len(epsilons) > 1:
            raise InputError(f"the module's batch norms use several epsilons "
                             f"{sorted(epsilons)}; rescompile's spec has one")
        epsilon = epsilons.pop() if epsilons else None
        source = source.state_dict()
    if not isinstance(source, Mapping):
        raise InputError(f"expected a torch.nn.Module or a state dict, got "
                         f"{type(source).__name__}")
    state = {}
    for key, tensor in source.items():
        if str(key).rsplit(".", 1)[-1] in IGNORED:
            continue
        array = _array(key, tensor)
        if array.dtype.kind != "f":
            raise InputError(f"tensor {key!r}: dtype {array.dtype} is not a float type")
        state[str(key)] = array
    return state, epsilon


def _array(key, tensor) -> np.ndarray:
    """A tensor's values as a NumPy array; bfloat16 (which NumPy lacks) widened to float32,
    exactly."""
    if not hasattr(tensor, "detach"):
        try:
            return np.asarray(tensor)
        except ValueError as exc:  # a ragged list
            raise InputError(f"tensor {key!r}: not an array ({exc})") from None
    if tensor.is_meta:
        raise InputError(f"tensor {key!r} is on the meta device: it holds no values")
    tensor = tensor.detach().cpu()
    if str(tensor.dtype) == "torch.bfloat16":
        tensor = tensor.float()
    try:
        return tensor.numpy()
    except (TypeError, RuntimeError) as exc:  # a sparse layout, a dtype NumPy lacks
        raise InputError(f"tensor {key!r}: {tensor.dtype} {tensor.layout} cannot be read as "
                         f"an array ({str(exc)[:80]})") from None


def _layout(state: dict) -> str:
    if {"conv1.weight", "bn1.weight", "fc.weight"} <= set(state):
        return "torchvision"
    if {"conv1.weight", "bn.weight", "linear.weight"} <= set(state):
        return "preact"
    raise InputError("not a supported ResNet: expected torchvision's module paths (conv1, bn1, "
                     "layer1.0.conv1, ..., fc) or a pre-activation CIFAR ResNet's (conv1, "
                     "layer1.0.bn1, ..., bn, linear)")


def _units(state: dict) -> list[int]:
    """Units per stage, from the `layer{s}.{u}.` paths; stages numbered from 1 without gaps."""
    found: dict[int, set[int]] = {}
    for key in state:
        match = re.match(r"layer(\d+)\.(\d+)\.", key)
        if match:
            found.setdefault(int(match[1]), set()).add(int(match[2]))
    if not found or sorted(found) != list(range(1, len(found) + 1)):
        raise InputError(f"not a supported ResNet: stages {sorted(found)} (expected layer1, "
                         f"layer2, ...)")
    for stage, units in found.items():
        if sorted(units) != list(range(len(units))):
            raise InputError(f"not a supported ResNet: layer{stage} has blocks {sorted(units)}")
    return [len(found[s]) for s in sorted(found)]


def unit_kind(has_conv3: bool, conv1_filters: int, last_filters: int) -> tuple[str, float]:
    """(unit, bottleneck_width) of a block with or without a third conv, from its first conv's
    filters and its last conv's (a bottleneck's width is their ratio)."""
    if not has_conv3:
        return "basic", 0.25
    return "bottleneck", conv1_filters / last_filters


def model_name(unit: str, width: float, units: list[int]) -> str:
    """resnet<depth>, and wide-resnet<depth>-<k> for a bottleneck k times ResNet's width."""
    depth = 2 + (2 if unit == "basic" else 3) * sum(units)
    return f"resnet{depth}" if width == 0.25 else f"wide-resnet{depth}-{width / 0.25:g}"


def _infer_spec(state: dict, layout: str, epsilon, input) -> ResNetSpec:
    units = _units(state)
    stem = state["conv1.weight"]
    head = state["fc.weight" if layout == "torchvision" else "linear.weight"]
    last = "conv3" if "layer1.0.conv3.weight" in state else "conv2"
    unit, width = unit_kind(last == "conv3", state["layer1.0.conv1.weight"].shape[0],
                                   state[f"layer1.0.{last}.weight"].shape[0])
    filters = [int(state[f"layer{s}.0.{last}.weight"].shape[0]) for s in range(1, len(units) + 1)]
    torchvision = layout == "torchvision"
    size = input or ((224, 224) if torchvision else (32, 32))
    model = {
        "input": [int(size[0]), int(size[1]), int(stem.shape[1])],
        "num_classes": int(head.shape[0]), "stem": "imagenet" if torchvision else "cifar",
        "stem_filters": int(stem.shape[0]), "unit": unit, "bottleneck_width": width,
        "preactivation": not torchvision,
        "stride_on": "conv2" if unit == "bottleneck" else "conv1", "padding": "symmetric",
        "stages": [{"filters": f, "units": n, "stride": 1 if s == 0 else 2}
                   for s, (f, n) in enumerate(zip(filters, units))],
        "activate_before_residual": [True] * len(units) if not torchvision else
        [True] + [False] * (len(units) - 1),
        "relu_leakiness": 0.0}
    return load_spec({"name": f"{layout}-{model_name(unit, width, units)}", "model": model,
                      "batch_norm": {
        "epsilon": epsilon or TORCHVISION_EPSILON, "decay": 1 - TORCH_MOMENTUM}})


def _checked(spec: ResNetSpec, inferred: ResNetSpec) -> ResNetSpec:
    """The given spec, if its model is the one the weights describe (input size aside)."""
    given, wanted = spec.model, inferred.model
    for field in ("num_classes", "stem", "stem_filters", "unit", "shortcut", "bottleneck_width",
                  "preactivation", "stages"):
        if getattr(given, field) != getattr(wanted, field):
            raise InputError(f"spec {spec.name!r}: model.{field} is {getattr(given, field)!r}, "
                             f"but the weights describe {getattr(wanted, field)!r}")
    if given.input[2] != wanted.input[2]:
        raise InputError(f"spec {spec.name!r}: model.input has {given.input[2]} channels, the "
                         f"stem conv takes {wanted.input[2]}")
    return spec


def _names(layout: str, spec: ResNetSpec) -> dict[str, tuple[str, str]]:
    """torch key -> (rescompile variable, layout conversion)."""
    names = {"conv1.weight": ("init/init_conv/DW", "conv")}
    head, final = (("fc", "bn1"), "init/init_bn") if layout == "torchvision" else \
        (("linear", "bn"), "unit_last/final_bn")
    names.update(_bn(head[1], final))
    names[f"{head[0]}.weight"] = ("logit/DW", "dense")
    names[f"{head[0]}.bias"] = ("logit/biases", "copy")
    convs = 2 if spec.model.unit == "basic" else 3
    for s, stage in enumerate(spec.model.stages, start=1):
        for u in range(stage.units):
            torch_unit, ours = f"layer{s}.{u}", f"unit_{s}_{u}"
            for k in range(1, convs + 1):
                names[f"{torch_unit}.conv{k}.weight"] = (f"{ours}/sub{k}/conv{k}/DW", "conv")
            names.update(_unit_norms(layout, torch_unit, ours, spec, s, u, convs))
            projection = "downsample.0" if layout == "torchvision" else "shortcut.0"
            names[f"{torch_unit}.{projection}.weight"] = (f"{ours}/sub_add/project/DW", "conv")
    return names


def _unit_norms(layout, torch_unit, ours, spec, s, u, convs) -> dict:
    if layout == "torchvision":
        names = {}
        for k in range(1, convs + 1):
            names.update(_bn(f"{torch_unit}.bn{k}", f"{ours}/sub{k}/bn{k}"))
        names.update(_bn(f"{torch_unit}.downsample.1", f"{ours}/sub_add/project_bn"))
        return names
    shared, residual_only = ACTIVATION_SCOPES[spec.model.unit]
    first = shared if spec.model.activate_before_residual[s - 1] and u == 0 else residual_only
    names = _bn(f"{torch_unit}.bn1", f"{ours}/{first}/init_bn")
    for k in range(2, convs + 1):
        names.update(_bn(f"{torch_unit}.bn{k}", f"{ours}/sub{k}/bn{k}"))
    return names


def _bn(torch_path: str, scope: str) -> dict:
    return {f"{torch_path}.{field}": (f"{scope}/{ours}", "copy")
            for field, ours in BN_FIELDS.items()}


CONVERT = {"conv": hwio_from_oihw, "dense": lambda a: a.T,
           "copy": lambda a: a}


def _params(state: dict, layout: str, spec: ResNetSpec) -> dict[str, np.ndarray]:
    expected = lower(spec, "infer", "float64", optimize=False).model.variables
    names = {k: v for k, v in _names(layout, spec).items() if v[0] in expected}
    leftover = sorted(set(state) - set(names))
    if leftover:
        raise InputError(f"tensor {leftover[0]!r} has no place in {spec.name!r} "
                         f"({len(leftover)} such tensors)")
    params = {}
    for key, (name, conversion) in names.items():
        if key not in state:
            raise InputError(f"tensor {key!r} is missing (it would be {name!r})")
        value = np.ascontiguousarray(CONVERT[conversion](state[key]))
        if value.shape != tuple(expected[name].shape):
            raise InputError(f"tensor {key!r}: shape {list(state[key].shape)} does not fit "
                             f"{name!r} of shape {list(expected[name].shape)} "
                             f"(as {conversion}: {list(value.shape)})")
        params[name] = value
    return params
