"""The same model as ONNX (`rescompile export`, and ONNX Runtime baselines): a spec's inference
graph as built (batch norm unfolded, NCHW) with the model's variables as initializers under
their TensorFlow names, and the spec itself (TOML) in the metadata, so that `from_onnx` reads
our own files back exactly. Weights are float32 (ONNX Runtime's CPU kernels are)."""

from __future__ import annotations

import numpy as np

from ..build import build
from ..padding import pads_2d
from ..spec import load_spec
from .layouts import oihw_from_hwio

OPSET = 17
SPEC_KEY = "rescompile.spec"  # metadata of our exports: the spec as TOML, for from_onnx


def _window(graph, node, k: int) -> dict:
    """An ONNX window's strides and pads (ONNX orders them begin, begin, end, end)."""
    x = graph.value(node.inputs[0]).shape
    t, b, l, r = pads_2d(x[1], x[2], k, node.attrs["stride"], node.attrs["padding"])
    return {"strides": [node.attrs["stride"]] * 2, "pads": [t, l, b, r]}


def _conv(graph, node):
    k = graph.value(node.inputs[1]).shape[0]
    return "Conv", dict(_window(graph, node, k), kernel_shape=[k, k])


def _max_pool(graph, node):
    k = node.attrs["k"]
    return "MaxPool", dict(_window(graph, node, k), kernel_shape=[k, k])


def _avg_pool(graph, node):
    k = node.attrs["k"]
    return "AveragePool", {"kernel_shape": [k, k], "strides": [k, k]}


def _pad_channels(graph, node):
    """Zero channels before and after (NCHW: the pads of N, C, H, W, then their ends), the
    pads a constant input of the node."""
    before, after = node.attrs["before"], node.attrs["after"]
    return "Pad", {}, [np.array([0, before, 0, 0, 0, after, 0, 0], np.int64)]


def _relu(graph, node):
    alpha = node.attrs["alpha"]
    return ("LeakyRelu", {"alpha": alpha}) if alpha else ("Relu", {})


EXPORTERS = {  # op -> (graph, node) -> (ONNX op type, its attributes[, constant inputs])
    "conv2d": _conv,
    "max_pool": _max_pool,
    "avg_pool": _avg_pool,
    "pad_channels": _pad_channels,
    "relu": _relu,
    "batch_norm": lambda graph, node: ("BatchNormalization",
                                       {"epsilon": node.attrs["epsilon"]}),
    "add": lambda graph, node: ("Add", {}),
    "dense": lambda graph, node: ("Gemm", {}),
    "global_avg_pool": lambda graph, node: ("ReduceMean", {"axes": [2, 3], "keepdims": 0}),
}


def _nodes(helper, numpy_helper, graph, node) -> list:
    """The node's ONNX node, after a Constant node for each constant input it takes."""
    if node.op not in EXPORTERS:
        raise ValueError(f"node {node.name!r}: no ONNX mapping for op {node.op!r}")
    kind, attrs, *constants = EXPORTERS[node.op](graph, node)
    names = [f"{node.outputs[0]}/constant{i}" for i in range(len(constants[0] if constants else
                                                                     ()))]
    made = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(c, name))
            for name, c in zip(names, constants[0] if constants else ())]
    return made + [helper.make_node(kind, list(node.inputs) + names, [node.outputs[0]],
                                    **attrs)]


def onnx_nodes(graph) -> list:
    """The ONNX nodes of a spec's inference graph (as built), in graph order."""
    from onnx import helper, numpy_helper
    return [made for n in graph.nodes for made in _nodes(helper, numpy_helper, graph, n)]


def onnx_model(spec, params: dict):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    spec = load_spec(spec)
    graph = build(spec, "infer", "float32").graph
    inits = [numpy_helper.from_array(np.ascontiguousarray(
        oihw_from_hwio(v) if v.ndim == 4 else v, dtype=np.float32), k)
        for k, v in params.items()]
    h, w, c = graph.value("images").shape[1:]
    logits = graph.outputs["logits"]
    model = helper.make_model(
        helper.make_graph(onnx_nodes(graph), "resnet",
                          [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                         ["N", c, h, w])],
                          [helper.make_tensor_value_info(logits, TensorProto.FLOAT,
                                                         ["N", graph.value(logits).shape[1]])],
                          inits),
        opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    helper.set_model_props(model, {SPEC_KEY: spec.to_toml()})
    onnx.checker.check_model(model)
    return model


def ort_runner(spec, params: dict, images: np.ndarray, threads: int = 2):
    """A function running the model on `images` (NHWC) in ONNX Runtime, all optimisations."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(onnx_model(spec, params).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    feed = {"images": np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)}
    return lambda: session.run(None, feed)[0]
