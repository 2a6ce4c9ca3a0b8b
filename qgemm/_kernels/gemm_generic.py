"""The generic tier of the ``gemm`` kernel family: numpy, so a first call compiles nothing.

:func:`generic_gemm_kernel` returns a plain Python callable with the call signature of the
specialised kernels of :func:`.gemm.gemm_kernel` -- ``(a, M, K, KG, b, b16, N, NP, pairmax,
*stage, nchunks, nthreads, out)`` -- the same result codes (-1 ok, ``-2 - j`` for a non-finite
float bias at column ``j``, ``i * K + k`` for the first non-finite activation of the dynamic
kind; ``out`` untouched on an error code) and bit-identical results:

* **int32 accumulation.** The panel layout ``b`` is unpacked to a dense ``[N, 4 * KG]`` weight
  by a reshape/transpose; the product is one float64 BLAS matmul (uint8 x int8 products and
  their sums are exact integers in float64 for any ``K < 2**37``), cast to int64 and wrapped to
  int32 as the kernels' int32 arithmetic wraps.
* **saturating variants** (``avx2s``/``portables``: FBGEMM's AVX2 ``vpmaddubsw``).  Each int16
  pair ``a[4g] w[4g] + a[4g+1] w[4g+1]`` (and ``4g+2, 4g+3``) is clamped to int16 before it is
  summed.  Only pairs with ``amax * (|w0| + |w1|) > 32767`` can clamp; the exact product is
  corrected by ``clamp(p) - p`` over those pairs alone, in row chunks (bounded memory).
* **zero points and the output stage**: the accumulator starts at ``int_bias - x_zp * colsum``
  (the kernels' ``init``), the ``rowsum * w_zp`` term is int64, and the float32 operations of
  :func:`.output_stage.lower` / :func:`~.output_stage.ep_float` /
  :func:`~.output_stage.ep_requant` run in the same order (numpy float32 ufuncs, no
  contraction; ``np.rint`` rounds half to even; ``max``/``min`` with Python's tie rules).
* **dynamic kind**: the min/max, :func:`.quantize_generic.choose_qparams_np` (the numpy twin
  of ``choose_qparams_scalar``) and the row quantization ``clamp(rint(x / scale) + zp)``.

None of this imports Numba (the GEMM kernels use no fastmath, so numpy's float32 ops give the
same bits).  It specialises on ``(kind, saturating)`` only and runs single-threaded; the
specialised kernel compiles in the background meanwhile (see :mod:`qgemm._cache`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from .._tuning import GENERIC_GEMM_CHUNK_ELEMS
from .quantize_generic import choose_qparams_np

__all__ = ["generic_gemm_kernel", "generic_key", "KINDS", "N_STAGE"]

KINDS = ("raw", "float", "requant", "dynamic")
"""The ``gemm`` family's output kinds (:data:`.gemm.KINDS`; a test checks they agree)."""
N_STAGE = 13
"""Number of :class:`~.output_stage.OutputStage` fields (a test and the builder check it)."""
_SATURATING = ("avx2s", "portables")
_INT16_MAX = 32767
_CHUNK_ELEMS = GENERIC_GEMM_CHUNK_ELEMS


def generic_key(key: tuple) -> tuple[str, bool]:
    """``(kind, saturating)`` of a specialised key ``(kind, fast, exact, MR, NV, NR, parallel)``."""
    kind, fast, exact = key[0], key[1], key[2]
    return (kind, fast in _SATURATING and exact in _SATURATING)


def _dense_weight(b: np.ndarray, N: int, KG: int, NP: int) -> np.ndarray:
    """The int8 ``[N, 4 * KG]`` weight held in panels ``b[p, g, c, t] = w[p NP + c, 4 g + t]``."""
    npan = -(-N // NP) if N else 0
    panels = b[: npan * KG * NP * 4].reshape(npan, KG, NP, 4)
    return panels.transpose(0, 2, 1, 3).reshape(npan * NP, 4 * KG)[:N]


def _int_product(aq: np.ndarray, w: np.ndarray, sat: bool) -> np.ndarray:
    """``aq [M, KP] @ w [N, KP].T`` as int64 (exact), with int16 pair saturation if ``sat``."""
    M, KP = aq.shape
    N = w.shape[0]
    if M == 0 or N == 0 or KP == 0:
        return np.zeros((M, N), np.int64)
    wf = w.astype(np.float64)
    acc = np.empty((M, N), np.int64)
    rows = max(1, _CHUNK_ELEMS // max(KP, N))
    for i0 in range(0, M, rows):
        af = aq[i0 : i0 + rows].astype(np.float64)
        acc[i0 : i0 + rows] = af @ wf.T
    if not sat:
        return acc
    amax = int(aq.max())
    w16 = np.abs(w.astype(np.int16))
    risky = (w16[:, 0::2] + w16[:, 1::2]).astype(np.int64) * amax > _INT16_MAX  # [N, KP/2]
    jr, hr = np.nonzero(risky)
    if jr.size == 0:
        return acc
    # pairs (2h, 2h + 1) that can clamp: p = a0 w0 + a1 w1 (int32 never overflows here)
    w0 = w[jr, 2 * hr].astype(np.int32)
    w1 = w[jr, 2 * hr + 1].astype(np.int32)
    cols, starts = np.unique(jr, return_index=True)
    rows = max(1, _CHUNK_ELEMS // jr.size)
    for i0 in range(0, M, rows):
        a32 = aq[i0 : i0 + rows].astype(np.int32)
        p = a32[:, 2 * hr] * w0 + a32[:, 2 * hr + 1] * w1
        d = (np.clip(p, -32768, _INT16_MAX) - p).astype(np.int64)
        acc[i0 : i0 + rows, cols] += np.add.reduceat(d, starts, axis=1)
    return acc


def _first_nonfinite(x: np.ndarray) -> int:
    """Flat (row-major) index of the first non-finite element of ``x``, or -1."""
    bad = ~np.isfinite(x)
    if not bad.any():
        return -1
    return int(np.argmax(bad.reshape(-1)))


def _py_max(x: np.ndarray, floor: Any) -> np.ndarray:
    """Python's / Numba's ``max(x, floor)``: ``floor`` only where ``floor > x``."""
    return np.where(floor > x, floor, x)


def _py_min(x: np.ndarray, ceil: Any) -> np.ndarray:
    """Python's / Numba's ``min(x, ceil)``: ``ceil`` only where ``ceil < x``."""
    return np.where(ceil < x, ceil, x)


def _quantize_rows(a: np.ndarray, M: int, K: int, KP: int, x_qmax: int):
    """The dynamic kind's prologue: ``(aq [M, KP] uint8, scale, zero_point)`` or the code of
    the first non-finite activation."""
    x = a[:M, :K]
    lo = hi = np.float32(0.0)
    if M > 0 and K > 0:
        bad = _first_nonfinite(x)
        if bad >= 0:
            return bad
        # the sign of a zero min/max cannot change the parameters (both widen to include 0)
        lo = x.min()
        hi = x.max()
    scale, zp = choose_qparams_np(np.float64(lo), np.float64(hi), 0, x_qmax)
    sc = np.float32(scale[0])
    zpi = np.int32(zp[0])
    aq = np.zeros((M, KP), np.uint8)
    if M and K:
        v = np.rint(x / sc) + np.float32(zpi)
        aq[:, :K] = np.clip(v, np.float32(0.0), np.float32(x_qmax))
    return aq, sc, zpi


def generic_gemm_kernel(key: tuple) -> Callable[..., int]:
    """Build the generic (numpy) kernel serving the specialised ``gemm`` key ``key``."""
    kind, sat = generic_key(key)
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    stage_mod = sys.modules.get("qgemm._kernels.output_stage")  # never imported from here
    if stage_mod is not None and len(stage_mod.OutputStage._fields) != N_STAGE:
        raise TypeError(
            f"gemm_generic: the output stage has {len(stage_mod.OutputStage._fields)} fields, "
            f"the generic kernel takes {N_STAGE}: update qgemm/_kernels/gemm_generic.py"
        )
    RAW = kind == "raw"
    FLOAT = kind in ("float", "dynamic")
    DYN = kind == "dynamic"
    SAT = bool(sat)

    def gemm_generic(a, M, K, KG, b, b16, N, NP, pairmax, w_zero_point, has_w_zero_point,
                     w_colsum, w_scale, x_zero_point, x_scale, x_qmax, int_bias, float_bias,
                     relu, out_scale, out_zero_point, out_qmax, nchunks, nthreads,
                     out):  # fmt: skip
        M, K, KG, N = int(M), int(K), int(KG), int(N)
        KP = 4 * KG
        if not RAW:
            fb = np.asarray(float_bias[:N], np.float32)
            badj = _first_nonfinite(fb)
            if badj >= 0:
                return -2 - badj
        if DYN:
            got = _quantize_rows(a, M, K, KP, int(x_qmax))
            if isinstance(got, int):
                return got
            aq, q_scale, q_zp = got
        else:
            aq = a[:M, :KP]
            q_scale = np.float32(x_scale)
            q_zp = np.int32(x_zero_point)
        w = _dense_weight(b, N, KG, int(NP))
        acc = _int_product(aq, w, SAT)
        if not RAW:
            init = (
                np.asarray(int_bias[:N], np.int64)
                - np.int64(q_zp) * np.asarray(w_colsum[:N], np.int64)
            ).astype(np.int32)
            acc += init
        acc32 = acc.astype(np.int32)  # the kernels' int32 wrap-around
        if RAW:
            out[:M, :N] = acc32
            return -1
        if has_w_zero_point:
            rs = aq[:, :K].sum(axis=1, dtype=np.int64)
            v = acc32.astype(np.int64) - rs[:, None] * np.asarray(w_zero_point[:N], np.int64)
            vf = v.astype(np.float32)
        else:
            vf = acc32.astype(np.float32)
        ws = np.asarray(w_scale[:N], np.float32)
        with np.errstate(all="ignore"):
            if FLOAT:
                floor = np.float32(0.0) if relu else np.float32(-np.inf)
                res = _py_max(vf * q_scale * ws + fb, floor)
            else:  # lower(REQUANT) then ep_requant
                ab = q_scale * ws
                mult = ab / np.float32(out_scale)
                bias_q = fb / ab
                ozp = np.float32(out_zero_point)
                qlo = ozp if relu else np.float32(0.0)
                f = np.rint((vf + bias_q) * mult) + ozp
                res = _py_min(_py_max(f, qlo), np.float32(out_qmax)).astype(np.uint8)
        out[:M, :N] = res
        return -1

    gemm_generic.__qualname__ = f"gemm_generic[{kind}{', saturating' if SAT else ''}]"
    return gemm_generic


generic_gemm_kernel.generic_key = generic_key  # type: ignore[attr-defined]
