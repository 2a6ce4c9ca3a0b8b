"""Scores of joint predictions: the d_KL^tau family (Osband et al., "Evaluating high-order
predictive distributions in deep learning" / "The neural testbed").

Every score takes **sample predictions** of an approximate posterior -- ``sample_probs``
``[J, N, C]``: ``J`` samples (Laplace weight samples, ensemble members, MC-dropout passes), ``N``
inputs, ``C`` class probabilities -- and integer ``labels [N]``.  A 2-D ``[N, C]`` array is
one sample (a point-estimate model).  Binary click data are ``C = 2`` (``[1 - p, p]``).

* :func:`joint_nll` -- the data in consecutive batches of ``tau`` inputs; per batch
  ``-log mean_j prod_t p_j(y_t | x_t)``; the mean over batches.  ``tau = 1`` is
  :func:`marginal_nll`.  As google-deepmind/enn's ``make_nll_joint_calculator``, the last
  ``N mod tau`` inputs are left out.
* :func:`polyadic_nll` -- the dyadic (``kappa = 2``) estimator of enn's
  ``make_nll_polyadic_calculator``: consecutive batches of ``kappa`` anchor inputs, ``tau``
  draws with replacement from them, joint NLL of the drawn sequence.
* :func:`marginal_nll`, :func:`accuracy`, :func:`ece`, :func:`reliability` -- marginal scores
  of the sample-mean prediction.
* :func:`dkl` -- ``d_KL^tau`` against a known true distribution (synthetic data).

The joint scores run in Numba kernels (:mod:`qgemm._kernels.scoring`) in log space, over index
ranges of the input (nothing of size ``[J, N/tau, tau, C]`` is built).

Examples
--------
>>> import numpy as np
>>> from qgemm import scoring
>>> p = np.array([[[0.9, 0.1], [0.2, 0.8]], [[0.5, 0.5], [0.6, 0.4]]])   # J=2, N=2, C=2
>>> y = np.array([0, 1])
>>> round(scoring.marginal_nll(p, y), 4), round(scoring.joint_nll(p, y, tau=2), 4)
(0.4338, 0.7765)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _config
from ._kernels.scoring import check_probs_kernel, joint_ll_kernel, polyadic_ll_kernel
from ._validate import as_array, check_int

__all__ = [
    "joint_nll",
    "polyadic_nll",
    "marginal_nll",
    "accuracy",
    "ece",
    "reliability",
    "dkl",
    "polyadic_counts",
    "polyadic_label_counts",
]

PROB_ATOL = {"float32": 1e-4, "float64": 1e-6}
"""How far a probability row may sum from 1 (float32 rounding of a softmax is ~1e-7 per
class; 1e-4 leaves room for thousands of classes)."""

_FLOATS = (np.float32, np.float64)


def _check_probs(name: str, probs: Any) -> np.ndarray:
    p = as_array(name, probs, dtypes=_FLOATS, ndim=(2, 3))
    if p.ndim == 2:
        p = p[None]
    if p.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one sample, got shape {p.shape}")
    if p.shape[2] == 0:
        raise ValueError(f"{name}: expected at least one class, got shape {p.shape}")
    p = np.ascontiguousarray(p)
    if p.size:
        code, j, i, v = check_probs_kernel((p.dtype.name,))(p, PROB_ATOL[p.dtype.name])
        if code == 1.0:
            raise ValueError(
                f"{name}: expected probabilities in [0, 1], got {v} at sample {int(j)}, "
                f"input {int(i)}"
            )
        if code == 2.0:
            raise ValueError(
                f"{name}: expected probabilities summing to 1 over the last axis, got sum {v} "
                f"at sample {int(j)}, input {int(i)} (tolerance {PROB_ATOL[p.dtype.name]})"
            )
    return p


def _check_labels(labels: Any, n: int, n_classes: int) -> np.ndarray:
    y = as_array("labels", labels, ndim=(1, 2))
    if y.ndim == 2:
        if y.shape[1] != 1:
            raise ValueError(f"labels: expected shape ({n},) or ({n}, 1), got {y.shape}")
        y = y[:, 0]
    if y.dtype.kind == "b":
        y = y.astype(np.int64)
    if y.dtype.kind not in "iu":
        raise TypeError(f"labels: expected an integer array, got dtype {y.dtype.name}")
    if y.shape[0] != n:
        raise ValueError(f"labels: expected {n} labels (one per input), got {y.shape[0]}")
    if n:
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= n_classes:
            bad = int(np.flatnonzero((y < 0) | (y >= n_classes))[0])
            raise ValueError(
                f"labels: expected class ids in [0, {n_classes}), got {int(y[bad])} at "
                f"position {bad}"
            )
    return np.ascontiguousarray(y, dtype=np.int64)


def _check_tau(tau: Any, n: int, name: str = "tau") -> int:
    tau = check_int(name, tau, minimum=1)
    if tau > n:
        raise ValueError(f"{name}: expected at most the number of inputs N = {n}, got {tau}")
    return tau


def _inputs(sample_probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p = _check_probs("sample_probs", sample_probs)
    y = _check_labels(labels, p.shape[1], p.shape[2])
    return p, y


def _joint_ll(p: np.ndarray, y: np.ndarray, tau: int) -> np.ndarray:
    nb = p.shape[1] // tau
    out = np.empty(nb, np.float64)
    if nb:
        _config.sync_threads()
        joint_ll_kernel((p.dtype.name,))(p, y, tau, out)
    return out


def joint_nll(sample_probs: Any, labels: Any, tau: int = 1) -> float:
    """Joint negative log-likelihood over consecutive batches of ``tau`` inputs.

    ``mean_b -log( mean_j prod_{t < tau} p_j(y_{b tau + t} | x_{b tau + t}) )`` in nats per
    batch (not per input: divide by ``tau`` for a per-input value).  The last ``N mod tau``
    inputs are left out (enn's convention).

    Parameters
    ----------
    sample_probs : float32/float64 ``[J, N, C]`` (or ``[N, C]``, one sample)
        Probabilities in ``[0, 1]`` summing to 1 over ``C``.
    labels : int ``[N]`` (or ``[N, 1]``), class ids in ``[0, C)``
    tau : int, ``1 <= tau <= N``

    Raises
    ------
    ValueError
        Probabilities outside ``[0, 1]`` or not summing to 1, labels out of range, ``tau``
        larger than ``N``.

    Examples
    --------
    >>> import numpy as np
    >>> p = np.full((3, 4, 2), 0.5)
    >>> bool(np.isclose(joint_nll(p, [0, 1, 1, 0], tau=2), 2 * np.log(2)))
    True
    """
    p, y = _inputs(sample_probs, labels)
    tau = _check_tau(tau, p.shape[1])
    return float(-_joint_ll(p, y, tau).mean())


def marginal_nll(sample_probs: Any, labels: Any) -> float:
    """Marginal NLL ``mean_i -log mean_j p_j(y_i | x_i)`` (:func:`joint_nll` at ``tau = 1``)."""
    p, y = _inputs(sample_probs, labels)
    if p.shape[1] == 0:
        raise ValueError("sample_probs: expected at least one input, got N = 0")
    return float(-_joint_ll(p, y, 1).mean())


def polyadic_counts(n_batches: int, kappa: int, tau: int, seed: Any = 0) -> np.ndarray:
    """The draws of :func:`polyadic_nll`: int64 ``[n_batches, kappa]``, how many of the
    ``tau`` draws with replacement picked each anchor of each batch --
    ``np.random.default_rng(seed).multinomial(tau, [1 / kappa] * kappa, size=n_batches)``
    (only the counts enter the joint likelihood, so this has the distribution of enn's
    ``tau`` uniform draws)."""
    rng = np.random.default_rng(seed)
    return np.ascontiguousarray(
        rng.multinomial(tau, np.full(kappa, 1.0 / kappa), size=n_batches), dtype=np.int64
    )


def polyadic_nll(
    sample_probs: Any, labels: Any, tau: int, *, kappa: int = 2, seed: Any = 0
) -> float:
    """Polyadic joint NLL (``kappa = 2``: dyadic), enn's ``make_nll_polyadic_calculator``.

    The inputs are split into consecutive batches of ``kappa`` anchors (the last
    ``N mod kappa`` left out); each batch draws ``tau`` of its anchors with replacement
    (:func:`polyadic_counts` with ``seed``; the same draws for every sample ``j``) and scores
    ``-log mean_j prod_draws p_j(y | x)``; the result is the mean over batches.  With few
    anchors repeated many times, large ``tau`` separates models that know what they do not
    know from ones that do not, without test sets of ``tau`` distinct inputs per batch.

    Unlike enn (which seeds its draws from the labels), the draws depend only on ``seed``, so
    two models scored with one seed see the same draws.

    Examples
    --------
    >>> import numpy as np
    >>> p = np.full((2, 6, 2), 0.5)
    >>> bool(np.isclose(polyadic_nll(p, np.zeros(6, int), tau=10), 10 * np.log(2)))
    True
    """
    p, y = _inputs(sample_probs, labels)
    n = p.shape[1]
    kappa = _check_tau(kappa, n, "kappa")
    tau = check_int("tau", tau, minimum=1)
    nb = n // kappa
    counts = polyadic_counts(nb, kappa, tau, seed)
    full = np.zeros((nb, kappa, p.shape[2]), np.int64)
    anchors = np.arange(nb * kappa).reshape(nb, kappa)
    full[np.arange(nb)[:, None], np.arange(kappa)[None, :], y[anchors]] = counts
    return _polyadic(p, full)


def _polyadic(p: np.ndarray, counts3: np.ndarray) -> float:
    out = np.empty(counts3.shape[0], np.float64)
    _config.sync_threads()
    polyadic_ll_kernel((p.dtype.name,))(p, counts3, out)
    return float(-out.mean())


def polyadic_label_counts(
    true_probs: Any, n_batches: int, kappa: int, tau: int, seed: Any = 0
) -> np.ndarray:
    """The draws of the polyadic :func:`dkl`: int64 ``[n_batches, kappa, C]``, how many of
    each batch's ``tau`` draws picked anchor ``k`` and got label ``c`` -- the anchor counts of
    :func:`polyadic_counts` (``seed``), then for each anchor its labels drawn afresh from the
    truth (``Generator.multinomial(count, true_probs[anchor])`` with the same generator, after
    the anchor counts).  ``true_probs`` ``[N, C]`` float64."""
    t = np.asarray(true_probs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(tau, np.full(kappa, 1.0 / kappa), size=n_batches)
    q = t[: n_batches * kappa].reshape(n_batches, kappa, t.shape[1])
    return np.ascontiguousarray(rng.multinomial(counts, q), dtype=np.int64)


def _mean_probs(p: np.ndarray) -> np.ndarray:
    return p.mean(axis=0, dtype=np.float64)


def accuracy(sample_probs: Any, labels: Any) -> float:
    """Fraction of inputs whose most probable class (of the sample mean) is the label."""
    p, y = _inputs(sample_probs, labels)
    if p.shape[1] == 0:
        raise ValueError("sample_probs: expected at least one input, got N = 0")
    return float((_mean_probs(p).argmax(axis=1) == y).mean())


def reliability(
    sample_probs: Any, labels: Any, *, n_bins: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reliability-diagram data of the top-label confidence of the sample mean.

    Returns ``(confidence, accuracy, count)``, each ``[n_bins]``: mean confidence and accuracy
    of the inputs whose confidence falls in ``[k / n_bins, (k + 1) / n_bins)`` (the last bin
    closed), and their number (NaN confidence/accuracy in an empty bin).
    """
    p, y = _inputs(sample_probs, labels)
    n_bins = check_int("n_bins", n_bins, minimum=1)
    m = _mean_probs(p)
    conf = m.max(axis=1) if m.shape[0] else np.zeros(0)
    hit = (m.argmax(axis=1) == y).astype(np.float64) if m.shape[0] else np.zeros(0)
    k = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(k, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.bincount(k, weights=conf, minlength=n_bins) / count
        a = np.bincount(k, weights=hit, minlength=n_bins) / count
    return c, a, count


def ece(sample_probs: Any, labels: Any, *, n_bins: int = 10) -> float:
    """Expected calibration error: ``sum_k (n_k / N) |accuracy_k - confidence_k|`` over
    ``n_bins`` equal-width bins of the top-label confidence (:func:`reliability`)."""
    c, a, count = reliability(sample_probs, labels, n_bins=n_bins)
    n = int(count.sum())
    if n == 0:
        raise ValueError("sample_probs: expected at least one input, got N = 0")
    nz = count > 0
    return float(np.sum(count[nz] * np.abs(a[nz] - c[nz])) / n)


def dkl(
    true_probs: Any,
    sample_probs: Any,
    labels: Any = None,
    tau: int = 1,
    *,
    kappa: int | None = None,
    seed: Any = 0,
) -> float:
    """``d_KL^tau``: the joint KL divergence from the true distribution to the model's, per
    batch of ``tau`` inputs, estimated with labels drawn from the truth.

    ``d_KL^tau = E[log P_true(y_1..tau | x) - log P_model(y_1..tau | x)]``:

    * ``kappa=None``: ``joint_nll(sample_probs) - joint_nll(true_probs)`` on consecutive batches
      of ``labels`` (which must be draws from ``true_probs``; None: drawn here with ``seed``).
      Unbiased; ``0`` for the true model.
    * ``kappa=2`` (dyadic): batches of ``kappa`` anchors, ``tau`` draws of anchors with
      replacement, and for every draw a *fresh* label from the truth
      (:func:`polyadic_label_counts`) -- the neural testbed's dyadic sampling.  Repeating one
      observed label per anchor instead (as :func:`polyadic_nll` must on real data) is not a
      draw from the true joint and can make the estimate negative, so ``labels`` must be None.

    Parameters
    ----------
    true_probs : float ``[N, C]``, the true class probabilities of every input
    sample_probs, tau
        As :func:`joint_nll`.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> q = rng.uniform(0.1, 0.9, 1000); truth = np.stack([1 - q, q], axis=1)
    >>> y = (rng.random(1000) < q).astype(int)
    >>> dkl(truth, truth, y, tau=10), dkl(truth, truth, tau=100, kappa=2)
    (0.0, 0.0)
    """
    t = _check_probs("true_probs", true_probs)
    p = _check_probs("sample_probs", sample_probs)
    if t.shape[0] != 1:
        raise ValueError(f"true_probs: expected one distribution [N, C], got shape {t.shape}")
    if t.shape[1:] != p.shape[1:]:
        raise ValueError(
            f"true_probs: expected {p.shape[1]} inputs x {p.shape[2]} classes (as "
            f"sample_probs), got shape {t.shape[1:]}"
        )
    if kappa is None:
        if labels is None:
            u = np.random.default_rng(seed).random((t.shape[1],))
            cdf = np.cumsum(t[0].astype(np.float64), axis=1)
            labels = np.minimum((u[:, None] >= cdf).sum(axis=1), t.shape[2] - 1)
        return joint_nll(p, labels, tau) - joint_nll(t, labels, tau)
    if labels is not None:
        raise ValueError(
            "labels: the dyadic d_KL draws a fresh label from true_probs for every repeat; "
            "pass labels=None"
        )
    n = p.shape[1]
    kappa = _check_tau(kappa, n, "kappa")
    tau = check_int("tau", tau, minimum=1)
    c3 = polyadic_label_counts(t[0], n // kappa, kappa, tau, seed)
    return _polyadic(p, c3) - _polyadic(t, c3)
