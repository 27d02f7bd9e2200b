"""Spec -> forward graph, with every variable named as in the seed's TensorFlow scopes.

Pre-activation units (v2, the seed's) and ResNet v1's post-activation units, bottleneck (1x1,
3x3, 1x1) or basic (3x3, 3x3), are all built here; they share the scope scheme
(`unit_1_0/sub1/conv1/DW`, `.../sub2/bn2/gamma`, `.../sub_add/project/DW`), v1 adding
`sub1/bn1` and `sub_add/project_bn`. The shortcut is a projection or the seed's `_residual`
one: an average pool with the stride and zero channels on both sides, which has no variables.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import UsageError
from .ir import BATCH, Graph, verify
from .precision import compute_dtype
from .spec import STEMS, unit_convs

# The scope of a pre-activation unit's first batch norm, when the shortcut is taken after it
# (activate_before_residual) and when before it, as the seed's model file names them.
ACTIVATION_SCOPES = {"bottleneck": ("common_bn_relu", "residual_bn_relu"),
                     "basic": ("shared_activation", "residual_only_activation")}

MODES = ("train", "infer")


@dataclass(frozen=True)
class Variable:
    """A model variable: its TF name, shape, role and how the seed initialises it."""
    name: str
    shape: tuple
    role: str  # "param" (trainable) or "state" (moving statistics)
    init: str  # "he_normal", "unit_scaling", "zeros", "ones"


@dataclass
class Model:
    """A built forward graph and the variables it reads."""
    graph: Graph
    variables: dict[str, Variable]
    activations: dict[str, str]  # scope of each unit ("init", "unit_1_0", "unit_last") -> value


def build(spec, mode: str = "infer", dtype: str = "float64") -> Model:
    if mode not in MODES:
        raise UsageError(f"mode must be one of {MODES}, got {mode!r}")
    # a bfloat16 model's graph is a float32 graph: only what it stores differs (precision.py)
    builder = _Builder(spec, mode, compute_dtype(dtype))
    logits = builder.network()
    builder.graph.outputs["logits"] = logits
    verify(builder.graph)
    return Model(builder.graph, builder.variables, builder.activations)


class _Builder:
    def __init__(self, spec, mode: str, dtype: str):
        self.spec, self.model, self.mode = spec, spec.model, mode
        self.graph = Graph(dtype=dtype)
        self.variables: dict[str, Variable] = {}
        self.activations: dict[str, str] = {}

    # -- variables and nodes ----------------------------------------------------------------
    def variable(self, name: str, shape: tuple, role: str, init: str) -> str:
        self.variables[name] = Variable(name, tuple(shape), role, init)
        return self.graph.add_input(name, shape, role)

    def node(self, op: str, inputs, attrs, scope: str, name: str | None = None):
        outs = self.graph.add_node(op, inputs, attrs, name=name or scope, scope=scope)
        return outs[0] if len(outs) == 1 else outs

    def channels(self, value: str) -> int:
        return self.graph.value(value).shape[-1]

    # -- layers ---------------------------------------------------------------------------
    def conv(self, scope: str, x: str, k: int, out: int, stride: int) -> str:
        w = self.variable(f"{scope}/DW", (k, k, self.channels(x), out), "param", "he_normal")
        return self.node("conv2d", [x, w], {"stride": stride, "padding": self.model.padding},
                         scope)

    def batch_norm(self, scope: str, x: str) -> str:
        c = (self.channels(x),)
        beta = self.variable(f"{scope}/beta", c, "param", "zeros")
        gamma = self.variable(f"{scope}/gamma", c, "param", "ones")
        mean = self.variable(f"{scope}/moving_mean", c, "state", "zeros")
        var = self.variable(f"{scope}/moving_variance", c, "state", "ones")
        attrs = {"epsilon": self.spec.batch_norm.epsilon, "training": self.mode == "train"}
        if self.mode == "train" and self.spec.batch_norm.sync:
            attrs["sync"] = True
        if self.mode == "train":
            # The moving statistics are read only by the update that training appends.
            return self.node("batch_norm", [x, gamma, beta], attrs, scope)[0]
        return self.node("batch_norm", [x, gamma, beta, mean, var], attrs, scope)

    def relu(self, scope: str, x: str) -> str:
        return self.node("relu", [x], {"alpha": self.model.relu_leakiness}, f"{scope}/relu")

    def bn_relu(self, bn_scope: str, x: str) -> str:
        return self.relu(bn_scope.rsplit("/", 1)[0], self.batch_norm(bn_scope, x))

    # -- network --------------------------------------------------------------------------
    def network(self) -> str:
        h, w, c = self.model.input
        x = self.graph.add_input("images", (BATCH, h, w, c), "data")
        x = self.stem(x)
        in_filters = self.model.stem_filters
        for i, stage in enumerate(self.model.stages, start=1):
            for j in range(stage.units):
                stride = stage.stride if j == 0 else 1
                before = self.model.activate_before_residual[i - 1] and j == 0
                x = self.unit(f"unit_{i}_{j}", x, in_filters, stage.filters, stride, before)
                in_filters = stage.filters
        return self.head(x)

    def stem(self, x: str) -> str:
        stem = STEMS[self.model.stem]
        x = self.conv("init/init_conv", x, stem.kernel, self.model.stem_filters, stem.stride)
        if not self.model.preactivation:
            x = self.bn_relu("init/init_bn", x)
        if stem.pool:
            k, stride = stem.pool
            x = self.node("max_pool", [x], {"k": k, "stride": stride,
                                            "padding": self.model.padding}, "init/pool")
        self.activations["init"] = x
        return x

    def unit(self, scope: str, x: str, in_f: int, out_f: int, stride: int, before: bool) -> str:
        build_unit = self.preact_unit if self.model.preactivation else self.postact_unit
        y = build_unit(scope, x, in_f, out_f, stride, before)
        self.activations[scope] = y
        return y

    def convs(self, out_f: int, stride: int):
        """(scope of conv k, kernel size, filters, stride) of the residual branch."""
        convs = unit_convs(dataclasses.asdict(self.model), out_f, stride)
        return [(f"sub{k}", *conv) for k, conv in enumerate(convs, start=1)]

    def preact_unit(self, scope, x, in_f, out_f, stride, activate_before_residual):
        shared, residual_only = ACTIVATION_SCOPES[self.model.unit]
        if activate_before_residual:
            x = self.bn_relu(f"{scope}/{shared}/init_bn", x)
            shortcut = x
        else:
            shortcut = x
            x = self.bn_relu(f"{scope}/{residual_only}/init_bn", x)
        for k, (sub, size, filters, s) in enumerate(self.convs(out_f, stride), start=1):
            if k > 1:
                x = self.bn_relu(f"{scope}/{sub}/bn{k}", x)
            x = self.conv(f"{scope}/{sub}/conv{k}", x, size, filters, s)
        shortcut = self.shortcut(scope, shortcut, in_f, out_f, stride)
        return self.node("add", [x, shortcut], {}, f"{scope}/sub_add/add")

    def postact_unit(self, scope, x, in_f, out_f, stride, _activate_before_residual):
        shortcut = x
        convs = self.convs(out_f, stride)
        for k, (sub, size, filters, s) in enumerate(convs, start=1):
            x = self.batch_norm(f"{scope}/{sub}/bn{k}",
                                self.conv(f"{scope}/{sub}/conv{k}", x, size, filters, s))
            if k < len(convs):
                x = self.relu(f"{scope}/{sub}", x)
        shortcut = self.shortcut(scope, shortcut, in_f, out_f, stride)
        return self.relu(f"{scope}/sub_add", self.node("add", [x, shortcut], {},
                                                       f"{scope}/sub_add/add"))

    def shortcut(self, scope, x, in_f, out_f, stride) -> str:
        """The identity where the shape does not change; else a 1x1 projection (with batch
        norm in v1), or the seed's average pool with the stride and zero channels on both
        sides (no variables)."""
        if in_f == out_f and stride == 1:
            return x
        if self.model.shortcut == "projection":
            x = self.conv(f"{scope}/sub_add/project", x, 1, out_f, stride)
            if not self.model.preactivation:
                x = self.batch_norm(f"{scope}/sub_add/project_bn", x)
            return x
        if stride > 1:
            x = self.node("avg_pool", [x], {"k": stride}, f"{scope}/sub_add/pool")
        if out_f > in_f:
            pad = (out_f - in_f) // 2
            x = self.node("pad_channels", [x], {"before": pad, "after": out_f - in_f - pad},
                          f"{scope}/sub_add/pad")
        return x

    def head(self, x: str) -> str:
        if self.model.preactivation:
            x = self.bn_relu("unit_last/final_bn", x)
        x = self.node("global_avg_pool", [x], {}, "unit_last/pool")
        self.activations["unit_last"] = x
        c = self.channels(x)
        w = self.variable("logit/DW", (c, self.model.num_classes), "param", "unit_scaling")
        b = self.variable("logit/biases", (self.model.num_classes,), "param", "zeros")
        return self.node("dense", [x, w, b], {}, "logit/dense")
