"""Hypothesis strategies shared by tests: random small specs of every shape the spec allows."""

import numpy as np
from hypothesis import strategies as st

import rescompile as rc
from rescompile.spec import STEMS

stage = st.fixed_dictionaries({"filters": st.sampled_from([4, 8, 12]),
                               "units": st.integers(1, 2), "stride": st.integers(1, 2)})


@st.composite
def small_specs(draw):
    """Any stem, unit flavour, padding and leakiness; odd sizes, 1 or 3 input channels."""
    stages = draw(st.lists(stage, min_size=1, max_size=3))
    stem = draw(st.sampled_from(["cifar", "imagenet"]))
    total = STEMS[stem].total_stride * int(np.prod([s["stride"] for s in stages]))
    size = draw(st.integers(total, total + 5))
    return rc.load_spec({"name": "random", "model": {
        "input": [size, draw(st.integers(total, total + 5)), draw(st.sampled_from([1, 3]))],
        "num_classes": draw(st.integers(2, 6)), "stem": stem,
        "stem_filters": draw(st.sampled_from([4, 8])),
        "preactivation": draw(st.booleans()),
        "stride_on": draw(st.sampled_from(["conv1", "conv2"])),
        "padding": draw(st.sampled_from(["same", "symmetric"])),
        "stages": stages,
        "activate_before_residual": draw(st.lists(st.booleans(), min_size=len(stages),
                                                  max_size=len(stages))),
        "relu_leakiness": draw(st.sampled_from([0.0, 0.1]))}})
