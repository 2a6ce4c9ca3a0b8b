"""Packed uint8 x int8 GEMM with a fused output stage (the kernels behind :mod:`qgemm.gemm`).

Layout
------
The weight ``w`` (``[N, K]`` int8) is packed once into panels of ``NP`` output columns
(``NP`` in 16/32/64): ``packed[p, g, c, t] = w[p * NP + c, 4 * g + t]`` -- for each panel, for
each group of 4 consecutive ``k``, ``NP`` columns of 4 bytes (FBGEMM's ``PackBMatrix``
grouping).  Both ``N`` and ``K`` are zero-padded to whole panels and k-groups, so microkernels
never test bounds; the activations they read are padded to ``4 * KG`` bytes per row by the
wrapper when needed (padding bytes multiply zero weights).

Tiles
-----
A task is one ``NR``-column tile of the output (``NR`` divides ``NP``) over a chunk of rows;
the chunk is walked ``MR`` rows at a time by a register-tile microkernel (one per ISA, see
:mod:`.gemm_ukernel`) that accumulates the whole ``K`` into int32 and leaves the ``mr x NR``
tile in a small scratch buffer; the output stage then reads the tile once and writes the
final values (zero-point correction, scaling, bias, ReLU, requantization).  Tasks run in a
``prange`` in the parallel twin of each kernel (threads split over column tiles first, then row
chunks); a serial twin serves small problems and one thread.

Kernel keys (``kernel_family("gemm")``)
---------------------------------------
``(kind, variant_fast, variant_exact, MR, NV, NR, parallel)`` where ``kind`` is the output
stage (``"raw"`` int32, ``"float"`` float32, ``"requant"`` uint8, ``"dynamic"`` float32 with the
activation quantization fused in front) and the variants name the microkernels
(``vnni``, ``avx2``, ``avx2x`` = exact split, ``avx2s`` = saturating, ``portable``, ``portables``).
Granularity needs no key entry: scales and zero points are expanded to one per output column
at pack time, so per-tensor, per-group and per-channel weights share kernels.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange, types
from numba.core.errors import TypingError
from numba.extending import overload

from .._cache import kernel_family
from .gemm_ukernel import AVX2_EXACT, AVX2_FAST, VNNI, ukr

# Microkernel variants (literal ints passed to ``_tile``).
PORTABLE = 10
PORTABLE_SAT = 11
VARIANTS = {
    "vnni": VNNI,
    "avx2": AVX2_FAST,
    "avx2x": AVX2_EXACT,
    "avx2s": AVX2_FAST,
    "portable": PORTABLE,
    "portables": PORTABLE_SAT,
}

INT16_MAX = 32767


def _tile(a, a_row, lda_bytes, b, b_off, bstride, kgroups, c, mr, MR, NV, VARIANT):
    """Stub: ``mr x NR`` int32 tile of ``a[a_row:a_row+mr] @ packed`` into ``c`` (row stride NR)."""
    raise NotImplementedError  # pragma: no cover - only called from jitted code


@overload(_tile, prefer_literal=True, inline="always")
def _tile_impl(a, a_row, lda_bytes, b, b_off, bstride, kgroups, c, mr, MR, NV, VARIANT):
    if not isinstance(VARIANT, types.IntegerLiteral) or not isinstance(NV, types.IntegerLiteral):
        raise TypingError("_tile: NV and VARIANT must be integer literals")
    variant = VARIANT.literal_value
    if variant in (VNNI, AVX2_FAST, AVX2_EXACT):
        mr_c = MR.literal_value
        nv_c = NV.literal_value

        def impl(a, a_row, lda_bytes, b, b_off, bstride, kgroups, c, mr, MR, NV, VARIANT):
            ukr(
                a,
                a_row * lda_bytes,
                lda_bytes,
                b,
                b_off,
                bstride,
                kgroups,
                c,
                mr,
                mr_c,
                nv_c,
                variant,
            )

        return impl
    sat = variant == PORTABLE_SAT
    nr = NV.literal_value * 16

    def impl_portable(a, a_row, lda_bytes, b, b_off, bstride, kgroups, c, mr, MR, NV, VARIANT):
        acc = np.zeros(nr, np.int64)
        for r in range(mr):
            acc[:] = 0
            row = a_row + r
            for g in range(kgroups):
                a0 = np.int64(a[row, 4 * g])
                a1 = np.int64(a[row, 4 * g + 1])
                a2 = np.int64(a[row, 4 * g + 2])
                a3 = np.int64(a[row, 4 * g + 3])
                base = b_off + g * bstride
                for col in range(nr):
                    q = base + 4 * col
                    p0 = a0 * np.int64(b[q]) + a1 * np.int64(b[q + 1])
                    p1 = a2 * np.int64(b[q + 2]) + a3 * np.int64(b[q + 3])
                    if sat:
                        p0 = min(max(p0, -32768), 32767)
                        p1 = min(max(p1, -32768), 32767)
                    acc[col] += p0 + p1
            for col in range(nr):
                c[r * nr + col] = _wrap32(acc[col])

    return impl_portable


@numba.njit
def _wrap32(v):
    """int64 -> int32 with two's-complement wrap-around (exact when the true value fits)."""
    v = v & 0xFFFFFFFF
    if v >= 0x80000000:
        v -= 0x100000000
    return np.int32(v)


# ---------------------------------------------------------------------------- choose qparams


@numba.njit
def _f32(v):
    return np.float32(v)


@numba.njit
def _choose_u8(lo, hi, qmin, qmax):
    """FBGEMM's ``ChooseQuantizationParams`` for one tensor, exactly as
    :func:`qgemm.quantize.choose_qparams` computes it (asymmetric)."""
    mn = np.float64(min(_f32(lo), _f32(0.0)))
    mx = np.float64(max(_f32(hi), _f32(0.0)))
    scale = _f32((mx - mn) / (qmax - qmin))
    if scale == 0 or np.isinf(_f32(1.0) / scale):
        scale = _f32(0.1)
    thr = _f32(6.1e-5)
    if scale < thr:
        amp = _f32(thr / scale)
        span = np.float64(thr) * (qmax - qmin)
        if mn == 0:
            mx = np.float64(_f32(span))
        elif mx == 0:
            mn = np.float64(_f32(-span))
        else:
            mn = np.float64(_f32(mn * amp))
            mx = np.float64(_f32(mx * amp))
        scale = thr
    s64 = np.float64(scale)
    zp_min = qmin - mn / s64
    zp_max = qmax - mx / s64
    err_min = abs(qmin) + abs(mn / s64)
    err_max = abs(qmax) + abs(mx / s64)
    init = zp_min if err_min < err_max else zp_max
    zp = np.rint(init)
    zp = min(max(zp, np.float64(qmin)), np.float64(qmax))
    return scale, np.int32(zp)


# ---------------------------------------------------------------------------- the kernels

_KINDS = ("raw", "float", "requant", "dynamic")


def _signature(kind: str):
    a2 = types.Array(types.uint8, 2, "A")
    x2 = types.Array(types.float32, 2, "A")
    b1 = types.Array(types.int8, 1, "C")
    i32v = types.Array(types.int32, 1, "C")
    f32v = types.Array(types.float32, 1, "C")
    out_t = {
        "raw": types.int32,
        "float": types.float32,
        "requant": types.uint8,
        "dynamic": types.float32,
    }[kind]
    out2 = types.Array(out_t, 2, "C")
    first = x2 if kind == "dynamic" else a2
    # (a, M, K, KG, b, N, NP, colc, bzp, has_bzp, a_zp, a_scale, bscale, ibias, fbias,
    #  c_scale, c_zp, relu, pairmax, qmax, nchunks, out) -> int64
    return types.int64(
        first,
        types.int64,
        types.int64,
        types.int64,
        b1,
        types.int64,
        types.int64,
        i32v,
        i32v,
        types.boolean,
        types.int32,
        types.float32,
        f32v,
        i32v,
        f32v,
        types.float32,
        types.int32,
        types.boolean,
        types.int64,
        types.int64,
        types.int64,
        out2,
    )


@kernel_family("gemm")
def gemm_kernel(key):
    """Build the GEMM kernel for ``key = (kind, fast, exact, MR, NV, NR, parallel)``.

    Returns -1 on success; otherwise nothing is written to ``out`` and the result is the flat
    index of the first non-finite activation (dynamic kind), or ``-2 - j`` for a non-finite
    float bias at column ``j``.  ``qmax`` is the activation code maximum (dynamic kind) or the
    output code maximum (requant kind).
    """
    kind, fast_name, exact_name, MR, NV, NR, parallel = key
    if kind not in _KINDS:
        raise ValueError(f"kind: expected one of {_KINDS}, got {kind!r}")
    V_FAST = VARIANTS[fast_name]
    V_EXACT = VARIANTS[exact_name]
    CHOOSE = V_FAST != V_EXACT  # pick fast/exact at run time by the saturation bound
    RAW = kind == "raw"
    FLOAT = kind in ("float", "dynamic")
    REQ = kind == "requant"
    DYN = kind == "dynamic"

    @numba.njit(_signature(kind), parallel=parallel, cache=True, nogil=True)
    def gemm(
        a,
        M,
        K,
        KG,
        b,
        N,
        NP,
        colc,
        bzp,
        has_bzp,
        a_zp,
        a_scale,
        bscale,
        ibias,
        fbias,
        c_scale,
        c_zp,
        relu,
        pairmax,
        qmax,
        nchunks,
        out,
    ):
        KP = 4 * KG
        if not RAW:
            for j in range(N):
                fb = fbias[j]
                if not (fb - fb == np.float32(0.0)):
                    return -2 - j
        # ---- activations: quantize (dynamic) or take as is
        if DYN:
            if M > 0 and K > 0:
                lo_r = np.empty(M, np.float32)
                hi_r = np.empty(M, np.float32)
                bad_r = np.full(M, -1, np.int64)
                for i in prange(M):
                    rlo = np.float32(np.inf)
                    rhi = np.float32(-np.inf)
                    for k in range(K):
                        xv = a[i, k]
                        if not (xv - xv == np.float32(0.0)):
                            if bad_r[i] < 0:
                                bad_r[i] = i * K + k
                        else:
                            rlo = min(rlo, xv)
                            rhi = max(rhi, xv)
                    lo_r[i] = rlo
                    hi_r[i] = rhi
                for i in range(M):
                    if bad_r[i] >= 0:
                        return bad_r[i]
                lo = lo_r.min()
                hi = hi_r.max()
            else:
                lo = np.float32(0.0)
                hi = np.float32(0.0)
            sc, zp = _choose_u8(lo, hi, 0, qmax)
            q_scale = sc
            q_zp = zp
            aq = np.zeros((M, KP), np.uint8)
            fq = np.float32(qmax)
            fzp = np.float32(zp)
            for i in prange(M):
                for k in range(K):
                    q = np.rint(a[i, k] / sc) + fzp
                    q = min(max(q, np.float32(0.0)), fq)
                    aq[i, k] = np.uint8(q)
            amax = np.int64(qmax)
        else:
            aq = a
            q_scale = a_scale
            q_zp = a_zp
            amax = np.int64(255)
            if CHOOSE and pairmax * 255 > INT16_MAX:
                amax = 0
                for i in range(M):
                    for k in range(K):
                        amax = max(amax, np.int64(aq[i, k]))
        use_fast = (not CHOOSE) or amax * pairmax <= INT16_MAX
        lda = aq.strides[0]
        # ---- per-row and per-column terms of the output stage
        rowsum = np.zeros(M, np.int64)
        if has_bzp:
            for i in range(M):
                s = np.int64(0)
                for k in range(K):
                    s += aq[i, k]
                rowsum[i] = s
        if REQ:
            mult = np.empty(N, np.float32)
            fbq = np.empty(N, np.float32)
            for j in range(N):
                ab = q_scale * bscale[j]
                mult[j] = ab / c_scale
                fbq[j] = fbias[j] / ab
            qlo = np.float32(c_zp) if relu else np.float32(0.0)
            fczp = np.float32(c_zp)
            fqmax = np.float32(qmax)
        else:
            mult = bscale
            fbq = fbias
            qlo = np.float32(0.0)
            fczp = np.float32(0.0)
            fqmax = np.float32(0.0)
        azp64 = np.int64(q_zp)
        # ---- tasks: column tiles x row chunks
        nct = (N + NR - 1) // NR
        mblocks = (M + MR - 1) // MR
        chunks = max(1, min(nchunks, mblocks))
        mc = MR * ((mblocks + chunks - 1) // chunks)
        ntask = nct * chunks
        bstride = NP * 4
        for t in prange(ntask):
            ct = t // chunks
            rc = t - ct * chunks
            i_start = rc * mc
            i_stop = min(M, i_start + mc)
            j0 = ct * NR
            p = j0 // NP
            boff = p * KG * NP * 4 + (j0 - p * NP) * 4
            nc = min(NR, N - j0)
            scratch = np.empty(MR * NR, np.int32)
            for i0 in range(i_start, i_stop, MR):
                mr = min(MR, i_stop - i0)
                if use_fast:
                    _tile(aq, i0, lda, b, boff, bstride, KG, scratch, mr, MR, NV, V_FAST)
                else:
                    _tile(aq, i0, lda, b, boff, bstride, KG, scratch, mr, MR, NV, V_EXACT)
                for r in range(mr):
                    i = i0 + r
                    rs = rowsum[i]
                    orow = out[i]
                    for cc in range(nc):
                        j = j0 + cc
                        v = np.int64(scratch[r * NR + cc])
                        if RAW:
                            orow[j] = scratch[r * NR + cc]
                        else:
                            v = v - azp64 * np.int64(colc[j]) - rs * np.int64(bzp[j])
                            v = np.int64(_wrap32(v)) + np.int64(ibias[j])
                            if FLOAT:
                                f = np.float32(v) * q_scale * bscale[j] + fbias[j]
                                if relu:
                                    f = max(f, np.float32(0.0))
                                orow[j] = f
                            else:
                                f = (np.float32(v) + fbq[j]) * mult[j]
                                f = np.rint(f) + fczp
                                f = min(max(f, qlo), fqmax)
                                orow[j] = np.uint8(f)
        return -1

    return gemm
