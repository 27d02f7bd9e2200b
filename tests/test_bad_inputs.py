"""Bad input, as a hostile or careless user gives it. Every case gets one line naming the file,
field or tensor and its kind's exit code (2 usage, 3 spec, 4 input, 5 checkpoint, 6 resources,
7 device, 8 diverged), or the correct result, and loses nothing.

CLI cases run `main(argv)` in-process: (argv, exit code, words of the message). API cases call
the library: (call, exception, words). The files they read are made once per module."""

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
import zipfile

import numpy as np
import pytest

import rescompile as rc
from conftest import ROOT, peak_bytes, tiny_spec
from rescompile.archive import npz_bytes
from rescompile.artifact import save_artifact
from rescompile.backends.cpu.llvm import jit
from rescompile.backends.cpu.llvm.sync import Barrier
from rescompile.backends.cpu.target import host_target
from rescompile.cli import main
from rescompile.training.checkpoints import CheckpointDir

SPEC = tiny_spec()
TRAIN = ["--data", "synthetic", "--backend", "reference", "--batch-size", "16", "--seed", "1"]
GOOD_MODEL = ('[model]\ninput = [8, 8, 3]\nnum_classes = 5\nstem_filters = 4\n'
              'stages = [{ filters = 8, units = 1, stride = 1 }]\n')


def spec_text(**model_lines) -> str:
    """The tiny spec as TOML with [model] lines replaced or added."""
    lines = dict(line.split(" = ", 1) for line in GOOD_MODEL.splitlines()[1:])
    lines.update({k: str(v) for k, v in model_lines.items()})
    return 'name = "t"\n[model]\n' + "".join(f"{k} = {v}\n" for k, v in lines.items())


def rewrite_npz(source, target, change) -> None:
    """An .npz with its arrays (manifest included, as `__manifest__`) passed through `change`."""
    with np.load(source) as z:
        arrays = {k: z[k] for k in z.files}
    target.write_bytes(npz_bytes(change(arrays)))


def with_manifest(change):
    def edit(arrays):
        manifest = json.loads(arrays["__manifest__"].tobytes())
        text = json.dumps(change(manifest)) if callable(change) else change
        arrays["__manifest__"] = np.frombuffer(text.encode(), np.uint8)
        return arrays
    return edit


def without(variable):
    """Drop a variable's array and its manifest entry."""
    def edit(arrays):
        arrays = with_manifest(lambda m: {**m, "variables": [
            v for v in m["variables"] if v != variable]})(arrays)
        return {k: v for k, v in arrays.items() if k != f"var/{variable}"}
    return edit


def npy_header_lie(shape) -> bytes:
    """A .npy whose header declares `shape` over 16 bytes of data."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False,
                                                  "shape": shape})
    return buffer.getvalue() + b"\0" * 16


def deflated_with_a_hole(source, target) -> None:
    """A compressed copy of the checkpoint `source` with 16 bytes of its largest member's
    deflate stream overwritten: zlib fails on it."""
    with zipfile.ZipFile(source) as z, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
        for name in z.namelist():
            out.writestr(name, z.read(name))
    with zipfile.ZipFile(target) as z:
        big = max(z.infolist(), key=lambda i: i.compress_size)
    data = bytearray(target.read_bytes())
    start = big.header_offset + 30 + len(big.filename) + len(big.extra) + 8
    data[start:start + 16] = b"\xff" * 16
    target.write_bytes(bytes(data))


def cifar(folder, change_first) -> None:
    """A CIFAR-10 folder of empty files, the first changed by `change_first(path)`."""
    folder.mkdir()
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    change_first(folder / names[0])
    for name in names[1:]:
        (folder / name).write_bytes(b"")


def torch_and_onnx_files(d) -> None:
    """A torch.save file that holds a Python object (weights_only refuses it), an ONNX model
    with an initializer short of its dims, and our own export with an invalid spec."""
    import argparse
    import onnx
    import torch
    from onnx import numpy_helper
    from rescompile.interop import onnx_model
    from rescompile.interop.onnx_model import SPEC_KEY
    torch.save({"conv1.weight": torch.zeros(2), "args": argparse.Namespace()}, d / "object.pt")
    short = numpy_helper.from_array(np.zeros((4, 4), np.float32), "w")
    short.raw_data = b"\0" * 12
    graph = onnx.helper.make_graph([], "g", [], [], initializer=[short])
    (d / "short.onnx").write_bytes(onnx.helper.make_model(graph).SerializeToString())
    model = onnx_model(SPEC, rc.compile(SPEC, seed=1).params)
    entry = next(p for p in model.metadata_props if p.key == SPEC_KEY)
    entry.value = '{"name": "a b"}'
    (d / "bad-spec.onnx").write_bytes(model.SerializeToString())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "spec.toml").write_text(SPEC.to_toml())
    exe = rc.compile(SPEC, mode="train", seed=1)
    rng = np.random.default_rng(0)
    exe.train_step(rng.standard_normal((4, 8, 8, 3)), rng.integers(0, 5, 4))
    exe.save(d / "ckpt.npz")
    infer = rc.compile(SPEC, mode="infer", seed=1)
    infer.save(d / "infer.npz")
    save_artifact(infer, d / "model.rcx")
    moving = next(n for n in exe.params if n.endswith("moving_mean"))
    rewrite_npz(d / "ckpt.npz", d / "no-moving.npz", without(moving))
    rewrite_npz(d / "ckpt.npz", d / "bad-json.npz", with_manifest("{not json"))
    rewrite_npz(d / "ckpt.npz", d / "step-str.npz", with_manifest(lambda m: {**m, "step": "1"}))
    rewrite_npz(d / "ckpt.npz", d / "no-dtype.npz", with_manifest(
        lambda m: {k: v for k, v in m.items() if k != "dtype"}))
    rewrite_npz(d / "ckpt.npz", d / "nan.npz", lambda a: {
        **a, "var/logit/biases": np.full_like(a["var/logit/biases"], np.nan)})
    data = (d / "ckpt.npz").read_bytes()
    (d / "cut.npz").write_bytes(data[:len(data) // 2])
    (d / "text.npz").write_text("not a checkpoint\n")
    (d / "lie.npy").write_bytes(npy_header_lie((10 ** 12,)))
    with zipfile.ZipFile(d / "ckpt.npz") as source, zipfile.ZipFile(d / "lying.npz", "w") as z:
        for name in source.namelist():
            z.writestr(name, source.read(name))
        z.writestr("var/huge.npy", (d / "lie.npy").read_bytes())
    with zipfile.ZipFile(d / "ckpt.npz") as source, zipfile.ZipFile(d / "lying-header.npz",
                                                                    "w") as z:
        for name in source.namelist():
            z.writestr(name, (d / "lie.npy").read_bytes() if name == "var/logit/biases.npy"
                       else source.read(name))
    deflated_with_a_hole(d / "ckpt.npz", d / "bad-deflate.npz")
    (d / "neg.npy").write_bytes(npy_header_lie((-4, -4)) + b"\0" * 48)
    for name in ("fifo.npy", "fifo.toml", "fifo.npz", "fifo.jsonl", "fifo.onnx"):
        os.mkfifo(d / name)
    (d / "bigint.json").write_text('{"name": 1' + "0" * 5000 + "}")
    (d / "dup.json").write_text('{"name": "a", "name": "b"}')
    (d / "old.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    cifar(d / "cifar-fifo", lambda first: os.mkfifo(first))
    cifar(d / "cifar-huge", lambda first: first.open("wb").truncate(3073 * 10 ** 7))  # sparse
    torch_and_onnx_files(d)
    np.save(d / "empty.npy", np.zeros((0, 8, 8, 3), np.float32))
    np.save(d / "flat.npy", np.zeros((2, 8, 8), np.float32))
    np.save(d / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (d / "garbage.npy").write_bytes(os.urandom(300))
    (d / "latin1.toml").write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    (d / "deep.json").write_text('{"name": ' + "[" * 50000 + "]" * 50000 + "}")
    (d / "huge.toml").write_text("# " + "x" * (1 << 20) + "\n")
    (d / "eps.toml").write_text(SPEC.replace(batch_norm={"epsilon": 1e-40}).to_toml())
    (d / "wild.toml").write_text(SPEC.replace(train={"learning_rate": [[0, 1e30]]}).to_toml())
    (d / "a-file").write_text("x")
    (d / "outdir").mkdir()
    _bad_data(d, rewrite_npz)
    return d


def _bad_data(d, rewrite):
    """Image folders, npz files and images for `--data folder|npz` and `predict`, each with
    one thing wrong, beside a good folder of three classes for `shapes.toml`."""
    from pictures import shape_folder
    (d / "shapes.toml").write_text(tiny_spec(num_classes=3).to_toml())
    good = shape_folder(d / "pics", per_class=2)
    png = (good / "red circle" / "001.png").read_bytes()
    for variant in ("truncated", "garbage", "empty-class", "fifo", "two-classes", "bad-name"):
        shutil.copytree(good, d / f"pics-{variant}")
    (d / "pics-truncated" / "red circle" / "001.png").write_bytes(png[:len(png) // 2])
    (d / "pics-garbage" / "red circle" / "001.png").write_bytes(os.urandom(200))
    for path in (d / "pics-empty-class" / "red circle").iterdir():
        path.unlink()
    (d / "pics-empty-class" / "red circle" / "notes.txt").write_text("not an image")
    os.mkfifo(d / "pics-fifo" / "red circle" / "zz.png")
    shutil.rmtree(d / "pics-two-classes" / "red circle")
    (d / "pics-bad-name" / "red circle").rename(d / "pics-bad-name" / "red\x1b[31mcircle")
    (d / "cut.png").write_bytes(png[:len(png) // 2])
    (d / "notes.txt").write_text("not an image")
    images = np.zeros((6, 8, 8, 3), np.uint8)
    np.savez(d / "no-labels.npz", images=images)
    np.savez(d / "label-out.npz", images=images, labels=np.array([0, 1, 2, 0, 1, 7]))
    np.savez(d / "typo.npz", images=images, labels=np.zeros(6, np.int64), val_image=images)
    np.savez(d / "pickled.npz", images=images, labels=np.array([{}] * 6, dtype=object))
    (d / "dir.npz").mkdir()
    rewrite(d / "ckpt.npz", d / "named.npz", with_manifest(lambda m: {**m, "data": {
        "classes": ["a", "b\x1b[2J", "c", "d", "e"], "normalize": "image", "mean": [],
        "std": [], "val_fraction": 0.1}}))


def folder(d, variant: str) -> list:
    return ["train", d / "shapes.toml", "--data", "folder", "--data-dir", d / f"pics-{variant}",
            "--backend", "reference", "--steps", "1"]


def npz(d, name: str) -> list:
    return ["train", d / "spec.toml", "--data", "npz", "--data-dir", d / name, "--backend",
            "reference", "--steps", "1"]


def predict(d, images: str) -> list:
    return ["predict", d / "spec.toml", "--checkpoint", d / "ckpt.npz", d / images]


def run_cli(argv, capsys) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    return code, capsys.readouterr().err


CLI_CASES = [
    # specs
    ("unknown key", lambda d: ["dump", spec_text(bogus=1)], 3, "model.bogus: unknown key"),
    ("no stages", lambda d: ["dump", spec_text(stages="[]")], 3, "model.stages"),
    ("string number", lambda d: ["dump", spec_text(relu_leakiness='"0.1"')], 3,
     "model.relu_leakiness: expected a number"),
    ("huge filters", lambda d: ["dump", spec_text(
        stages="[{ filters = 1000000000000000000000000000000, units = 1, stride = 1 }]")], 3,
     "model.stages[0].filters: must be >= 1 and <= 16384"),
    ("huge units", lambda d: ["dump", spec_text(
        stages="[{ filters = 8, units = 100000, stride = 1 }]")], 3, "<= 1000"),
    ("many stages", lambda d: ["dump", spec_text(
        stages="[" + ", ".join(["{ filters = 8, units = 1, stride = 1 }"] * 17) + "]")], 3,
     "at most 16 entries"),
    ("huge input", lambda d: ["dump", spec_text(input="[100000, 8, 3]")], 3, "<= 8192"),
    ("pooled shortcut that does not fit", lambda d: ["dump", spec_text(
        input="[7, 7, 3]", unit='"basic"', shortcut='"pool_pad"',
        stages="[{ filters = 8, units = 1, stride = 2 }]")], 3,
     'model.stages[0].stride: with shortcut "pool_pad" the 2x2 average pool of the 7x7 map '
     'gives 3x3, the convolutions 4x4'),
    ("width of a basic unit", lambda d: ["dump", spec_text(
        unit='"basic"', bottleneck_width=0.5)], 3, "model.bottleneck_width: only bottleneck"),
    ("missing file", lambda d: ["dump", d / "nope" / "missing.toml"], 3, "no such spec file"),
    ("missing file here", lambda d: ["dump", "missing-spec.toml"], 3, "no such spec file"),
    ("unknown preset", lambda d: ["dump", "no-such-preset"], 3, "unknown name 'no-such-preset'"),
    ("not utf-8", lambda d: ["dump", d / "latin1.toml"], 3, "not UTF-8 text"),
    ("deep json", lambda d: ["dump", d / "deep.json"], 3, "nested too deeply"),
    ("deep toml", lambda d: ["dump", "a = " + "[" * 50000 + "]" * 50000], 3,
     "nested too deeply"),
    ("huge spec file", lambda d: ["dump", d / "huge.toml"], 3, "larger than 1048576 bytes"),
    ("epsilon under float32", lambda d: ["run", d / "eps.toml", "--backend", "reference"], 3,
     "batch_norm.epsilon: 1e-40 is not a normal float32 number"),
    ("hostile name", lambda d: ["dump", 'name = "a\\"); import os #"\n' + GOOD_MODEL], 3,
     "name: must be a string"),
    ("spec is a FIFO", lambda d: ["dump", d / "fifo.toml"], 3, "a FIFO, not a regular spec file"),
    ("5000-digit integer", lambda d: ["dump", d / "bigint.json"], 3,
     "Exceeds the limit (4300 digits)"),
    ("duplicate json key", lambda d: ["dump", d / "dup.json"], 3,
     "key 'name' appears twice in one object"),
    # usage
    ("batch 0", lambda d: ["run", d / "spec.toml", "--batch", "0"], 2,
     "argument --batch: must be >= 1"),
    ("batch 1e8", lambda d: ["run", d / "spec.toml", "--batch", "1e8"], 2,
     "argument --batch: expected an integer, got '1e8'"),
    ("negative seed", lambda d: ["run", d / "spec.toml", "--seed", "-1"], 2,
     "argument --seed: must be >= 0"),
    ("unknown stage", lambda d: ["dump", d / "spec.toml", "--after", "nope"], 2,
     "unknown stage 'nope'"),
    ("unknown command", lambda d: ["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    ("unknown peer", lambda d: ["bench", d / "spec.toml", "--peer", "tvm"], 2,
     "argument --peer: invalid choice: 'tvm'"),
    ("peers and none", lambda d: ["bench", d / "spec.toml", "--no-peers", "--peer",
                                  "pytorch"], 2, "not allowed with argument --no-peers"),
    ("predict suffix", lambda d: ["predict", d / "spec.toml", "--checkpoint", d / "ckpt.npz",
                                  d / "empty.npy", "-o", d / "out.txt"], 2,
     "must end in .json or .npy"),
    ("resume without dir", lambda d: ["train", d / "spec.toml", *TRAIN, "--resume"], 2,
     "--resume needs --checkpoint DIR"),
    ("log exists", lambda d: ["train", d / "spec.toml", *TRAIN, "--steps", "1", "--log",
                              d / "old.jsonl"], 2,
     "old.jsonl: exists; pass --resume to continue its run, or --overwrite-log"),
    ("plot format", lambda d: ["train", d / "spec.toml", *TRAIN, "--steps", "1", "--plot",
                               d / "plot.txt"], 2, "--plot"),
    ("steps past int64", lambda d: ["train", d / "spec.toml", *TRAIN, "--steps", 2 ** 63], 2,
     "9223372036854775808 steps is more than the 9223372036854775807 a checkpoint records"),
    ("exchange timeout 0", lambda d: ["train", d / "spec.toml", *TRAIN, "--exchange-timeout",
                                      "0"], 2, "--exchange-timeout: must be a finite number > 0"),
    # inputs and data
    ("empty npy", lambda d: predict(d, "empty.npy"), 4, "with N >= 1, got shape [0, 8, 8, 3]"),
    ("rank-3 npy", lambda d: predict(d, "flat.npy"), 4, "expected images [N, H, W, C]"),
    ("garbage npy", lambda d: predict(d, "garbage.npy"), 4, "garbage.npy: array 'images' has a "
                                                      "corrupt header"),
    ("pickled npy", lambda d: predict(d, "objects.npy"), 4, "is object, expected one of"),
    ("lying npy", lambda d: predict(d, "lie.npy"), 4, "declares shape [1000000000000]"),
    ("missing npy", lambda d: predict(d, "none.npy"), 4, "none.npy: no such images file"),
    ("npy is /dev/zero", lambda d: predict(d, "/dev/zero"), 4,
     "/dev/zero: a character device, not a regular images file"),
    ("npy is a FIFO", lambda d: predict(d, "fifo.npy"), 4, "a FIFO, not a regular images file"),
    ("npy is a directory", lambda d: predict(d, "outdir"), 4, "a directory, not a regular"),
    ("negative npy dims", lambda d: predict(d, "neg.npy"), 4, "declares a negative dimension"),
    ("cifar file is a FIFO", lambda d: ["train", d / "spec.toml", "--data", "cifar10",
                                        "--data-dir", d / "cifar-fifo"], 4,
     "data_batch_1.bin: a FIFO, not a regular cifar10 data file"),
    ("torch file is /dev/zero", lambda d: ["import-torch", "/dev/zero", "-o", d / "x.npz"], 4,
     "/dev/zero: a character device, not a regular torch.save file"),
    ("torch file with objects", lambda d: ["import-torch", d / "object.pt", "-o", d / "x.npz"],
     4, "object.pt: holds objects other than tensors"),
    ("onnx file is a FIFO", lambda d: ["import-onnx", d / "fifo.onnx", "-o", d / "x.npz"], 4,
     "a FIFO, not a regular ONNX model file"),
    ("onnx data short of dims", lambda d: ["import-onnx", d / "short.onnx", "-o", d / "x.npz"],
     4, "short.onnx: initializer 'w' does not hold the data its dims [4, 4] declare"),
    ("onnx embedded spec", lambda d: ["import-onnx", d / "bad-spec.onnx", "-o", d / "x.npz"],
     4, "bad-spec.onnx: its embedded spec is invalid: name"),
    ("no data dir", lambda d: ["train", d / "spec.toml", "--data", "cifar10", "--data-dir",
                               d / "nope"], 4, "does not exist"),
    ("truncated image", lambda d: folder(d, "truncated"), 4,
     "red circle/001.png: cannot decode as PNG or JPEG (image file is truncated"),
    ("garbage image", lambda d: folder(d, "garbage"), 4, "001.png: cannot decode as PNG or JPEG"),
    ("class without images", lambda d: folder(d, "empty-class"), 4,
     "red circle: class folder with no PNG or JPEG images"),
    ("fifo image", lambda d: folder(d, "fifo"), 4, "zz.png: a FIFO, not a regular"),
    ("class count", lambda d: folder(d, "two-classes"), 4,
     "pics-two-classes: 2 class folders, the model has num_classes = 3"),
    ("class name", lambda d: folder(d, "bad-name"), 4,
     "class folder 'red\\x1b[31mcircle' cannot be a class name: it must be printable"),
    ("no image folder", lambda d: folder(d, "none"), 4, "pics-none: no such image folder"),
    ("npz without labels", lambda d: npz(d, "no-labels.npz"), 4,
     "no-labels.npz: no array 'labels'"),
    ("npz label outside", lambda d: npz(d, "label-out.npz"), 4,
     "label-out.npz: labels holds class 7, outside the model's 5 classes"),
    ("npz unknown array", lambda d: npz(d, "typo.npz"), 4,
     "typo.npz: unknown array 'val_image'"),
    ("npz pickled", lambda d: npz(d, "pickled.npz"), 4, "array 'labels.npy' is object"),
    ("npz not a zip", lambda d: npz(d, "text.npz"), 4, "text.npz: corrupt archive"),
    ("npz a directory", lambda d: npz(d, "dir.npz"), 4, "dir.npz: a directory, not a regular"),
    ("predict cut png", lambda d: predict(d, "cut.png"), 4, "cut.png: cannot decode as PNG"),
    ("predict text", lambda d: predict(d, "notes.txt"), 4,
     "notes.txt: expected a .npy array or an image file"),
    ("val fraction", lambda d: [*folder(d, "ok"), "--val-fraction", "1.5"], 2,
     "argument --val-fraction: must be between 0 and 1, got 1.5"),
    ("smoothing flag", lambda d: ["train", d / "spec.toml", *TRAIN, "--label-smoothing", "2"],
     3, "train.label_smoothing: must be >= 0 and <= 1, got 2.0"),
    ("cosine flag", lambda d: ["train", d / "spec.toml", *TRAIN, "--schedule", "cosine"], 3,
     "train.learning_rate: the cosine schedule takes one [0, peak] entry, got 4"),
    # checkpoints
    ("no moving stat", lambda d: ["eval", d / "spec.toml", "--checkpoint", d / "no-moving.npz",
                                  "--data", "synthetic"], 5,
     "model variable 'unit_1_0/common_bn_relu/init_bn/moving_mean' is missing"),
    ("manifest not json", lambda d: ["eval", d / "spec.toml", "--checkpoint",
                                     d / "bad-json.npz", "--data", "synthetic"], 5,
     "bad-json.npz: corrupt manifest"),
    ("manifest step type", lambda d: ["eval", d / "spec.toml", "--checkpoint",
                                      d / "step-str.npz", "--data", "synthetic"], 5,
     "manifest field 'step' must be an integer >= 0 and <= 9223372036854775807, got \"1\""),
    ("manifest no dtype", lambda d: ["eval", d / "spec.toml", "--checkpoint",
                                     d / "no-dtype.npz", "--data", "synthetic"], 5,
     "manifest field 'dtype' is missing"),
    ("nan checkpoint", lambda d: ["eval", d / "spec.toml", "--checkpoint", d / "nan.npz",
                                  "--data", "synthetic"], 5,
     "variable 'logit/biases' is not finite"),
    ("cut checkpoint", lambda d: ["eval", d / "spec.toml", "--checkpoint", d / "cut.npz",
                                  "--data", "synthetic"], 5, "cut.npz: corrupt archive"),
    ("text checkpoint", lambda d: ["eval", d / "spec.toml", "--checkpoint", d / "text.npz",
                                   "--data", "synthetic"], 5, "text.npz: corrupt archive"),
    ("extra member", lambda d: ["eval", d / "spec.toml", "--checkpoint", d / "lying.npz",
                                "--data", "synthetic"], 5, "unexpected member 'var/huge.npy'"),
    ("lying header", lambda d: ["eval", d / "spec.toml", "--checkpoint",
                                d / "lying-header.npz", "--data", "synthetic"], 5,
     "array 'var/logit/biases.npy' declares shape [1000000000000]"),
    ("corrupt deflate", lambda d: ["eval", d / "spec.toml", "--checkpoint",
                                   d / "bad-deflate.npz", "--data", "synthetic"], 5,
     "bad-deflate.npz: corrupt archive"),
    ("checkpoint is a FIFO", lambda d: ["eval", d / "spec.toml", "--checkpoint", d / "fifo.npz",
                                        "--data", "synthetic"], 5,
     "a FIFO, not a regular checkpoint file"),
    ("checkpoint is /dev/zero", lambda d: ["eval", d / "spec.toml", "--checkpoint", "/dev/zero",
                                           "--data", "synthetic"], 5,
     "/dev/zero: a character device, not a regular checkpoint file"),
    ("missing checkpoint", lambda d: ["eval", d / "spec.toml", "--checkpoint", d / "no.npz",
                                      "--data", "synthetic"], 5, "no such checkpoint file"),
    ("hostile class names", lambda d: ["eval", d / "spec.toml", "--checkpoint",
                                       d / "named.npz", "--data", "synthetic"], 5,
     "named.npz: the data record's classes: class name 'b\\x1b[2J' must be printable"),
    ("output is a FIFO", lambda d: ["compile", d / "spec.toml", "--backend", "reference",
                                    "-o", d / "fifo.jsonl"], 6,
     "fifo.jsonl: cannot write: a FIFO, not a regular file"),
    # resources
    ("output is a directory", lambda d: ["dump", d / "spec.toml", "-o", d / "outdir"], 6,
     "outdir: cannot write"),
    ("artifact is a directory", lambda d: ["compile", d / "spec.toml", "--backend",
                                           "reference", "-o", d / "outdir"], 6,
     "outdir: cannot write"),
    ("batch too large", lambda d: ["run", d / "spec.toml", "--backend", "reference",
                                   "--batch", "100000000"], 6, "GiB available"),
    ("checkpoint under a file", lambda d: ["train", d / "spec.toml", *TRAIN, "--steps", "1",
                                           "--checkpoint", d / "a-file" / "ck"], 6,
     "checkpoint directory cannot be written"),
    ("log is a directory", lambda d: ["train", d / "spec.toml", *TRAIN, "--steps", "1",
                                      "--log", d / "outdir"], 6, "--log"),
    ("log is a FIFO", lambda d: ["train", d / "spec.toml", *TRAIN, "--steps", "1",
                                 "--log", d / "fifo.jsonl"], 6,
     "fifo.jsonl: cannot write: a FIFO, not a regular file"),
    ("cifar beyond memory", lambda d: ["train", d / "spec.toml", "--data", "cifar10",
                                       "--data-dir", d / "cifar-huge"], 6, "GiB available"),
    ("cache is a file", lambda d: ["cache", "clear", "--dir", d / "a-file"], 6,
     "a-file: not a directory, so not a kernel cache"),
]


@pytest.mark.parametrize("argv, code, words", [c[1:] for c in CLI_CASES],
                         ids=[c[0] for c in CLI_CASES])
def test_cli_case(files, capsys, argv, code, words):
    before = sorted(p.name for p in files.iterdir())
    got, err = run_cli(argv(files), capsys)
    assert got == code, err
    assert words in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert sorted(p.name for p in files.iterdir()) == before  # nothing written, nothing lost


def test_cuda_without_a_gpu_is_one_line(files, capsys, monkeypatch):
    from rescompile.backends.cuda import device
    monkeypatch.setattr(device, "available", lambda: False)
    code, err = run_cli(["run", files / "spec.toml", "--backend", "cuda"], capsys)
    assert code == 7 and "needs an NVIDIA GPU" in err and err.count("\n") == 1


def test_a_second_run_on_a_checkpoint_directory_is_refused(files, tmp_path, capsys):
    held = CheckpointDir(tmp_path / "ck")
    held.hold()
    try:
        code, err = run_cli(["train", files / "spec.toml", *TRAIN, "--steps", "1",
                             "--checkpoint", tmp_path / "ck"], capsys)
    finally:
        held.release()
    assert code == 6 and f"in use by another training run (pid {os.getpid()})" in err
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [".lock"]
    assert run_cli(["train", files / "spec.toml", *TRAIN, "--steps", "1",
                    "--checkpoint", tmp_path / "ck"], capsys)[0] == 0


def test_resume_on_a_directory_in_use_says_so_before_choosing_a_checkpoint(files, tmp_path,
                                                                          capsys):
    """The other run may prune or be writing the newest checkpoint (here: a torn one), so
    the lock is probed before any is chosen."""
    ck = tmp_path / "ck"
    assert run_cli(["train", files / "spec.toml", *TRAIN, "--steps", "1", "--checkpoint", ck],
                   capsys)[0] == 0
    (ck / "step-000002.npz").write_bytes(b"PK\3\4 torn")
    (ck / "step-000002.json").write_text((ck / "step-000001.json").read_text())
    held = CheckpointDir(ck)
    held.hold()
    try:
        code, err = run_cli(["train", files / "spec.toml", *TRAIN, "--steps", "3",
                             "--checkpoint", ck, "--resume"], capsys)
    finally:
        held.release()
    assert code == 6 and "in use by another training run" in err, err


def test_a_diverging_run_stops_before_saving_nan(files, tmp_path, capsys):
    ck = tmp_path / "ck"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # the reference's own overflows
        code, err = run_cli(["train", files / "wild.toml", *TRAIN, "--steps", "5",
                             "--checkpoint", ck, "--checkpoint-every", "1", "--keep", "1"],
                            capsys)
    assert code == 8 and "nothing of this step was applied" in err.splitlines()[-1]
    saved = sorted(p.name for p in ck.glob("step-*.npz"))
    assert saved == ["step-000001.npz"]            # the last finite one, not pruned
    assert np.isfinite(rc.load(ck / saved[0]).state["logit/DW"]).all()


def test_resume_drops_a_torn_last_metrics_line(files, tmp_path, capsys):
    ck, log = tmp_path / "ck", tmp_path / "m.jsonl"
    assert run_cli(["train", files / "spec.toml", *TRAIN, "--steps", "2", "--checkpoint", ck,
                    "--log", log], capsys)[0] == 0
    with open(log, "a") as f:
        f.write('{"step": 3, "lo')                   # a crash mid-write
    code, err = run_cli(["train", files / "spec.toml", *TRAIN, "--steps", "3",
                         "--checkpoint", ck, "--log", log, "--resume"], capsys)
    assert code == 0 and "dropped a torn last line" in err
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]
    log.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    code, err = run_cli(["train", files / "spec.toml", *TRAIN, "--steps", "4",
                         "--checkpoint", ck, "--log", log, "--resume"], capsys)
    assert code == 4 and "m.jsonl:2: not a metrics record" in err


def test_resume_without_optimizer_slots_needs_fresh_optimizer(files, tmp_path, capsys):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "step-000000.npz").write_bytes((files / "infer.npz").read_bytes())
    (ck / "step-000000.json").write_text(json.dumps(
        {"data": "synthetic", "seed": 1, "batch_size": 16, "augment": True, "step": 0}))
    argv = ["train", files / "spec.toml", *TRAIN, "--steps", "1", "--checkpoint", ck,
            "--resume"]
    code, err = run_cli(argv, capsys)
    assert code == 5 and "optimizer slot" in err and "--fresh-optimizer" in err
    assert run_cli([*argv, "--fresh-optimizer"], capsys)[0] == 0


@pytest.fixture(scope="module")
def exe():
    return rc.compile(SPEC, mode="train", seed=2)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(3)
    return rng.standard_normal((4, 8, 8, 3)).astype(np.float32), rng.integers(0, 5, 4)


def nan_at(array, index):
    array = np.array(array, dtype=np.float64)
    array[index] = np.nan
    return array


def edit_params(exe):
    exe.params["logit/biases"][0] = 1.0


def from_torch(state):
    from rescompile.interop import from_torch
    return from_torch(state)


def torch_zeros(kind: str):
    """A conv kernel in bfloat16 (which NumPy lacks), or on the meta device (no values)."""
    import torch
    if kind == "meta":
        return torch.zeros((4, 3, 7, 7), device="meta")
    return torch.zeros((4, 3, 7, 7), dtype=torch.bfloat16)


API_CASES = [
    ("misspelled keyword", lambda e, b: rc.compile(SPEC, backend="cpu", progres=True),
     rc.UsageError, "unknown keyword 'progres' for backend 'cpu'"),
    ("keyword of another backend", lambda e, b: rc.compile(SPEC, isa="avx2"),
     rc.UsageError, "unknown keyword 'isa' for backend 'reference'"),
    ("unknown backend", lambda e, b: rc.compile(SPEC, backend="tpu"), rc.UsageError,
     "backend must be one of"),
    ("nan image", lambda e, b: e.train_step(nan_at(b[0], (1, 2, 3, 0)), b[1]), rc.InputError,
     "images: holds 1 non-finite values (the first at [1, 2, 3, 0]: nan)"),
    ("nan one-hot", lambda e, b: e.train_step(b[0], nan_at(np.eye(5)[b[1]], (2, 1))),
     rc.InputError, "labels: holds 1 non-finite values"),
    ("negative one-hot", lambda e, b: e.train_step(b[0], np.eye(5)[b[1]] * 2 - 1),
     rc.InputError, "labels: row 0 is not a distribution"),
    ("float labels [N]", lambda e, b: e.train_step(b[0], b[1].astype(np.float32)),
     rc.InputError, "labels: expected int class ids"),
    ("beyond float32", lambda e, b: e.forward(b[0].astype(np.float64) * 1e39), rc.InputError,
     "images: is beyond float32's range"),
    ("nan dlogits", lambda e, b: (e.forward(b[0]), e.backward(np.full((4, 5), np.nan))),
     rc.InputError, "dlogits: holds 20 non-finite values"),
    ("nan parameter", lambda e, b: e.load_params({**e.params, "logit/DW": nan_at(
        e.params["logit/DW"], (0, 0))}), rc.InputError, "variable 'logit/DW': holds 1"),
    ("edit params in place", lambda e, b: edit_params(e), ValueError, "read-only"),
    ("epsilon under float32", lambda e, b: rc.compile(
        SPEC.replace(batch_norm={"epsilon": 1e-40})), rc.SpecError, "batch_norm.epsilon"),
    ("train state without slots", lambda e, b: rc.load(b[2] / "infer.npz", mode="train"),
     rc.CheckpointError, "optimizer slot"),
    ("negative seed", lambda e, b: rc.compile(SPEC, seed=-1), rc.UsageError,
     "compile: seed must be an integer >= 0, got -1"),
    ("load(None)", lambda e, b: rc.load(None), rc.UsageError, "expected a path, got NoneType"),
    ("load a FIFO", lambda e, b: rc.load(b[2] / "fifo.npz"), rc.CheckpointError,
     "a FIFO, not a regular checkpoint or artifact file"),
    ("ragged images", lambda e, b: e.forward([[1.0, 2.0], [3.0]]), rc.InputError,
     "images: not an array (setting an array element with a sequence"),
    ("ragged labels", lambda e, b: e.train_step(b[0], [[0], [1, 2], [3], [4]]),
     rc.InputError, "labels: not an array"),
    ("object params", lambda e, b: e.load_params({**e.params, "logit/biases": [object()] * 5}),
     rc.InputError, "variable 'logit/biases': not an array of numbers"),
    ("bfloat16 torch tensors", lambda e, b: from_torch({"conv1.weight": torch_zeros("bfloat16")}),
     rc.InputError, "not a supported ResNet"),
    ("meta torch tensors", lambda e, b: from_torch({"conv1.weight": torch_zeros("meta")}),
     rc.InputError, "tensor 'conv1.weight' is on the meta device"),
]


@pytest.mark.parametrize("call, error, words", [c[1:] for c in API_CASES],
                         ids=[c[0] for c in API_CASES])
def test_api_case(exe, batch, files, call, error, words):
    before = {n: v.copy() for n, v in exe.state.items()}
    with pytest.raises(error) as caught:
        call(exe, (*batch, files))
    assert words in str(caught.value) and "\n" not in str(caught.value)
    assert all(np.array_equal(before[n], exe.state[n]) for n in before)


def test_inputs_handled_as_stated(exe, batch, files):
    """Int labels [N, 1] are class ids; a float64 spec keeps a tiny epsilon; a checkpoint
    without slots trains with fresh_optimizer=True, its slots starting at zero."""
    images, labels = batch
    assert exe.loss_and_grads(images, labels[:, None])[0] == exe.loss_and_grads(images,
                                                                                  labels)[0]
    rc.compile(SPEC.replace(batch_norm={"epsilon": 1e-40}), dtype="float64")
    fresh = rc.load(files / "infer.npz", mode="train", fresh_optimizer=True)
    slots = [n for n in fresh.state if n not in fresh.params]
    assert slots and all(not fresh.state[n].any() for n in slots)
    fresh.train_step(images, labels)


def test_a_diverged_step_changes_nothing(files, batch):
    exe = rc.compile(rc.load_spec(files / "wild.toml"), mode="train", seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        exe.train_step(*batch)
        before = {n: v.copy() for n, v in exe.state.items()}
        with pytest.raises(rc.NonFiniteError) as caught:
            exe.train_step(*batch)
    # The step that failed (the second), and the tensor that went non-finite first.
    assert "step 2: the loss is nan (the logits hold 20 non-finite values" in str(caught.value)
    assert exe.step == 1
    assert all(np.array_equal(before[n], exe.state[n]) for n in before)


def test_the_kernel_cache_repairs_itself(tmp_path):
    """At the cache's level (a compiled model's kernels stay loaded for the process, so a
    second compile would not read the cache): a corrupt entry is rebuilt and rewritten, and a
    directory that cannot be one falls back to a private one, each with a warning."""
    kernel = Barrier(host_target())
    body = jit.cached_object(kernel, tmp_path)
    entry = next((tmp_path / "objects").glob("*.o"))
    entry.write_bytes(entry.read_bytes()[:100])
    with pytest.warns(RuntimeWarning, match="corrupt kernel cache entry removed and rebuilt"):
        assert jit.cached_object(kernel, tmp_path) == body
    assert entry.read_bytes().endswith(body)
    (tmp_path / "a-file").write_text("x")
    with pytest.warns(RuntimeWarning, match="a-file: kernel cache directory unusable"):
        assert jit.cached_object(kernel, tmp_path / "a-file") == body


def test_a_corrupt_numba_cache_is_emptied_and_compiled_again(tmp_path):
    (tmp_path / "mod.py").write_text("from numba import njit\n\n@njit(cache=True)\n"
                                     "def f(x):\n    return x + 1\n")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import mod
        from rescompile.kernel_cache import repairing_numba_cache
        print(repairing_numba_cache([mod.f], lambda: mod.f(1)))
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = lambda: subprocess.run([sys.executable, "-c", script], capture_output=True,
                                 text=True, timeout=300, env=env)
    assert run().stdout.strip() == "2"
    for index in (tmp_path / "__pycache__").glob("*.nbi"):
        index.write_bytes(b"")
    out = run()
    assert out.stdout.strip() == "2", out.stderr
    assert "could not be read" in out.stderr and "compiling again" in out.stderr
    assert run().stdout.strip() == "2"


def test_a_member_larger_than_its_variable_is_refused_before_decompression(files, tmp_path):
    """128 MB of zeros that deflate to 128 kB, in place of a 5-float variable: refused from
    the zip's directory, while the memory held stays far below the member's size."""
    with zipfile.ZipFile(files / "ckpt.npz") as source, \
            zipfile.ZipFile(tmp_path / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as z:
        for name in source.namelist():
            z.writestr(name, b"\0" * (128 << 20) if name == "var/logit/biases.npy"
                       else source.read(name))
    assert (tmp_path / "bomb.npz").stat().st_size < 1 << 20
    peak, message = peak_bytes(lambda: rc.load(tmp_path / "bomb.npz"), rc.CheckpointError)
    assert "'var/logit/biases.npy' declares 134217728 bytes, 20 to 4116 expected" in message
    assert peak < 100 << 20, peak


@pytest.mark.parametrize("name", ["ckpt.npz", "model.rcx"])
def test_random_byte_flips_are_refused_in_one_line(files, tmp_path, name):
    """Seeded random flips of 1 to 3 bytes anywhere in a checkpoint (stored) or an artifact
    (deflated): each loads, or is refused with one line naming the file; nothing else."""
    rng = np.random.default_rng(23)
    data = (files / name).read_bytes()
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(30):
        flipped = bytearray(data)
        for at in rng.integers(0, len(data), rng.integers(1, 4)):
            flipped[at] ^= int(rng.integers(1, 256))
        path = tmp_path / f"{case}-{name}"
        path.write_bytes(bytes(flipped))
        try:
            rc.load(path, backend="reference")
            outcomes["loaded"] += 1
        except rc.UserError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc), (case, str(exc))
            outcomes["refused"] += 1
    assert outcomes["refused"] >= 20, outcomes  # a flip a zip's CRC catches is a refusal
