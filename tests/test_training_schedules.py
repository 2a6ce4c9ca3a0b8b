"""cyclical_lr without overflow (issue 12): the amplitude decay of ``triangular2`` and
``exp_range`` at huge cycle counts gives the limit value with no warning, and the same values
(bit for bit) where the old ``1 / 2.0 ** (cycle - 1)`` / ``gamma ** step`` did not overflow."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from qgemm.averaging import CyclicalLR, cyclical_lr


def _old(step, base, mx, size, mode, gamma=1.0):
    """The formula as it was (overflows past cycle 1025), for steps where it does not."""
    s = np.asarray(step, np.float64)
    cycle = np.floor(1.0 + s / (2 * size))
    x = 1.0 + s / (2 * size) - cycle
    factor = np.where(x <= 0.5, x / 0.5, (x - 1.0) / (0.5 - 1.0))
    scale = 1.0 / 2.0 ** (cycle - 1.0) if mode == "triangular2" else gamma**s
    return base + (mx - base) * factor * scale


@pytest.fixture(autouse=True)
def _warnings_are_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            yield


def test_triangular2_same_values_before_overflow_bitwise():
    steps = np.concatenate([np.arange(0, 60, 0.5), 2.0 * np.arange(1000, 1024) + 1.0])
    with np.errstate(all="ignore"):
        want = _old(steps, 0.1, 1.0, 1.0, "triangular2")
    got = cyclical_lr(steps, base_lr=0.1, max_lr=1.0, step_size=1.0, mode="triangular2")
    np.testing.assert_array_equal(got, want)
    for s in (3.0, 7.5, 2047.0):
        assert cyclical_lr(s, base_lr=0.1, max_lr=1.0, step_size=1.0, mode="triangular2") == (
            float(want[np.flatnonzero(steps == s)[0]])
        )


@pytest.mark.parametrize("step", [2.0 * 1030 + 1, 1e6 + 0.5, 1e300])
def test_triangular2_huge_cycles_give_the_limit(step):
    lr = cyclical_lr(step, base_lr=0.25, max_lr=1.0, step_size=1, mode="triangular2")
    assert lr == 0.25
    arr = cyclical_lr(
        np.array([1.0, step]), base_lr=0.25, max_lr=1.0, step_size=1, mode="triangular2"
    )
    np.testing.assert_array_equal(arr, [1.0, 0.25])


def test_triangular2_subnormal_decay_tends_to_zero():
    # cycles 1025..1074: 1 / 2**k had overflowed to 1 / inf = 0; 0.5**k is the exact value
    steps = 2.0 * np.arange(1024, 1100) + 1.0
    lr = cyclical_lr(steps, base_lr=0.0, max_lr=1.0, step_size=1, mode="triangular2")
    assert np.all(np.diff(lr) <= 0) and lr[0] > 0 and lr[-1] == 0.0
    with np.errstate(under="ignore"):
        want = 0.5 ** (np.flatnonzero(lr > 0) + 1024.0)
    np.testing.assert_array_equal(lr[lr > 0], want)


def test_exp_range_no_overflow():
    # gamma < 1: decays to base_lr
    assert (
        cyclical_lr(1e9 + 1, base_lr=0.1, max_lr=1.0, step_size=2, mode="exp_range", gamma=0.99)
        == 0.1
    )
    # gamma > 1: the amplitude grows without bound (limit inf) but the bottom of a cycle,
    # where the triangle is 0, stays base_lr (not 0 * inf = nan)
    s = np.array([0.0, 1.0, 4.0, 1e6, 1e6 + 1.0])
    got = cyclical_lr(s, base_lr=0.1, max_lr=1.0, step_size=2, mode="exp_range", gamma=1.01)
    assert got[0] == 0.1 and got[2] == 0.1 and got[3] == 0.1 and got[4] == np.inf
    with np.errstate(all="ignore"):
        want = _old(s[:3], 0.1, 1.0, 2.0, "exp_range", 1.01)
    np.testing.assert_array_equal(got[:3], want)
    # max_lr == base_lr: constant, whatever gamma**step does
    assert (
        cyclical_lr(1e6, base_lr=0.5, max_lr=0.5, step_size=2, mode="exp_range", gamma=1.5) == 0.5
    )


def test_schedule_object_iterates_past_the_old_overflow():
    clr = CyclicalLR(base_lr=0.0, max_lr=1.0, step_size=1, mode="triangular2")
    assert clr(2 * 5000 + 1) == 0.0
    assert clr(3) == 0.5
