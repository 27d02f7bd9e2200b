"""The command line: help, dump in every format, run, and one-line errors."""

import json
import subprocess
import sys


from rescompile.cli import main

SEED = "examples/seed_small.toml"


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "rescompile", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for command in ("dump", "run"):
        assert command in out


def test_dump_text_has_one_line_per_node_and_a_summary(capsys):
    assert main(["dump", SEED, "--after", "build"]) == 0
    out = capsys.readouterr().out
    assert "%unit_1_0/sub1/conv1 = conv2d(%unit_1_0/common_bn_relu/relu, " \
           "%unit_1_0/sub1/conv1/DW) s=1 pad=same -> [N,16,16,16]" in out
    assert "eps=0.001" in out and "alpha=0.1" in out
    assert "# trainable parameters: 219,482" in out


def test_dump_json_counts_ops(capsys, tmp_path):
    target = tmp_path / "g.json"
    assert main(["dump", SEED, "--after", "build", "--format", "json", "-o", str(target)]) == 0
    doc = json.loads(target.read_text())
    ops = [n["op"] for n in doc["nodes"]]
    assert ops.count("conv2d") == 22 and ops.count("batch_norm") == 19
    assert {"name", "op", "inputs", "outputs", "attrs"} <= set(doc["nodes"][0])


def test_dump_train_shows_every_phase(capsys):
    assert main(["dump", SEED, "--mode", "train", "--after", "autodiff", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {n["phase"] for n in doc["nodes"]} == {"forward", "loss", "backward", "update"}


def test_dump_dot(capsys):
    assert main(["dump", SEED, "--after", "build", "--format", "dot"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("digraph rescompile {") and out.rstrip().endswith("}")
    assert '"unit_1_0/sub1/conv1" -> ' in out


def test_dump_dot_draws_one_arrow_per_pair_and_each_fused_chain(capsys):
    """A folded weight and its bias reach the conv on one arrow labelled with both; a fused
    node's box names its epilogue chain (and its prologue's)."""
    assert main(["dump", SEED, "--format", "dot"]) == 0
    lines = capsys.readouterr().out.splitlines()
    fold = '"unit_1_0/sub2/bn2/fold" -> "unit_1_0/sub1/conv1"'
    arrows = [line for line in lines if line.strip().startswith(fold)]
    assert len(arrows) == 1
    assert r'label="unit_1_0/sub2/bn2/fold\nunit_1_0/sub2/bn2/fold:b"' in arrows[0]
    assert any('"unit_1_0/sub3/conv3" [label="fused_conv2d[add]' in line for line in lines)
    assert any('"unit_1_1/sub1/conv1" [label="prologue_fused_conv2d[affine+relu>bias_add+relu]'
               in line for line in lines)


def test_run_reports_what_it_did(capsys):
    assert main(["run", SEED, "--backend", "reference", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "219,482 trainable" in out and "logits [2, 10]" in out
