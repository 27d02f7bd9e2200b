"""The cpu backend's measured conv tiles: measured once on this host and reused, never read
for another CPU, measured again when the cached choices are unreadable, and never changing a
number (a train step is the same bits with tuning on and off)."""

import json
import warnings

import numpy as np
import pytest

import rescompile as rc
from rescompile.backends.cpu import autotune
from rescompile.backends.cpu.arena import Layout
from rescompile.backends.cpu.autotune import candidates
from rescompile.backends.cpu.llvm.conv import ConvKernel
from rescompile.backends.cpu.llvm.wgrad import WgradKernel
from rescompile.backends.cpu.llvm.winograd import WinogradKernel
from rescompile.backends.cpu.target import generic_target
from rescompile.backends.cpu.tuning import (EMPTY_ROWS, MIN_TILE_ROWS, POINTER_ROWS,
                                            WIDENING_REGISTERS, conv_tile)
from conftest import random_bn_state, tiny_spec

# 64 output channels: a layer that admits more than one tile on every instruction set.
WIDE = tiny_spec(stem_filters=16, stages=[{"filters": 64, "units": 1, "stride": 1}],
                 activate_before_residual=[True])


def compiled(cache_dir, tune=True, mode="infer", **options):
    return rc.compile(WIDE, mode=mode, backend="cpu", tune=tune, cache_dir=cache_dir, seed=3,
                      **options)


def tiles(exe) -> dict:
    return {s.name: (s.kernel.mr, s.kernel.nv) for plan in exe.program.plans.values()
            for s in plan.schedule.kernel_steps if isinstance(s.kernel, ConvKernel)}


def wgrad_tiles(exe) -> dict:
    return {s.name: (s.kernel.mr, s.kernel.nv) for plan in exe.program.plans.values()
            for s in plan.schedule.kernel_steps if isinstance(s.kernel, WgradKernel)}


def test_a_second_compile_reuses_the_choices(tmp_path):
    first = compiled(tmp_path)
    assert first.program.tuner.measured > 0
    second = compiled(tmp_path)
    assert second.program.tuner.measured == 0
    assert tiles(second) == tiles(first)
    remarks = [why for _, why in second.program.schedule.remarks if why.startswith("tile ")]
    assert any("measured:" in why and "GFLOP/s" in why for why in remarks)


def test_the_candidates_are_timed_in_turns(tmp_path, monkeypatch):
    """Each round calls every candidate once, in one order, TIMED_ROUNDS rounds after one to
    warm them: a burst of other load on the shared machine then slows every candidate alike."""
    timed, seconds, rates = [], autotune._TimedCall.seconds, autotune.Tuner._rates
    monkeypatch.setattr(autotune._TimedCall, "seconds",
                        lambda call: timed[-1].append(call) or seconds(call))
    monkeypatch.setattr(autotune.Tuner, "_rates",
                        lambda tuner, steps, layouts: timed.append([]) or rates(tuner, steps,
                                                                                 layouts))
    compiled(tmp_path)
    assert timed
    for calls in timed:
        turn = list(dict.fromkeys(calls))
        assert len(turn) >= 2
        assert calls == turn * (autotune.TIMED_ROUNDS + 1)


def test_a_tile_replaces_the_derived_one_only_where_clearly_faster():
    derived, other = (6, 2), (4, 3)
    margin = autotune.TILE_MARGIN
    assert autotune.chosen({derived: 100.0, other: 100.0 * (1 + margin / 2)}, derived) == derived
    assert autotune.chosen({derived: 100.0, other: 100.0 * (1 + 2 * margin)}, derived) == other
    assert autotune.chosen({other: 90.0, derived: 100.0}, derived) == derived


def test_choices_of_another_cpu_are_never_read(tmp_path):
    first = compiled(tmp_path)
    path = first.program.tuner.path
    doc = json.loads(path.read_text())
    other = path.with_name("0" * 16 + ".json")
    # another CPU's file, whose every choice is a tile nothing here would pick
    doc["choices"]["float32"] = {key: {"tile": [1, 1], "gflops": {}}
                                 for key in doc["choices"]["float32"]}
    other.write_text(json.dumps(doc))
    path.unlink()
    again = compiled(tmp_path)
    assert again.program.tuner.measured == first.program.tuner.measured
    assert (1, 1) not in tiles(again).values()


def test_choices_an_older_tuner_made_are_measured_again(tmp_path):
    first = compiled(tmp_path)
    path = first.program.tuner.path
    doc = json.loads(path.read_text())
    doc["format"] = autotune.FORMAT - 1
    doc["choices"]["float32"] = {key: {"tile": [1, 1], "gflops": {}}
                                 for key in doc["choices"]["float32"]}
    path.write_text(json.dumps(doc))
    again = compiled(tmp_path)
    assert again.program.tuner.measured == first.program.tuner.measured
    assert (1, 1) not in tiles(again).values()
    assert json.loads(path.read_text())["format"] == autotune.FORMAT


def test_an_unreadable_choice_file_is_measured_again_with_a_warning(tmp_path):
    first = compiled(tmp_path)
    first.program.tuner.path.write_text('{"choices": {"float32": {"x": {"tile": "bad"')
    with pytest.warns(RuntimeWarning, match="tuning choices unreadable"):
        again = compiled(tmp_path)
    assert again.program.tuner.measured == first.program.tuner.measured
    json.loads(again.program.tuner.path.read_text())  # rewritten whole


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tuning_changes_no_number(tmp_path, dtype):
    """A train step with other tiles than the derived ones is the same bits, in either
    dtype: the cached choices are set to the widest candidate of every layer that has
    several, the weight gradients' included (bfloat16: their x and dy staged widened, so
    their k loop widens nothing and they have the wider tiles float32's have)."""
    choose_the_widest(compiled(tmp_path, mode="train", dtype=dtype).program, dtype)
    rng = np.random.default_rng(0)
    images, labels = rng.standard_normal((3, *WIDE.model.input)), rng.integers(0, 5, 3)
    results = []
    for tune in (True, False):
        exe = compiled(tmp_path, tune=tune, mode="train", dtype=dtype)
        loss = exe.train_step(images, labels)
        results.append((loss, exe.state, exe.forward(images), tiles(exe), wgrad_tiles(exe)))
    (loss_a, state_a, logits_a, tiles_a, wgrad_a), \
        (loss_b, state_b, logits_b, tiles_b, wgrad_b) = results
    assert tiles_a != tiles_b and wgrad_a != wgrad_b
    if dtype == "bfloat16":
        staged = [s.kernel for s in exe.program.plan("train_step").schedule.kernel_steps
                  if isinstance(s.kernel, WgradKernel)]
        assert staged and all(k.staged and not k.widens for k in staged)
    assert loss_a == loss_b
    np.testing.assert_array_equal(logits_a, logits_b)
    for name, value in state_a.items():
        np.testing.assert_array_equal(value, state_b[name], err_msg=name)


def test_a_train_step_is_the_same_bits_on_every_vector_width(tmp_path):
    """AVX2 and AVX-512 kernels take a train step to the same bits: the tiles differ (16
    registers against 32), and no sum depends on a tile (`slots.BlockSums`), the batch
    statistics and batch-norm gradient sums a conv makes included."""
    if not generic_target("avx512").runs_here():
        pytest.skip("the host runs no AVX-512")
    rng = np.random.default_rng(1)
    images, labels = rng.standard_normal((5, *WIDE.model.input)), rng.integers(0, 5, 5)
    results = []
    for isa in ("avx2", "avx512"):
        exe = compiled(tmp_path, tune=False, mode="train", isa=isa)
        sums = [s.kernel for s in exe.program.plan("train_step").schedule.kernel_steps
                if isinstance(s.kernel, ConvKernel) and s.kernel.sums]
        results.append((exe.train_step(images, labels), exe.state, exe.forward(images),
                        {(k.sums, k.mr) for k in sums}))
    (loss_a, state_a, logits_a, sums_a), (loss_b, state_b, logits_b, sums_b) = results
    assert sums_a and sums_a != sums_b
    assert loss_a == loss_b
    np.testing.assert_array_equal(logits_a, logits_b)
    for name, value in state_a.items():
        np.testing.assert_array_equal(value, state_b[name], err_msg=name)


def choose_the_widest(program, dtype: str) -> None:
    """Set the cached choice of every layer that has several tiles to its widest."""
    lanes = program.target.lanes("float32")
    doc = json.loads(program.tuner.path.read_text())
    for choice in doc["choices"][dtype].values():
        mr, nr = max((tuple(map(int, tile.split("x"))) for tile in choice["gflops"]),
                     key=lambda tile: tile[1])
        choice["tile"] = [mr, nr // lanes]
    program.tuner.path.write_text(json.dumps(doc))


def test_a_winograd_tile_changes_no_number(tmp_path):
    """Winograd layers (3x3, 64 channels on 8 x 8 maps) are measured like any conv, and with
    their widest tile give the same logits as with the derived one."""
    spec = tiny_spec(stem_filters=64, unit="basic", activate_before_residual=[True],
                     stages=[{"filters": 64, "units": 1, "stride": 1}])
    first = rc.compile(spec, mode="infer", backend="cpu", tune=True, cache_dir=tmp_path)
    choose_the_widest(first.program, "float32")
    images = np.random.default_rng(1).standard_normal((2, *spec.model.input))
    runs = []
    for tune in (True, False):
        exe = rc.compile(spec, mode="infer", backend="cpu", tune=tune, cache_dir=tmp_path)
        exe.load_params(random_bn_state(exe))
        tiles = {s.name: (s.kernel.mr, s.kernel.nv) for s in exe.program.schedule.kernel_steps
                 if isinstance(s.kernel, WinogradKernel)}
        runs.append((tiles, exe.forward(images)))
    (tiles_a, logits_a), (tiles_b, logits_b) = runs
    assert tiles_a and tiles_a != tiles_b
    np.testing.assert_array_equal(logits_a, logits_b)


def test_tuning_off_measures_nothing(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exe = compiled(tmp_path, tune=False)
    assert exe.program.tuner.measured == 0 and not exe.program.tuner.path.exists()
    assert all("derived" in why for _, why in exe.program.schedule.remarks
               if why.startswith("tile "))


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_every_candidate_of_a_widening_kernel_leaves_its_registers(isa):
    """A kernel that widens its broadcast input (bfloat16 on FMAs) is tried only on tiles that
    leave WIDENING_REGISTERS for it (its derived tile first), a weight gradient's too."""
    target = generic_target(isa)
    for depth in (None, 16, 9 * 64):
        widening = candidates(target, "float32", 128, depth, widens=True)
        assert widening[0] == conv_tile(target, "float32", 128, depth, widens=True)
        for mr, nv in widening:
            assert nv * mr + nv + 1 + WIDENING_REGISTERS <= target.registers, (mr, nv)
        # AVX2's 16 registers leave a widening tile 2 vectors wide only (5 x 16, or 4 x 16
        # for a depth of 16); AVX-512's 32 leave 2 to 4
        assert {nv for _, nv in widening} == ({2} if isa == "avx2" else {2, 3, 4})


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_every_width_is_also_tried_with_its_row_pointers_in_registers(isa):
    """A tile of more than POINTER_ROWS rows spills row pointers (a 16-channel layer on
    AVX-512 ran a third slower on 14 x 16 than on 12 x 16): a tile one vector wide is derived
    with no more rows, and every width the candidates try is also tried with no more."""
    target = generic_target(isa)
    assert conv_tile(target, "float32", target.lanes("float32"))[0] <= POINTER_ROWS
    for channels in (target.lanes("float32"), 64, 256):
        tiles = candidates(target, "float32", channels)
        assert tiles[0] == conv_tile(target, "float32", channels)
        for width in {nv for _, nv in tiles}:
            assert min(mr for mr, nv in tiles if nv == width) <= POINTER_ROWS, (channels, width)


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_a_small_map_takes_rows_that_divide_its_pixels(isa):
    """Where the widest rows would leave more than EMPTY_ROWS of the tiles over an image's
    pixels empty (16 Winograd tiles of a 7 x 7 or 8 x 8 map on AVX-512's 14 rows: 12 of
    28), the derived tile (the tuner's first candidate) takes the most rows that divide the
    pixels; a map they cover well keeps them (49 pixels on 14 rows: 7 empty of 56)."""
    target = generic_target(isa)
    widest = conv_tile(target, "float32", 512)[0]
    for pixels in (1, 4, 16, 36, 49, 64, 3136):
        mr, _ = conv_tile(target, "float32", 512, pixels=pixels)
        computed = -(-pixels // widest) * widest
        if (computed - pixels) / computed <= EMPTY_ROWS or pixels < MIN_TILE_ROWS:
            assert mr == widest, pixels
        else:
            assert pixels % mr == 0 and mr >= MIN_TILE_ROWS, pixels
            assert not any(pixels % rows == 0 for rows in range(mr + 1, widest)), pixels
        assert candidates(target, "float32", 512, pixels=pixels)[0] == (mr, 2)
    assert conv_tile(generic_target("avx512"), "float32", 512, pixels=16)[0] == 8
    assert conv_tile(generic_target("avx512"), "float32", 512, pixels=49)[0] == 14


def test_the_tuner_times_a_prologue_on_vectors_of_its_input_channels(tmp_path):
    """The tuner's arguments for a kernel with a prologue (a 1 x 1 conv, or its weight
    gradient, reading a BN-ReLU) give the prologue's per-channel vectors its input channels,
    as the arena does, not its output channels: reading past them it met garbage, a NaN of
    which sent a bfloat16 kernel to its exact twin (ResNet-164's stride-2 conv1, 128 -> 64
    channels, timed at a third of its speed). Here 64 -> 16 channels, in training."""
    spec = tiny_spec(stem_filters=16, stages=[{"filters": 64, "units": 2, "stride": 1}],
                     activate_before_residual=[True])
    exe = rc.compile(spec, mode="train", backend="cpu", tune=False, cache_dir=tmp_path)
    wider = 0
    for plan in exe.program.plans.values():
        schedule = plan.schedule
        for step in schedule.kernel_steps:
            if not getattr(step.kernel, "prologue", ()):
                continue
            layouts = {v: Layout(*schedule.shapes[v], schedule.pads.get(v, (0, 0, 0, 0)))
                       for v in step.tensors.values()}
            _, _, arrays = autotune.step_arguments(step, layouts, 1)
            by_role = dict(zip((p.role for p in step.kernel.signature.pointers), arrays))
            for operand in step.kernel.prologue_chain.operands:
                assert by_role[operand.role].size == step.fields["cin"], (step.name, operand)
            wider += step.fields["cin"] > step.channels
    assert wider >= 2  # a conv and its weight gradient
