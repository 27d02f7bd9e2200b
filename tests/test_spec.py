"""Tests for rescompile.spec: defaults, validation messages, round trips, presets."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rescompile.spec import (
    BatchNormSpec, ModelSpec, ResNetSpec, SpecError, StageSpec, TrainSpec, load_spec, preset,
    spec_from_dict,
)

ROOT = Path(__file__).resolve().parents[1]
PRESET_FILES = sorted((ROOT / "rescompile" / "presets").glob("*.toml"))
PRESET_NAMES = ["seed-small", "cifar-resnet164", "resnet50-imagenet", "digits-resnet",
                "seed-basic-small", "cifar-resnet32", "cifar-resnet56", "cifar-resnet110",
                "resnet18-imagenet", "resnet34-imagenet", "wide-resnet50-2-imagenet"]


def minimal() -> dict:
    """The smallest valid spec dict: only the required model keys."""
    return {"model": {"input": [32, 32, 3], "num_classes": 10, "stages": [
        {"filters": 64, "units": 2, "stride": 1},
        {"filters": 128, "units": 2, "stride": 2},
        {"filters": 256, "units": 2, "stride": 2},
    ]}}


def with_change(path: str, value) -> dict:
    """minimal() with one dotted key set, e.g. with_change("model.stages", [])."""
    d = minimal()
    *parents, last = path.split(".")
    table = d
    for key in parents:
        table = table.setdefault(key, {})
    table[last] = value
    return d


def error_of(d) -> str:
    with pytest.raises(SpecError) as info:
        spec_from_dict(d)
    return str(info.value)


# --- defaults --------------------------------------------------------------------------------

def test_defaults_are_the_seeds():
    spec = spec_from_dict(minimal())
    assert spec.name == "resnet"
    m = spec.model
    assert (m.stem, m.stem_filters, m.unit, m.preactivation) == ("cifar", 16, "bottleneck", True)
    assert (m.stride_on, m.padding, m.relu_leakiness) == ("conv1", "same", 0.1)
    assert m.activate_before_residual == (True, False, False)
    assert m.stages[1] == StageSpec(filters=128, units=2, stride=2)
    assert m.input == (32, 32, 3)
    assert spec.batch_norm == BatchNormSpec(epsilon=1e-3, decay=0.9, zero_debias=False)
    assert spec.train == TrainSpec()
    assert spec.train.learning_rate[0] == (0, 0.1)


def test_activate_before_residual_default_follows_stage_count():
    d = minimal()
    d["model"]["stages"] = d["model"]["stages"][:2]
    assert spec_from_dict(d).model.activate_before_residual == (True, False)


def test_ints_are_accepted_for_floats_and_stored_as_floats():
    spec = spec_from_dict(with_change("model.relu_leakiness", 0))
    assert type(spec.model.relu_leakiness) is float
    assert spec == spec_from_dict(with_change("model.relu_leakiness", 0.0))
    assert spec.digest() == spec_from_dict(with_change("model.relu_leakiness", 0.0)).digest()


# --- validation messages name the field ------------------------------------------------------

@pytest.mark.parametrize("path, value, expected", [
    # types
    ("model.num_classes", True, "model.num_classes: expected an integer"),
    ("model.num_classes", 10.0, "model.num_classes: expected an integer"),
    ("model.preactivation", 1, "model.preactivation: expected true or false"),
    ("model.relu_leakiness", "0.1", "model.relu_leakiness: expected a number"),
    ("model.relu_leakiness", False, "model.relu_leakiness: expected a number"),
    ("model.stages", {"filters": 64}, "model.stages: expected a list"),
    ("batch_norm", [1], "batch_norm: expected a table"),
    # values
    ("model.input", [32, 32], "model.input: must have exactly 3 entries"),
    ("model.input", [32, 0, 3], "model.input[1]: must be >= 1"),
    ("model.num_classes", 1, "model.num_classes: must be >= 2"),
    ("model.stem", "vgg", "model.stem: must be one of 'cifar', 'imagenet'"),
    ("model.stem_filters", 0, "model.stem_filters: must be >= 1"),
    ("model.unit", "plain", "model.unit: must be one of 'bottleneck', 'basic'"),
    ("model.shortcut", "conv", "model.shortcut: must be one of 'projection', 'pool_pad'"),
    ("model.bottleneck_width", 0, "model.bottleneck_width: must be > 0 and <= 1"),
    ("model.bottleneck_width", 0.3, "model.stages[0].filters: times bottleneck_width 0.3 must "
                                    "be a whole number of inner channels >= 1, got 64 (19.2)"),
    ("model.stride_on", "conv3", "model.stride_on: must be one of 'conv1', 'conv2'"),
    ("model.padding", "valid", "model.padding: must be one of 'same', 'symmetric'"),
    ("model.stages", [], "model.stages: must not be empty"),
    ("model.activate_before_residual", [True], "model.activate_before_residual: must have one "
                                               "entry per stage (3), got 1"),
    ("model.activate_before_residual", [1, 0, 0], "model.activate_before_residual[0]: expected "
                                                  "true or false"),
    ("model.relu_leakiness", 1.0, "model.relu_leakiness: must be >= 0 and < 1"),
    ("model.relu_leakiness", -0.1, "model.relu_leakiness: must be >= 0 and < 1"),
    ("model.relu_leakiness", float("nan"), "model.relu_leakiness: must be a finite number"),
    ("batch_norm.epsilon", 0.0, "batch_norm.epsilon: must be > 0"),
    ("batch_norm.epsilon", float("inf"), "batch_norm.epsilon: must be a finite number"),
    ("batch_norm.decay", 1.0, "batch_norm.decay: must be >= 0 and < 1"),
    ("batch_norm.zero_debias", "yes", "batch_norm.zero_debias: expected true or false"),
    ("train.optimizer", "adam", "train.optimizer: must be one of 'momentum', 'sgd'"),
    ("train.momentum", 1, "train.momentum: must be >= 0 and < 1"),
    ("train.weight_decay", -1e-4, "train.weight_decay: must be >= 0"),
    ("train.batch_size", 0, "train.batch_size: must be >= 1"),
    ("train.learning_rate", [], "train.learning_rate: must not be empty"),
    ("train.learning_rate", [[10, 0.1]], "train.learning_rate[0]: the first from_step must be 0"),
    ("train.learning_rate", [[0, 0.1], [0, 0.01]], "train.learning_rate[1]: from_step must be "
                                                   "greater than the previous entry's 0"),
    ("train.learning_rate", [[0, 0.1], [5, 0.0]], "train.learning_rate[1][1]: must be > 0"),
    ("train.learning_rate", [[0, 0.1], [5.0, 0.1]], "train.learning_rate[1][0]: expected an "
                                                    "integer"),
    ("train.learning_rate", [[0, 0.1], 5], "train.learning_rate[1]: expected a [from_step, lr]"),
    ("train.schedule", "linear", "train.schedule: must be one of 'step', 'cosine'"),
    ("train.warmup_steps", -1, "train.warmup_steps: must be >= 0"),
    ("train.warmup_start", 1.5, "train.warmup_start: must be >= 0 and <= 1"),
    ("train.total_steps", 1.0, "train.total_steps: expected an integer"),
    ("train.min_lr", 0.01, "train.min_lr: only the cosine schedule reads it"),
    ("train.nesterov", 1, "train.nesterov: expected true or false"),
    ("train.label_smoothing", 1.1, "train.label_smoothing: must be >= 0 and <= 1"),
    ("train.weight_decay_on", "biases", "train.weight_decay_on: must be one of 'kernels', 'all'"),
    ("name", "", "name: must be a string of 1-64 characters"),
    ("name", "a" * 65, "name: must be a string of 1-64 characters"),
    ("name", 7, "name: must be a string"),
])
def test_invalid_field_is_named(path, value, expected):
    assert expected in error_of(with_change(path, value))


COSINE = {"schedule": "cosine", "learning_rate": [[0, 0.4]], "warmup_steps": 3,
          "total_steps": 10}


@pytest.mark.parametrize("change, expected", [
    ({"nesterov": True, "optimizer": "sgd"}, "train.nesterov: Nesterov momentum needs "
                                             "optimizer = \"momentum\""),
    ({"learning_rate": [[0, 0.4], [5, 0.1]]}, "train.learning_rate: the cosine schedule takes "
                                              "one [0, peak] entry, got 2"),
    ({"total_steps": 3}, "train.total_steps: the cosine schedule needs total_steps > "
                         "warmup_steps (3), got 3"),
    ({"total_steps": 0, "warmup_steps": 0}, "train.total_steps: the cosine schedule needs"),
    ({"min_lr": 0.5}, "train.min_lr: must be <= the peak learning rate 0.4, got 0.5"),
])
def test_recipe_fields_are_checked_together(change, expected):
    assert error_of({**minimal(), "train": {**COSINE, **change}}).startswith(expected)


@pytest.mark.parametrize("stage, expected", [
    ({"filters": 0, "units": 1, "stride": 1}, "model.stages[1].filters: must be >= 1"),
    ({"filters": 10, "units": 1, "stride": 1}, "model.stages[1].filters: times "
                                               "bottleneck_width 0.25 must be a whole number"),
    ({"filters": 64, "units": 0, "stride": 1}, "model.stages[1].units: must be >= 1"),
    ({"filters": 64, "units": 1, "stride": 0}, "model.stages[1].stride: must be >= 1 and <= 4, "
                                               "got 0"),
    ({"filters": 64, "units": 1, "stride": 5}, "model.stages[1].stride: must be >= 1 and <= 4"),
    ({"filters": 64, "units": 1}, "model.stages[1].stride: missing required key"),
    ("64", "model.stages[1]: expected a table"),
])
def test_invalid_stage_is_named(stage, expected):
    d = minimal()
    d["model"]["stages"][1] = stage
    assert expected in error_of(d)


def basic(**model) -> dict:
    """The seed's basic-unit CIFAR ResNet (filters 16, 32, 64) with `model` changed."""
    d = minimal()
    d["model"].update({"unit": "basic", "shortcut": "pool_pad", "stages": [
        {"filters": 16, "units": 1, "stride": 1}, {"filters": 32, "units": 1, "stride": 2},
        {"filters": 64, "units": 1, "stride": 2}], **model})
    return d


def test_every_unit_and_shortcut_combination_builds_where_shapes_allow():
    for unit in ("basic", "bottleneck"):
        for shortcut in ("projection", "pool_pad"):
            for preactivation in (True, False):
                d = basic(unit=unit, shortcut=shortcut, preactivation=preactivation)
                if unit == "bottleneck":
                    d["model"]["stages"] = [dict(s, filters=4 * s["filters"])
                                            for s in d["model"]["stages"]]
                    d["model"]["stem_filters"] = 64 if shortcut == "pool_pad" else 16
                model = spec_from_dict(d).model
                assert (model.unit, model.shortcut) == (unit, shortcut)


@pytest.mark.parametrize("change, expected", [
    ({"input": [31, 32, 3]}, "model.stages[1].stride: with shortcut \"pool_pad\" the 2x2 "
                             "average pool of the 31x32 map gives 15x16, the convolutions "
                             "16x16"),
    ({"stages": [{"filters": 16, "units": 1, "stride": 2}]},
     "model.stages[0].stride: with shortcut \"pool_pad\" a unit whose channels do not change "
     "(16) takes no pooled shortcut, so its stride must be 1, got 2"),
    ({"stages": [{"filters": 16, "units": 1, "stride": 1}, {"filters": 33, "units": 1,
                                                            "stride": 2}]},
     "model.stages[1].filters: with shortcut \"pool_pad\" the channels grow by an even number "
     "of zero channels, 16 -> 33 does not"),
    ({"stem_filters": 32}, "model.stages[0].filters: with shortcut \"pool_pad\" the channels "
                           "grow by an even number of zero channels, 32 -> 16 does not"),
    ({"bottleneck_width": 0.5}, "model.bottleneck_width: only bottleneck units read it (unit "
                                "is \"basic\"), got 0.5"),
])
def test_combinations_that_cannot_be_built_are_named(change, expected):
    assert error_of(basic(**change)) == expected


def test_pool_pad_fits_wherever_each_stride_divides_the_map():
    """Stride 1 units that widen take a pad alone; SAME and symmetric padding agree here."""
    d = basic(input=[36, 36, 3], padding="symmetric", stages=[
        {"filters": 24, "units": 1, "stride": 1}, {"filters": 32, "units": 2, "stride": 3}])
    assert spec_from_dict(d).model.stages[1].stride == 3


def test_error_message_starts_with_the_path():
    assert error_of(with_change("model.stages", [])).startswith("model.stages:")


@pytest.mark.parametrize("path, allowed", [
    ("model.filter", "input, num_classes, stem"),
    ("train.lr", "optimizer, momentum, weight_decay, learning_rate, batch_size, schedule"),
    ("batch_norm.eps", "epsilon, decay, zero_debias"),
    ("modle", "name, model, batch_norm, train"),
])
def test_unknown_key_is_named_with_the_allowed_ones(path, allowed):
    message = error_of(with_change(path, 1))
    assert message.startswith(f"{path}: unknown key")
    assert allowed in message


def test_unknown_stage_key():
    d = minimal()
    d["model"]["stages"][0]["filter"] = 64
    message = error_of(d)
    assert message.startswith("model.stages[0].filter: unknown key")
    assert "filters, units, stride" in message


def test_missing_required_keys():
    assert error_of([]).startswith("spec: expected a table")
    assert error_of({}).startswith("model: missing required key")
    d = minimal()
    del d["model"]["num_classes"]
    assert error_of(d).startswith("model.num_classes: missing required key")


@pytest.mark.parametrize("stem, size, ok", [
    ("cifar", 4, True),      # strides 1*2*2 = 4
    ("cifar", 3, False),
    ("imagenet", 16, True),  # 4 * 4 = 16
    ("imagenet", 15, False),
])
def test_input_must_cover_the_total_stride(stem, size, ok):
    d = with_change("model.stem", stem)
    d["model"]["input"] = [size, 32, 3]
    if ok:
        spec_from_dict(d)
    else:
        message = error_of(d)
        assert message.startswith("model.input:")
        assert f"total stride {4 if stem == 'cifar' else 16}" in message


@pytest.mark.parametrize("name", ['x"; import os', "a b", "../etc", "x\ny", "naïve", "a/b"])
def test_hostile_names_are_rejected(name):
    assert error_of(with_change("name", name)).startswith("name:")


def test_hostile_name_in_toml_is_rejected():
    toml = 'name = "x\\"; import os"\n' + preset("seed-small").to_toml().split("\n", 1)[1]
    with pytest.raises(SpecError, match="^name:"):
        load_spec(toml)


def test_direct_construction_is_validated_too():
    spec = preset("seed-small")
    with pytest.raises(SpecError, match="^train.batch_size:"):
        dataclasses.replace(spec, train=dataclasses.replace(spec.train, batch_size=0))
    with pytest.raises(SpecError, match="^name:"):
        ResNetSpec(name="bad name", model=spec.model)


# --- round trips and immutability ------------------------------------------------------------

@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_round_trips(name):
    spec = preset(name)
    assert spec.name == name
    assert spec_from_dict(spec.to_dict()) == spec
    assert load_spec(spec.to_toml()) == spec
    assert load_spec(spec.to_json()) == spec
    assert load_spec(spec) is spec
    assert json.loads(spec.to_json()) == spec.to_dict()
    assert load_spec(spec.to_toml()).digest() == spec.digest()


def test_load_spec_from_files(tmp_path):
    spec = preset("digits-resnet")
    (tmp_path / "a.toml").write_text(spec.to_toml())
    (tmp_path / "a.json").write_text(spec.to_json())
    (tmp_path / "a.yaml").write_text("name: x")
    assert load_spec(tmp_path / "a.toml") == spec
    assert load_spec(str(tmp_path / "a.json")) == spec
    with pytest.raises(SpecError, match="unknown spec file suffix"):
        load_spec(tmp_path / "a.yaml")
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(str(tmp_path / "missing.toml"))


def test_load_spec_reports_syntax_errors():
    with pytest.raises(SpecError, match="invalid TOML"):
        load_spec("name = \n[model")
    with pytest.raises(SpecError, match="invalid JSON"):
        load_spec('{"name": ')
    with pytest.raises(SpecError, match="invalid TOML"):
        load_spec("[1, 2]")
    with pytest.raises(SpecError, match="^model: expected a table"):
        load_spec('{"model": [1]}')


def test_spec_is_immutable_and_hashable():
    spec = preset("seed-small")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.model.stages[0].units = 3
    assert isinstance(spec.model.stages, tuple) and isinstance(spec.model.input, tuple)
    assert {spec: 1}[preset("seed_small")] == 1


def test_replace():
    spec = preset("seed-small")
    changed = spec.replace(name="other", train={"batch_size": 4})
    assert (changed.name, changed.train.batch_size) == ("other", 4)
    assert changed.train.momentum == spec.train.momentum
    assert changed.model == spec.model and changed.digest() != spec.digest()
    assert spec.replace(batch_norm=BatchNormSpec(zero_debias=True)).batch_norm.zero_debias
    with pytest.raises(SpecError, match="^train.batch_size:"):
        spec.replace(train={"batch_size": 0})
    with pytest.raises(SpecError, match="^nmae: unknown key"):
        spec.replace(nmae="x")


def test_digest_is_stable_and_sensitive():
    spec = preset("cifar-resnet164")
    assert len(spec.digest()) == 64
    assert spec.digest() == spec_from_dict(json.loads(spec.to_json())).digest()
    assert spec.digest() != spec.replace(model={"relu_leakiness": 0.2}).digest()


@st.composite
def valid_spec_dicts(draw):
    """Random valid spec dicts: stride constraints respected, optional keys sometimes left out."""
    stem = draw(st.sampled_from(["cifar", "imagenet"]))
    stages = draw(st.lists(st.fixed_dictionaries({
        "filters": st.integers(1, 64).map(lambda n: 4 * n),
        "units": st.integers(1, 20),
        "stride": st.integers(1, 4),
    }), min_size=1, max_size=5))
    total = (4 if stem == "imagenet" else 1)
    for stage in stages:
        total *= stage["stride"]
    unit_float = st.floats(0, 1, exclude_max=True)
    model = {
        "input": [draw(st.integers(total, total + 300)), draw(st.integers(total, total + 300)),
                  draw(st.integers(1, 8))],
        "num_classes": draw(st.integers(2, 10_000)),
        "stages": stages,
    }
    optional_model = {
        "stem": st.just(stem),
        "stem_filters": st.integers(1, 128),
        "unit": st.just("bottleneck"),
        "preactivation": st.booleans(),
        "stride_on": st.sampled_from(["conv1", "conv2"]),
        "padding": st.sampled_from(["same", "symmetric"]),
        "activate_before_residual": st.lists(st.booleans(), min_size=len(stages),
                                             max_size=len(stages)),
        "relu_leakiness": unit_float | st.integers(0, 0),
    }
    starts = draw(st.lists(st.integers(1, 10**6), unique=True, max_size=5))
    optional_train = {
        "optimizer": st.sampled_from(["momentum", "sgd"]),
        "momentum": unit_float,
        "weight_decay": st.floats(0, 1e3),
        "learning_rate": st.tuples(*[st.floats(1e-300, 1e3) for _ in range(len(starts) + 1)])
        .map(lambda lrs: [[s, lr] for s, lr in zip([0] + sorted(starts), lrs)]),
        "batch_size": st.integers(1, 4096),
        "warmup_steps": st.integers(0, 10**6),
        "warmup_start": st.floats(0, 1),
        "total_steps": st.integers(0, 10**6),
        "label_smoothing": st.floats(0, 1),
        "weight_decay_on": st.sampled_from(["kernels", "all"]),
    }
    optional_bn = {
        "epsilon": st.floats(1e-300, 10),
        "decay": unit_float,
        "zero_debias": st.booleans(),
    }

    def some_of(options):
        keys = draw(st.lists(st.sampled_from(sorted(options)), unique=True))
        return {key: draw(options[key]) for key in keys}

    model.update(some_of(optional_model))
    model["stem"] = stem  # the stride bound above assumed this stem
    d = {"model": model}
    if draw(st.booleans()):
        d["name"] = draw(st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True))
    if draw(st.booleans()):
        d["train"] = some_of(optional_train)
    if draw(st.booleans()):
        d["batch_norm"] = some_of(optional_bn)
    return d


@settings(max_examples=150, deadline=None)
@given(valid_spec_dicts())
def test_random_valid_specs_round_trip(d):
    spec = spec_from_dict(d)
    assert spec_from_dict(spec.to_dict()) == spec
    assert load_spec(spec.to_toml()) == spec
    assert load_spec(spec.to_json()) == spec
    assert load_spec(spec.to_toml()).digest() == spec.digest()
    hash(spec)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.train.batch_size = 1
    # to_dict hands out copies: mutating one leaves the spec as it was.
    mutated = spec.to_dict()
    mutated["model"]["stages"].clear()
    assert spec.model.stages and spec_from_dict(spec.to_dict()) == spec


# --- the learning-rate schedule --------------------------------------------------------------

def test_lr_at_is_piecewise_constant():
    train = TrainSpec()
    assert train.lr_at(0) == 0.1
    assert train.lr_at(39999) == 0.1
    assert train.lr_at(40000) == 0.01
    assert train.lr_at(60001) == 0.001
    assert train.lr_at(10**9) == 0.0001
    with pytest.raises(ValueError):
        train.lr_at(-1)


def test_warmup_then_cosine_follows_the_formula():
    train = spec_from_dict({**minimal(), "train": {**COSINE, "min_lr": 0.04,
                                                   "warmup_start": 0.25}}).train
    peak, m, s, w, t = 0.4, 0.04, 0.25, 3, 10
    expected = [peak * (s + (1 - s) * k / w) for k in range(w)] + \
        [m + (peak - m) * (1 + math.cos(math.pi * (k - w) / (t - w))) / 2 for k in range(w, t)]
    assert [train.lr_at(k) for k in range(t)] == pytest.approx(expected, rel=1e-15)
    assert train.lr_at(0) == pytest.approx(0.1) and train.lr_at(3) == 0.4
    assert train.lr_at(10) == train.lr_at(10**6) == pytest.approx(m)  # stays at min_lr


def test_warmup_leads_into_the_step_schedule():
    train = TrainSpec(learning_rate=((0, 0.2), (4, 0.02)), warmup_steps=2)
    assert [train.lr_at(k) for k in range(5)] == pytest.approx([0.02, 0.11, 0.2, 0.2, 0.02])


def test_specs_without_the_recipe_fields_take_the_seeds_recipe():
    train = spec_from_dict(minimal()).train
    assert (train.schedule, train.warmup_steps, train.total_steps, train.nesterov,
            train.label_smoothing, train.weight_decay_on) == ("step", 0, 0, False, 0.0,
                                                              "kernels")


# --- presets ---------------------------------------------------------------------------------

def test_preset_by_name_and_by_file_stem():
    assert preset("resnet164_cifar") is preset("cifar-resnet164")
    assert preset("seed_small").model.input == (16, 16, 3)
    assert preset("resnet164_cifar").model.stages[2] == StageSpec(256, 18, 2)
    imagenet = preset("resnet50_imagenet")
    assert isinstance(imagenet.model, ModelSpec)
    assert (imagenet.model.stem, imagenet.model.preactivation) == ("imagenet", False)
    assert [s.units for s in imagenet.model.stages] == [3, 4, 6, 3]
    assert preset("digits").train.lr_at(300) == 0.01


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(SpecError) as info:
        preset("resnet19")
    assert "resnet19" in str(info.value)
    for name in PRESET_NAMES:
        assert name in str(info.value)


def test_cifar_preset_is_the_documented_schema():
    spec = preset("cifar-resnet164")
    default = spec_from_dict({"name": "cifar-resnet164", "model": {
        "input": [32, 32, 3], "num_classes": 10,
        "stages": [{"filters": f, "units": 18, "stride": s}
                   for f, s in [(64, 1), (128, 2), (256, 2)]]}})
    assert spec == default


def test_examples_are_the_packaged_presets():
    """One file per model: each example spec is a link to the preset the package ships."""
    assert [p.name for p in PRESET_FILES] == sorted(p.name for p in (ROOT / "examples")
                                                     .glob("*.toml"))
    for packaged in PRESET_FILES:
        example = ROOT / "examples" / packaged.name
        assert example.is_symlink() and example.resolve() == packaged.resolve()
