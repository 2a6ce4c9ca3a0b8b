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
from .gemm_ukernel import AVX2_EXACT, AVX2_FAST, VNNI, atomic_next, ukr
from .gemm_ukernel import FLOAT as MODE_FLOAT
from .gemm_ukernel import RAW as MODE_RAW
from .gemm_ukernel import REQUANT as MODE_REQUANT

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
NATIVE_VARIANTS = (VNNI, AVX2_FAST, AVX2_EXACT)
# Parallelise the explicit prange loops only: with plain parallel=True, Numba turns every array
# expression (np.zeros, a[:] = b, ...) into a parallel region of its own -- one fork/join each
# (~3 us apiece on 2 cores, and a stall whenever a core is busy).
PRANGE_ONLY = {
    "prange": True,
    "comprehension": False,
    "reduction": False,
    "inplace_binop": False,
    "setitem": False,
    "numpy": False,
    "stencil": False,
    "fusion": False,
}
PAR_ELEMS = 1 << 16  # activations quantized in parallel from this many elements on


def _tile(a, a_row, lda_bytes, b, b_off, bstride, kgroups, c, init, mr, MR, NV, VARIANT):
    """Stub: the ``mr x NR`` int32 tile ``init + a[a_row:a_row+mr] @ packed`` into ``c``."""
    raise NotImplementedError  # pragma: no cover - only called from jitted code


@overload(_tile, prefer_literal=True, inline="always")
def _tile_impl(a, a_row, lda_bytes, b, b_off, bstride, kgroups, c, init, mr, MR, NV, VARIANT):
    if not isinstance(VARIANT, types.IntegerLiteral) or not isinstance(NV, types.IntegerLiteral):
        raise TypingError("_tile: NV and VARIANT must be integer literals")
    variant = VARIANT.literal_value
    if variant in NATIVE_VARIANTS:

        def unreachable(a, a_row, lda_bytes, b, b_off, bstride, kgroups, c, init, mr, MR, NV,
                        VARIANT):  # fmt: skip
            pass  # native variants go through _tile_fused (branch never taken)

        return unreachable
    sat = variant == PORTABLE_SAT
    nr = NV.literal_value * 16

    def impl_portable(
        a, a_row, lda_bytes, b, b_off, bstride, kgroups, c, init, mr, MR, NV, VARIANT
    ):
        # int32 arithmetic throughout (every update wrapped in np.int32: Numba would widen
        # to int64), accumulating in place in ``c``; the column loop vectorises with LLVM's
        # interleaved loads of the 4 bytes per column.
        for r in range(mr):
            for col in range(nr):
                c[r * nr + col] = init[col]
        # (0-based views: Numba's negative-index fix-up on ``base + i`` blocks vectorising)
        ncol = init.shape[0]  # == nr; a run-time trip count gets vectorised, a literal 16
        # gets fully unrolled first and then not vectorised
        for g in range(kgroups):
            bg = b[b_off + g * bstride : b_off + g * bstride + 4 * nr]
            for r in range(mr):
                row = a_row + r
                a0 = np.int32(a[row, 4 * g])
                a1 = np.int32(a[row, 4 * g + 1])
                a2 = np.int32(a[row, 4 * g + 2])
                a3 = np.int32(a[row, 4 * g + 3])
                cr = c[r * nr : r * nr + nr]
                for col in range(ncol):
                    p0 = np.int32(a0 * np.int32(bg[4 * col]) + a1 * np.int32(bg[4 * col + 1]))
                    p1 = np.int32(a2 * np.int32(bg[4 * col + 2]) + a3 * np.int32(bg[4 * col + 3]))
                    if sat:
                        p0 = np.int32(min(max(p0, np.int32(-32768)), np.int32(32767)))
                        p1 = np.int32(min(max(p1, np.int32(-32768)), np.int32(32767)))
                    cr[col] = np.int32(cr[col] + np.int32(p0 + p1))

    return impl_portable


def _tile_fused(a, a_row, lda_bytes, b, b_off, bstride, kgroups, init, mr, out, o_off, ldo, p1,
                p2, bzp, rs, col, s1, s2, s3, MR, NV, VARIANT, MODE):  # fmt: skip
    """Stub: the ``mr x NR`` tile with the output stage fused in registers (native ISAs)."""
    raise NotImplementedError  # pragma: no cover - only called from jitted code


@overload(_tile_fused, prefer_literal=True, inline="always")
def _tile_fused_impl(a, a_row, lda_bytes, b, b_off, bstride, kgroups, init, mr, out, o_off, ldo,
                     p1, p2, bzp, rs, col, s1, s2, s3, MR, NV, VARIANT, MODE):  # fmt: skip
    for t in (MR, NV, VARIANT, MODE):
        if not isinstance(t, types.IntegerLiteral):
            raise TypingError("_tile_fused: MR, NV, VARIANT and MODE must be integer literals")
    variant = VARIANT.literal_value
    if variant not in NATIVE_VARIANTS:

        def unreachable(a, a_row, lda_bytes, b, b_off, bstride, kgroups, init, mr, out, o_off,
                        ldo, p1, p2, bzp, rs, col, s1, s2, s3, MR, NV, VARIANT, MODE):  # fmt: skip
            pass  # the portable path goes through _tile (branch never taken)

        return unreachable
    mr_c = MR.literal_value
    nv_c = NV.literal_value
    mode_c = MODE.literal_value

    def impl(a, a_row, lda_bytes, b, b_off, bstride, kgroups, init, mr, out, o_off, ldo, p1, p2,
             bzp, rs, col, s1, s2, s3, MR, NV, VARIANT, MODE):  # fmt: skip
        ukr(a, a_row * lda_bytes, lda_bytes, b, b_off, bstride, kgroups, init, mr, out, o_off,
            ldo, p1, p2, bzp, rs, col, a_row, s1, s2, s3, mr_c, nv_c, variant, mode_c)  # fmt: skip

    return impl


@numba.njit(error_model="numpy")
def _wrap32(v):
    """int64 -> int32 with two's-complement wrap-around (exact when the true value fits)."""
    v = v & 0xFFFFFFFF
    if v >= 0x80000000:
        v -= 0x100000000
    return np.int32(v)


# ---------------------------------------------------------------------------- choose qparams


@numba.njit(error_model="numpy")
def _f32(v):
    return np.float32(v)


@numba.njit(error_model="numpy")
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


# ---------------------------------------------------------------------------- activations


@numba.njit(nogil=True, error_model="numpy")
def _row_minmax(x, K):
    """``(min, max, all finite)`` of ``x[:K]`` (contiguous float32).

    Done on the float bits mapped to order-preserving integers (``b ^ ((b >> 31) & 0x7fffffff)``),
    so the min/max and the non-finite test (exponent all ones) are integer reductions that
    LLVM vectorises exactly, without fast-math."""
    xi = x.view(np.int32)
    mn = np.int64(0x7FFFFFFF)
    mx = np.int64(-0x80000000)
    bad = np.int64(0)
    for k in range(K):
        b = np.int64(xi[k])
        o = b ^ ((b >> 31) & 0x7FFFFFFF)
        mn = min(mn, o)
        mx = max(mx, o)
        bad |= np.int64((b & 0x7F800000) == 0x7F800000)
    t = np.empty(2, np.int32)
    t[0] = np.int32(mn ^ ((mn >> 31) & 0x7FFFFFFF))
    t[1] = np.int32(mx ^ ((mx >> 31) & 0x7FFFFFFF))
    f = t.view(np.float32)
    return f[0], f[1], bad == 0


@numba.njit(nogil=True, error_model="numpy")
def _quantize_row(x, q, K, scale, zp, qmax):
    """``q[:K] = clamp(rint(x / scale) + zp, 0, qmax)``; ``q[K:]`` (k-group padding) = 0."""
    for k in range(K):
        v = np.rint(x[k] / scale) + zp
        q[k] = np.uint8(min(max(v, np.float32(0.0)), qmax))
    for k in range(K, q.shape[0]):
        q[k] = 0


# ---------------------------------------------------------------------------- output stages
# One row of one tile; 0-based loops over views so LLVM vectorises them cleanly.


@numba.njit(nogil=True, error_model="numpy")
def _ep_float(s, o, bscale, fbias, a_scale, flo, rs, bzp, has_bzp):
    """ReQuantizeForFloat: ``raw * a_scale * w_scale[j] + bias[j]``, then ``max(., flo)``."""
    if has_bzp:
        for c in range(s.size):
            v = np.int64(s[c]) - rs * np.int64(bzp[c])
            o[c] = max(np.float32(v) * a_scale * bscale[c] + fbias[c], flo)
    else:
        for c in range(s.size):
            o[c] = max(np.float32(s[c]) * a_scale * bscale[c] + fbias[c], flo)


@numba.njit(nogil=True, error_model="numpy")
def _ep_requant(s, o, fbq, mult, czp, qlo, qmax, rs, bzp, has_bzp):
    """ReQuantizeOutput: ``clamp(rint((raw + bias / ab) * mult) + c_zp, qlo, qmax)``."""
    if has_bzp:
        for c in range(s.size):
            v = np.int64(s[c]) - rs * np.int64(bzp[c])
            f = np.rint((np.float32(v) + fbq[c]) * mult[c]) + czp
            o[c] = np.uint8(min(max(f, qlo), qmax))
    else:
        for c in range(s.size):
            f = np.rint((np.float32(s[c]) + fbq[c]) * mult[c]) + czp
            o[c] = np.uint8(min(max(f, qlo), qmax))


# ---------------------------------------------------------------------------- the kernels

_KINDS = ("raw", "float", "requant", "dynamic")


def _signature(kind: str):
    a2 = types.Array(types.uint8, 2, "A")
    x2 = types.Array(types.float32, 2, "C")
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
    #  c_scale, c_zp, relu, pairmax, qmax, nchunks, nthreads, out) -> int64
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
    PAR = bool(parallel)
    NATIVE = V_FAST in NATIVE_VARIANTS
    MODE = MODE_RAW if RAW else (MODE_FLOAT if FLOAT else MODE_REQUANT)
    OUT_DT = np.int32 if RAW else (np.float32 if FLOAT else np.uint8)
    ES = np.dtype(OUT_DT).itemsize

    @numba.njit(
        _signature(kind),
        parallel=PRANGE_ONLY if parallel else False,
        cache=True,
        nogil=True,
        error_model="numpy",
    )
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
        nthreads,
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
            lo = np.float32(0.0)
            hi = np.float32(0.0)
            if M > 0 and K > 0:
                lo_r = np.empty(M, np.float32)
                hi_r = np.empty(M, np.float32)
                ok_r = np.empty(M, np.bool_)
                if PAR and M * K >= PAR_ELEMS:
                    for i in prange(M):
                        lo_r[i], hi_r[i], ok_r[i] = _row_minmax(a[i], K)
                else:  # a parallel region costs microseconds: not worth it for small x
                    for i in range(M):
                        lo_r[i], hi_r[i], ok_r[i] = _row_minmax(a[i], K)
                for i in range(M):
                    if not ok_r[i]:
                        for k in range(K):
                            xv = a[i, k]
                            if not (xv - xv == np.float32(0.0)):
                                return i * K + k
                lo = lo_r.min()
                hi = hi_r.max()
            sc, zp = _choose_u8(lo, hi, 0, qmax)
            q_scale = sc
            q_zp = zp
            aq = np.empty((M, KP), np.uint8)
            if PAR and M * K >= PAR_ELEMS:
                for i in prange(M):
                    _quantize_row(a[i], aq[i], K, sc, np.float32(zp), np.float32(qmax))
            else:
                for i in range(M):
                    _quantize_row(a[i], aq[i], K, sc, np.float32(zp), np.float32(qmax))
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
        NPAD = N + NR  # per-column vectors padded so full-width vector loads stay in bounds
        if REQ:
            mult = np.zeros(NPAD, np.float32)
            fbq = np.zeros(NPAD, np.float32)
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
        flo = np.float32(0.0) if relu else np.float32(-np.inf)
        # fused output stage operands: (p1, p2, s1, s2, s3) per the microkernel's MODE
        if NATIVE:
            bzp_p = np.zeros(NPAD, np.int32)
            bzp_p[:N] = bzp
            if FLOAT:
                p1 = np.zeros(NPAD, np.float32)
                p2 = np.zeros(NPAD, np.float32)
                p1[:N] = bscale
                p2[:N] = fbias
                s1, s2, s3 = q_scale, flo, np.float32(0.0)
            elif REQ:
                p1, p2 = fbq, mult
                s1, s2, s3 = fczp, qlo, fqmax
            else:
                p1 = np.zeros(1, np.float32)
                p2 = p1
                s1, s2, s3 = np.float32(0.0), np.float32(0.0), np.float32(0.0)
        # ---- tasks: column tiles x row chunks
        nct = (N + NR - 1) // NR
        mblocks = (M + MR - 1) // MR
        chunks = max(1, min(nchunks, mblocks))
        mc = MR * ((mblocks + chunks - 1) // chunks)
        ntask = nct * chunks
        bstride = NP * 4
        # one worker per thread, each taking the next task from an atomic counter (dynamic
        # schedule: a thread slowed by a busy core takes fewer tasks); scratch tiles
        # allocated once per worker
        nthr = nthreads if PAR else 1
        nthr = max(1, min(nthr, ntask))
        work = np.empty((nthr, MR * NR + NR), np.int32)
        tmpw = np.empty((nthr, MR, NR), OUT_DT)
        counter = np.zeros(1, np.int64)
        for tid in prange(nthr):
            scratch = work[tid, : MR * NR]
            init = work[tid, MR * NR :]
            tmp = tmpw[tid]
            while True:
                t = atomic_next(counter)
                if t >= ntask:
                    break
                ct = t // chunks
                rc = t - ct * chunks
                i_start = rc * mc
                i_stop = min(M, i_start + mc)
                j0 = ct * NR
                p = j0 // NP
                boff = p * KG * NP * 4 + (j0 - p * NP) * 4
                nc = min(NR, N - j0)
                # per-column integer terms start the accumulators: bias - a_zp * colsum (exact:
                # every partial sum and the result fit int32 within the K limits of the wrapper)
                init[:] = 0
                if not RAW:
                    ib_t = ibias[j0 : j0 + nc]
                    cs_t = colc[j0 : j0 + nc]
                    for cc in range(nc):
                        init[cc] = np.int32(np.int64(ib_t[cc]) - azp64 * np.int64(cs_t[cc]))
                if NATIVE:
                    full = nc == NR
                    for i0 in range(i_start, i_stop, MR):
                        mr = min(MR, i_stop - i0)
                        # full tiles are written in place; the last, partial one via tmp
                        if full:
                            dst = out
                            o_off = (i0 * N + j0) * ES
                            ldo = N * ES
                        else:
                            dst = tmp
                            o_off = 0
                            ldo = NR * ES
                        if use_fast:
                            _tile_fused(aq, i0, lda, b, boff, bstride, KG, init, mr, dst, o_off,
                                        ldo, p1, p2, bzp_p, rowsum, j0, s1, s2, s3, MR, NV,
                                        V_FAST, MODE)  # fmt: skip
                        else:
                            _tile_fused(aq, i0, lda, b, boff, bstride, KG, init, mr, dst, o_off,
                                        ldo, p1, p2, bzp_p, rowsum, j0, s1, s2, s3, MR, NV,
                                        V_EXACT, MODE)  # fmt: skip
                        if not full:
                            for r in range(mr):
                                out[i0 + r, j0 : j0 + nc] = tmp[r, :nc]
                    continue
                bs_t = bscale[j0 : j0 + nc]
                fb_t = fbias[j0 : j0 + nc]
                bz_t = bzp[j0 : j0 + nc]
                fbq_t = fbq[j0 : j0 + nc]
                mult_t = mult[j0 : j0 + nc]
                for i0 in range(i_start, i_stop, MR):
                    mr = min(MR, i_stop - i0)
                    if use_fast:
                        _tile(aq, i0, lda, b, boff, bstride, KG, scratch, init, mr, MR, NV, V_FAST)
                    else:
                        _tile(aq, i0, lda, b, boff, bstride, KG, scratch, init, mr, MR, NV, V_EXACT)
                    for r in range(mr):
                        i = i0 + r
                        sv = scratch[r * NR : r * NR + nc]
                        ov = out[i, j0 : j0 + nc]
                        if RAW:
                            ov[:] = sv
                        elif FLOAT:
                            _ep_float(sv, ov, bs_t, fb_t, q_scale, flo, rowsum[i], bz_t, has_bzp)
                        else:
                            _ep_requant(
                                sv, ov, fbq_t, mult_t, fczp, qlo, fqmax, rowsum[i], bz_t, has_bzp
                            )
        return -1

    return gemm


@kernel_family("gemm_ceiling")
def ceiling_kernel(key):
    """The machine's int8 ceiling: ``reps`` register tiles on L1-resident data per thread.

    Key ``(variant, MR, NV, NR)``; called as ``kern(a, b, kgroups, reps, threads)``.
    """
    variant, MR, NV, NR = key
    V = VARIANTS[variant]
    NATIVE = V in NATIVE_VARIANTS
    sig = types.int64(
        types.Array(types.uint8, 2, "A"),
        types.Array(types.int8, 1, "C"),
        types.int64,
        types.int64,
        types.int64,
    )

    @numba.njit(sig, parallel=PRANGE_ONLY, cache=True, nogil=True)
    def ceiling(a, b, kgroups, reps, threads):
        lda = a.strides[0]
        for _t in prange(threads):
            out = np.empty((MR, NR), np.int32)
            init = np.zeros(NR, np.int32)
            scratch = np.empty(MR * NR, np.int32)
            f1 = np.zeros(NR, np.float32)
            z1 = np.zeros(NR, np.int32)
            rs = np.zeros(MR, np.int64)
            zero = np.float32(0.0)
            for _ in range(reps):
                if NATIVE:
                    _tile_fused(a, 0, lda, b, 0, NR * 4, kgroups, init, MR, out, 0, NR * 4, f1,
                                f1, z1, rs, 0, zero, zero, zero, MR, NV, V, MODE_RAW)  # fmt: skip
                else:
                    _tile(a, 0, lda, b, 0, NR * 4, kgroups, scratch, init, MR, MR, NV, V)
        return 0

    return ceiling


@kernel_family("gemm_pack")
def pack_kernel(key):
    """Pack ``w [N, K]`` int8 into panels (see the module docstring) in one pass.

    Key ``()``; ``pack(w, NP, packed, colsum) -> pairmax`` fills ``packed`` (zero padded),
    ``colsum[j] = sum_k w[j, k]`` and returns ``max |w[j, 2i]| + |w[j, 2i + 1]|`` (the bound that
    decides whether ``vpmaddubsw`` can saturate).
    """
    sig = types.int64(
        types.Array(types.int8, 2, "A"),
        types.int64,
        types.Array(types.int8, 1, "C"),
        types.Array(types.int64, 1, "C"),
    )

    @numba.njit(sig, cache=True, nogil=True, error_model="numpy")
    def pack(w, NP, packed, colsum):
        N, K = w.shape
        KG = (K + 3) // 4
        npan = (N + NP - 1) // NP
        colsum[:] = 0
        pairmax = np.int64(0)
        for p in range(npan):
            for g in range(KG):
                base = (p * KG + g) * NP * 4
                for c in range(NP):
                    j = p * NP + c
                    q = base + 4 * c
                    if j >= N:
                        for t in range(4):
                            packed[q + t] = 0
                        continue
                    s = np.int64(0)
                    for t in range(4):
                        k = 4 * g + t
                        v = w[j, k] if k < K else np.int8(0)
                        packed[q + t] = v
                        s += v
                    colsum[j] += s
                    p0 = abs(np.int64(packed[q])) + abs(np.int64(packed[q + 1]))
                    p1 = abs(np.int64(packed[q + 2])) + abs(np.int64(packed[q + 3]))
                    pairmax = max(pairmax, p0, p1)
        return pairmax

    return pack
