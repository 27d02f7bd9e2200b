"""TensorFlow's numbers for the seed model's *basic* residual unit (tf_resnet_basic_small.npz,
and tf_resnet_basic_tiny.npz for the CUDA simulator).

This script is not part of the test suite and needs TensorFlow, which rescompile does not
depend on. Run it from a virtual environment of its own (see tests/oracle/README.md):

    TF_ENABLE_ONEDNN_OPTS=0 OMP_NUM_THREADS=1 /path/to/tfvenv/bin/python \
        tests/oracle/make_tf_basic.py tests/data/tf_resnet_basic_small.npz [small]
    ... tests/oracle/make_tf_basic.py tests/data/tf_resnet_basic_tiny.npz tiny

The second argument picks the configuration (`CONFIGS`): "small" is the model file's filters
on 16x16 images; "tiny" shrinks every size (filters 4, 4, 8, 16 with a 4-filter stem, one
unit per stage, batch 2 of 8x8 images) so that Numba's CUDA simulator runs it in seconds.

The model is a port of tensorflow/models `research/resnet/resnet_model.py` (the CIFAR ResNet of
the project's seed) with `use_bottleneck=False`, so every unit is the model file's `_residual`:

    activate_before_residual:  shared_activation/        x = relu(bn(x)); orig_x = x
    otherwise:                 residual_only_activation/ orig_x = x; x = relu(bn(x))
    sub1/conv1   3x3, in -> out, the unit's stride (SAME)
    sub2/bn2, relu, sub2/conv2   3x3, out -> out, stride 1 (SAME)
    sub_add      if in != out: orig_x = avg_pool(orig_x, stride, stride, VALID), then the
                 channels are zero-padded by (out - in) // 2 on each side; x += orig_x

The port keeps the model file's structure, scopes, ops and their order. The only changes:
- The dtype is a parameter (the model file hard-codes tf.float32), so the same graph runs in
  float32 and float64. The float64 run starts from the float32 values cast to float64.
- tf.compat.v1 spellings of TF1 APIs (get_or_create_global_step, MomentumOptimizer, ...).
- The cost that is trained is the correct one, mean softmax cross-entropy on the *logits*; the
  model file's cost (softmax probabilities fed into the cross-entropy, a known bug) is kept
  beside it for reference (`train/xent_buggy`, `train/cost_buggy`).
- Summaries and logging are left out (they do not touch the numbers).
- `zero_debias` is a switch: True is what TF's assign_moving_average does by default (the
  `after/` keys); False is the textbook update (the `after_nodebias/` keys).
- The script keeps handles on what it stores (batch statistics, unit outputs, ReLU inputs).

Everything runs in graph mode (tf.compat.v1 sessions), single-threaded, with deterministic ops
and oneDNN off. Variables get seeded random values, none at its default, so that batch-norm
folding and the moving statistics are really exercised.
"""

import json
import os
import platform
import sys
from collections import namedtuple

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")   # must be set before TensorFlow loads
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
from tensorflow.python.training import moving_averages

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
tf.config.experimental.enable_op_determinism()

v1 = tf.compat.v1

SEED = 1234            # the bottleneck oracle's seed: the same images and labels
CONFIGS = {  # batch, image size, units per stage, filters (the stem's first)
    "small": (4, 16, 2, [16, 16, 32, 64]),
    "tiny": (2, 8, 1, [4, 4, 8, 16]),
}
CONFIG = sys.argv[2] if len(sys.argv) > 2 else "small"
BATCH, SIZE, UNITS_PER_STAGE, FILTERS = CONFIGS[CONFIG]
NUM_CLASSES = 10
LEARNING_RATE, MOMENTUM = 0.1, 0.9

HParams = namedtuple("HParams",
                     "batch_size, num_classes, min_lrn_rate, lrn_rate, "
                     "num_residual_units, use_bottleneck, weight_decay_rate, "
                     "relu_leakiness, optimizer")

HPS = HParams(batch_size=BATCH, num_classes=NUM_CLASSES, min_lrn_rate=0.0001,
              lrn_rate=LEARNING_RATE, num_residual_units=UNITS_PER_STAGE,
              use_bottleneck=False, weight_decay_rate=0.0002, relu_leakiness=0.1,
              optimizer="mom")


class ResNet:
    """The model file's ResNet class, basic units only, with a dtype."""

    def __init__(self, hps, images, labels, mode, dtype, zero_debias=True):
        self.hps = hps
        self._images = images
        self.labels = labels
        self.mode = mode
        self.dtype = dtype
        self.zero_debias = zero_debias
        self._extra_train_ops = []
        # What the generator stores, by name; the model file does not keep these.
        self.unit_outputs = {}     # 'init', 'unit_i_j', 'unit_last' -> tensor
        self.batch_stats = {}      # bn scope -> (mean, variance), train mode
        self.bn_inputs = {}        # bn scope -> input tensor
        self.relu_inputs = []

    def build_graph(self):
        self.global_step = v1.train.get_or_create_global_step()
        self._build_model()
        if self.mode == "train":
            self._build_train_op()

    def _stride_arr(self, stride):
        return [1, stride, stride, 1]

    def _build_model(self):
        with v1.variable_scope("init"):
            x = self._images
            x = self._conv("init_conv", x, 3, 3, FILTERS[0], self._stride_arr(1))
        self.unit_outputs["init"] = x

        strides = [1, 2, 2]
        activate_before_residual = [True, False, False]
        assert not self.hps.use_bottleneck
        res_func = self._residual
        filters = FILTERS  # the model file's [16, 16, 32, 64] in the "small" configuration

        for stage in range(3):
            with v1.variable_scope("unit_%d_0" % (stage + 1)):
                x = res_func(x, filters[stage], filters[stage + 1],
                             self._stride_arr(strides[stage]), activate_before_residual[stage])
            self.unit_outputs["unit_%d_0" % (stage + 1)] = x
            for i in range(1, self.hps.num_residual_units):
                with v1.variable_scope("unit_%d_%d" % (stage + 1, i)):
                    x = res_func(x, filters[stage + 1], filters[stage + 1], self._stride_arr(1),
                                 False)
                self.unit_outputs["unit_%d_%d" % (stage + 1, i)] = x

        with v1.variable_scope("unit_last"):
            x = self._batch_norm("final_bn", x)
            x = self._relu(x, self.hps.relu_leakiness)
            x = self._global_avg_pool(x)
        self.unit_outputs["unit_last"] = x

        with v1.variable_scope("logit"):
            logits = self._fully_connected(x, self.hps.num_classes)
            self.logits = logits
            self.predictions = tf.nn.softmax(logits)

        with v1.variable_scope("costs"):
            self.weight_decay = self._decay()
            xent = tf.nn.softmax_cross_entropy_with_logits(logits=logits, labels=self.labels)
            self.xent_correct = tf.reduce_mean(xent, name="xent")
            self.cost = self.xent_correct + self.weight_decay
            # The model file's cost, for reference only: probabilities fed in as logits.
            xent_buggy = tf.nn.softmax_cross_entropy_with_logits(logits=self.predictions,
                                                                 labels=self.labels)
            self.xent_buggy = tf.reduce_mean(xent_buggy, name="xent_buggy")
            self.cost_buggy = self.xent_buggy + self.weight_decay

    def _build_train_op(self):
        # The model file makes lrn_rate a float32 constant; here it has the run's dtype, so the
        # float64 step uses 0.1 itself rather than float32(0.1).
        self.lrn_rate = tf.constant(self.hps.lrn_rate, self.dtype)
        trainable_variables = v1.trainable_variables()
        grads = tf.gradients(self.cost, trainable_variables)
        self.grads = dict(zip([v.op.name for v in trainable_variables], grads))
        self.grad_images = tf.gradients(self.cost, self._images)[0]

        self.optimizer = v1.train.MomentumOptimizer(self.lrn_rate, MOMENTUM)
        apply_op = self.optimizer.apply_gradients(zip(grads, trainable_variables),
                                                  global_step=self.global_step,
                                                  name="train_step")
        train_ops = [apply_op] + self._extra_train_ops
        self.train_op = tf.group(*train_ops)

    def _batch_norm(self, name, x):
        with v1.variable_scope(name):
            scope = v1.get_variable_scope().name
            self.bn_inputs[scope] = x
            params_shape = [x.get_shape()[-1]]
            beta = v1.get_variable("beta", params_shape, self.dtype,
                                   initializer=v1.constant_initializer(0.0, self.dtype))
            gamma = v1.get_variable("gamma", params_shape, self.dtype,
                                    initializer=v1.constant_initializer(1.0, self.dtype))
            if self.mode == "train":
                mean, variance = v1.nn.moments(x, [0, 1, 2], name="moments")
                self.batch_stats[scope] = (mean, variance)
                moving_mean = v1.get_variable(
                    "moving_mean", params_shape, self.dtype,
                    initializer=v1.constant_initializer(0.0, self.dtype), trainable=False)
                moving_variance = v1.get_variable(
                    "moving_variance", params_shape, self.dtype,
                    initializer=v1.constant_initializer(1.0, self.dtype), trainable=False)
                self._extra_train_ops.append(moving_averages.assign_moving_average(
                    moving_mean, mean, 0.9, zero_debias=self.zero_debias))
                self._extra_train_ops.append(moving_averages.assign_moving_average(
                    moving_variance, variance, 0.9, zero_debias=self.zero_debias))
            else:
                mean = v1.get_variable(
                    "moving_mean", params_shape, self.dtype,
                    initializer=v1.constant_initializer(0.0, self.dtype), trainable=False)
                variance = v1.get_variable(
                    "moving_variance", params_shape, self.dtype,
                    initializer=v1.constant_initializer(1.0, self.dtype), trainable=False)
            y = tf.nn.batch_normalization(x, mean, variance, beta, gamma, 0.001)
            y.set_shape(x.get_shape())
            return y

    def _residual(self, x, in_filter, out_filter, stride, activate_before_residual=False):
        """Residual unit with 2 sub layers (the model file's `_residual`)."""
        if activate_before_residual:
            with v1.variable_scope("shared_activation"):
                x = self._batch_norm("init_bn", x)
                x = self._relu(x, self.hps.relu_leakiness)
                orig_x = x
        else:
            with v1.variable_scope("residual_only_activation"):
                orig_x = x
                x = self._batch_norm("init_bn", x)
                x = self._relu(x, self.hps.relu_leakiness)

        with v1.variable_scope("sub1"):
            x = self._conv("conv1", x, 3, in_filter, out_filter, stride)

        with v1.variable_scope("sub2"):
            x = self._batch_norm("bn2", x)
            x = self._relu(x, self.hps.relu_leakiness)
            x = self._conv("conv2", x, 3, out_filter, out_filter, [1, 1, 1, 1])

        with v1.variable_scope("sub_add"):
            if in_filter != out_filter:
                orig_x = v1.nn.avg_pool(orig_x, stride, stride, "VALID")
                orig_x = tf.pad(
                    orig_x, [[0, 0], [0, 0], [0, 0],
                             [(out_filter - in_filter) // 2, (out_filter - in_filter) // 2]])
            x += orig_x
        return x

    def _decay(self):
        """L2 weight decay loss: rate * sum(l2_loss(w)) over every DW."""
        costs = []
        for var in v1.trainable_variables():
            if var.op.name.find(r"DW") > 0:
                costs.append(tf.nn.l2_loss(var))
        # The model file passes the Python float, which TF makes a float32 constant; it is
        # given the run's dtype here so that the float64 graph builds.
        rate = tf.constant(self.hps.weight_decay_rate, self.dtype)
        return tf.multiply(rate, tf.add_n(costs))

    def _conv(self, name, x, filter_size, in_filters, out_filters, strides):
        with v1.variable_scope(name):
            n = filter_size * filter_size * out_filters
            kernel = v1.get_variable(
                "DW", [filter_size, filter_size, in_filters, out_filters], self.dtype,
                initializer=v1.random_normal_initializer(stddev=np.sqrt(2.0 / n)))
            return tf.nn.conv2d(x, kernel, strides, padding="SAME")

    def _relu(self, x, leakiness=0.0):
        self.relu_inputs.append(x)
        return v1.where(tf.less(x, 0.0), leakiness * x, x, name="leaky_relu")

    def _fully_connected(self, x, out_dim):
        x = tf.reshape(x, [self.hps.batch_size, -1])
        w = v1.get_variable("DW", [x.get_shape()[1], out_dim], self.dtype,
                            initializer=v1.uniform_unit_scaling_initializer(factor=1.0))
        b = v1.get_variable("biases", [out_dim], self.dtype,
                            initializer=v1.constant_initializer())
        return v1.nn.xw_plus_b(x, w, b)

    def _global_avg_pool(self, x):
        assert x.get_shape().ndims == 4
        return tf.reduce_mean(x, [1, 2])


# ---------------------------------------------------------------------------------------------
# Inputs and variable values

def make_inputs():
    rng = np.random.default_rng(SEED)
    images = rng.standard_normal((BATCH, SIZE, SIZE, 3)).astype(np.float32)
    label_index = rng.integers(0, NUM_CLASSES, BATCH).astype(np.int64)
    labels = np.eye(NUM_CLASSES, dtype=np.float32)[label_index]
    return rng, images, labels, label_index


def random_value(rng, name, shape):
    """A seeded value for one model variable; nothing is at its default."""
    leaf = name.rsplit("/", 1)[-1]
    if name == "logit/DW":   # uniform_unit_scaling_initializer(factor=1.0)'s range
        limit = np.sqrt(3.0 / shape[0])
        value = rng.uniform(-limit, limit, shape)
    elif leaf == "DW":       # random_normal_initializer(stddev=sqrt(2 / (k * k * out)))
        value = rng.normal(0.0, np.sqrt(2.0 / (shape[0] * shape[1] * shape[3])), shape)
    elif leaf == "gamma" or leaf == "moving_variance":
        value = rng.uniform(0.5, 1.5, shape)
    elif leaf in ("beta", "moving_mean", "biases"):
        value = rng.normal(0.0, 0.1, shape)
    else:
        raise ValueError(f"no rule for {name}")
    return value.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Running the graphs

def session(graph):
    config = v1.ConfigProto(intra_op_parallelism_threads=1, inter_op_parallelism_threads=1,
                            device_count={"CPU": 1})
    return v1.Session(graph=graph, config=config)


def model_variables(graph):
    """The model's own variables (not the optimizer's slots, not the debiasing shadows), in
    creation order."""
    with graph.as_default():
        return [v for v in v1.global_variables()
                if v.op.name != "global_step" and "/Momentum" not in v.op.name
                and not v.op.name.endswith(("/biased", "/local_step"))]


def build(mode, dtype, zero_debias=True):
    graph = tf.Graph()
    with graph.as_default():
        v1.set_random_seed(SEED)   # determinism requires it for the initializers (overwritten)
        images = v1.placeholder(dtype, [BATCH, SIZE, SIZE, 3], name="images")
        labels = v1.placeholder(dtype, [BATCH, NUM_CLASSES], name="labels")
        model = ResNet(HPS, images, labels, mode, dtype, zero_debias)
        model.build_graph()
        init = v1.global_variables_initializer()
        model.loaders = {}
        for var in model_variables(graph):
            value = v1.placeholder(dtype, var.shape)
            model.loaders[var.op.name] = (value, var.assign(value))
    sess = session(graph)
    sess.run(init)
    return graph, sess, model


def load(sess, model, values, np_dtype):
    """Overwrite every model variable with its seeded value (after TF's own initializers)."""
    for name, (value, assign) in model.loaders.items():
        sess.run(assign, {value: values[name].astype(np_dtype)})


def run_eval(dtype, np_dtype, values, images, labels):
    graph, sess, model = build("eval", dtype)
    load(sess, model, values, np_dtype)
    feed = {model._images: images.astype(np_dtype), model.labels: labels.astype(np_dtype)}
    fetch = {"logits": model.logits, "act": model.unit_outputs}
    out = sess.run(fetch, feed)
    again = sess.run(fetch, feed)
    repeat_identical = bool(np.array_equal(out["logits"], again["logits"]))
    n_vars = len(graph.get_collection(v1.GraphKeys.GLOBAL_VARIABLES))
    sess.close()
    return out, repeat_identical, n_vars


def run_train(dtype, np_dtype, values, images, labels, zero_debias):
    """Forward, loss, gradients, then one train step; returns everything as NumPy."""
    graph, sess, model = build("train", dtype, zero_debias)
    load(sess, model, values, np_dtype)
    feed = {model._images: images.astype(np_dtype), model.labels: labels.astype(np_dtype)}
    fetch = {
        "logits": model.logits, "predictions": model.predictions,
        "xent_correct": model.xent_correct, "xent_buggy": model.xent_buggy,
        "weight_decay": model.weight_decay, "cost_correct": model.cost,
        "cost_buggy": model.cost_buggy,
        "batch_stats": model.batch_stats, "bn_inputs": model.bn_inputs,
        "grads": model.grads, "grad_images": model.grad_images,
        "act": model.unit_outputs, "relu_inputs": model.relu_inputs,
    }
    out = sess.run(fetch, feed)
    again = sess.run(fetch, feed)
    same = all(np.array_equal(out[k], again[k]) for k in ("logits", "cost_correct", "grad_images"))
    same = same and all(np.array_equal(out["grads"][n], again["grads"][n]) for n in out["grads"])
    out["repeat_identical"] = bool(same)

    variables = model_variables(graph)
    trainable = [v.op.name for v in graph.get_collection(v1.GraphKeys.TRAINABLE_VARIABLES)]
    with graph.as_default():
        all_vars = v1.global_variables()
    step = sess.run(model.global_step)
    sess.run(model.train_op, feed)
    out["after"] = {v.op.name: sess.run(v) for v in variables}
    out["global_step"] = (int(step), int(sess.run(model.global_step)))
    out["momentum_slots"] = {n: sess.run(model.optimizer.get_slot(v, "momentum"))
                             for n, v in zip(trainable,
                                             graph.get_collection(
                                                 v1.GraphKeys.TRAINABLE_VARIABLES))}
    out["trainable"] = trainable
    out["model_variables"] = [v.op.name for v in variables]
    model_names = {v.op.name for v in variables}
    out["extra_variables"] = [v.op.name for v in all_vars
                              if v.op.name != "global_step" and v.op.name not in model_names]
    out["lr_used"] = float(sess.run(model.lrn_rate))
    sess.close()
    return out


def rel(a, b):
    """max |a - b| and that relative to max |b| (b is the float64 value)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    max_abs = float(np.abs(a - b).max())
    return max_abs, max_abs / max(float(np.abs(b).max()), 1e-300)


def compare_group(pairs):
    """The worst of several (name, f32, f64) comparisons, by relative error."""
    worst = max(((name,) + rel(x, y) for name, x, y in pairs), key=lambda t: t[2])
    return {"max_abs": max(rel(x, y)[0] for _, x, y in pairs), "max_rel_to_maxabs": worst[2],
            "worst": worst[0]}


def main(path):
    rng, images, labels, label_index = make_inputs()

    # Variable names and shapes, in TF's creation order, from the train graph.
    graph, sess, _ = build("train", tf.float32)
    names_shapes = [(v.op.name, v.shape.as_list()) for v in model_variables(graph)]
    sess.close()
    values = {name: random_value(rng, name, shape) for name, shape in names_shapes}
    moving = [n for n, _ in names_shapes if "moving_" in n]

    runs = {}
    for tag, dtype, np_dtype in (("f32", tf.float32, np.float32),
                                 ("f64", tf.float64, np.float64)):
        ev, eval_repeat, eval_vars = run_eval(dtype, np_dtype, values, images, labels)
        tr = run_train(dtype, np_dtype, values, images, labels, zero_debias=True)
        nd = run_train(dtype, np_dtype, values, images, labels, zero_debias=False)
        runs[tag] = (ev, tr, nd, eval_repeat, eval_vars)

    trainable = runs["f32"][1]["trainable"]
    model_vars = runs["f32"][1]["model_variables"]
    assert model_vars == [n for n, _ in names_shapes]
    bn_scopes = list(runs["f32"][1]["batch_stats"])
    units = list(runs["f32"][1]["act"])

    data = {"images": images, "labels": labels, "label_index": label_index}
    for name in model_vars:
        data[f"before/{name}"] = values[name]
    data["before/global_step"] = np.int64(runs["f32"][1]["global_step"][0])

    checks = {}
    for tag, (ev, tr, nd, eval_repeat, eval_vars) in runs.items():
        p = "" if tag == "f32" else "f64/"
        data[p + "eval/logits"] = ev["logits"]
        for key in ("logits", "predictions", "xent_correct", "xent_buggy", "weight_decay",
                    "cost_correct", "cost_buggy"):
            data[p + "train/" + key] = np.asarray(tr[key])
        for scope in bn_scopes:
            data[p + f"train/batch_mean/{scope}"] = tr["batch_stats"][scope][0]
            data[p + f"train/batch_var/{scope}"] = tr["batch_stats"][scope][1]
        for name in trainable:
            data[p + f"grad/{name}"] = tr["grads"][name]
        data[p + "grad_images"] = tr["grad_images"]
        # Like the bottleneck oracle: the float64 run stores only the moving statistics after
        # the step (its trainables are exactly before - lr * grad, checked below).
        for name in (model_vars if tag == "f32" else moving):
            data[p + f"after/{name}"] = tr["after"][name]
        data[p + "after/global_step"] = np.int64(tr["global_step"][1])
        for name in moving:
            data[p + f"after_nodebias/{name}"] = nd["after"][name]
        if tag == "f32":
            for unit in units:
                data[f"act_train/{unit}"] = tr["act"][unit]
                data[f"act_eval/{unit}"] = ev["act"][unit]

        np_dtype = np.float32 if tag == "f32" else np.float64
        lr = np_dtype(LEARNING_RATE)
        step_err = max(float(np.abs(tr["after"][n] - (values[n].astype(np_dtype)
                                                      - lr * tr["grads"][n])).max())
                       for n in trainable)
        slot_is_grad = all(np.array_equal(tr["momentum_slots"][n], tr["grads"][n])
                           for n in trainable)
        nodebias_trainables_same = all(np.array_equal(tr["after"][n], nd["after"][n])
                                       for n in trainable)

        def batch_of(name):
            scope, stat = name.rsplit("/", 1)
            return tr["batch_stats"][scope][0 if stat == "moving_mean" else 1]

        debias_err = max(float(np.abs(tr["after"][n] - batch_of(n)).max()) for n in moving)
        textbook_err = max(float(np.abs(nd["after"][n].astype(np.float64)
                                        - (0.9 * values[n].astype(np.float64)
                                           + 0.1 * batch_of(n).astype(np.float64))).max())
                           for n in moving)
        tf_rule_err = max(float(np.abs(nd["after"][n] - (values[n].astype(np_dtype)
                                                        - (values[n].astype(np_dtype)
                                                           - batch_of(n))
                                                        * np_dtype(np.float32(1 - 0.9)))).max())
                          for n in moving)
        checks[tag] = {
            "train_forward_backward_repeat_bitwise_identical": tr["repeat_identical"],
            "eval_forward_repeat_bitwise_identical": eval_repeat,
            "max_abs(after - (before - lr*grad)) over trainables": step_err,
            "lr_used": tr["lr_used"],
            "momentum_slot_equals_grad_bitwise": slot_is_grad,
            "trainables_after_same_with_and_without_zero_debias": nodebias_trainables_same,
            "max_abs(after moving stat (zero_debias) - batch stat)": debias_err,
            "max_abs(after_nodebias - (0.9*old + 0.1*batch)) in float64": textbook_err,
            "max_abs(after_nodebias - (old - (old - batch) * float32(1 - 0.9)))": tf_rule_err,
            "global_step_after": tr["global_step"][1],
            "extra_variables_created_by_train_graph": len(tr["extra_variables"]),
            "extra_variable_examples": tr["extra_variables"][:6],
            "eval_graph_variables": eval_vars,
        }

    # The batch variance is the biased one (divide by N*H*W), checked on every BN input.
    f64_train = runs["f64"][1]
    biased = max(float(np.abs(f64_train["batch_stats"][s][1]
                              - f64_train["bn_inputs"][s].var(axis=(0, 1, 2))).max())
                 for s in bn_scopes)
    unbiased = max(float(np.abs(f64_train["batch_stats"][s][1]
                                - f64_train["bn_inputs"][s].var(axis=(0, 1, 2), ddof=1)).max())
                   for s in bn_scopes)
    checks["variance_check"] = {"max_abs_vs_biased_var": biased,
                                "max_abs_vs_unbiased_var": unbiased,
                                "n_per_channel": {s: int(np.prod(f64_train["bn_inputs"][s]
                                                                 .shape[:3]))
                                                  for s in bn_scopes}}

    # How far TF's float32 run is from its float64 run, relative to each tensor's max.
    f32_vs_f64 = {}
    keys32 = [k for k in data if not k.startswith(("f64/", "before/", "act_", "images",
                                                   "label"))]
    groups = {}
    for k in keys32:
        if "global_step" in k or ("f64/" + k) not in data:
            continue
        if k.startswith("grad/"):
            group = "grad/*"
        elif k.startswith("train/batch_"):
            group = "train/batch_mean|var/*"
        elif k.startswith("after/"):
            group = "after/* (moving stats)" if "moving_" in k else "after/* (trainables)"
        elif k.startswith("after_nodebias/"):
            group = "after_nodebias/*"
        else:
            group = k
        groups.setdefault(group, []).append((k, data[k], data["f64/" + k]))
    groups["after/* (trainables)"] = [
        (f"after/{n}", data[f"after/{n}"], values[n].astype(np.float64)
         - LEARNING_RATE * data[f"f64/grad/{n}"]) for n in trainable]
    for group, pairs in groups.items():
        f32_vs_f64[group] = compare_group(pairs)
    for unit in units:
        for mode, run_index in (("train", 1), ("eval", 0)):
            key = f"act_{mode}/{unit}"
            f32_vs_f64[key] = compare_group([(key, runs["f32"][run_index]["act"][unit],
                                              runs["f64"][run_index]["act"][unit])])
    flips = sum(int(np.count_nonzero((a < 0) != (b < 0)))
                for a, b in zip(runs["f32"][1]["relu_inputs"], runs["f64"][1]["relu_inputs"]))
    relu64 = np.concatenate([r.ravel() for r in runs["f64"][1]["relu_inputs"]])
    f32_vs_f64["train relu inputs: f32-vs-f64 sign flips"] = flips
    f32_vs_f64["train relu inputs: count"] = int(relu64.size)
    f32_vs_f64["train relu inputs: min |x| (f64 run)"] = float(np.abs(relu64).min())
    f32_vs_f64["train relu inputs: count |x|<1e-6, <1e-5 (f64 run)"] = [
        int((np.abs(relu64) < 1e-6).sum()), int((np.abs(relu64) < 1e-5).sum())]
    f32_vs_f64["grad per-tensor max_rel_to_maxabs (worst 3)"] = sorted(
        ([n, rel(data[f"grad/{n}"], data[f"f64/grad/{n}"])[1]] for n in trainable),
        key=lambda t: -t[1])[:3]

    meta = {
        "config": f"basic_{CONFIG}",
        "unit": "basic",
        "shortcut": "pool_pad",
        "N": UNITS_PER_STAGE, "batch": BATCH, "size": SIZE, "num_classes": NUM_CLASSES,
        "seed": SEED,
        "filters": FILTERS, "strides": [1, 2, 2],
        "activate_before_residual": [True, False, False],
        "hparams": {"relu_leakiness": HPS.relu_leakiness, "bn_epsilon": 0.001,
                    "bn_decay": 0.9, "weight_decay": HPS.weight_decay_rate,
                    "momentum": MOMENTUM, "learning_rate": LEARNING_RATE},
        "storage": {"act": "float32 run only, train and eval mode, whole batch",
                    "f64/after": "moving statistics and global_step only; the float64 "
                                 "trainables after the step are before - 0.1 * f64/grad",
                    "compressed": True},
        "image_shape": list(images.shape),
        "trainable_variables": trainable,
        "model_variables": model_vars,
        "moving_stat_variables": moving,
        "units": units,
        "bn_scopes": bn_scopes,
        "checks": checks,
        "f32_vs_f64": f32_vs_f64,
        "versions": {"tensorflow": tf.__version__, "numpy": np.__version__,
                     "python": platform.python_version(), "platform": platform.platform(),
                     "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS")},
        "generator": "tests/oracle/make_tf_basic.py",
    }
    data["meta_json"] = np.array(json.dumps(meta))
    np.savez_compressed(path, **data)
    print(json.dumps({"checks": checks, "f32_vs_f64": f32_vs_f64}, indent=1))
    print(f"wrote {path}: {len(data)} arrays, {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else
         os.path.join(os.path.dirname(__file__), "..", "data", f"tf_resnet_basic_{CONFIG}.npz"))
