"""Kernels of the DLRM model (:mod:`qgemm.models`): the fused dot-product feature interaction
and a fast, counter-based random table initialiser.

``interaction_kernel((self_interaction, fastmath, parallel))``
    ``kern(x, emb, out)``: ``x`` float32 ``[B, d]`` (bottom-MLP output), ``emb`` float32
    ``[T, B, d]`` (the pooled embeddings, table-major so every table's bag output is one
    contiguous block), ``out`` float32 ``[B, d + P]``.  Writes ``out[b, :d] = x[b]`` followed by
    the ``P`` pairwise dot products of the ``n = T + 1`` feature vectors ``f_0 = x[b]``,
    ``f_{k+1} = emb[k, b]`` in the order of facebookresearch/dlrm (``for i in range(n): for j in
    range(i + self_interaction): dot(f_i, f_j)``, i.e. the strictly lower triangle of
    ``F F^T`` row by row, plus the diagonal when ``self_interaction``).  This is DLRM's
    ``cat -> bmm -> tril gather -> cat`` in one pass, parallel over the batch (serial below
    :data:`qgemm._tuning.INTERACTION_PARALLEL_MIN_MACS`).  Float32 accumulation
    (reassociated under qgemm's fast-math flags so LLVM vectorises the dot).

The bags of a DLRM's tables are checked by the embedding bags' own validator
(:func:`qgemm.embedding.check_bags`).

``fill_uniform_kernel(())``
    ``kern(out, seed, lo, width)``: fills float32 ``out[rows, cols]`` with
    ``lo + width * u``, ``u`` uniform in ``[0, 1)`` from SplitMix64 of the element's flat
    position plus a seed-derived offset.  Counter-based, so the result does not depend on the
    thread count; parallel over rows.  Generating a 1M x 64 table takes ~0.1 s on two cores
    against ~1 s for numpy's ``Generator.random``.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange, types

from .._cache import kernel_family
from .._tuning import INTERACTION_PARALLEL_MIN_MACS as PARALLEL_MIN_MACS

__all__ = [
    "PARALLEL_MIN_MACS",
    "interaction_kernel",
    "fill_uniform_kernel",
    "splitmix64",
]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


# No eager signature: compiled only when inlined into a kernel that calls it (never at import).
@numba.njit(nogil=True, inline="always")
def splitmix64(z):  # pragma: no cover - compiled
    """One SplitMix64 output for uint64 counter ``z`` (Steele, Lea & Flood 2014)."""
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@kernel_family("dlrm_interaction")
def interaction_kernel(key):
    """Fused DLRM dot interaction; key ``(self_interaction: bool, fastmath: bool | frozenset,
    parallel: bool)``."""
    self_interaction, fastmath, parallel = key
    if not isinstance(fastmath, bool):
        fastmath = set(fastmath)  # numba wants a bool, dict or set
    extra = 1 if self_interaction else 0
    sig = types.void(types.float32[:, ::1], types.float32[:, :, ::1], types.float32[:, ::1])
    # Numba's disk cache keys an entry on the bytecode and the closure's values, not on the
    # njit options: the body reads OPTIONS so each (parallel, fastmath) twin has its own entry
    # (otherwise the first one compiled would serve them all).
    OPTIONS = repr((bool(parallel), sorted(fastmath) if isinstance(fastmath, set) else fastmath))

    @numba.njit(sig, parallel=parallel, cache=True, nogil=True, fastmath=fastmath)
    def kern(x, emb, out):  # pragma: no cover - compiled
        if len(OPTIONS) == 0:  # never true: ties the cache entry to the options
            return
        batch, d = x.shape
        n = emb.shape[0] + 1
        for b in prange(batch):
            for t in range(d):
                out[b, t] = x[b, t]
            p = d
            for i in range(n):
                for j in range(i + extra):
                    acc = np.float32(0.0)
                    if i == 0:  # only with self_interaction: <x, x>
                        for t in range(d):
                            acc += x[b, t] * x[b, t]
                    elif j == 0:
                        for t in range(d):
                            acc += emb[i - 1, b, t] * x[b, t]
                    else:
                        for t in range(d):
                            acc += emb[i - 1, b, t] * emb[j - 1, b, t]
                    out[b, p] = acc
                    p += 1

    return kern


@kernel_family("dlrm_fill_uniform")
def fill_uniform_kernel(key):
    """Counter-based uniform float32 fill; key ``()``."""
    del key
    sig = types.void(types.float32[:, ::1], types.uint64, types.float32, types.float32)

    @numba.njit(sig, parallel=True, cache=True, nogil=True)
    def kern(out, seed, lo, width):  # pragma: no cover - compiled
        rows, cols = out.shape
        base = splitmix64(seed)
        scale = np.float32(1.0 / 16777216.0)  # 2**-24
        for i in prange(rows):
            ctr = base + np.uint64(i) * np.uint64(cols)
            for j in range(cols):
                z = splitmix64(ctr + np.uint64(j))
                u = np.float32(z >> np.uint64(40)) * scale  # 24 random bits -> [0, 1)
                out[i, j] = lo + width * u

    return kern
