"""`rescompile check`: a clean pipeline passes; a deliberately broken pass is caught and named,
down to the first node whose value it moved."""

import pytest

from rescompile.cli import main
from rescompile.compiler import lower
from rescompile.passes import Pass, PassResult, pipelines
from rescompile.check import check_stages
from rescompile.passes.fold_bn import fold_bn
from conftest import EXAMPLES

SPEC = str(EXAMPLES / "seed_small.toml")


def fold_bn_wrong_epsilon(graph):
    """fold_bn with the classic bug: the folded weights use ten times the epsilon."""
    result = fold_bn(graph)
    nodes = [n.replace(attrs={**n.attrs, "epsilon": n.attrs["epsilon"] * 10})
             if n.op == "fold_bn_weights" else n for n in result.graph.nodes]
    return PassResult(result.graph.with_nodes(nodes), True, result.remarks)


@pytest.mark.parametrize("mode, dtype", [("infer", "float64"), ("train", "float32")])
def test_check_passes_the_real_pipeline(capsys, mode, dtype):
    assert main(["check", SPEC, "--mode", mode, "--dtype", dtype]) == 0
    out = capsys.readouterr().out
    assert "ok: every pass within" in out
    for p in pipelines.PIPELINES[mode]:
        assert p.name in out


def test_check_names_a_broken_pass_and_the_first_bad_node(monkeypatch, capsys):
    broken = [Pass("fold_bn_wrong_epsilon", fold_bn_wrong_epsilon) if p.name == "fold_bn" else p
              for p in pipelines.INFER]
    monkeypatch.setitem(pipelines.PIPELINES, "infer", broken)
    assert main(["check", SPEC, "--mode", "infer"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: pass 'fold_bn_wrong_epsilon'" in out
    # The first value the bad fold moves is the first folded conv's output (the stem's BN).
    assert "first disagreeing node: unit_1_0/common_bn_relu/init_bn (bias_add)" in out


def test_check_report_lists_every_stage_against_the_baseline():
    lowered = lower(SPEC, "infer", "float32")
    report = check_stages(lowered)
    assert report.ok
    assert [s.stage for s in report.stages] == [name for name, _ in lowered.stages]
    assert report.stages[0].change == 0.0
