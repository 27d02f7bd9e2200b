"""ONNX in: a file rescompile exported (its spec in the metadata, its graph checked node for
node against the spec's), or a ResNet v1 as `torch.onnx.export` writes a torchvision-layout
module, with basic blocks (resnet18/34) or bottlenecks of any width (resnet50,
wide_resnet50_2), recognised by following the data flow from the input. Both of torch's
exporters are read: the TorchScript one (`dynamo=False`) and the default one (`dynamo=True`,
through onnxscript: opset 18, ReduceMean with its axes as an input, a Reshape before the
classifier); batch norm folded into the convs or not, local functions inlined first. Either
way: (spec, params by rescompile's TF names).

The file is parsed by the `onnx` package (protobuf: data, never code). Anything that does not
fit is refused with the first node that does not match and why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..build import build
from ..errors import InputError, SpecError
from ..fileio import open_regular
from ..resources import check_fits
from ..spec import ResNetSpec, load_spec
from .layouts import hwio_from_oihw
from .onnx_model import SPEC_KEY, onnx_nodes
from .torch_import import TORCHVISION_EPSILON, TORCH_MOMENTUM, model_name, unit_kind


def from_onnx(path, input=None) -> tuple[ResNetSpec, dict[str, np.ndarray]]:
    import onnx
    from onnx import external_data_helper, numpy_helper
    with open_regular(path, "ONNX model", InputError) as f:
        check_fits(2 * os.fstat(f.fileno()).st_size, f"{path}: the model")
        try:
            model = onnx.load(f, format="protobuf", load_external_data=False)
            # Tensors kept in files beside it (models over 2 GB): onnx refuses locations that
            # leave the model's directory.
            external_data_helper.load_external_data_for_model(model, os.path.dirname(path))
        except (OSError, ValueError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
            raise InputError(f"{path}: not a readable ONNX model ({exc})") from None
        except Exception as exc:  # protobuf's DecodeError has no common base with the above
            raise InputError(f"{path}: not a readable ONNX model ({type(exc).__name__})") \
                from None
    inits = {i.name: _initializer(path, i, numpy_helper) for i in model.graph.initializer}
    metadata = {p.key: p.value for p in model.metadata_props}
    if SPEC_KEY in metadata:
        return _own(path, model, metadata[SPEC_KEY], inits)
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    return _Tracer(path, model.graph, inits).resnet_v1(input)


def _initializer(path, tensor, numpy_helper) -> np.ndarray:
    try:
        return numpy_helper.to_array(tensor)
    except (ValueError, TypeError) as exc:  # data that does not fill its dims, say
        raise InputError(f"{path}: initializer {tensor.name[:80]!r} does not hold the data its "
                         f"dims {list(tensor.dims)[:8]} declare ({str(exc)[:80]})") from None


def _own(path, model, spec_text: str, inits: dict):
    """Our export: the spec must be valid, the graph exactly what it exports, the
    initializers exactly its variables."""
    try:
        spec = load_spec(spec_text)
    except SpecError as exc:
        raise InputError(f"{path}: its embedded spec is invalid: {exc}") from None
    params = {name: hwio_from_oihw(value) if value.ndim == 4 else value
              for name, value in inits.items()}
    built = build(spec, "infer", "float32")
    names = set(built.variables)
    for name in sorted(set(params) ^ names):
        what = "is not a variable of" if name in params else "is missing, a variable of"
        raise InputError(f"{path}: initializer {name!r} {what} spec {spec.name!r}")
    expected = onnx_nodes(built.graph)
    for got, want in zip(model.graph.node, expected):
        if (got.op_type, list(got.input), list(got.output), got.attribute) != \
                (want.op_type, list(want.input), list(want.output), want.attribute):
            raise InputError(f"{path}: node {got.name or got.output[0]!r} ({got.op_type}) is "
                             f"not what spec {spec.name!r} exports ({want.op_type} "
                             f"{list(want.input)})")
    if len(model.graph.node) != len(expected):
        raise InputError(f"{path}: {len(model.graph.node)} nodes, spec {spec.name!r} exports "
                         f"{len(expected)}")
    return spec, params


@dataclass
class ConvBn:
    """A Conv and the BatchNormalization after it, if any, as rescompile's conv + batch norm."""
    weight: np.ndarray    # OIHW
    stride: int
    pads: tuple           # ONNX order: top, left, bottom, right
    scale: np.ndarray
    shift: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    output: str


class _Tracer:
    def __init__(self, path, graph, inits):
        self.path, self.graph, self.inits = path, graph, inits
        self.consumers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.epsilon = None

    # -- the pieces ----------------------------------------------------------------------
    def refuse(self, node, why: str):
        name = node.name or (node.output[0] if node.output else "?")
        raise InputError(f"{self.path}: node {name!r} ({node.op_type}) does not fit a "
                         f"ResNet v1: {why}")

    def only(self, tensor: str, op: str | None = None, after=None):
        """The one node reading `tensor`, of type `op` if given."""
        users = self.consumers.get(tensor, [])
        if len(users) == 1 and op and users[0].op_type != op:
            self.refuse(users[0], f"expected a {op} here")
        if len(users) != 1:
            what = ", ".join(u.op_type for u in users) or "nothing"
            if after is None:
                raise InputError(f"{self.path}: tensor {tensor!r} feeds {what}, expected one "
                                 f"{op or 'node'}")
            self.refuse(after, f"its output feeds {what}, expected one {op or 'node'}")
        return users[0]

    def attrs(self, node) -> dict:
        from onnx import helper
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def conv_bn(self, conv) -> ConvBn:
        """A Conv (weights, optional bias) and an optional BatchNormalization after it."""
        if conv.op_type != "Conv" or conv.input[1] not in self.inits:
            self.refuse(conv, "expected a Conv with constant weights")
        a = self.attrs(conv)
        strides, weight = a.get("strides", [1, 1]), self.inits[conv.input[1]]
        if a.get("group", 1) != 1 or a.get("dilations", [1, 1]) != [1, 1] or \
                strides[0] != strides[1] or weight.shape[2] != weight.shape[3]:
            self.refuse(conv, "grouped, dilated or non-square convolutions are not ResNet's")
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            self.refuse(conv, f"auto_pad {a['auto_pad']!r}: only explicit pads are read")
        bias = self.inits.get(conv.input[2]) if len(conv.input) > 2 else None
        out = conv.output[0]
        users = self.consumers.get(out, [])
        channels = weight.shape[0]
        if len(users) == 1 and users[0].op_type == "BatchNormalization":
            bn = users[0]
            scale, shift, mean, var = (self.inits[n] for n in bn.input[1:5])
            epsilon = self.attrs(bn).get("epsilon", 1e-5)
            if self.epsilon is not None and not np.isclose(epsilon, self.epsilon):
                self.refuse(bn, f"epsilon {epsilon} differs from the others' {self.epsilon}")
            self.epsilon = epsilon
            mean = mean - bias if bias is not None else mean
            return ConvBn(weight, strides[0], tuple(a.get("pads", [0] * 4)), scale, shift, mean,
                          var, bn.output[0])
        # Folded: the bias is the batch norm's shift, over a unit scale.
        epsilon = self.epsilon or TORCHVISION_EPSILON
        zeros = np.zeros(channels, weight.dtype)
        return ConvBn(weight, strides[0], tuple(a.get("pads", [0] * 4)),
                      np.ones(channels, weight.dtype), bias if bias is not None else zeros,
                      zeros, np.full(channels, 1 - epsilon, weight.dtype), out)

    def relu(self, tensor: str, after) -> str:
        node = self.only(tensor, "Relu", after)
        return node.output[0]

    # -- the network -----------------------------------------------------------------------
    def resnet_v1(self, input) -> tuple[ResNetSpec, dict]:
        graph = self.graph
        images = [i for i in graph.input if i.name not in self.inits]
        if len(images) != 1:
            raise InputError(f"{self.path}: expected one image input, got "
                             f"{[i.name for i in images]}")
        dims = [d.dim_value or None for d in images[0].type.tensor_type.shape.dim]
        if len(dims) != 4:
            raise InputError(f"{self.path}: input {images[0].name!r} is not NCHW")
        size = input or (dims[2] or 224, dims[3] or 224)
        params, stem = {}, self.only(images[0].name)
        first = self.conv_bn(stem)
        self._check_padding(stem, first)
        self._store(params, "init/init_conv", "init/init_bn", first)
        x = self.relu(first.output, stem)
        pool = self.only(x)
        imagenet = pool.op_type == "MaxPool"
        if imagenet:
            x = pool.output[0]
        stages, units = [], []
        while True:
            users = self.consumers.get(x, [])
            if any(u.op_type in ("GlobalAveragePool", "ReduceMean") for u in users):
                break
            x = self._unit(x, users, params, stages, units)
        head = self._head(x, params)
        unit, width = unit_kind(len(units[0]) == 3, units[0][0][0], units[0][-1][0])
        if any(len(u) != len(units[0]) for u in units):
            self.refuse(self.graph.node[-1], "its units mix basic blocks and bottlenecks")
        model = {
            "input": [int(size[0]), int(size[1]), int(first.weight.shape[1])],
            "num_classes": int(head), "stem": "imagenet" if imagenet else "cifar",
            "stem_filters": int(first.weight.shape[0]), "unit": unit, "bottleneck_width": width,
            "preactivation": False, "stride_on": self._stride_on(unit, units),
            "padding": self.padding,
            "stages": [{"filters": f, "units": n, "stride": s} for f, s, n in stages],
            "activate_before_residual": [True] + [False] * (len(stages) - 1),
            "relu_leakiness": 0.0}
        name = model_name(unit, width, [n for _, _, n in stages])
        spec = load_spec({"name": f"onnx-{name}", "model": model, "batch_norm": {
            "epsilon": self.epsilon or TORCHVISION_EPSILON, "decay": 1 - TORCH_MOMENTUM}})
        return spec, params

    def _unit(self, x, users, params, stages, units) -> str:
        """One unit from its input `x`: its convs (each but the last followed by a ReLU, the
        last by the residual add), the add's shortcut (x, or a projection of it), then the
        ReLU after the add. Records the unit's (filters, stride) of each conv in `units`."""
        convs = [u for u in users if u.op_type == "Conv"]
        adds = [u for u in users if u.op_type == "Add"]
        if not convs or len(convs) + len(adds) != len(users):
            self.refuse(users[0] if users else self.graph.node[-1],
                        "a unit's input feeds its convs and the residual add only")
        main = next((c for c in convs if self._is_main(c)), None)
        if main is None:
            self.refuse(convs[0], "no conv of this unit is followed by a ReLU")
        branch = [self.conv_bn(main)]
        while True:
            nxt = self.only(branch[-1].output, after=main)
            if nxt.op_type == "Add":
                break
            branch.append(self.conv_bn(self.only(self.relu(branch[-1].output, main), "Conv")))
        if len(branch) not in (2, 3):
            self.refuse(main, f"a unit of {len(branch)} convs is neither a basic block nor a "
                              f"bottleneck")
        add = nxt
        project = [c for c in convs if c is not main]
        shortcut = self.conv_bn(project[0]) if project else None
        other = [i for i in add.input if i != branch[-1].output]
        if other != [shortcut.output if shortcut else x]:
            self.refuse(add, "the residual add does not take the unit's shortcut")
        filters, stride = int(branch[-1].weight.shape[0]), max(c.stride for c in branch)
        if shortcut is not None or not stages or stages[-1][0] != filters:
            stages.append([filters, stride, 0])
        stage = len(stages)
        stages[-1][2] += 1
        unit = f"unit_{stage}_{stages[-1][2] - 1}"
        for k, conv in enumerate(branch, start=1):
            self._store(params, f"{unit}/sub{k}/conv{k}", f"{unit}/sub{k}/bn{k}", conv)
            self._check_padding(main, conv)
        if shortcut is not None:
            self._store(params, f"{unit}/sub_add/project", f"{unit}/sub_add/project_bn",
                        shortcut)
        units.append([(int(c.weight.shape[0]), c.stride) for c in branch])
        return self.relu(add.output[0], add)

    def _stride_on(self, unit: str, units) -> str:
        """Which conv of a downsampling unit strides (torchvision's: a basic block's first, a
        bottleneck's 3x3)."""
        for convs in units:
            strides = [stride for _, stride in convs]
            if max(strides) > 1:
                return "conv1" if strides[0] > 1 else "conv2"
        return "conv1" if unit == "basic" else "conv2"

    def _is_main(self, conv) -> bool:
        out = conv.output[0]
        users = self.consumers.get(out, [])
        if len(users) == 1 and users[0].op_type == "BatchNormalization":
            users = self.consumers.get(users[0].output[0], [])
        return len(users) == 1 and users[0].op_type == "Relu"

    def _check_padding(self, node, conv: ConvBn) -> None:
        k = conv.weight.shape[2]
        top, left, bottom, right = conv.pads
        if (top, left, bottom, right) != (k // 2,) * 4:
            self.refuse(node, f"pads {list(conv.pads)}: only symmetric k//2 padding is read "
                              f"from foreign files")
        self.padding = "symmetric"

    def _head(self, x, params) -> int:
        pool = next(u for u in self.consumers[x] if u.op_type in ("GlobalAveragePool",
                                                                  "ReduceMean"))
        node = self.only(pool.output[0])
        if node.op_type in ("Flatten", "Reshape"):
            node = self.only(node.output[0])
        if node.op_type != "Gemm" or node.input[1] not in self.inits:
            self.refuse(node, "the classifier must be a Gemm with constant weights")
        a = self.attrs(node)
        weight = self.inits[node.input[1]]
        params["logit/DW"] = np.ascontiguousarray(weight.T if a.get("transB", 0) else weight)
        params["logit/biases"] = self.inits[node.input[2]]
        return params["logit/DW"].shape[1]

    def _store(self, params, conv_scope: str, bn_scope: str, conv: ConvBn) -> None:
        params[f"{conv_scope}/DW"] = hwio_from_oihw(conv.weight)
        params.update({f"{bn_scope}/gamma": conv.scale, f"{bn_scope}/beta": conv.shift,
                       f"{bn_scope}/moving_mean": conv.mean,
                       f"{bn_scope}/moving_variance": conv.var})

    padding = "symmetric"
