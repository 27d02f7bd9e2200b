"""Pass structure: what the infer and train pipelines leave of ResNet-164, ResNet-50 and the
seed's small net (kernel counts, as tinygrad asserts them), the refusals they report, and the
pass manager's contract."""

import json
from collections import Counter

import pytest

from rescompile.cli import main
from rescompile.compiler import lower
from rescompile.errors import GraphError
from rescompile.ir import verify
from rescompile.passes import PIPELINES, Pass, PassError, PassResult, run_pipeline
from rescompile.check import evaluate, random_feeds, relative_change
from rescompile.ops.registry import ops_of_kind
from rescompile.passes.fold_bn import fold_bn
from rescompile.passes.shortcut import fuse_shortcut
from conftest import EXAMPLES, tiny_spec

CONVS = ops_of_kind("conv")
STANDALONE = ("batch_norm",) + ops_of_kind("epilogue")


@pytest.fixture(scope="module", params=["resnet164_cifar", "resnet50_imagenet"])
def infer_dump(request, tmp_path_factory):
    """The JSON dump of the final infer graph, as a user sees it."""
    path = tmp_path_factory.mktemp("dump") / f"{request.param}.json"
    assert main(["dump", str(EXAMPLES / f"{request.param}.toml"), "--mode", "infer",
                 "--format", "json", "-o", str(path)]) == 0
    return request.param, json.loads(path.read_text())


def test_infer_pipeline_leaves_no_batch_norm_and_no_standalone_elementwise(infer_dump):
    name, doc = infer_dump
    ops = Counter(n["op"] for n in doc["nodes"])
    assert not {op: ops[op] for op in STANDALONE if ops[op]}, name
    if name == "resnet50_imagenet":
        assert ops["max_pool"] == 1


def test_infer_pipeline_gives_three_conv_kernels_per_unit_plus_projection(infer_dump):
    name, doc = infer_dump
    convs = Counter(n["scope"].split("/")[0] for n in doc["nodes"] if n["op"] in CONVS)
    projections = {n["scope"].split("/")[0] for n in doc["nodes"]
                   if n["op"] in CONVS and n["scope"].endswith("sub_add/project")}
    units = [u for u in convs if u.startswith("unit_")]
    assert len(units) == (54 if name == "resnet164_cifar" else 16)
    for unit in units:
        assert convs[unit] == 3 + (unit in projections), unit
    assert convs["init"] == 1


@pytest.fixture(scope="module")
def seed_train():
    return lower(EXAMPLES / "seed_small.toml", "train", "float64", verify_each=True)


def test_train_graph_is_never_bn_folded(seed_train):
    before, after = seed_train.stages[1][1].count_ops(), seed_train.graph.count_ops()
    assert before["batch_norm"] == 19
    assert not {"batch_norm", "fold_bn_weights", "bn_affine_params", "affine"} & set(after)
    assert all(not n.attrs.get("stats") or n.op in ("fused_conv2d", "prologue_fused_conv2d")
               for n in seed_train.graph.nodes)


def test_train_pipeline_fuses_normalize_relu_stats_and_relu_backward(seed_train):
    ops = seed_train.graph.count_ops()
    assert "relu" not in ops and "relu_grad" not in ops and "batch_moments" not in ops
    # each of the 19 batch norms' gradients, with its ReLU's, in two halves: the apply (with a
    # gradient add in 3), and the sums, in the data gradient's kernel but for the last one's
    assert ops["batch_norm_relu_grad_apply"] + ops["fused_batch_norm_relu_grad_apply"] == 19
    in_convs = [n for n in seed_train.graph.nodes
                if n.attrs.get("sums", {}).get("op") == "batch_norm_relu_grad_sums"]
    assert (len(in_convs), ops["batch_norm_relu_grad_sums"]) == (18, 1)
    normalize_relu = [n for n in seed_train.graph.nodes if n.op == "fused_elementwise"
                      and [s["op"] for s in n.attrs["epilogue"]] == ["batch_normalize", "relu"]]
    # the rest run as the prologue of the 1 x 1 convs reading them (a BN-ReLU by its gamma)
    prologues = {n.inputs[n.attrs["prologue"][0]["args"][0]] for n in seed_train.graph.nodes
                 if "prologue" in n.attrs}
    assert (len(normalize_relu), len(prologues)) == (7, 12)
    assert sum(bool(n.attrs.get("stats")) for n in seed_train.graph.nodes) == 19


def test_gradient_fusions_report_their_refusals(seed_train):
    """The final batch norm's gradient arrives from the pool, not a convolution's; the residual
    stream's gradient into the last unit is read by three kernels: both stay apart, said why."""
    remarks = [str(r) for r in seed_train.remarks]
    assert ("[fuse_bn_grad_sums] grad/unit_last/final_bn/d/sums: the sums stay a separate "
            "reduction: producer is global_avg_pool_grad") in remarks
    assert any(r.startswith("[fuse_grad_adds] grad/unit_3_0/sub_add/add/sum1: not fused into "
                            "grad/unit_last/final_bn/d: grad/unit_last/final_bn/d is also read by")
               for r in remarks)


def test_a_backend_without_a_fused_kernel_skips_its_pass_and_says_so():
    """The cuda backend has no kernel for the gradient halves, fused data gradients and
    prologue convs: its pipeline leaves their passes out, each with a remark, and its graph
    holds only ops it runs."""
    from rescompile.backends import cuda
    lowered = lower(tiny_spec(), "train", backend="cuda")
    skipped = {r.pass_name: r.reason for r in lowered.remarks if r.node == "(pipeline)"}
    assert set(skipped) == {"split_bn_grad", "fuse_grad_adds", "fuse_prologues"}
    assert "has no kernel for batch_norm_relu_grad_apply" in skipped["split_bn_grad"]
    assert all(cuda.supports(n.op) for n in lowered.graph.nodes)
    assert not any(r.node == "(pipeline)" for r in lower(tiny_spec(), "train").remarks)


def test_train_keeps_the_values_the_runtime_feeds(seed_train):
    built = seed_train.stages[1][1]
    assert seed_train.graph.outputs == built.outputs
    grad_logits = built.outputs["grad/logits"]
    assert any(grad_logits in n.outputs for n in seed_train.graph.nodes)
    assert set(seed_train.graph.inputs) == set(built.inputs)


def test_refused_folds_are_reported_with_the_reason():
    lowered = lower(EXAMPLES / "seed_small.toml", "infer")
    remarks = [str(r) for r in lowered.remarks]
    assert "[fold_bn] unit_2_0/residual_bn_relu/init_bn: producer is add" in remarks
    assert not [r for r in remarks if "conv1" in r or "bn2" in r or "bn3" in r]


def test_bn_after_a_conv_with_another_consumer_becomes_an_affine():
    # Without activate_before_residual, init_conv's output feeds the shortcut and init_bn:
    # folding init_bn into init_conv would scale the shortcut too.
    spec = tiny_spec(activate_before_residual=[False, False])
    lowered = lower(spec, "infer", "float64", pipeline=[Pass("fold_bn", fold_bn)])
    ops = {n.name: n.op for n in lowered.graph.nodes}
    assert ops["unit_1_0/residual_bn_relu/init_bn"] == "affine"
    assert ops["unit_1_0/sub2/bn2"] == "bias_add"
    reason = {r.node: r.reason for r in lowered.remarks}["unit_1_0/residual_bn_relu/init_bn"]
    assert "other consumers" in reason and "unit_1_0/sub_add/project" in reason


def test_bn_whose_output_has_two_consumers_still_folds_and_agrees():
    # The folded value keeps the BN's name and meaning, so every reader of it stays correct.
    lowered = lower(tiny_spec(), "infer", "float64", optimize=False)
    graph = lowered.graph.copy()
    (extra,) = graph.add_node("relu", ["unit_1_0/sub2/bn2"], {"alpha": 0.5}, name="extra")
    graph.outputs["extra"] = extra
    result = fold_bn(graph)
    assert {n.name: n.op for n in result.graph.nodes}["unit_1_0/sub2/bn2"] == "bias_add"
    feeds = random_feeds(lowered)
    before, after = evaluate(graph, feeds), evaluate(result.graph, feeds)
    for key, value in graph.outputs.items():
        assert relative_change(before[value], after[value]) < 1e-12, key


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_the_pooled_shortcut_is_read_by_its_add_unless_its_value_is_wanted(mode):
    """The pooled, padded tensor becomes part of the add (and in training the pooled one's
    gradient one kernel; a pad alone's is one already) with the numbers unchanged; made a
    public output, the pool stays, and says why."""
    lowered = lower(tiny_spec(unit="basic", shortcut="pool_pad"), mode, "float64",
                    optimize=False)
    result = fuse_shortcut(lowered.graph)
    ops = Counter(n.op for n in result.graph.nodes)
    assert ops["add_pooled"] == 2 and not {"avg_pool", "pad_channels", "avg_pool_grad"} & set(ops)
    train = mode == "train"
    assert (ops["pool_pad_grad"], ops["crop_channels"]) == ((1, 1) if train else (0, 0))
    feeds = random_feeds(lowered)
    before, after = evaluate(lowered.graph, feeds), evaluate(result.graph, feeds)
    for key, value in lowered.graph.outputs.items():
        assert relative_change(before[value], after[value]) == 0, key
    graph = lowered.graph.copy()
    graph.outputs["pooled"] = "unit_2_0/sub_add/pool"
    kept = fuse_shortcut(graph)
    assert "avg_pool" in {n.op for n in kept.graph.nodes}
    assert ("unit_2_0/sub_add/pool", "not fused into unit_2_0/sub_add/pad: "
            "unit_2_0/sub_add/pool is a public output") in kept.remarks


def test_stages_name_build_autodiff_and_every_pass():
    infer = lower(tiny_spec(), "infer")
    train = lower(tiny_spec(), "train")
    assert [s for s, _ in infer.stages] == ["build"] + [r.name for r in infer.pass_log]
    assert [s for s, _ in train.stages][:2] == ["build", "autodiff"]
    assert [s for s, _ in lower(tiny_spec(), "train", optimize=False).stages] == \
        ["build", "autodiff"]
    assert [r.name for r in infer.pass_log] == [p.name for p in PIPELINES["infer"]]


def test_parameter_only_nodes_run_in_prepare():
    graph = lower(tiny_spec(), "infer").graph
    phases = {n.op: n.phase for n in graph.nodes}
    assert phases["fold_bn_weights"] == phases["bn_affine_params"] == "prepare"
    assert phases["fused_conv2d"] == "forward"


def test_pass_manager_names_the_failing_pass_and_its_predecessors():
    def breaks(graph):
        node = graph.nodes[0]
        return PassResult(graph.with_nodes([node.replace(inputs=("nowhere",))] + graph.nodes[1:]),
                          True)

    graph = lower(tiny_spec(), "infer", optimize=False).graph
    pipeline = [Pass("fold_bn", fold_bn), Pass("breaks", breaks)]
    with pytest.raises(PassError, match=r"pass 'breaks' failed \(passes before it: fold_bn\)"):
        run_pipeline(graph, pipeline, verify_each=True)
    with pytest.raises(GraphError):
        verify(run_pipeline(graph, pipeline).graph)


def test_dump_after_all_writes_numbered_files(tmp_path, capsys):
    assert main(["dump", str(EXAMPLES / "seed_small.toml"), "--after", "all", "--format", "dot",
                 "-o", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0] == "01-build.dot" and "03-fold_bn.dot" in names
    assert main(["dump", str(EXAMPLES / "seed_small.toml"), "--after", "fold_bn"]) == 0
    text = capsys.readouterr().out
    assert "# remark [fold_bn] unit_last/final_bn: producer is add" in text
    assert "# pass fuse_epilogues: changed" in text
