"""Hypothesis strategies shared by tests: random small specs of every shape the spec allows."""

import numpy as np
from hypothesis import strategies as st

import rescompile as rc
from rescompile.spec import STEMS

stage = st.fixed_dictionaries({"filters": st.sampled_from([4, 8, 12]),
                               "units": st.integers(1, 2), "stride": st.integers(1, 2)})


@st.composite
def residual_units(draw, stem_filters: int, stages: list[dict]) -> dict:
    """Model fields for a unit kind (bottleneck or basic), a shortcut (projection or
    pool_pad) and a bottleneck width (a quarter or half of the filters), with `stages`
    fitted to the seed's pooled shortcut where it is drawn: its channels grow by an even
    number (here a multiple of 4, so every width stays whole) and a stage that keeps them
    keeps the map size."""
    unit = draw(st.sampled_from(["bottleneck", "basic"]))
    shortcut = draw(st.sampled_from(["projection", "pool_pad"]))
    width = draw(st.sampled_from([0.25, 0.5])) if unit == "bottleneck" else 0.25
    if shortcut == "pool_pad":
        filters = stem_filters
        for s in stages:
            growth = draw(st.sampled_from([0, 4, 8]))
            filters += growth
            s["filters"], s["stride"] = filters, s["stride"] if growth else 1
    return {"unit": unit, "shortcut": shortcut, "bottleneck_width": width, "stages": stages}


def input_size(draw, total_stride: int, pool_pad: bool) -> int:
    """An odd size above the total stride, or (the pooled shortcut needs whole blocks at every
    stride) a multiple of it."""
    if pool_pad:
        return total_stride * draw(st.integers(1, 2))
    return draw(st.integers(total_stride, total_stride + 5))


@st.composite
def small_specs(draw):
    """Any stem, unit kind, shortcut, bottleneck width, padding and leakiness; odd sizes, 1 or
    3 input channels."""
    stages = draw(st.lists(stage, min_size=1, max_size=3))
    stem = draw(st.sampled_from(["cifar", "imagenet"]))
    stem_filters = draw(st.sampled_from([4, 8]))
    units = draw(residual_units(stem_filters, stages))
    total = STEMS[stem].total_stride * int(np.prod([s["stride"] for s in units["stages"]]))
    pool_pad = units["shortcut"] == "pool_pad"
    return rc.load_spec({"name": "random", "model": {
        "input": [input_size(draw, total, pool_pad), input_size(draw, total, pool_pad),
                  draw(st.sampled_from([1, 3]))],
        "num_classes": draw(st.integers(2, 6)), "stem": stem, "stem_filters": stem_filters,
        "preactivation": draw(st.booleans()),
        "stride_on": draw(st.sampled_from(["conv1", "conv2"])),
        "padding": draw(st.sampled_from(["same", "symmetric"])),
        **units,
        "activate_before_residual": draw(st.lists(st.booleans(), min_size=len(stages),
                                                  max_size=len(stages))),
        "relu_leakiness": draw(st.sampled_from([0.0, 0.1]))}})
