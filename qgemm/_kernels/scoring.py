"""Kernels of :mod:`qgemm.scoring`: joint log-likelihoods over ``[J, N, C]`` sample probabilities.

Every kernel reads the sample probabilities ``probs[j, i, c]`` (``J`` posterior samples, ``N``
inputs, ``C`` classes; float32 or float64, C-contiguous) and the integer labels in place: the
batches of consecutive inputs are index ranges, never ``[J, N / tau, tau, C]`` copies.  All
arithmetic is float64 in log space.

``joint_ll_kernel((dtype,))``
    ``kern(probs, labels, tau, out)``: for batch ``b`` (inputs ``b*tau .. b*tau + tau - 1``)
    ``out[b] = log mean_j exp(sum_t log probs[j, b*tau + t, labels[b*tau + t]])`` -- the
    log-mean-exp over samples is an online logsumexp (running maximum), so probabilities of
    1e-30 (log -69) over hundreds of inputs neither underflow nor lose precision.  A sample
    with a zero probability contributes ``-inf`` to the sum; ``out[b]`` is ``-inf`` only when
    every sample gives the batch probability zero.  Parallel over batches.

``polyadic_ll_kernel((dtype,))``
    ``kern(probs, counts, out)``: the polyadic (kappa-adic) variant.  Batch ``b`` has
    ``kappa = counts.shape[1]`` anchor inputs ``b*kappa + k``; ``counts[b, k, c]`` is how many
    of the ``tau`` draws (with replacement) picked anchor ``k`` *with label* ``c`` (one label
    per anchor when scoring observed labels; fresh labels per draw for d_KL against a known
    truth), so ``out[b] = log mean_j exp(sum_{k,c} counts[b, k, c] * log probs[j, b*kappa + k,
    c])`` -- the sum over the ``tau`` draws without materialising them.

``check_probs_kernel((dtype,))``
    ``kern(probs, atol) -> (code, j, i, value)``: the first element outside ``[0, 1]`` (or NaN;
    code 1) or the first row whose sum differs from 1 by more than ``atol`` (code 2, value =
    the sum); code 0 when all is well.  One pass, no temporaries.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange, types

from .._cache import kernel_family

__all__ = ["joint_ll_kernel", "polyadic_ll_kernel", "check_probs_kernel"]

_NB = {"float32": types.float32, "float64": types.float64}


@kernel_family("scoring_joint_ll")
def joint_ll_kernel(key):
    """Joint log-likelihood per batch of ``tau`` consecutive inputs; key ``(dtype,)``."""
    (dt,) = key
    sig = types.void(_NB[dt][:, :, ::1], types.int64[::1], types.int64, types.float64[::1])

    @numba.njit(sig, parallel=True, cache=True, nogil=True)
    def kern(probs, labels, tau, out):  # pragma: no cover - compiled
        n_samples = probs.shape[0]
        log_j = math.log(n_samples)
        for b in prange(out.shape[0]):
            lo = b * tau
            mx = -np.inf
            tot = 0.0
            for j in range(n_samples):
                s = 0.0
                for t in range(tau):
                    i = lo + t
                    s += math.log(np.float64(probs[j, i, labels[i]]))
                if s > mx:
                    tot = tot * math.exp(mx - s) + 1.0
                    mx = s
                elif s > -np.inf:
                    tot += math.exp(s - mx)
            if mx == -np.inf:
                out[b] = -np.inf
            else:
                out[b] = mx + math.log(tot) - log_j

    return kern


@kernel_family("scoring_polyadic_ll")
def polyadic_ll_kernel(key):
    """Polyadic joint log-likelihood per batch of ``kappa`` anchors; key ``(dtype,)``."""
    (dt,) = key
    sig = types.void(_NB[dt][:, :, ::1], types.int64[:, :, ::1], types.float64[::1])

    @numba.njit(sig, parallel=True, cache=True, nogil=True)
    def kern(probs, counts, out):  # pragma: no cover - compiled
        n_samples = probs.shape[0]
        kappa = counts.shape[1]
        n_classes = counts.shape[2]
        log_j = math.log(n_samples)
        for b in prange(out.shape[0]):
            lo = b * kappa
            mx = -np.inf
            tot = 0.0
            for j in range(n_samples):
                s = 0.0
                for k in range(kappa):
                    for c in range(n_classes):
                        n = counts[b, k, c]
                        if n:
                            s += n * math.log(np.float64(probs[j, lo + k, c]))
                if s > mx:
                    tot = tot * math.exp(mx - s) + 1.0
                    mx = s
                elif s > -np.inf:
                    tot += math.exp(s - mx)
            if mx == -np.inf:
                out[b] = -np.inf
            else:
                out[b] = mx + math.log(tot) - log_j

    return kern


@kernel_family("scoring_check_probs")
def check_probs_kernel(key):
    """Range and normalisation check of ``[J, N, C]`` probabilities; key ``(dtype,)``."""
    (dt,) = key
    sig = types.UniTuple(types.float64, 4)(_NB[dt][:, :, ::1], types.float64)

    @numba.njit(sig, cache=True, nogil=True)
    def kern(probs, atol):  # pragma: no cover - compiled
        n_samples, n, n_classes = probs.shape
        for j in range(n_samples):
            for i in range(n):
                s = 0.0
                for c in range(n_classes):
                    v = np.float64(probs[j, i, c])
                    if not (v >= 0.0 and v <= 1.0):  # also catches NaN
                        return 1.0, np.float64(j), np.float64(i), v
                    s += v
                if abs(s - 1.0) > atol:
                    return 2.0, np.float64(j), np.float64(i), s
        return 0.0, 0.0, 0.0, 0.0

    return kern
