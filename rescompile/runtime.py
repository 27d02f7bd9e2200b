"""Executable: owns variables, checks inputs, and runs a backend's compiled entries.

Threads: calls on one executable run one at a time (a lock per executable), since they share
its buffers, its variables and its step; calls on different executables run concurrently,
except inside the CPU backend's driver, which admits one thread of the process at a time
(`backends/cpu/driver.py`)."""

from __future__ import annotations

import functools
import math
import threading

import numpy as np

from . import checkpoint
from .autodiff import LEARNING_RATE, SEED
from .build import Variable
from .compiler import backend_module, backend_options, lower
from .entries import batch_statistics, make_entries
from .errors import CheckpointError, InputError, NonFiniteError, UsageError
from .init import initial_values
from .precision import Precision
from .resources import check_fits
from .spec import load_spec


def _serialised(method):
    """Run `method` holding the executable's lock (re-entrant: `save` reads `state`)."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return locked


class Executable:
    def __init__(self, lowered, backend: str = "reference", seed: int = 0,
                 variables: dict[str, np.ndarray] | None = None, step: int = 0, **options):
        self._lock = threading.RLock()
        self.spec, self.mode, self.dtype = lowered.spec, lowered.mode, lowered.dtype
        # what the variables are kept in and the user passes and gets: float32 for bfloat16
        self.precision = Precision(self.dtype)
        self.array_dtype = self.precision.compute
        self.lowered = lowered
        self.graph = lowered.graph
        self.backend = backend
        _check_options(backend, options)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise UsageError(f"compile: seed must be an integer >= 0, got {seed!r}")
        # Initial values are drawn in float64 and cast: twice the variables' bytes at once.
        check_fits(2 * 8 * sum(math.prod(v.shape) for v in lowered.variables.values()),
                   f"the variables of spec {self.spec.name!r}")
        self.entries = make_entries(self.graph, self.mode)
        self.program = backend_module(backend).compile_program(self.graph, self.entries,
                                                               dtype=self.dtype, **options)
        self._variables: dict[str, Variable] = lowered.variables
        self._values = initial_values(self._variables, seed, self.array_dtype)
        self.step = step
        self._forward_done = False
        self._prepared = False
        self._variable_feeds: dict | None = None  # the variables as fed, rebuilt on change
        if variables is not None:
            self.load_state(variables)

    # -- variables ----------------------------------------------------------------------
    @property
    @_serialised
    def params(self) -> dict[str, np.ndarray]:
        """Trainables and moving statistics by TF name (the model's variables), read-only:
        the compiled program keeps derived copies (folded and packed weights), so a change goes
        through `load_params`, which re-derives them."""
        return {n: _read_only(self._values[n]) for n in self.lowered.model.variables}

    @property
    @_serialised
    def state(self) -> dict[str, np.ndarray]:
        """Every variable the executable owns (params, moving statistics, optimizer slots),
        read-only like `params`."""
        return {n: _read_only(v) for n, v in self._values.items()}

    @_serialised
    def load_params(self, values: dict) -> None:
        """Replace model variables; every name, shape and dtype is checked first."""
        self._assign(values, self.lowered.model.variables, require_all=True)

    @_serialised
    def load_state(self, values: dict) -> None:
        self._assign(values, self._variables, require_all=False)

    def _assign(self, values: dict, allowed: dict[str, Variable], require_all: bool) -> None:
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise InputError(f"unknown variable {unknown[0]!r} ({len(unknown)} unknown in all)")
        missing = sorted(set(allowed) - set(values))
        if require_all and missing:
            raise InputError(f"missing variable {missing[0]!r} ({len(missing)} missing in all)")
        checked = {name: _variable_array(name, value, allowed[name].shape, self.array_dtype)
                   for name, value in values.items()}
        self._values.update(checked)
        self._variable_feeds = None
        self._forward_done = False
        self._prepared = False

    # -- running ------------------------------------------------------------------------
    def _run(self, entry: str, feeds: dict) -> dict:
        if self._variable_feeds is None:
            self._variable_feeds = {n: self._values[n] for n, r in self.graph.inputs.items()
                                    if r in ("param", "state")}
        inputs = dict(self._variable_feeds)
        if LEARNING_RATE in self.graph.inputs:
            inputs[LEARNING_RATE] = np.asarray(self.learning_rate(), self.array_dtype)
        inputs.update(feeds)
        return self.program.run(entry, inputs)

    def learning_rate(self) -> float:
        return self.spec.train.lr_at(self.step)

    @_serialised
    def forward(self, images) -> np.ndarray:
        images = self._images(images)
        if "prepare" in self.entries and not self._prepared:
            self._run("prepare", {})
            self._prepared = True
        logits = self._run("forward", {"images": images})[self.graph.outputs["logits"]]
        self._forward_done = True
        self._batch = images.shape[0]
        return logits

    @_serialised
    def backward(self, dlogits) -> dict[str, np.ndarray]:
        """Vector-Jacobian product of the last train-mode forward with d(logits)."""
        if self.mode != "train":
            raise RuntimeError("backward needs an executable compiled with mode='train'")
        if not self._forward_done:
            raise RuntimeError("backward needs a forward(images) first")
        shape = (self._batch, self.spec.model.num_classes)
        dlogits = _float_array("dlogits", dlogits, shape, self.array_dtype)
        feeds = {self.graph.outputs["grad/logits"]: dlogits,
                 SEED: np.asarray(0, self.array_dtype)}
        return self._grads(self._run("backward", feeds))

    @_serialised
    def loss_and_grads(self, images, labels):
        self._check_train("loss_and_grads")
        feeds = self._batch_feeds(images, labels)
        results = self._run("loss_and_grads", feeds)
        return float(results[self.graph.outputs["loss"]]), self._grads(results)

    @_serialised
    def train_step(self, images, labels) -> float:
        """One optimizer step: gradients, update, moving statistics, step count."""
        self._check_train("train_step")
        results = self._run("train_step", self._batch_feeds(images, labels))
        loss = results[self.graph.outputs["loss"]]
        self.check_loss(loss, results.get(self.graph.outputs["logits"]))
        self._apply(results)
        return float(loss)

    @_serialised
    def step_gradients(self, images, labels):
        """`train_step`'s first half, for data-parallel training: (loss, gradients by variable
        name, batch statistics by value name) of this batch; nothing is applied."""
        self._check_train("step_gradients")
        results = self._run("step_gradients", self._batch_feeds(images, labels))
        statistics = {v: results[v] for v in batch_statistics(self.graph)}
        grads = {k[5:]: results[v] for k, v in self.graph.outputs.items() if v in results
                 and k.startswith("grad/")}
        return float(results[self.graph.outputs["loss"]]), grads, statistics

    @_serialised
    def apply_gradients(self, grads: dict, statistics: dict) -> None:
        """`train_step`'s second half: the optimizer update from `grads` and the moving
        averages from `statistics` (both as `step_gradients` gives them, or reduced over the
        ranks of a job), then the step count."""
        self._check_train("apply_gradients")
        names = {v: k[5:] for k, v in self.graph.outputs.items() if k.startswith("grad/")}
        label = lambda v: names.get(v, f"batch statistic {v!r}")  # noqa: E731
        given = {v: grads.get(names[v]) if v in names else statistics.get(v)
                 for v in self.entries["apply_gradients"].feeds if v != LEARNING_RATE}
        missing = sorted(v for v, value in given.items() if value is None)
        if missing:
            raise InputError(f"apply_gradients: {label(missing[0])!r} is missing "
                             f"({len(missing)} of the gradients and statistics that "
                             f"step_gradients returns)")
        feeds = {v: _float_array(label(v), value, self.graph.value(v).shape, self.array_dtype)
                 for v, value in given.items()}
        self._apply(self._run("apply_gradients", feeds))

    def _apply(self, results: dict) -> None:
        updates = {key[4:]: results[value] for key, value in self.graph.outputs.items()
                   if key.startswith("new/")}
        self._check_updates(updates)
        self._values.update(updates)
        self._variable_feeds = None
        self.step += 1
        self._forward_done = False

    def check_loss(self, loss, logits=None) -> None:
        """A diverged step must not reach the weights (nor, through them, a checkpoint). The
        step named is the one that failed, counted from 1 as progress counts steps."""
        if not np.isfinite(loss):
            where = _nonfinite(logits) if logits is not None else None
            cause = f" (the logits hold {where})" if where else ""
            raise NonFiniteError(f"step {self.step + 1}: the loss is {float(loss)}{cause}; "
                                 f"nothing of this step was applied (lower the learning "
                                 f"rate?)")

    def _check_updates(self, updates: dict) -> None:
        for name, value in updates.items():
            where = _nonfinite(value)
            if where:
                raise NonFiniteError(f"step {self.step + 1}: the update of {name!r} holds "
                                     f"{where}; nothing of this step was applied")

    # -- checks -------------------------------------------------------------------------
    def _check_train(self, what: str) -> None:
        if self.mode != "train":
            raise RuntimeError(f"{what} needs an executable compiled with mode='train'")

    def _grads(self, results: dict) -> dict[str, np.ndarray]:
        return {key[5:]: results[v] for key, v in self.graph.outputs.items()
                if key.startswith("grad/") and key != "grad/logits"}

    def _images(self, images) -> np.ndarray:
        h, w, c = self.spec.model.input
        images = _float_array("images", images, (None, h, w, c), self.array_dtype)
        storage = self.precision.storage(self.graph.value("images"))
        if storage != self.array_dtype:  # the kernels read them as stored
            _check_finite("images", self.precision.round(images, storage),
                          f"is beyond {storage}'s range at")
        return images

    def _batch_feeds(self, images, labels) -> dict:
        images = self._images(images)
        onehot = _one_hot(labels, images.shape[0], self.spec.model.num_classes,
                          self.array_dtype)
        return {"images": images, "labels": onehot, SEED: np.asarray(1, self.array_dtype)}

    @_serialised
    def save(self, path) -> None:
        checkpoint.save(self, path)


def _read_only(array: np.ndarray) -> np.ndarray:
    view = np.asarray(array).view()
    view.flags.writeable = False
    return view


def _check_options(backend: str, options: dict) -> None:
    known = backend_options(backend)
    for key in options:
        if key not in known:
            raise UsageError(f"compile: unknown keyword {key!r} for backend {backend!r} "
                             f"(it takes seed, optimize{''.join(', ' + k for k in known)})")


def _as_array(name: str, value) -> np.ndarray:
    """`value` as an array, or an InputError naming it (a ragged list, an object NumPy cannot
    hold)."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{name}: not an array ({str(exc).splitlines()[0][:120]})") from None
    if array.dtype == object:
        raise InputError(f"{name}: not an array of numbers (holds Python objects)")
    return array


def _float_array(name: str, value, shape, dtype: str) -> np.ndarray:
    """Check rank, shape and dtype of a run-time tensor; `None` in shape is any size >= 1."""
    array = _as_array(name, value)
    if array.dtype.kind != "f":
        raise InputError(f"{name}: dtype {array.dtype} is not a float type; pass float32 or "
                         f"float64")
    expected = "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"
    if array.ndim != len(shape):
        raise InputError(f"{name}: expected rank {len(shape)} {expected}, got shape "
                         f"{list(array.shape)}")
    if any(d is not None and d != a for d, a in zip(shape, array.shape)) or array.shape[0] < 1:
        raise InputError(f"{name}: expected shape {expected}, got {list(array.shape)}")
    return _finite_cast(name, array, dtype, copy=False)


def _finite_cast(name: str, array: np.ndarray, dtype: str, copy: bool) -> np.ndarray:
    """`array` cast to `dtype`: a copy of its own if `copy`, else C-contiguous and copied only
    if it must be. Refused if it holds a non-finite value or one the cast makes infinite."""
    _check_finite(name, array, "holds")
    with np.errstate(over="ignore"):
        cast = np.array(array, dtype=dtype) if copy else np.ascontiguousarray(array, dtype=dtype)
    _check_finite(name, cast, f"is beyond {dtype}'s range at")
    return cast


def _check_finite(name: str, array: np.ndarray, what: str) -> None:
    """Refuse NaN and infinity before they reach a kernel: in a train step they would spread
    into every weight."""
    where = _nonfinite(array)
    if where:
        raise InputError(f"{name}: {what} {where}")


def _nonfinite(array: np.ndarray) -> str | None:
    """How many values of `array` are NaN or infinite and where the first is; None if none."""
    bad = ~np.isfinite(array)
    if not bad.any():
        return None
    first = [int(i) for i in np.unravel_index(int(np.argmax(bad)), bad.shape)]
    return (f"{int(bad.sum())} non-finite values (the first at {first}: "
            f"{np.asarray(array)[tuple(first)]})")


def _variable_array(name: str, value, shape: tuple, dtype: str) -> np.ndarray:
    array = _as_array(f"variable {name!r}", value)
    if array.dtype.kind != "f":
        raise InputError(f"variable {name!r}: dtype {array.dtype} is not a float type")
    if tuple(array.shape) != tuple(shape):
        raise InputError(f"variable {name!r}: expected shape {list(shape)}, got "
                         f"{list(array.shape)}")
    return _finite_cast(f"variable {name!r}", array, dtype, copy=True)


def _one_hot(labels, batch: int, classes: int, dtype: str) -> np.ndarray:
    """Class ids [N] (or [N, 1], as many loaders give them), or rows of class probabilities
    [N, classes]: one-hot or soft labels, each row non-negative and summing to 1."""
    labels = _as_array("labels", labels)
    if labels.ndim == 2 and labels.shape[1] == 1 and labels.dtype.kind in "iu":
        labels = labels[:, 0]
    if labels.ndim == 1 and labels.dtype.kind in "iu":
        if labels.shape[0] != batch:
            raise InputError(f"labels: expected {batch} class ids, got {labels.shape[0]}")
        if labels.size and (labels.min() < 0 or labels.max() >= classes):
            raise InputError(f"labels: class ids must be in [0, {classes}), got "
                             f"[{labels.min()}, {labels.max()}]")
        return np.eye(classes, dtype=dtype)[labels]
    if labels.ndim == 2 and labels.dtype.kind == "f":
        return _distributions(_float_array("labels", labels, (batch, classes), dtype))
    raise InputError(f"labels: expected int class ids [N] or one-hot [N, {classes}], got "
                     f"{labels.dtype} {list(labels.shape)}")


def _distributions(rows: np.ndarray) -> np.ndarray:
    # The cross-entropy of a row that is no distribution is no loss we could name.
    tolerance = 1e-3 if rows.dtype == np.float32 else 1e-9
    sums = rows.sum(axis=1, dtype=np.float64)
    bad = (rows < 0).any(axis=1) | (np.abs(sums - 1) > tolerance)
    if bad.any():
        row = int(np.argmax(bad))
        raise InputError(f"labels: row {row} is not a distribution over the classes (entries "
                         f">= 0 summing to 1; min {rows[row].min():g}, sum {sums[row]:g})")
    return rows


def compile(spec, mode: str = "infer", backend: str = "reference", dtype: str = "float32",
            seed: int = 0, optimize: bool = True, **options) -> Executable:
    """Compile a spec (path, TOML/JSON text, dict or ResNetSpec) into an Executable.
    `optimize=False` skips the passes (the graph as built and differentiated)."""
    return Executable(lower(spec, mode, dtype, optimize=optimize, backend=backend),
                      backend=backend, seed=seed, **options)


def load_checkpoint(path, spec=None, mode: str | None = None, backend: str = "reference",
                    fresh_optimizer: bool = False, dtype: str | None = None,
                    **options) -> Executable:
    """An Executable restored from a checkpoint. With `spec`, the checkpoint must match it.
    `fresh_optimizer` accepts a checkpoint without optimizer slots (one saved in inference
    mode, say) for training: the slots start from zero. `dtype` compiles it in another dtype
    than it was saved in (a bfloat16 checkpoint holds float32 variables: it loads into a
    float32 executable and back as it is)."""
    manifest, variables = checkpoint.read(path)
    saved = checkpoint.saved_spec(path, manifest)
    if spec is not None and load_spec(spec).digest() != saved.digest():
        raise CheckpointError(f"{path}: checkpoint is of spec {saved.name!r}, which differs "
                              f"from the given spec {load_spec(spec).name!r}")
    mode = mode or manifest["mode"]
    checkpoint.check_variables(path, variables, saved, manifest["dtype"], mode, fresh_optimizer)
    exe = compile(saved, mode=mode, backend=backend, dtype=dtype or manifest["dtype"],
                  **options)
    exe.load_state({n: v for n, v in variables.items() if n in exe.lowered.variables})
    exe.step = manifest["step"]
    return exe
