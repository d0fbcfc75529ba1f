"""scripts/bench_unroll.py: the grid of cases and one case run in-process."""

import argparse

import pytest

from tests.scripts import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_unroll")


def test_channels_are_parsed_or_refused(bench):
    assert bench._channels("16,32") == (16, 32)
    for bad in ("", "16,x", "16,0"):
        with pytest.raises(argparse.ArgumentTypeError, match="positive integers"):
            bench._channels(bad)


def test_a_two_convolution_case_builds_that_model_and_times_it(bench):
    case = dict(model="cnn", T=3, conv="auto", x64=False, estimator="reverse",
                checkpoint="step", hvp="forward", channels=[16, 32], batch_size=20,
                val_batch_size=0, hvp_batch_size=0, window=2, implicit_iters=2,
                repeats=1, budget=0.0, max_bytes=2**40, space="scalar")
    row = bench.run_case(case)
    # Two 3x3 convolutions (1->16, 16->32) and the dense head on 8x8 images.
    convs = (9 * 1 + 1) * 16 + (9 * 16 + 1) * 32
    assert row["num_params"] == convs + (8 * 8 * 32 + 1) * 10
    assert row["grad_finite"] and row["seconds"] > 0 and row["repeats"] == 1
