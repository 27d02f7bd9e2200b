"""The ResNet spec: a validated, immutable description of one model and how to train it.

A spec arrives as TOML, JSON or a dict and leaves as frozen dataclasses. Validation is
table-driven: each section is a table mapping a key to a *check*, a function
``(raw value, dotted path) -> canonical value`` that raises :class:`SpecError` naming the path
and what is allowed. Cross-field rules (a bottleneck's inner width a whole number, input large
enough for the strides, a pooled shortcut that fits, ...) run after a section's keys have been
checked one by one.

Canonical values are tuples (never lists) and floats (never ints where a float is meant), so
two equal specs hash and digest alike however they were written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import operator
import re
import reprlib
import sys
from bisect import bisect_right
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SpecError
from .fileio import read_bounded
from .padding import out_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "SpecError", "StageSpec", "ModelSpec", "BatchNormSpec", "TrainSpec", "ResNetSpec",
    "load_spec", "spec_from_dict", "preset", "check_representable",
]


# ---------------------------------------------------------------------------------------------
# The spec as dataclasses
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StageSpec:
    filters: int
    units: int
    stride: int


@dataclass(frozen=True)
class ModelSpec:
    input: tuple[int, int, int]  # H, W, C (NHWC)
    num_classes: int
    stem: str
    stem_filters: int
    unit: str
    shortcut: str
    bottleneck_width: float
    preactivation: bool
    stride_on: str
    padding: str
    stages: tuple[StageSpec, ...]
    activate_before_residual: tuple[bool, ...]
    relu_leakiness: float


@dataclass(frozen=True)
class BatchNormSpec:
    epsilon: float = 1e-3
    decay: float = 0.9
    zero_debias: bool = False
    sync: bool = False  # data-parallel: statistics of the global batch, not each rank's share


@dataclass(frozen=True)
class TrainSpec:
    optimizer: str = "momentum"
    momentum: float = 0.9
    weight_decay: float = 2e-4
    learning_rate: tuple[tuple[int, float], ...] = (
        (0, 0.1), (40000, 0.01), (60000, 0.001), (80000, 0.0001))
    batch_size: int = 128
    schedule: str = "step"           # or "cosine"
    warmup_steps: int = 0
    warmup_start: float = 0.1        # the warm-up's first rate, as a factor of the peak
    total_steps: int = 0             # the run's length (0: unset); cosine ends here
    min_lr: float = 0.0              # where cosine ends
    nesterov: bool = False
    label_smoothing: float = 0.0
    weight_decay_on: str = "kernels"  # or "all"

    def lr_at(self, step: int) -> float:
        """The learning rate of the update after `step` steps (0: the first). The peak is the
        first entry of `learning_rate`. For t < warmup_steps = W it rises linearly:
        peak * (s + (1 - s) * t / W). Then "step" is piecewise constant (the lr of the last
        entry whose from_step <= t), and "cosine" falls from the peak to min_lr = m at
        total_steps = T: m + (peak - m) * (1 + cos(pi * (t - W) / (T - W))) / 2, and stays at
        m after T. This is the rate PyTorch's LambdaLR gives for lambda t: lr_at(t) / peak."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        peak = self.learning_rate[0][1]
        if step < self.warmup_steps:
            s = self.warmup_start
            return peak * (s + (1 - s) * step / self.warmup_steps)
        if self.schedule == "cosine":
            span = self.total_steps - self.warmup_steps
            progress = min(step - self.warmup_steps, span) / span
            return self.min_lr + (peak - self.min_lr) * (1 + math.cos(math.pi * progress)) / 2
        starts = [from_step for from_step, _ in self.learning_rate]
        return self.learning_rate[bisect_right(starts, step) - 1][1]


@dataclass(frozen=True)
class ResNetSpec:
    name: str
    model: ModelSpec
    batch_norm: BatchNormSpec = field(default_factory=BatchNormSpec)
    train: TrainSpec = field(default_factory=TrainSpec)

    def __post_init__(self) -> None:
        # Constructing a ResNetSpec directly (or via dataclasses.replace) must not bypass
        # validation: re-check everything and store the canonical sub-specs.
        for key, value in _assemble(_SPEC(_plain(self), "")).items():
            object.__setattr__(self, key, value)

    def to_dict(self) -> dict:
        """Plain dicts, lists and scalars; spec_from_dict(spec.to_dict()) == spec."""
        return _plain(self)

    def to_toml(self) -> str:
        return _toml_document(self.to_dict())

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def replace(self, **changes: Any) -> ResNetSpec:
        """A copy with top-level fields replaced; a dict for a section updates only its keys,
        e.g. ``spec.replace(train={"batch_size": 32})``."""
        d = self.to_dict()
        for key, value in changes.items():
            if key not in d:
                raise SpecError(f"{key}: unknown key; allowed keys: {', '.join(d)}")
            value = _plain(value)
            d[key] = {**d[key], **value} if isinstance(value, dict) else value
        return spec_from_dict(d)

    def digest(self) -> str:
        """Stable sha256 hex of the canonical JSON: a cache key and checkpoint check."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def _plain(obj: Any) -> Any:
    """Dataclasses to dicts and tuples to lists, recursively: the JSON/TOML shape."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {key: _plain(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(item) for item in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# Checks: (raw value, dotted path) -> canonical value, or SpecError
# ---------------------------------------------------------------------------------------------

Check = Callable[[Any, str], Any]
_REQUIRED = object()   # a table default meaning "this key must be given"
_DERIVED = object()    # a table default filled in by the section's cross-field rule


# Error messages show a value abbreviated: a hostile spec may nest a value thousands deep or
# make it megabytes long.
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother = 3, 60, 60


def _shown(value: Any) -> str:
    return _SHOWN.repr(value)


def _type_name(value: Any) -> str:
    return {bool: "bool", int: "integer", float: "float", str: "string"}.get(
        type(value), type(value).__name__)


_COMPARISONS = {"ge": (">=", operator.ge), "gt": (">", operator.gt),
                "le": ("<=", operator.le), "lt": ("<", operator.lt)}


def _check_bounds(value: float, path: str, bounds: dict[str, float]) -> None:
    if not all(_COMPARISONS[op][1](value, bound) for op, bound in bounds.items()):
        allowed = " and ".join(f"{_COMPARISONS[op][0]} {bound}" for op, bound in bounds.items())
        raise SpecError(f"{path}: must be {allowed}, got {_shown(value)}")


def _int(**bounds: int) -> Check:
    def check(value: Any, path: str) -> int:
        # bool is a subclass of int, and a float such as 2.0 is a typo we will not guess at.
        if type(value) is not int:
            raise SpecError(f"{path}: expected an integer, got {_type_name(value)} "
                            f"{_shown(value)}")
        _check_bounds(value, path, bounds)
        return value
    return check


def _float(**bounds: float) -> Check:
    def check(value: Any, path: str) -> float:
        if type(value) not in (int, float):
            raise SpecError(f"{path}: expected a number, got {_type_name(value)} "
                            f"{_shown(value)}")
        try:
            number = float(value)
        except OverflowError:  # an int too large for a float
            number = math.inf
        if not math.isfinite(number):
            raise SpecError(f"{path}: must be a finite number, got {_shown(value)}")
        _check_bounds(number, path, bounds)
        return number
    return check


def _bool(value: Any, path: str) -> bool:
    if type(value) is not bool:
        raise SpecError(f"{path}: expected true or false, got {_type_name(value)} "
                        f"{_shown(value)}")
    return value


def _choice(*options: str) -> Check:
    def check(value: Any, path: str) -> str:
        if type(value) is not str or value not in options:
            allowed = ", ".join(repr(o) for o in options)
            raise SpecError(f"{path}: must be one of {allowed}, got {_shown(value)}")
        return value
    return check


# The name lands in file names and comments of generated code, so only a safe alphabet.
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _name(value: Any, path: str) -> str:
    if type(value) is not str or not _NAME_RE.fullmatch(value):
        raise SpecError(f"{path}: must be a string of 1-64 characters from [A-Za-z0-9._-] "
                        f"(it is used in file names and generated code), got {_shown(value)}")
    return value


def _list(item: Check, length: int | None = None, what: str = "",
          most: int = 64) -> Check:
    """A non-empty list (of exactly `length` items if given, else at most `most`) of values
    passing `item`."""
    def check(value: Any, path: str) -> tuple:
        if not isinstance(value, (list, tuple)):
            raise SpecError(f"{path}: expected a list{what}, got {_type_name(value)} "
                            f"{_shown(value)}")
        if length is not None and len(value) != length:
            raise SpecError(f"{path}: must have exactly {length} entries{what}, "
                            f"got {len(value)}")
        if len(value) > most:
            raise SpecError(f"{path}: must have at most {most} entries{what}, "
                            f"got {len(value)}")
        if not value:
            raise SpecError(f"{path}: must not be empty")
        return tuple(item(entry, f"{path}[{i}]") for i, entry in enumerate(value))
    return check


def _table(checks: dict[str, Check], defaults: Mapping[str, Any],
           rule: Callable[[dict, str], None] | None = None) -> Check:
    """A table with exactly the keys of `checks`; missing keys take `defaults`, then `rule`
    checks the fields against each other (and may fill in derived defaults)."""
    def check(value: Any, path: str) -> dict:
        if not isinstance(value, Mapping):
            raise SpecError(f"{path or 'spec'}: expected a table, "
                            f"got {_type_name(value)} {_shown(value)}")
        prefix = f"{path}." if path else ""
        for key in value:
            if key not in checks:
                raise SpecError(f"{prefix}{key}: unknown key; allowed keys in "
                                f"{path or 'the top level'}: {', '.join(checks)}")
        out = {}
        for key, key_check in checks.items():
            default = defaults.get(key, _REQUIRED)
            if key in value:
                out[key] = key_check(value[key], prefix + key)
            elif default is _REQUIRED:
                raise SpecError(f"{prefix}{key}: missing required key")
            else:
                out[key] = default
        if rule is not None:
            rule(out, path)
        return out
    return check


def _dataclass_defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls)}


# ---------------------------------------------------------------------------------------------
# The schema
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stem:
    """The layers before the first stage: a conv (`kernel` x `kernel`, `stride`), then a max
    pool (`pool`: its kernel and stride) or none."""
    kernel: int
    stride: int
    pool: tuple[int, int] | None = None

    @property
    def total_stride(self) -> int:
        """How much the stem downsamples before the first stage."""
        return self.stride * (self.pool[1] if self.pool else 1)


STEMS = {"cifar": Stem(3, 1), "imagenet": Stem(7, 2, pool=(3, 2))}
UNITS = ("bottleneck", "basic")
SHORTCUTS = ("projection", "pool_pad")


def unit_convs(model: Mapping, out_f: int, stride: int) -> list[tuple[int, int, int]]:
    """(kernel size, filters, stride) of each conv of a unit's residual branch, in order, for
    a model's fields (`unit`, `bottleneck_width`, `stride_on`): a bottleneck's 1x1, 3x3, 1x1
    with `bottleneck_width * out_f` inner channels, or a basic unit's two 3x3; `stride_on`
    says which of the first two convs downsamples."""
    first, second = (stride, 1) if model["stride_on"] == "conv1" else (1, stride)
    if model["unit"] == "basic":
        return [(3, out_f, first), (3, out_f, second)]
    inner = round(out_f * model["bottleneck_width"])
    return [(1, inner, first), (3, inner, second), (1, out_f, 1)]

# Upper bounds on sizes: far above any ResNet trained (ResNet-1001 has 111 units a stage and
# 1024 filters), low enough that a typo cannot ask for a graph of millions of nodes.
MAX_FILTERS = 16384
MAX_UNITS = 1000        # in all stages together
MAX_STAGES = 16
MAX_INPUT = 8192        # height, width and channels of the input
MAX_CLASSES = 100000
MAX_BATCH = 65536

_STAGE = _table(
    {"filters": _int(ge=1, le=MAX_FILTERS), "units": _int(ge=1, le=MAX_UNITS),
     "stride": _int(ge=1, le=4)},
    defaults={})


def _learning_rate_entry(value: Any, path: str) -> tuple[int, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise SpecError(f"{path}: expected a [from_step, lr] pair, got {_shown(value)}")
    from_step, lr = value
    return _int(ge=0, le=2**53)(from_step, f"{path}[0]"), _float(gt=0)(lr, f"{path}[1]")


def _learning_rate(value: Any, path: str) -> tuple[tuple[int, float], ...]:
    schedule = _list(_learning_rate_entry, what=" of [from_step, lr] pairs",
                     most=1000)(value, path)
    if schedule[0][0] != 0:
        raise SpecError(f"{path}[0]: the first from_step must be 0, got {schedule[0][0]}")
    for i in range(1, len(schedule)):
        if schedule[i][0] <= schedule[i - 1][0]:
            raise SpecError(f"{path}[{i}]: from_step must be greater than the previous "
                            f"entry's {schedule[i - 1][0]}, got {schedule[i][0]}")
    return schedule


def _model_rule(model: dict, path: str) -> None:
    stages = model["stages"]
    units = sum(stage["units"] for stage in stages)
    if units > MAX_UNITS:
        raise SpecError(f"{path}.stages: at most {MAX_UNITS} units in all stages, got {units}")
    _check_width(model, path)

    if model["activate_before_residual"] is _DERIVED:
        # The seed's rule: only the first stage activates before taking the shortcut.
        model["activate_before_residual"] = (True,) + (False,) * (len(stages) - 1)
    if len(model["activate_before_residual"]) != len(stages):
        raise SpecError(f"{path}.activate_before_residual: must have one entry per stage "
                        f"({len(stages)}), got {len(model['activate_before_residual'])}")

    # Every stride needs at least one input pixel, i.e. the final map is at least 1x1.
    strides = [STEMS[model["stem"]].total_stride] + [stage["stride"] for stage in stages]
    total = math.prod(strides)
    height, width, _ = model["input"]
    if min(height, width) < total:
        raise SpecError(f"{path}.input: height and width must be >= the total stride {total} "
                        f"(stem {strides[0]} x stages {'*'.join(map(str, strides[1:]))}), "
                        f"got {height}x{width}")
    if model["shortcut"] == "pool_pad":
        _check_pool_pad(model, path)


def _check_width(model: dict, path: str) -> None:
    """A bottleneck's inner width must be a whole number of channels; a basic unit has none."""
    width = model["bottleneck_width"]
    if model["unit"] == "basic":
        if width != _MODEL_DEFAULTS["bottleneck_width"]:
            raise SpecError(f"{path}.bottleneck_width: only bottleneck units read it (unit is "
                            f"\"basic\"), got {width}")
        return
    for i, stage in enumerate(model["stages"]):
        inner = stage["filters"] * width
        if round(inner) < 1 or abs(inner - round(inner)) > 1e-9 * inner:
            raise SpecError(f"{path}.stages[{i}].filters: times bottleneck_width {width} must be "
                            f"a whole number of inner channels >= 1, got {stage['filters']} "
                            f"({inner:g})")


def _stem_size(model: dict, size: int) -> int:
    """A spatial size after the stem's conv and pool."""
    stem = STEMS[model["stem"]]
    size = out_size(size, stem.kernel, stem.stride, model["padding"])
    return out_size(size, stem.pool[0], stem.pool[1], model["padding"]) if stem.pool else size


def _check_pool_pad(model: dict, path: str) -> None:
    """The seed's shortcut (average pool with the stride, then zero channels on both sides)
    must give the residual branch's shape at every unit that changes channels or size."""
    sizes = [_stem_size(model, n) for n in model["input"][:2]]
    in_f = model["stem_filters"]
    for i, stage in enumerate(model["stages"]):
        where, out_f, stride = f"{path}.stages[{i}]", stage["filters"], stage["stride"]
        if out_f == in_f and stride != 1:
            raise SpecError(f"{where}.stride: with shortcut \"pool_pad\" a unit whose channels "
                            f"do not change ({in_f}) takes no pooled shortcut, so its stride "
                            f"must be 1, got {stride}")
        if out_f < in_f or (out_f - in_f) % 2:
            raise SpecError(f"{where}.filters: with shortcut \"pool_pad\" the channels grow by "
                            f"an even number of zero channels, {in_f} -> {out_f} does not")
        branch = sizes
        for k, _, s in unit_convs(model, out_f, stride):
            branch = [out_size(n, k, s, model["padding"]) for n in branch]
        pooled = [n // stride for n in sizes]
        if branch != pooled:
            raise SpecError(f"{where}.stride: with shortcut \"pool_pad\" the {stride}x{stride} "
                            f"average pool of the {sizes[0]}x{sizes[1]} map gives "
                            f"{pooled[0]}x{pooled[1]}, the convolutions {branch[0]}x{branch[1]}")
        sizes, in_f = branch, out_f


_MODEL_DEFAULTS = {
    "stem": "cifar", "stem_filters": 16, "unit": "bottleneck", "shortcut": "projection",
    "bottleneck_width": 0.25, "preactivation": True,
    "stride_on": "conv1", "padding": "same", "activate_before_residual": _DERIVED,
    "relu_leakiness": 0.1,
}

_MODEL = _table(
    {
        "input": _list(_int(ge=1, le=MAX_INPUT), length=3, what=" [H, W, C]"),
        "num_classes": _int(ge=2, le=MAX_CLASSES),
        "stem": _choice(*STEMS),
        "stem_filters": _int(ge=1, le=MAX_FILTERS),
        "unit": _choice(*UNITS),
        "shortcut": _choice(*SHORTCUTS),
        "bottleneck_width": _float(gt=0, le=1),
        "preactivation": _bool,
        "stride_on": _choice("conv1", "conv2"),
        "padding": _choice("same", "symmetric"),
        "stages": _list(_STAGE, what=" of stage tables", most=MAX_STAGES),
        "activate_before_residual": _list(_bool, what=" of booleans", most=MAX_STAGES),
        "relu_leakiness": _float(ge=0, lt=1),
    },
    defaults=_MODEL_DEFAULTS, rule=_model_rule)

_BATCH_NORM = _table(
    {"epsilon": _float(gt=0), "decay": _float(ge=0, lt=1), "zero_debias": _bool,
     "sync": _bool},
    defaults=_dataclass_defaults(BatchNormSpec))

def _train_rule(train: dict, path: str) -> None:
    if train["nesterov"] and train["optimizer"] != "momentum":
        raise SpecError(f"{path}.nesterov: Nesterov momentum needs optimizer = \"momentum\", "
                        f"got {train['optimizer']!r}")
    if train["schedule"] == "step":
        # A field the schedule would not read is a mistake to report, not to ignore.
        if train["min_lr"]:
            raise SpecError(f"{path}.min_lr: only the cosine schedule reads it (schedule is "
                            f"\"step\"), got {train['min_lr']}")
        return
    rates = train["learning_rate"]
    if len(rates) != 1:
        raise SpecError(f"{path}.learning_rate: the cosine schedule takes one [0, peak] entry, "
                        f"got {len(rates)}")
    if train["total_steps"] <= train["warmup_steps"]:
        raise SpecError(f"{path}.total_steps: the cosine schedule needs total_steps > "
                        f"warmup_steps ({train['warmup_steps']}), got {train['total_steps']}")
    if train["min_lr"] > rates[0][1]:
        raise SpecError(f"{path}.min_lr: must be <= the peak learning rate {rates[0][1]}, "
                        f"got {train['min_lr']}")


_TRAIN = _table(
    {
        "optimizer": _choice("momentum", "sgd"),
        "momentum": _float(ge=0, lt=1),
        "weight_decay": _float(ge=0),
        "learning_rate": _learning_rate,
        "batch_size": _int(ge=1, le=MAX_BATCH),
        "schedule": _choice("step", "cosine"),
        "warmup_steps": _int(ge=0, le=2**53),
        "warmup_start": _float(ge=0, le=1),
        "total_steps": _int(ge=0, le=2**53),
        "min_lr": _float(ge=0),
        "nesterov": _bool,
        "label_smoothing": _float(ge=0, le=1),
        "weight_decay_on": _choice("kernels", "all"),
    },
    defaults=_dataclass_defaults(TrainSpec), rule=_train_rule)

_SPEC = _table(
    {"name": _name, "model": _MODEL, "batch_norm": _BATCH_NORM, "train": _TRAIN},
    defaults={"name": "resnet", "batch_norm": _BATCH_NORM({}, "batch_norm"),
              "train": _TRAIN({}, "train")})


def _assemble(canonical: dict) -> dict[str, Any]:
    """The canonical dict's sections as dataclasses, keyed by ResNetSpec field."""
    model = dict(canonical["model"])
    model["stages"] = tuple(StageSpec(**stage) for stage in model["stages"])
    return {
        "name": canonical["name"],
        "model": ModelSpec(**model),
        "batch_norm": BatchNormSpec(**canonical["batch_norm"]),
        "train": TrainSpec(**canonical["train"]),
    }


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

# A spec is a few hundred bytes; a bound on the text keeps a stray multi-gigabyte file out.
MAX_SPEC_BYTES = 1 << 20


def spec_from_dict(d: Mapping) -> ResNetSpec:
    return ResNetSpec(**_assemble(_SPEC(d, "")))


def _parse(text: str, kind: str, origin: str) -> Any:
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(f"{origin}: {len(text)} characters; a spec has at most "
                        f"{MAX_SPEC_BYTES}")
    try:
        return tomllib.loads(text) if kind == "toml" else \
            json.loads(text, object_pairs_hook=_unique_keys)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise SpecError(f"{origin}: invalid {kind.upper()}: {e}") from None
    except RecursionError:
        raise SpecError(f"{origin}: invalid {kind.upper()}: nested too deeply") from None
    except ValueError as e:  # Python's bound on integer digits (its advice cut); a key twice
        raise SpecError(f"{origin}: invalid {kind.upper()}: {str(e).split(';')[0][:160]}") \
            from None


def _unique_keys(pairs: list) -> dict:
    """A JSON object, refused if a key appears twice (JSON would keep the last silently;
    TOML refuses it too)."""
    table = {}
    for key, value in pairs:
        if key in table:
            raise ValueError(f"key {_shown(key)} appears twice in one object")
        table[key] = value
    return table


def _load_file(path: Path) -> ResNetSpec:
    kind = {".toml": "toml", ".json": "json"}.get(path.suffix.lower())
    if kind is None:
        raise SpecError(f"{path}: unknown spec file suffix {path.suffix!r}; "
                        f"expected .toml or .json")
    data = read_bounded(path, "spec", MAX_SPEC_BYTES, "a spec is a few hundred bytes",
                        SpecError)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return spec_from_dict(_parse(text, kind, str(path)))


def check_representable(spec: ResNetSpec, dtype: str) -> None:
    """Every number of the spec must survive the cast to the compile dtype: 1e-320 is a
    float64 but 0 in float32, and batch norm with a zero epsilon divides by zero."""
    info = np.finfo(dtype)
    for path, value in _numbers(spec.to_dict(), ""):
        if value != 0 and not float(info.tiny) <= abs(value) <= float(info.max):
            raise SpecError(f"{path}: {value!r} is not a normal {dtype} number (magnitudes "
                            f"{float(info.tiny):.3g} to {float(info.max):.3g}, or 0)")


def _numbers(value: Any, path: str):
    """(dotted path, value) of every float in a spec's plain dict."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{path}.{key}".lstrip("."))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{path}[{i}]")
    elif isinstance(value, float):
        yield path, value


def _looks_like_path(text: str) -> bool:
    # A one-line string with no '=', no '{' and no leading '[' is no TOML or JSON spec.
    stripped = text.strip()
    return "\n" not in stripped and "=" not in stripped and "{" not in stripped and \
        not stripped.startswith("[")


def _is_existing_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # e.g. a long TOML string is not a valid file name
        return False


def load_spec(source: ResNetSpec | Mapping | Path | str) -> ResNetSpec:
    """A spec from a ResNetSpec (returned as is), a dict, a .toml/.json path, or TOML/JSON
    text. A string naming an existing file is read as that file; otherwise a string starting
    with '{' is JSON and anything else TOML."""
    if isinstance(source, ResNetSpec):
        return source
    if isinstance(source, Mapping):
        return spec_from_dict(source)
    if isinstance(source, Path):
        return _load_file(source)
    if isinstance(source, str):
        if _looks_like_path(source) or _is_existing_file(source):
            return _load_file(Path(source))
        kind = "json" if source.lstrip().startswith("{") else "toml"
        return spec_from_dict(_parse(source, kind, "spec"))
    raise SpecError(f"spec: expected a ResNetSpec, dict, path or TOML/JSON string, "
                    f"got {type(source).__name__}")


@lru_cache(maxsize=None)
def _presets() -> dict[str, ResNetSpec]:
    """Shipped presets keyed by both their spec name and their file stem."""
    found = {}
    for entry in sorted(resources.files("rescompile.presets").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            spec = spec_from_dict(_parse(entry.read_text(encoding="utf-8"), "toml", entry.name))
            found[spec.name] = found[entry.name.removesuffix(".toml")] = spec
    return found


def preset(name: str) -> ResNetSpec:
    """A shipped spec by spec name ("cifar-resnet164") or file stem ("resnet164_cifar")."""
    presets = _presets()
    if name not in presets:
        raise SpecError(f"preset: unknown name {name!r}; known: {', '.join(sorted(presets))}")
    return presets[name]


# ---------------------------------------------------------------------------------------------
# TOML writing (the schema only needs scalars, arrays, inline tables and one level of tables)
# ---------------------------------------------------------------------------------------------

_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")


def _toml_string(s: str) -> str:
    # Quote, backslash and control characters (DEL included) must be escaped in TOML.
    escaped = "".join(
        "\\" + ch if ch in '"\\' else
        f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch
        for ch in s)
    return f'"{escaped}"'


def _toml_key(key: str) -> str:
    return key if _BARE_KEY_RE.fullmatch(key) else _toml_string(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot write non-finite float {value!r}")
        return repr(value)  # shortest round-tripping form, always with '.' or 'e'
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, Mapping):
        items = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return f"{{ {items} }}"
    if isinstance(value, (list, tuple)):
        if any(isinstance(item, Mapping) for item in value):
            # Inline tables one per line: TOML 1.0 allows newlines in arrays, not in them.
            return "[\n" + "".join(f"  {_toml_value(item)},\n" for item in value) + "]"
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_document(d: Mapping) -> str:
    """Top-level scalars first, then each nested table as a [section]."""
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in d.items()
             if not isinstance(v, Mapping)]
    for key, table in d.items():
        if isinstance(table, Mapping):
            lines += ["", f"[{_toml_key(key)}]"]
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"
