"""qgemm.scoring against the plain-numpy references of tests/reference_uncertainty.py.

Floats: the kernels and the references both sum float64 logs, in different orders; agreement
is required to ``rtol = 1e-10`` (plus ``1e-12`` absolute).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qgemm import scoring
from tests.reference_uncertainty import (
    ref_ece,
    ref_exact_dkl,
    ref_joint_nll,
    ref_polyadic_counts_nll,
    ref_polyadic_nll,
)

RTOL, ATOL = 1e-10, 1e-12


def _probs(rng, J, N, C, dtype=np.float64, floor=0.0):
    a = rng.random((J, N, C)) + floor
    return (a / a.sum(axis=2, keepdims=True)).astype(dtype)


@st.composite
def cases(draw):
    J = draw(st.integers(1, 5))
    N = draw(st.integers(1, 23))
    C = draw(st.integers(1, 4))
    tau = draw(st.integers(1, N))
    seed = draw(st.integers(0, 2**16))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(seed)
    p = _probs(rng, J, N, C, dtype)
    y = rng.integers(0, C, N)
    return p, y, tau, seed


@given(cases())
def test_joint_nll_matches_reference(case):
    p, y, tau, _ = case
    got = scoring.joint_nll(p, y, tau)
    assert np.isclose(got, ref_joint_nll(p, y, tau), rtol=RTOL, atol=ATOL)


@given(cases(), st.integers(1, 30))
def test_polyadic_matches_reference(case, tau_draws):
    p, y, kappa, seed = case
    counts = scoring.polyadic_counts(p.shape[1] // kappa, kappa, tau_draws, seed)
    assert counts.shape == (p.shape[1] // kappa, kappa)
    assert (counts.sum(axis=1) == tau_draws).all()
    got = scoring.polyadic_nll(p, y, tau_draws, kappa=kappa, seed=seed)
    assert np.isclose(got, ref_polyadic_nll(p, y, counts), rtol=RTOL, atol=ATOL)


@given(cases(), st.integers(1, 12))
def test_marginal_scores_match_reference(case, n_bins):
    p, y, _, _ = case
    assert np.isclose(scoring.marginal_nll(p, y), ref_joint_nll(p, y, 1), rtol=RTOL)
    assert np.isclose(scoring.ece(p, y, n_bins=n_bins), ref_ece(p, y, n_bins), atol=1e-12)
    m = p.astype(np.float64).mean(axis=0)
    assert scoring.accuracy(p, y) == float((m.argmax(axis=1) == y).mean())
    conf, acc, count = scoring.reliability(p, y, n_bins=n_bins)
    assert count.sum() == p.shape[1] and conf.shape == acc.shape == (n_bins,)


def test_hand_made_cases():
    p = np.array([[[0.9, 0.1], [0.2, 0.8]], [[0.5, 0.5], [0.6, 0.4]]])
    y = np.array([0, 1])
    assert np.isclose(scoring.marginal_nll(p, y), -(np.log(0.7) + np.log(0.6)) / 2)
    assert np.isclose(scoring.joint_nll(p, y, 2), -np.log((0.9 * 0.8 + 0.5 * 0.4) / 2))
    assert scoring.joint_nll(p, y, 1) == scoring.marginal_nll(p, y)
    # one sample: ECE of confidences 0.9 (hit) and 0.8 (hit) in 10 bins = (0.1 + 0.2) / 2
    assert np.isclose(scoring.ece(p[0], y), 0.15)
    assert scoring.accuracy(p[1], y) == 0.5


def test_identical_samples_joint_is_sum_of_marginals():
    rng = np.random.default_rng(1)
    one = _probs(rng, 1, 40, 3)
    y = rng.integers(0, 3, 40)
    same = np.repeat(one, 6, axis=0)
    marg = scoring.marginal_nll(same, y)
    for tau in (1, 2, 5, 8, 40):
        assert np.isclose(scoring.joint_nll(same, y, tau), tau * marg, rtol=1e-12)


def test_log_space_stability():
    N, tau = 200, 100
    p = np.full((3, N, 2), 0.5)
    p[:, :, 0] = 1e-30
    p[:, :, 1] = 1.0 - 1e-30
    y = np.zeros(N, np.int64)
    # prod of 100 probabilities 1e-30 underflows to 0 in float64; the log space does not
    assert np.isclose(scoring.joint_nll(p, y, tau), -tau * np.log(1e-30), rtol=1e-12)
    p[1] = 0.5
    want = -(np.log(1 / 3) + tau * np.log(0.5))  # the 0.5-sample dominates the mixture
    assert np.isclose(scoring.joint_nll(p, y, tau), want, rtol=1e-12)
    assert np.isclose(scoring.polyadic_nll(p, y, 1000), -(np.log(1 / 3) + 1000 * np.log(0.5)))


def test_zero_probability_gives_inf():
    p = np.array([[[1.0, 0.0], [0.0, 1.0]]])
    assert scoring.joint_nll(p, [1, 1], 2) == np.inf
    assert scoring.joint_nll(p, [0, 1], 2) == 0.0


def test_dkl_truth_is_zero_and_estimator_is_unbiased():
    rng = np.random.default_rng(3)
    q = rng.uniform(0.05, 0.95, 4)
    truth = np.stack([1 - q, q], axis=1)
    model = _probs(rng, 3, 4, 2)
    y = (rng.random(4) < q).astype(int)
    assert scoring.dkl(truth, truth, y, 2) == 0.0
    for tau in (1, 2, 4):
        # E over labels drawn from the truth of the estimator == exact enumerated KL
        expect = 0.0
        for ys in itertools.product((0, 1), repeat=4):
            ys = np.array(ys)
            w = np.prod(truth[np.arange(4), ys])
            expect += w * scoring.dkl(truth, model, ys, tau)
        assert np.isclose(expect, ref_exact_dkl(truth, model, tau), rtol=1e-10)


def test_no_materialised_copies():
    # 1M-element input scored at tau=1000 in one pass: nothing close to J * N * C extra
    import tracemalloc

    rng = np.random.default_rng(0)
    p = _probs(rng, 4, 50_000, 5)
    y = rng.integers(0, 5, 50_000)
    scoring.joint_nll(p[:, :100], y[:100], 10)  # compile outside the trace
    tracemalloc.start()
    scoring.joint_nll(p, y, 1000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < p.nbytes / 4


def test_dyadic_dkl_draws_fresh_labels():
    rng = np.random.default_rng(4)
    N = 40
    q = rng.uniform(0.05, 0.95, N)
    truth = np.stack([1 - q, q], axis=1)
    model = _probs(rng, 5, N, 2)
    c3 = scoring.polyadic_label_counts(truth, N // 2, 2, 50, seed=7)
    assert c3.shape == (N // 2, 2, 2) and (c3.sum(axis=(1, 2)) == 50).all()
    assert (c3.sum(axis=2) == scoring.polyadic_counts(N // 2, 2, 50, seed=7)).all()
    want = ref_polyadic_counts_nll(model, c3) - ref_polyadic_counts_nll(truth, c3)
    assert np.isclose(scoring.dkl(truth, model, tau=50, kappa=2, seed=7), want, rtol=1e-10)
    assert scoring.dkl(truth, truth, tau=50, kappa=2, seed=7) == 0.0
    # averaged over draws, the estimate of a wrong model is positive (a KL divergence)
    est = [scoring.dkl(truth, model, tau=10, kappa=2, seed=s) for s in range(30)]
    assert np.mean(est) > 0
    with pytest.raises(ValueError, match="labels: the dyadic d_KL draws a fresh label"):
        scoring.dkl(truth, model, np.zeros(N, int), 10, kappa=2)
    # labels drawn inside dkl (seeded) when not given
    assert scoring.dkl(truth, model, tau=4, seed=1) == scoring.dkl(truth, model, tau=4, seed=1)


@pytest.mark.parametrize(
    "probs, labels, tau, exc, match",
    [
        (np.full((2, 3, 2), 0.5), [0, 2, 1], 1, ValueError, r"labels: expected class ids in"),
        (np.full((2, 3, 2), 0.5), [0, -1, 1], 1, ValueError, r"got -1 at position 1"),
        (np.full((2, 3, 2), 0.6), [0, 1, 1], 1, ValueError, r"summing to 1"),
        (np.full((2, 3, 2), np.nan), [0, 1, 1], 1, ValueError, r"in \[0, 1\]"),
        (np.full((2, 3, 2), 0.5), [0, 1, 1], 4, ValueError, r"tau: expected at most .* N = 3"),
        (np.full((2, 3, 2), 0.5), [0, 1, 1], 0, ValueError, r"tau: expected an int >= 1"),
        (np.full((2, 3, 2), 0.5), [0, 1], 1, ValueError, r"expected 3 labels"),
        (np.full((2, 3, 2), 0.5), [0.0, 1.0, 1.0], 1, TypeError, r"integer array"),
        (np.ones((2, 3, 2), np.int64), [0, 1, 1], 1, TypeError, r"dtype float32 or float64"),
        (np.full((3, 2), 0.5)[None, None], [0, 1, 1], 1, ValueError, r"2-D or 3-D"),
    ],
)
def test_bad_inputs(probs, labels, tau, exc, match):
    with pytest.raises(exc, match=match):
        scoring.joint_nll(probs, labels, tau)


def test_bad_inputs_other_scores():
    p = np.full((2, 3, 2), 0.5)
    with pytest.raises(ValueError, match="kappa: expected at most"):
        scoring.polyadic_nll(p, [0, 1, 1], 5, kappa=4)
    with pytest.raises(ValueError, match="true_probs: expected 3 inputs"):
        scoring.dkl(np.full((4, 2), 0.5), p, [0, 1, 1])
    with pytest.raises(ValueError, match="at least one input"):
        scoring.ece(np.zeros((1, 0, 2)), np.zeros(0, int))
    with pytest.raises(ValueError, match="n_bins: expected an int >= 1"):
        scoring.ece(p, [0, 1, 1], n_bins=0)
