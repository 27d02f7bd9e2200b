"""The compiler's structure, pinned exactly: for each preset and mode, the final graph's
kernel-level ops (with their epilogue chains), the CUDA launches per entry and the CPU kernel
calls and host steps per entry. The values were reviewed when written, for instance
ResNet-164 inference is the README's 163 fused convs and 3 projections, with every batch norm
folded, and the seed's basic units read their pooled, padded shortcut in the epilogue of the
conv that adds it (`add_pooled`). Any lost or new fusion fails here and shows as a diff of the
table. A test also proves that each pass of each pipeline moves at least one of these tables,
so none can be deleted quietly. A final test finds import cycles.
"""

import ast
from collections import Counter
from pathlib import Path

import pytest

import rescompile as rc
from rescompile.backends.cpu.steps import HostStep
from rescompile.backends.cuda.plan import count_launches
from rescompile.compiler import lower
from rescompile.dump import kernel_label
from rescompile.entries import make_entries
from rescompile.passes.pipelines import PIPELINES

PRESETS = Path(rc.__file__).parent / "presets"
# A preactivation model with an ImageNet stem: its first batch norm follows the max pool, which
# no conv epilogue can take, so it is the case that needs fuse_elementwise in inference.
TINY_IMAGENET = {"name": "tiny-imagenet-v2", "model": {
    "input": [8, 8, 3], "num_classes": 5, "stem": "imagenet", "stem_filters": 4,
    "stages": [{"filters": 8, "units": 1, "stride": 1}, {"filters": 16, "units": 1, "stride": 2}],
    "activate_before_residual": [False, False]}}

OPS = {  # (preset, mode) -> kernel-level op (with its epilogue chain) -> count
    ('digits', 'infer'): {
        'conv2d': 2, 'dense': 1, 'fused_conv2d[add+affine+relu]': 1, 'fused_conv2d[add]': 1,
        'fused_conv2d[bias_add+relu]': 4, 'global_avg_pool': 1, 'prepare:bn_affine_params': 2,
        'prepare:fold_bn_weights': 5, 'prologue_fused_conv2d[affine+relu>bias_add+relu]': 1},
    ('digits', 'train'): {
        'add': 11, 'batch_norm_relu_grad_apply': 7, 'batch_norm_relu_grad_sums': 1, 'conv2d': 1,
        'conv2d_grad_filter': 4, 'conv2d_grad_input': 2, 'dense': 1, 'fused_conv2d[]+stats': 3,
        'fused_conv2d_grad_input[]+batch_norm_relu_grad_sums': 5,
        'fused_conv2d_grad_input[add]': 1,
        'fused_conv2d_grad_input[add]+batch_norm_relu_grad_sums': 1,
        'fused_elementwise[batch_normalize+relu]': 3, 'global_avg_pool': 1,
        'global_avg_pool_grad': 1, 'l2_penalty': 1, 'l2_penalty_grad': 10, 'matmul': 2,
        'momentum_update': 25, 'moving_average': 14,
        'prologue_conv2d_grad_filter[batch_normalize+relu>]': 5,
        'prologue_fused_conv2d[batch_normalize+relu>]': 1,
        'prologue_fused_conv2d[batch_normalize+relu>]+stats': 2,
        'prologue_fused_conv2d[batch_normalize+relu>add]+stats': 2, 'softmax_cross_entropy': 1,
        'softmax_cross_entropy_grad': 1, 'sum_rows': 1},
    ('seed_small', 'infer'): {
        'conv2d': 3, 'dense': 1, 'fused_conv2d[add+affine+relu]': 1, 'fused_conv2d[add]': 5,
        'fused_conv2d[bias_add+relu]': 8, 'global_avg_pool': 1, 'prepare:bn_affine_params': 6,
        'prepare:fold_bn_weights': 13, 'prologue_fused_conv2d[affine+relu>bias_add+relu]': 5},
    ('seed_small', 'train'): {
        'add': 24, 'batch_norm_relu_grad_apply': 16, 'batch_norm_relu_grad_sums': 1, 'conv2d': 2,
        'conv2d_grad_filter': 9, 'conv2d_grad_input': 2, 'dense': 1,
        'fused_batch_norm_relu_grad_apply[add]': 3, 'fused_conv2d[]+stats': 7,
        'fused_conv2d_grad_input[]+batch_norm_relu_grad_sums': 17,
        'fused_conv2d_grad_input[add]': 2,
        'fused_conv2d_grad_input[add]+batch_norm_relu_grad_sums': 1,
        'fused_elementwise[batch_normalize+relu]': 7, 'global_avg_pool': 1,
        'global_avg_pool_grad': 1, 'l2_penalty': 1, 'l2_penalty_grad': 23, 'matmul': 2,
        'momentum_update': 62, 'moving_average': 38,
        'prologue_conv2d_grad_filter[batch_normalize+relu>]': 13,
        'prologue_fused_conv2d[batch_normalize+relu>]': 1,
        'prologue_fused_conv2d[batch_normalize+relu>]+stats': 6,
        'prologue_fused_conv2d[batch_normalize+relu>add]+stats': 6, 'softmax_cross_entropy': 1,
        'softmax_cross_entropy_grad': 1, 'sum_rows': 1},
    ('resnet164_cifar', 'infer'): {
        'conv2d': 3, 'dense': 1, 'fused_conv2d[add+affine+relu]': 1, 'fused_conv2d[add]': 53,
        'fused_conv2d[bias_add+relu]': 56, 'global_avg_pool': 1, 'prepare:bn_affine_params': 54,
        'prepare:fold_bn_weights': 109, 'prologue_fused_conv2d[affine+relu>bias_add+relu]': 53},
    ('resnet164_cifar', 'train'): {
        'add': 168, 'batch_norm_relu_grad_apply': 112, 'batch_norm_relu_grad_sums': 1, 'conv2d': 2,
        'conv2d_grad_filter': 57, 'conv2d_grad_input': 2, 'dense': 1,
        'fused_batch_norm_relu_grad_apply[add]': 51, 'fused_conv2d[]+stats': 55,
        'fused_conv2d_grad_input[]+batch_norm_relu_grad_sums': 161,
        'fused_conv2d_grad_input[add]': 2,
        'fused_conv2d_grad_input[add]+batch_norm_relu_grad_sums': 1,
        'fused_elementwise[batch_normalize+relu]': 55, 'global_avg_pool': 1,
        'global_avg_pool_grad': 1, 'l2_penalty': 1, 'l2_penalty_grad': 167, 'matmul': 2,
        'momentum_update': 494, 'moving_average': 326,
        'prologue_conv2d_grad_filter[batch_normalize+relu>]': 109,
        'prologue_fused_conv2d[batch_normalize+relu>]': 1,
        'prologue_fused_conv2d[batch_normalize+relu>]+stats': 54,
        'prologue_fused_conv2d[batch_normalize+relu>add]+stats': 54, 'softmax_cross_entropy': 1,
        'softmax_cross_entropy_grad': 1, 'sum_rows': 1},
    ('resnet50_imagenet', 'infer'): {
        'dense': 1, 'fused_conv2d[bias_add+add+relu]': 16, 'fused_conv2d[bias_add+relu]': 33,
        'fused_conv2d[bias_add]': 4, 'global_avg_pool': 1, 'max_pool': 1,
        'prepare:fold_bn_weights': 53},
    ('resnet50_imagenet', 'train'): {
        'add': 55, 'batch_norm_grad_apply': 20, 'batch_norm_grad_sums': 20,
        'batch_norm_relu_grad_apply': 33, 'batch_norm_relu_grad_sums': 1, 'batch_normalize': 4,
        'conv2d_grad_filter': 37, 'conv2d_grad_input': 20, 'dense': 1, 'fused_conv2d[]+stats': 37,
        'fused_conv2d_grad_input[]+batch_norm_relu_grad_sums': 32,
        'fused_conv2d_grad_input[add]': 1, 'fused_elementwise[add+relu_grad]': 15,
        'fused_elementwise[batch_normalize+add|relu]': 16,
        'fused_elementwise[batch_normalize+relu]': 17, 'global_avg_pool': 1,
        'global_avg_pool_grad': 1, 'l2_penalty': 1, 'l2_penalty_grad': 54, 'matmul': 2,
        'max_pool': 1, 'max_pool_grad': 1, 'momentum_update': 161, 'moving_average': 106,
        'prologue_conv2d_grad_filter[batch_normalize+relu>]': 16,
        'prologue_fused_conv2d[batch_normalize+relu>]+stats': 16, 'relu_grad': 1,
        'softmax_cross_entropy': 1, 'softmax_cross_entropy_grad': 1, 'sum_rows': 1},
    ('seed_basic_small', 'infer'): {
        'dense': 1, 'fused_conv2d[add+affine+relu]': 1,
        'fused_conv2d[add_pooled|affine+relu]': 2, 'fused_conv2d[add|affine+relu]': 3,
        'fused_conv2d[bias_add+relu]': 7, 'global_avg_pool': 1, 'prepare:bn_affine_params': 6,
        'prepare:fold_bn_weights': 7},
    ('seed_basic_small', 'train'): {
        'add': 15, 'batch_norm_relu_grad_apply': 8, 'batch_norm_relu_grad_sums': 1,
        'conv2d_grad_filter': 13, 'conv2d_grad_input': 1, 'dense': 1,
        'fused_batch_norm_relu_grad_apply[add]': 5,
        'fused_conv2d[]+stats': 7, 'fused_conv2d[add]+stats': 4,
        'fused_conv2d[add_pooled]+stats': 2,
        'fused_conv2d_grad_input[]+batch_norm_relu_grad_sums': 11,
        'fused_conv2d_grad_input[add]+batch_norm_relu_grad_sums': 1,
        'fused_elementwise[batch_normalize+relu]': 13, 'global_avg_pool': 1,
        'global_avg_pool_grad': 1, 'l2_penalty': 1, 'l2_penalty_grad': 14, 'matmul': 2,
        'momentum_update': 41, 'moving_average': 26, 'pool_pad_grad': 2,
        'softmax_cross_entropy': 1, 'softmax_cross_entropy_grad': 1, 'sum_rows': 1},
    ('resnet18_imagenet', 'infer'): {
        'dense': 1, 'fused_conv2d[bias_add+add+relu]': 8, 'fused_conv2d[bias_add+relu]': 9,
        'fused_conv2d[bias_add]': 3, 'global_avg_pool': 1, 'max_pool': 1,
        'prepare:fold_bn_weights': 20},
    ('tiny-imagenet-v2', 'infer'): {
        'conv2d': 3, 'dense': 1, 'fused_conv2d[add+affine+relu]': 1, 'fused_conv2d[add]': 1,
        'fused_conv2d[bias_add+relu]': 2, 'global_avg_pool': 1, 'max_pool': 1,
        'prepare:bn_affine_params': 3, 'prepare:fold_bn_weights': 4,
        'prologue_fused_conv2d[affine+relu>bias_add+relu]': 2},
    ('tiny-imagenet-v2', 'train'): {
        'add': 11, 'batch_moments': 1, 'batch_norm_relu_grad_apply': 7,
        'batch_norm_relu_grad_sums': 1, 'conv2d': 3, 'conv2d_grad_filter': 5,
        'conv2d_grad_input': 1, 'dense': 1, 'fused_conv2d[]+stats': 2,
        'fused_conv2d_grad_input[]+batch_norm_relu_grad_sums': 6,
        'fused_conv2d_grad_input[add]': 2, 'fused_elementwise[batch_normalize+relu]': 3,
        'global_avg_pool': 1, 'global_avg_pool_grad': 1, 'l2_penalty': 1, 'l2_penalty_grad': 10,
        'matmul': 2, 'max_pool': 1, 'max_pool_grad': 1, 'momentum_update': 25,
        'moving_average': 14, 'prologue_conv2d_grad_filter[batch_normalize+relu>]': 4,
        'prologue_fused_conv2d[batch_normalize+relu>]+stats': 2,
        'prologue_fused_conv2d[batch_normalize+relu>add]+stats': 2, 'softmax_cross_entropy': 1,
        'softmax_cross_entropy_grad': 1, 'sum_rows': 1},
}
CUDA_LAUNCHES = {  # (preset, mode) -> entry -> launches at batch 4
    ('digits', 'infer'):
        {'prepare': 7, 'forward': 12},
    ('digits', 'train'):
        {'forward': 47, 'backward': 66, 'loss_and_grads': 128, 'train_step': 129,
         'step_gradients': 127, 'apply_gradients': 2},
    ('seed_small', 'infer'):
        {'prepare': 19, 'forward': 27},
    ('seed_small', 'train'):
        {'forward': 122, 'backward': 168, 'loss_and_grads': 318, 'train_step': 319,
         'step_gradients': 317, 'apply_gradients': 2},
    ('seed_basic_small', 'infer'):
        {'prepare': 13, 'forward': 19},
    ('seed_basic_small', 'train'):
        {'forward': 84, 'backward': 115, 'loss_and_grads': 218, 'train_step': 219,
         'step_gradients': 217, 'apply_gradients': 2},
}
CPU_STEPS = {  # (preset, mode) -> (entry -> (kernel calls, host steps), isa -> micro-kernels)
    # A layer whose channels fit one vector gets a tile one vector wide, a 3 x 3 layer whose
    # input channels fill whole vectors Winograd tiles in inference (its input transform a
    # kernel of its own where its channels make 4 or more panels), and a weight
    # gradient's tile rows that divide its depth (a conv's, its pixels an image where the
    # widest rows would leave a quarter of theirs empty: the 4 x 4 and 2 x 2 maps on
    # AVX-512), so the micro-kernels depend on the vector width and the register count (the
    # host's instruction set).
    ('digits', 'infer'):
        ({'forward': (12, 0)}, {'avx512': 10, 'avx2': 10, 'portable': 9}),
    ('digits', 'train'):
        ({'train_step': (66, 66), 'forward': (22, 0), 'backward': (45, 23),
          'loss_and_grads': (67, 27), 'step_gradients': (66, 27), 'apply_gradients': (0, 39)},
         {'avx512': 29, 'avx2': 26, 'portable': 21}),
    ('seed_small', 'infer'):
        ({'forward': (25, 0)}, {'avx512': 15, 'avx2': 9, 'portable': 11}),
    ('seed_small', 'train'):
        ({'train_step': (160, 153), 'forward': (51, 0), 'backward': (110, 49),
          'loss_and_grads': (161, 53), 'step_gradients': (160, 53),
          'apply_gradients': (0, 100)}, {'avx512': 34, 'avx2': 22, 'portable': 22}),
    ('seed_basic_small', 'infer'):
        ({'forward': (16, 0)}, {'avx512': 13, 'avx2': 9, 'portable': 12}),
    ('seed_basic_small', 'train'):
        ({'train_step': (112, 102), 'forward': (42, 0), 'backward': (71, 31),
          'loss_and_grads': (113, 35), 'step_gradients': (112, 35),
          'apply_gradients': (0, 67)}, {'avx512': 27, 'avx2': 18, 'portable': 18}),
}


def source(preset: str):
    return TINY_IMAGENET if preset == "tiny-imagenet-v2" else PRESETS / f"{preset}.toml"


def signature(node) -> str:
    """A node as the kernel it becomes (its op, chains and reductions: the dump's label), and
    whether it runs once per load (prepare)."""
    name = kernel_label(node)
    return f"prepare:{name}" if node.phase == "prepare" else name


def op_table(preset: str, mode: str, pipeline=None, backend=None) -> dict:
    graph = lower(source(preset), mode, "float32", pipeline=pipeline, backend=backend).graph
    return dict(Counter(signature(n) for n in graph.nodes))


@pytest.mark.parametrize("preset, mode", list(OPS))
def test_final_graph_ops(preset, mode):
    assert op_table(preset, mode) == OPS[preset, mode]


@pytest.mark.parametrize("preset, mode", list(CUDA_LAUNCHES))
def test_cuda_launches_per_entry(preset, mode):
    graph = lower(source(preset), mode, "float32", backend="cuda").graph
    assert count_launches(graph, make_entries(graph, mode), 4) == CUDA_LAUNCHES[preset, mode]


@pytest.mark.parametrize("preset, mode", list(CPU_STEPS))
def test_cpu_kernel_calls_per_entry(preset, mode):
    exe = rc.compile(source(preset), mode=mode, backend="cpu")
    calls = {}
    for entry, plan in exe.program.plans.items():
        steps = plan.schedule.steps[plan.begin:plan.end]
        hosts = sum(isinstance(s, HostStep) for s in steps)
        calls[entry] = (len(steps) - hosts, hosts)
    expected_calls, kernels = CPU_STEPS[preset, mode]
    assert (calls, len(exe.program.kernels)) == (expected_calls, kernels[exe.program.target.isa])


SMALL = ["digits", "seed_small", "tiny-imagenet-v2", "seed_basic_small"]
BASIC = ["seed_basic_small", "resnet32_cifar", "resnet56_cifar", "resnet110_cifar",
         "resnet18_imagenet", "resnet34_imagenet"]
# What a fused inference graph of basic units must not run as a kernel of its own: a batch norm
# or its affine, a ReLU, a residual add, or any part of the shortcut (pool, pad, its read).
STANDALONE = {"batch_norm", "affine", "relu", "add", "add_pooled", "avg_pool", "pad_channels",
              "fused_elementwise"}


@pytest.mark.parametrize("preset", BASIC)
def test_basic_units_fuse_as_fully_as_bottlenecks(preset):
    graph = lower(source(preset), "infer", "float32").graph
    assert not {n.op for n in graph.nodes} & STANDALONE


@pytest.mark.parametrize("mode, removed", [(mode, p.name) for mode, passes in PIPELINES.items()
                                           for p in passes if p.name != "dce"])
def test_every_pass_moves_a_pinned_table(mode, removed):
    """The tables above would catch the pass's deletion. (dce drops nothing from a graph as
    built: no test can see it go, and nothing depends on it.)"""
    pipeline = [p for p in PIPELINES[mode] if p.name != removed]
    assert any(op_table(preset, mode, pipeline) != OPS[preset, mode] for preset in SMALL)


def test_no_import_cycles():
    """Imports between rescompile's modules (also those inside functions) form no cycle."""
    root = Path(rc.__file__).parent
    modules = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(
        ".__init__"): p for p in root.rglob("*.py")}
    edges = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                subs = [f"{target}.{a.name}" for a in node.names
                        if f"{target}.{a.name}" in modules]
                for name in subs or ([target] if target in modules else []):
                    if name != module and not module.startswith(name + "."):
                        edges[module].add(name)
    state = {}

    def visit(module, path):
        state[module] = "open"
        for name in edges[module]:
            assert state.get(name) != "open", " -> ".join(path + [name])
            if name not in state:
                visit(name, path + [name])
        state[module] = "done"

    for module in modules:
        if module not in state:
            visit(module, [module])
