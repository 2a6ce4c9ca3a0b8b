"""The generic tier of the ``gemm`` kernel family: one shape-agnostic kernel per output kind.

Called exactly like the specialised kernels of :func:`.gemm.gemm_kernel` (same arguments, same
result codes) and bit-identical to them: the int32 accumulation is exact (or saturates int16
pairs exactly as the saturating variants do), the zero-point correction starts the accumulator
as the specialised kernels' ``init`` does, and the output stage is the portable path's own
:func:`~.output_stage.ep_float` / :func:`~.output_stage.ep_requant` (which do the float32
operations of the vector microkernels in the same order).

It specialises only on ``(kind, saturating)`` -- 8 kernels at most instead of one per
``(variants, tile, parallel)`` -- runs serially, and compiles in a fraction of the time, so
the first call of an op is served while the specialised kernel compiles in the background
(see :mod:`qgemm._cache`).
"""

from __future__ import annotations

import numba
import numpy as np

from .gemm import KINDS, _quantize_row, _row_minmax, _signature
from .output_stage import MODES, STAGE_TYPES, OutputStage, ep_float, ep_requant, lower
from .quantize import choose_qparams_scalar

__all__ = ["generic_gemm_kernel", "generic_key"]

_SATURATING = ("avx2s", "portables")
N_ARGS = 9 + len(STAGE_TYPES) + 3
"""(a, M, K, KG, b, b16, N, NP, pairmax, *stage, nchunks, nthreads, out): the gemm kernels'."""


def generic_key(key):
    """``(kind, saturating)`` of a specialised key ``(kind, fast, exact, MR, NV, NR, parallel)``."""
    kind, fast, exact = key[0], key[1], key[2]
    return (kind, fast in _SATURATING and exact in _SATURATING)


def generic_gemm_kernel(key):
    """Build the generic kernel serving the specialised ``gemm`` key ``key``."""
    kind, sat = generic_key(key)
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    RAW = kind == "raw"
    FLOAT = kind in ("float", "dynamic")
    DYN = kind == "dynamic"
    SAT = bool(sat)
    MODE = MODES[kind]

    sig = _signature(kind)
    if len(sig.args) != N_ARGS:
        raise TypeError(
            f"gemm_generic: the specialised gemm kernels take {len(sig.args)} arguments, the "
            f"generic one {N_ARGS}: update qgemm/_kernels/gemm_generic.py to the new signature"
        )

    @numba.njit(sig, cache=True, nogil=True, error_model="numpy")
    def gemm_generic(a, M, K, KG, b, b16, N, NP, pairmax, w_zero_point, has_w_zero_point, w_colsum,
                     w_scale, x_zero_point, x_scale, x_qmax, int_bias, float_bias, relu,
                     out_scale, out_zero_point, out_qmax, nchunks, nthreads, out):  # fmt: skip
        stage = OutputStage(w_zero_point, has_w_zero_point, w_colsum, w_scale, x_zero_point,
                            x_scale, x_qmax, int_bias, float_bias, relu, out_scale,
                            out_zero_point, out_qmax)  # fmt: skip
        KP = 4 * KG
        if not RAW:
            for j in range(N):
                fb = stage.float_bias[j]
                if not (fb - fb == np.float32(0.0)):
                    return -2 - j
        if DYN:
            qmax = stage.x_qmax
            lo = np.float32(0.0)
            hi = np.float32(0.0)
            if M > 0 and K > 0:
                lo = np.float32(np.inf)
                hi = np.float32(-np.inf)
                for i in range(M):
                    rl, rh, ok = _row_minmax(a[i], K)
                    if not ok:
                        for k in range(K):
                            xv = a[i, k]
                            if not (xv - xv == np.float32(0.0)):
                                return i * K + k
                    lo = min(lo, rl)
                    hi = max(hi, rh)
            sc, zp = choose_qparams_scalar(lo, hi, 0, qmax)
            q_scale = sc
            q_zp = zp
            aq = np.empty((M, KP), np.uint8)
            for i in range(M):
                _quantize_row(a[i], aq[i], K, sc, np.float32(zp), np.float32(qmax))
        else:
            aq = a
            q_scale = stage.x_scale
            q_zp = stage.x_zero_point
        has_bzp = stage.has_w_zero_point
        p1, p2, s1, s2, s3 = lower(stage, q_scale, MODE, False)
        bzp = stage.w_zero_point[:N]
        azp64 = np.int64(q_zp)
        init = np.zeros(N, np.int32)
        if not RAW:
            for j in range(N):
                init[j] = np.int32(
                    np.int64(stage.int_bias[j]) - azp64 * np.int64(stage.w_colsum[j])
                )
        acc = np.empty(N, np.int32)
        bstride = NP * 4
        for i in range(M):
            rs = np.int64(0)
            if has_bzp:
                for k in range(K):
                    rs += aq[i, k]
            acc[:] = init
            for j in range(N):
                p = j // NP
                base = p * KG * bstride + (j - p * NP) * 4
                s = np.int32(0)
                for g in range(KG):
                    o = base + g * bstride
                    a0 = np.int32(aq[i, 4 * g])
                    a1 = np.int32(aq[i, 4 * g + 1])
                    a2 = np.int32(aq[i, 4 * g + 2])
                    a3 = np.int32(aq[i, 4 * g + 3])
                    q0 = np.int32(a0 * np.int32(b[o]) + a1 * np.int32(b[o + 1]))
                    q1 = np.int32(a2 * np.int32(b[o + 2]) + a3 * np.int32(b[o + 3]))
                    if SAT:
                        q0 = np.int32(min(max(q0, np.int32(-32768)), np.int32(32767)))
                        q1 = np.int32(min(max(q1, np.int32(-32768)), np.int32(32767)))
                    s = np.int32(s + np.int32(q0 + q1))
                acc[j] = np.int32(acc[j] + s)
            orow = out[i]
            if RAW:
                orow[:] = acc
            elif FLOAT:
                ep_float(acc, orow, p1[:N], p2[:N], s1, s2, rs, bzp, has_bzp)
            else:
                ep_requant(acc, orow, p1[:N], p2[:N], s1, s2, s3, rs, bzp, has_bzp)
        return -1

    return gemm_generic


generic_gemm_kernel.generic_key = generic_key  # type: ignore[attr-defined]
