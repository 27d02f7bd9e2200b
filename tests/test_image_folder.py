"""Training on one's own images from the command line: a generated folder of coloured shapes
(PNG and JPEG, 16x24, so reading resizes and crops them to the model's 12x12) with class
names that are not identifiers, trained with the recipes (cosine with warm-up, Nesterov, label
smoothing, decay on all trainables, per-channel normalisation) to at least 90% on the seeded
held-out split; then eval and predict name the classes, and a resumed run is bit-identical.

The reference backend keeps this to a few seconds: the data path and the CLI are what is
tested here (the backends' numbers have tests of their own)."""

import json

import numpy as np
import pytest

from pictures import SHAPES, picture, save, shape_folder
from rescompile import checkpoint
from rescompile.cli import main
from rescompile.data import load_dataset
from rescompile.data.imagefile import read_image

Image = pytest.importorskip("PIL.Image")

SPEC = """name = "shapes"
[model]
input = [12, 12, 3]
num_classes = 3
stem_filters = 4
stages = [{ filters = 8, units = 1, stride = 1 }, { filters = 16, units = 1, stride = 2 }]
activate_before_residual = [true, false]
[train]
learning_rate = [[0, 0.1]]
batch_size = 16
"""
STEPS = 30
NAMES = sorted(SHAPES)  # class ids are the sorted folder names
RECIPE = ["--schedule", "cosine", "--warmup-steps", "5", "--total-steps", STEPS, "--nesterov",
          "--label-smoothing", "0.1", "--weight-decay-on", "all", "--normalize", "channel"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    (root / "shapes.toml").write_text(SPEC)
    return root / "shapes.toml", shape_folder(root / "images", per_class=24)


def train(spec, images, *args):
    return main(["train", str(spec), "--data", "folder", "--data-dir", str(images),
                 "--backend", "reference", "--val-fraction", "0.25", "--seed", "5",
                 *map(str, RECIPE), *map(str, args)])


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    spec, images = shapes
    out = tmp_path_factory.mktemp("trained")
    assert train(spec, images, "--checkpoint", out / "ck", "--eval-every", 10,
                 "--log", out / "log.jsonl") == 0
    return out / "ck", out / "log.jsonl"


def test_the_folder_is_read_as_image_folders_are(shapes):
    spec, images = shapes
    data = load_dataset("folder", images, input_shape=(12, 12, 3), num_classes=3,
                        val_fraction=0.25)
    assert data.class_names == tuple(NAMES)
    assert data.train_images.shape == (54, 12, 12, 3) and data.train_images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(data.test_labels), [6, 6, 6])  # per class
    again = load_dataset("folder", images, input_shape=(12, 12, 3), num_classes=3,
                         val_fraction=0.25)
    assert np.array_equal(again.test_images, data.test_images)  # the split is seeded
    # A 16x24 picture: its shorter side to 12 (bilinear), then the centre 12x12.
    path = images / NAMES[0] / "001.png"
    for mode, channels in (("RGB", 3), ("L", 1)):
        with Image.open(path) as picture_file:
            expected = picture_file.convert(mode).resize((18, 12), Image.Resampling.BILINEAR)
        centre = np.asarray(expected.crop((3, 0, 15, 12))).reshape(12, 12, channels)
        assert np.array_equal(read_image(path, (12, 12, channels)), centre)


def test_trains_to_90_percent_on_the_held_out_images(trained):
    _, log = trained
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records if "accuracy" in r] == [10, 20, 30]
    assert records[-1]["accuracy"] >= 0.9
    assert records[0]["lr"] == pytest.approx(0.1 * 0.1)  # the warm-up's first rate


def test_the_checkpoint_keeps_the_recipe_and_the_data(trained):
    ck, _ = trained
    manifest, _ = checkpoint.read(ck / f"step-{STEPS:06d}.npz")
    train = manifest["spec"]["train"]
    assert (train["schedule"], train["nesterov"], train["label_smoothing"],
            train["weight_decay_on"]) == ("cosine", True, 0.1, "all")
    data = manifest["data"]
    assert data["classes"] == NAMES and data["normalize"] == "channel"
    assert len(data["mean"]) == 3 and all(s > 0 for s in data["std"])


def test_eval_names_the_classes(shapes, trained, capsys):
    spec, images = shapes
    ck, _ = trained
    assert main(["eval", str(spec), "--checkpoint", str(ck), "--data", "folder",
                 "--data-dir", str(images), "--backend", "reference"]) == 0
    lines = capsys.readouterr().out.splitlines()
    correct, total = map(int, lines[0].rsplit("(", 1)[1].rstrip(")").split("/"))
    assert total == 18 and correct >= 0.9 * total  # the split the checkpoint was trained with
    assert [line.split()[:3] for line in lines[2:]] == [[str(k), *name.split()]
                                                        for k, name in enumerate(NAMES)]


def test_predict_names_the_classes_of_png_files(shapes, trained, tmp_path, capsys):
    spec, _ = shapes
    ck, _ = trained
    rng = np.random.default_rng(99)  # pictures the run never saw
    files = [save(picture(rng, name), tmp_path / f"{k}.png") for k, name in enumerate(NAMES * 2)]
    argv = ["predict", str(spec), "--checkpoint", str(ck), *map(str, files),
            "--backend", "reference", "--top", "2"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0] for line in lines] == list(map(str, files))
    predicted = [line.split(": ")[1].split(" (")[0] for line in lines]
    assert sum(p == truth for p, truth in zip(predicted, NAMES * 2)) >= 5
    assert main([*argv, "-o", str(tmp_path / "p.json")]) == 0
    rows = json.loads((tmp_path / "p.json").read_text())
    assert [row["names"][0] for row in rows] == predicted
    assert all(row["names"] == [NAMES[c] for c in row["classes"]] for row in rows)


def test_resume_is_bit_identical(shapes, trained, tmp_path):
    spec, images = shapes
    ck, _ = trained
    assert train(spec, images, "--checkpoint", tmp_path, "--steps", STEPS // 2) == 0
    assert train(spec, images, "--checkpoint", tmp_path, "--resume") == 0
    full, resumed = (checkpoint.read(d / f"step-{STEPS:06d}.npz") for d in (ck, tmp_path))
    assert full[0]["data"] == resumed[0]["data"]
    assert sorted(full[1]) == sorted(resumed[1])
    for name, value in full[1].items():
        assert np.array_equal(value, resumed[1][name]), name


def test_an_artifact_keeps_the_weights_and_says_it_drops_the_data(shapes, trained, tmp_path,
                                                                   capsys):
    """A run's recipe flags are no obstacle to compiling its checkpoint for inference, but an
    artifact keeps no data record: compile says so, and predict then gives class ids."""
    spec, images = shapes
    ck, _ = trained
    artifact = tmp_path / "m.rcx"
    assert main(["compile", str(spec), "--checkpoint", str(ck / f"step-{STEPS:06d}.npz"),
                 "-o", str(artifact), "--backend", "reference"]) == 0
    assert "keeps its data's class names and normalisation" in capsys.readouterr().err
    png = images / NAMES[0] / "001.png"
    assert main(["predict", str(spec), "--checkpoint", str(artifact), str(png),
                 "--backend", "reference"]) == 0
    assert capsys.readouterr().out.split(": ")[1][0] in "012"
