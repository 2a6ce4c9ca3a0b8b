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
at pack time, so per-tensor, per-group and per-channel weights share kernels.  Which variants
and tile each instruction-set path uses is :mod:`qgemm._isa`'s table.

Output stage
------------
The kernels take the operands of the output pipeline as one
:class:`~.output_stage.OutputStage` (its fields in order at the Python boundary) and turn it
into the microkernels' operands in one call of :func:`~.output_stage.lower`.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange, types
from numba.core.errors import TypingError
from numba.extending import overload

from .._cache import kernel_family
from .._tuning import GEMM_QUANTIZE_PARALLEL_MIN_ELEMS as PAR_ELEMS
from .gemm_ukernel import (
    AVX2_EXACT,
    AVX2_FAST,
    AVX2_WIDE,
    AVX2_WIDEN,
    VNNI,
    VNNI256,
    atomic_next,
    ukr,
)
from .gemm_ukernel import RAW as MODE_RAW
from .output_stage import MODES, PAD, STAGE_TYPES, OutputStage, ep_float, ep_requant, lower
from .quantize import choose_qparams_scalar

# Microkernel variants (literal ints passed to ``_tile``).
PORTABLE = 10
PORTABLE_SAT = 11
VARIANTS = {
    "vnni": VNNI,
    "avx2": AVX2_FAST,
    "avx2x": AVX2_EXACT,
    "avx2w": AVX2_WIDE,
    "avx2v": AVX2_WIDEN,
    "avx2s": AVX2_FAST,
    "vnni256": VNNI256,
    "portable": PORTABLE,
    "portables": PORTABLE_SAT,
}

INT16_MAX = 32767
NATIVE_VARIANTS = (VNNI, AVX2_FAST, AVX2_EXACT, AVX2_WIDE, VNNI256, AVX2_WIDEN)
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


# ---------------------------------------------------------------------------- activations


@numba.njit(nogil=True, error_model="numpy")
def _row_minmax_keys(x, K):
    """``(min, max)`` of ``x[:K]`` (contiguous float32) as order-preserving int32 keys.

    The float bits ``b`` map to ``b ^ ((b >> 31) & 0x7fffffff)``, an int32 whose order is the
    floats' order, so the min and max are integer reductions that LLVM vectorises exactly,
    without fast-math (8 lanes of ``vpminsd``/``vpmaxsd`` on AVX2: the int64 form ran 4.7x
    slower).  Only the call's pair of keys is turned back into floats (:func:`_keys_to_floats`):
    no allocation per row (a per-row 2-element buffer for the bit cast cost ~60 ns a row,
    1024 x 128 ran 5x slower)."""
    xi = x.view(np.int32)
    mn = np.int32(0x7FFFFFFF)
    mx = np.int32(-0x80000000)
    for k in range(K):
        b = xi[k]
        o = np.int32(b ^ ((b >> 31) & 0x7FFFFFFF))
        mn = min(mn, o)
        mx = max(mx, o)
    return mn, mx


@numba.njit(nogil=True, error_model="numpy")
def _keys_finite(lo, hi):
    """Whether every float whose key lies in ``[lo, hi]`` is finite: in the key order every
    +inf/+NaN maps at or above ``+inf``'s key ``0x7f800000`` and every -inf/-NaN at or below
    ``-inf``'s key ``0x807fffff`` (as int32), so both ends must lie strictly inside."""
    return hi < np.int32(0x7F800000) and lo > np.int32(-0x7F800001)


@numba.njit(nogil=True, error_model="numpy")
def _keys_to_floats(lo, hi):
    """The floats of two order-preserving keys (the map is its own inverse)."""
    t = np.empty(2, np.int32)
    t[0] = np.int32(lo ^ ((lo >> 31) & 0x7FFFFFFF))
    t[1] = np.int32(hi ^ ((hi >> 31) & 0x7FFFFFFF))
    f = t.view(np.float32)
    return f[0], f[1]


@numba.njit(nogil=True, error_model="numpy")
def _quantize_row(x, q, K, scale, zp, qmax):
    """``q[:K] = clamp(rint(x / scale) + zp, 0, qmax)``; ``q[K:]`` (k-group padding) = 0."""
    for k in range(K):
        v = np.rint(x[k] / scale) + zp
        q[k] = np.uint8(min(max(v, np.float32(0.0)), qmax))
    for k in range(K, q.shape[0]):
        q[k] = 0


# ---------------------------------------------------------------------------- the kernels

KINDS = tuple(MODES)
"""Output kinds: ``"raw"`` int32, ``"float"`` float32, ``"requant"`` uint8, ``"dynamic"``."""


def _signature(kind: str):
    a2 = types.Array(types.uint8, 2, "A")
    x2 = types.Array(types.float32, 2, "C")
    b1 = types.Array(types.int8, 1, "C")
    out_t = {
        "raw": types.int32,
        "float": types.float32,
        "requant": types.uint8,
        "dynamic": types.float32,
    }[kind]
    out2 = types.Array(out_t, 2, "C")
    first = x2 if kind == "dynamic" else a2
    i64 = types.int64
    # (a, M, K, KG, b, b16, N, NP, pairmax, *stage, nchunks, nthreads, out) -> int64
    return types.int64(first, i64, i64, i64, b1, b1, i64, i64, i64, *STAGE_TYPES, i64, i64, out2)


@kernel_family("gemm")
def gemm_kernel(key):
    """Build the GEMM kernel for ``key = (kind, fast, exact, MR, NV, NR, parallel)``.

    Called as ``kern(a, M, K, KG, b, b16, N, NP, pairmax, *stage, nchunks, nthreads, out)``
    with ``stage`` an :class:`~.output_stage.OutputStage` and ``b16`` the int16 twin of the
    packed weight (bytes; ``PackedWeight._wide``) when the exact variant is ``avx2w`` and the
    weight can saturate ``vpmaddubsw`` (else any int8 array: it is not read).  Returns -1 on
    success; otherwise nothing is written to ``out`` and the result is the flat index of the
    first non-finite activation (dynamic kind), or ``-2 - j`` for a non-finite float bias at
    column ``j``.
    """
    kind, fast_name, exact_name, MR, NV, NR, parallel = key
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    V_FAST = VARIANTS[fast_name]
    V_EXACT = VARIANTS[exact_name]
    CHOOSE = V_FAST != V_EXACT  # pick fast/exact at run time by the saturation bound
    SINGLE = not CHOOSE  # (a plain constant, so numba prunes the other tile calls)
    WIDE = V_EXACT == AVX2_WIDE  # the exact variant reads int16 weights (the twin b16) ...
    A16 = WIDE or V_EXACT == AVX2_WIDEN  # ... and int16 activations
    RAW = kind == "raw"
    FLOAT = kind in ("float", "dynamic")
    DYN = kind == "dynamic"
    PAR = bool(parallel)
    NATIVE = V_FAST in NATIVE_VARIANTS
    MODE = MODES[kind]
    OUT_DT = np.int32 if RAW else (np.float32 if FLOAT else np.uint8)
    ES = np.dtype(OUT_DT).itemsize

    @numba.njit(
        _signature(kind),
        parallel=PRANGE_ONLY if parallel else False,
        cache=True,
        nogil=True,
        error_model="numpy",
    )
    def gemm(a, M, K, KG, b, b16, N, NP, pairmax, w_zero_point, has_w_zero_point, w_colsum,
             w_scale, x_zero_point, x_scale, x_qmax, int_bias, float_bias, relu, out_scale,
             out_zero_point, out_qmax, nchunks, nthreads, out):  # fmt: skip
        stage = OutputStage(w_zero_point, has_w_zero_point, w_colsum, w_scale, x_zero_point,
                            x_scale, x_qmax, int_bias, float_bias, relu, out_scale,
                            out_zero_point, out_qmax)  # fmt: skip
        KP = 4 * KG
        if not RAW:
            fbias = stage.float_bias
            for j in range(N):
                fb = fbias[j]
                if not (fb - fb == np.float32(0.0)):
                    return -2 - j
        # ---- activations: quantize (dynamic) or take as is
        if DYN:
            qmax = stage.x_qmax
            lo = np.float32(0.0)
            hi = np.float32(0.0)
            if M > 0 and K > 0:
                # x is C-contiguous [M, K] (the wrapper's contract): the serial pass reads it
                # as one run; a parallel region costs microseconds, so only large x splits
                if PAR and M * K >= PAR_ELEMS:
                    lo_r = np.empty(M, np.int32)
                    hi_r = np.empty(M, np.int32)
                    for i in prange(M):
                        lo_r[i], hi_r[i] = _row_minmax_keys(a[i], K)
                    lo_k = lo_r[0]  # (loops, not .min()/.max(): 0.8 s less to compile)
                    hi_k = hi_r[0]
                    for i in range(1, M):
                        lo_k = min(lo_k, lo_r[i])
                        hi_k = max(hi_k, hi_r[i])
                else:
                    lo_k, hi_k = _row_minmax_keys(a.reshape(M * K), M * K)
                if not _keys_finite(lo_k, hi_k):  # the first non-finite element, in order
                    for i in range(M):
                        for k in range(K):
                            xv = a[i, k]
                            if not (xv - xv == np.float32(0.0)):
                                return i * K + k
                lo, hi = _keys_to_floats(lo_k, hi_k)
            sc, zp = choose_qparams_scalar(lo, hi, 0, qmax)
            q_scale = sc
            q_zp = zp
            aq = np.empty((M, KP), np.uint8)
            if PAR and M * K >= PAR_ELEMS:
                for i in prange(M):
                    _quantize_row(a[i], aq[i], K, sc, np.float32(zp), np.float32(qmax))
            elif KP == K:  # no k-group padding: x and aq are the same run of M * K
                _quantize_row(a.reshape(M * K), aq.reshape(M * K), M * K, sc, np.float32(zp),
                              np.float32(qmax))  # fmt: skip
            else:
                for i in range(M):
                    _quantize_row(a[i], aq[i], K, sc, np.float32(zp), np.float32(qmax))
            amax = np.int64(qmax)
        else:
            aq = a
            q_scale = stage.x_scale
            q_zp = stage.x_zero_point
            amax = np.int64(255)
            if CHOOSE and pairmax * 255 > INT16_MAX:
                amax = 0
                for i in range(M):
                    for k in range(K):
                        amax = max(amax, np.int64(aq[i, k]))
        use_fast = (not CHOOSE) or amax * pairmax <= INT16_MAX
        lda = aq.strides[0]
        if A16:
            # the exact variant's int16 activations (KP = 4 KG readable bytes per row of aq)
            mw = 0 if use_fast else M
            a16 = np.empty((mw, KP), np.int16)
            for i in range(mw):
                ar = aq[i]
                wr = a16[i]
                for k in range(KP):
                    wr[k] = ar[k]
            aw = a16.view(np.uint8)
            ldaw = 2 * KP
        # ---- the output stage: row sums, then the microkernels' operands (one place)
        has_bzp = stage.has_w_zero_point
        rowsum = np.zeros(M, np.int64)
        if has_bzp:
            for i in range(M):
                s = np.int64(0)
                for k in range(K):
                    s += aq[i, k]
                rowsum[i] = s
        p1, p2, s1, s2, s3 = lower(stage, q_scale, MODE, NATIVE)
        bzp = stage.w_zero_point
        ibias = stage.int_bias
        colc = stage.w_colsum
        azp64 = np.int64(q_zp)
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
                        if SINGLE or use_fast:  # (SINGLE: the one variant inlined once)
                            _tile_fused(aq, i0, lda, b, boff, bstride, KG, init, mr, dst, o_off,
                                        ldo, p1, p2, bzp, rowsum, j0, s1, s2, s3, MR, NV,
                                        V_FAST, MODE)  # fmt: skip
                        elif A16 and not WIDE:
                            _tile_fused(aw, i0, ldaw, b, boff, bstride, KG, init, mr, dst, o_off,
                                        ldo, p1, p2, bzp, rowsum, j0, s1, s2, s3, MR, NV,
                                        V_EXACT, MODE)  # fmt: skip
                        elif WIDE:
                            boffw = p * 2 * KG * NP * 4 + (j0 - p * NP) * 4
                            _tile_fused(aw, i0, ldaw, b16, boffw, bstride, 2 * KG, init, mr, dst,
                                        o_off, ldo, p1, p2, bzp, rowsum, j0, s1, s2, s3, MR, NV,
                                        V_EXACT, MODE)  # fmt: skip
                        else:
                            _tile_fused(aq, i0, lda, b, boff, bstride, KG, init, mr, dst, o_off,
                                        ldo, p1, p2, bzp, rowsum, j0, s1, s2, s3, MR, NV,
                                        V_EXACT, MODE)  # fmt: skip
                        if not full:  # (element loops: see lower's bias copy)
                            for r in range(mr):
                                for c in range(nc):
                                    out[i0 + r, j0 + c] = tmp[r, c]
                    continue
                p1_t = p1[j0 : j0 + nc]
                p2_t = p2[j0 : j0 + nc]
                bz_t = bzp[j0 : j0 + nc]
                for i0 in range(i_start, i_stop, MR):
                    mr = min(MR, i_stop - i0)
                    if SINGLE or use_fast:
                        _tile(aq, i0, lda, b, boff, bstride, KG, scratch, init, mr, MR, NV, V_FAST)
                    else:
                        _tile(aq, i0, lda, b, boff, bstride, KG, scratch, init, mr, MR, NV, V_EXACT)
                    for r in range(mr):
                        i = i0 + r
                        sv = scratch[r * NR : r * NR + nc]
                        ov = out[i, j0 : j0 + nc]
                        if RAW:
                            for c in range(nc):
                                ov[c] = sv[c]
                        elif FLOAT:
                            ep_float(sv, ov, p1_t, p2_t, s1, s2, rowsum[i], bz_t, has_bzp)
                        else:
                            ep_requant(sv, ov, p1_t, p2_t, s1, s2, s3, rowsum[i], bz_t, has_bzp)
        return -1

    return gemm


@kernel_family("gemm_ceiling")
def ceiling_kernel(key):
    """The machine's int8 ceiling: ``reps`` register tiles on L1-resident data per thread.

    Key ``(variant, MR, NV, NR)`` (:attr:`qgemm._isa.IsaPath.ceiling`); called as
    ``kern(a, b, kgroups, reps, threads)``.
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
            f1 = np.zeros(NR + PAD, np.float32)
            z1 = np.zeros(NR + PAD, np.int32)
            rs = np.zeros(MR, np.int64)
            i0 = np.int32(0)
            f0 = np.float32(0.0)
            stage = OutputStage(z1, False, z1, f1, i0, f0, 255, z1, f1, False, f0, i0, 255)
            p1, p2, s1, s2, s3 = lower(stage, f0, MODE_RAW, False)
            for _ in range(reps):
                if NATIVE:
                    _tile_fused(a, 0, lda, b, 0, NR * 4, kgroups, init, MR, out, 0, NR * 4, p1,
                                p2, z1, rs, 0, s1, s2, s3, MR, NV, V, MODE_RAW)  # fmt: skip
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
