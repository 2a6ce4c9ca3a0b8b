"""Float32 activations x float16 / bfloat16 weights -> float32 (FBGEMM's ``FbgemmFP16``).

Layout
------
The weight ``w`` (``[N, K]``) is rounded once to 16-bit codes and packed into panels of
``PANEL = 16`` output columns, K-major inside a panel: ``packed[p, k, c] = code(w[16 p + c,
k])`` -- for each ``k`` one 32-byte row of 16 half-precision weights (two ymm of 8 lanes on
AVX2, one zmm of 16 on AVX-512).  ``N`` is zero-padded to whole panels, ``K`` is not padded.
The buffer is 64-byte aligned (loads are unaligned anyway, so a copy of it works too).

Microkernel (native ISAs)
-------------------------
:func:`hkr` is a Numba ``@intrinsic`` emitting LLVM IR for an ``mr x (16 * npan)`` register
tile over ``npan`` adjacent panels (``mr <= MR``; ``npan`` 4 for one row, 2 for two rows, and
2 for any row count on AVX-512, 1 on AVX2): per ``k`` it loads the panel rows, widens them to
float32 *in registers* -- float16 by ``fpext <L x half> to <L x float>`` (F16C ``vcvtph2ps``
on AVX2 / AVX-512), bfloat16 by ``zext`` to i32, ``shl 16``, ``bitcast`` -- broadcasts one
activation per row and accumulates with ``llvm.fma`` (``vfmadd231ps``).  The bias add and the
ReLU are fused in the store.  Each output is the sequential FMA sum over ``k = 0 .. K-1``
(then ``+ bias``), so results do not depend on the tiling, the ISA or the thread count.

Portable path
-------------
Plain Numba loops: a ``KC x 16`` block of the panel is widened to float32 by scalar bit
manipulation (no F16C assumed) into a scratch block, then multiplied with ``a * w + acc``
(``contract`` only: FMA where the target has it, no reassociation -- the same sequential sum
over ``k``).

Kernel keys (``kernel_family("gemm_half")``)
--------------------------------------------
``(isa, wtype, relu, has_bias, parallel, MR)``: ``isa`` from :func:`qgemm._config.get_isa`
(``"portable"``, ``"avx2"``, ``"avxvnni"``, ``"avx512vnni"``; the tile from
:attr:`qgemm._isa.IsaPath.half`), ``wtype`` ``"float16"`` or ``"bfloat16"``.
Every kernel has the signature ``(x, m, k, b, n, out, bias, mrows, threads) -> None``: ``x``
the ``[m, k]`` float32 activations (any non-negative row stride, unit inner stride), ``b`` the
packed uint16 codes, ``out`` the flat C-contiguous ``[m, n]`` float32 result, ``bias`` float32
of at least ``n`` elements (ignored without bias), ``mrows`` the rows per task (a multiple of
``MR``), ``threads`` the workers of the parallel twin (ignored by the serial one).  Tasks =
groups of ``GROUP`` panels x row chunks; the native parallel twin runs one worker per thread,
each taking the next task from an atomic counter (a thread slowed by a busy core takes fewer
tasks), the portable one a static ``prange`` over the tasks.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

from .. import _isa
from .._cache import kernel_family
from .._tuning import HALF_PORTABLE_KC, HALF_PREFETCH_AVX2
from .gemm_ukernel import atomic_next

PANEL = 16
"""Output columns per packed panel (all ISAs share the layout, so packing is ISA-free)."""

GROUP = 4
"""Panels per task: rows 1 and 2 are computed over 4 or 2 adjacent panels at once, more rows
over 2 on AVX-512 (one vector per panel row) and 1 on AVX2."""

WTYPES = ("float16", "bfloat16")
_FP16 = 0
_BF16 = 1

# Parallelise the explicit prange loop only (see qgemm._kernels.gemm): with plain
# parallel=True every array expression becomes a fork/join region of its own.
_PRANGE_ONLY = {
    "prange": True,
    "comprehension": False,
    "reduction": False,
    "inplace_binop": False,
    "setitem": False,
    "numpy": False,
    "stencil": False,
    "fusion": False,
}

_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F32 = ir.FloatType()


def tile_shape(isa: str) -> tuple[int, int, int]:
    """``(MR, NV, LANES)`` of the register tile for ``isa`` (``NV * LANES == PANEL``), from the
    ISA table (:attr:`qgemm._isa.IsaPath.half`)."""
    try:
        t = _isa.path(isa).half
    except KeyError:
        raise ValueError(f"isa: expected one of {_isa.ISA_PATHS}, got {isa!r}") from None
    return t.mr, t.nv, t.nr // t.nv


# --------------------------------------------------------------------------- microkernel


def _splat(builder: ir.IRBuilder, scalar: ir.Value, vty: ir.VectorType) -> ir.Value:
    undef = ir.Constant(vty, ir.Undefined)
    v = builder.insert_element(undef, scalar, ir.Constant(_I32, 0))
    mask = ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count)
    return builder.shuffle_vector(v, undef, mask)


def _data_i8p(context, builder, aty, val):
    arr = cgutils.create_struct_proxy(aty)(context, builder, value=val)
    return builder.bitcast(arr.data, _I8.as_pointer())


def _widen(builder, codes, lanes, wtype):
    """``<lanes x i16>`` weight codes -> ``<lanes x float>``."""
    f_t = ir.VectorType(_F32, lanes)
    if wtype == _FP16:
        h = builder.bitcast(codes, ir.VectorType(ir.HalfType(), lanes))
        return builder.fpext(h, f_t)
    wide = builder.zext(codes, ir.VectorType(_I32, lanes))
    wide = builder.shl(wide, ir.Constant(ir.VectorType(_I32, lanes), [16] * lanes))
    return builder.bitcast(wide, f_t)


def _emit_tile(builder, module, g, rows, npan, nv, lanes, wtype, relu, has_bias, pf):
    """One ``rows x (npan * NV * LANES)`` tile: the k loop, then bias, ReLU and the store."""
    f_t = ir.VectorType(_F32, lanes)
    c_t = ir.VectorType(_I16, lanes)
    fma = cgutils.get_or_insert_function(
        module, ir.FunctionType(f_t, [f_t, f_t, f_t]), f"llvm.fma.v{lanes}f32"
    )
    if pf:  # declared only where used: a tile without prefetch is the IR it always was
        pf_t = ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32])
        prefetch = cgutils.get_or_insert_function(module, pf_t, "llvm.prefetch.p0")
    zero = ir.Constant(f_t, [0.0] * lanes)
    nvec = npan * nv  # vectors per row; vector q * nv + v: panel q, lanes v * LANES ...
    accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(nvec)] for _ in range(rows)]
    a_rows = [
        builder.gep(g["a"], [builder.mul(g["lda"], ir.Constant(_I64, r))]) for r in range(rows)
    ]
    w_rows = [builder.gep(g["b"], [builder.mul(g["pstride"], ir.Constant(_I64, q))])
              for q in range(npan)]  # fmt: skip
    row_bytes = ir.Constant(_I64, 2 * nv * lanes)
    with cgutils.for_range(builder, g["k"]) as loop:
        kk = loop.index
        koff = builder.mul(kk, row_bytes)
        ws = []
        for q in range(npan):
            bk = builder.gep(w_rows[q], [koff])
            if pf:
                pp = builder.gep(bk, [ir.Constant(_I64, pf)])
                builder.call(prefetch, [pp, ir.Constant(_I32, 0), ir.Constant(_I32, 3),
                                        ir.Constant(_I32, 1)])  # fmt: skip
            for v in range(nv):
                ptr = builder.gep(bk, [ir.Constant(_I64, 2 * v * lanes)])
                codes = builder.load(builder.bitcast(ptr, c_t.as_pointer()), align=1)
                ws.append(_widen(builder, codes, lanes, wtype))
        k4 = builder.mul(kk, ir.Constant(_I64, 4))
        for r in range(rows):
            pa = builder.bitcast(builder.gep(a_rows[r], [k4]), _F32.as_pointer())
            av = _splat(builder, builder.load(pa, align=1), f_t)
            for j in range(nvec):
                acc = builder.load(accs[r][j])
                builder.store(builder.call(fma, [av, ws[j], acc]), accs[r][j])
    biases = []
    if has_bias:  # the tile's columns are contiguous in out and bias (adjacent panels)
        for j in range(nvec):
            ptr = builder.gep(g["bias"], [ir.Constant(_I64, 4 * j * lanes)])
            biases.append(builder.load(builder.bitcast(ptr, f_t.as_pointer()), align=1))
    for r in range(rows):
        row_base = builder.gep(g["o"], [builder.mul(g["ldo"], ir.Constant(_I64, r))])
        for j in range(nvec):
            y = builder.load(accs[r][j])
            if has_bias:
                y = builder.fadd(y, biases[j])
            if relu:  # y < 0 ? 0 : y  -- NaN propagates (as torch.relu / np.maximum)
                y = builder.select(builder.fcmp_ordered("<", y, zero), zero, y)
            dst = builder.gep(row_base, [ir.Constant(_I64, 4 * j * lanes)])
            builder.store(y, builder.bitcast(dst, f_t.as_pointer()), align=1)


@intrinsic
def hkr(typingctx, a, a_off, b, b_off, pstride, k, mr, out, o_off, ldo, bias, bias_off, MR, NPAN,
        NV, LANES, WTYPE, RELU, BIAS, PF):  # fmt: skip
    """``out[r, 0:C] = relu?(sum_k a[r, k] * widen(b[k, 0:C]) + bias?[0:C])`` for ``r < mr``,
    ``C = NPAN * NV * LANES`` columns from ``NPAN`` adjacent panels ``pstride`` bytes apart.

    ``a`` is a 2-D float32 array with a unit inner stride (its row stride is read from it);
    offsets are in bytes from each array's first element, ``ldo`` is the output row stride in
    bytes; ``MR, NPAN, NV, LANES, WTYPE, RELU, BIAS, PF`` are literals (``mr <= MR``: one
    unrolled tile per row count behind a ``switch``).  ``PF > 0`` prefetches each panel's
    weights ``PF`` bytes ahead of the row being read (a hint: it never faults, also past the
    end of the buffer, and changes no result).
    """
    lits = (("MR", MR), ("NPAN", NPAN), ("NV", NV), ("LANES", LANES), ("WTYPE", WTYPE),
            ("RELU", RELU), ("BIAS", BIAS), ("PF", PF))  # fmt: skip
    for name, t in lits:
        if not isinstance(t, types.IntegerLiteral):
            raise TypingError(f"hkr: {name} must be an integer literal, got {t}")
    for name, t, dt in (("a", a, types.float32), ("b", b, types.uint16),
                        ("out", out, types.float32), ("bias", bias, types.float32)):  # fmt: skip
        if not (isinstance(t, types.Array) and t.dtype == dt):
            raise TypingError(f"hkr: {name} must be a {dt} array, got {t}")
    if a.ndim != 2:
        raise TypingError(f"hkr: a must be 2-D, got {a}")
    ints = (("a_off", a_off), ("b_off", b_off), ("pstride", pstride), ("k", k), ("mr", mr),
            ("o_off", o_off), ("ldo", ldo), ("bias_off", bias_off))  # fmt: skip
    for name, t in ints:
        if not isinstance(t, types.Integer):
            raise TypingError(f"hkr: {name} must be an integer, got {t}")
    mr_max, npan, nv = MR.literal_value, NPAN.literal_value, NV.literal_value
    lanes, wtype = LANES.literal_value, WTYPE.literal_value
    relu, has_bias = bool(RELU.literal_value), bool(BIAS.literal_value)
    pf = PF.literal_value
    sig = types.void(a, a_off, b, b_off, pstride, k, mr, out, o_off, ldo, bias, bias_off, MR,
                     NPAN, NV, LANES, WTYPE, RELU, BIAS, PF)  # fmt: skip

    def codegen(context, builder, signature, args):
        def i64(idx):
            return context.cast(builder, args[idx], signature.args[idx], types.int64)

        def data(idx):
            return _data_i8p(context, builder, signature.args[idx], args[idx])

        a_arr = cgutils.create_struct_proxy(signature.args[0])(context, builder, value=args[0])
        lda = cgutils.unpack_tuple(builder, a_arr.strides, 2)[0]
        g = {
            "a": builder.gep(data(0), [i64(1)]),
            "lda": lda,
            "b": builder.gep(data(2), [i64(3)]),
            "pstride": i64(4),
            "k": i64(5),
            "o": builder.gep(data(7), [i64(8)]),
            "ldo": i64(9),
            "bias": builder.gep(data(10), [i64(11)]),
        }
        module = builder.module
        fn = builder.function
        end = fn.append_basic_block("hkr.end")
        sw = builder.switch(i64(6), end)
        for rows in range(1, mr_max + 1):
            bb = fn.append_basic_block(f"hkr.rows{rows}")
            sw.add_case(ir.Constant(_I64, rows), bb)
            builder.position_at_end(bb)
            _emit_tile(builder, module, g, rows, npan, nv, lanes, wtype, relu, has_bias, pf)
            builder.branch(end)
        builder.position_at_end(end)
        return context.get_dummy_value()

    return sig, codegen


# ----------------------------------------------------------------------- portable helpers


@numba.njit(inline="always", error_model="numpy")
def _h2f_bits(h):
    """IEEE binary16 bits -> binary32 bits (exact; NaN payloads and signs kept)."""
    s = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    mant = h & 0x3FF
    if e == 0x1F:
        return s | 0x7F800000 | (mant << 13)
    if e != 0:
        return s | ((e + 112) << 23) | (mant << 13)
    if mant == 0:
        return s
    e2 = 113  # subnormal: mant * 2^-24, normalised
    while (mant & 0x400) == 0:
        mant <<= 1
        e2 -= 1
    return s | (e2 << 23) | ((mant & 0x3FF) << 13)


def _signature():
    x2 = types.Array(types.float32, 2, "A")
    f1 = types.Array(types.float32, 1, "C")
    u1 = types.Array(types.uint16, 1, "C")
    i64 = types.int64
    # (x, m, k, b, n, out, bias, mrows, threads)
    return types.void(x2, i64, i64, u1, i64, f1, f1, i64, i64)


@kernel_family("gemm_half")
def gemm_half_kernel(key):
    """Build the half-weight GEMM for ``key = (isa, wtype, relu, has_bias, parallel, MR)``."""
    isa, wtype, relu, has_bias, parallel, mr_c = key
    if wtype not in WTYPES:
        raise ValueError(f"wtype: expected one of {WTYPES}, got {wtype!r}")
    _, NV, LN = tile_shape(isa)
    WT = _FP16 if wtype == "float16" else _BF16
    RELU = 1 if relu else 0
    BIAS = 1 if has_bias else 0
    NR = PANEL
    G = GROUP
    PAR = bool(parallel)
    PFD = HALF_PREFETCH_AVX2 if isa == "avx2" else 0
    # Tiles of one vector per panel row (AVX-512: 16 lanes) take two panels at once for every
    # row count: 2 accumulators per row (up to 24 of the 32 zmm), each broadcast activation
    # feeds two FMAs.  Measured on Zen 5 (2 threads, same run, vs one panel): 1024^3 5.6 ->
    # 4.3-4.5 ms, 20x4096x1024 422 -> 355-369 us, 102x1024x512 239 -> 216, 3x4096x1024 140 ->
    # 85.  Two-vector tiles (AVX2: 6 rows x 2 ymm) have no registers to spare.
    PAIRED = NV == 1
    opts = {
        "cache": True,
        "nogil": True,
        "error_model": "numpy",
        "parallel": _PRANGE_ONLY if parallel else False,
    }
    if isa == "portable":
        return _build_portable(WT, bool(relu), bool(has_bias), PAR, opts)

    @numba.njit(_signature(), **opts)
    def gemm_half(x, m, k, b, n, out, bias, mrows, threads):
        npan = (n + NR - 1) // NR
        nfull = n // NR
        ngrp = (npan + G - 1) // G
        ntm = (m + mrows - 1) // mrows
        ntask = ngrp * ntm
        ps = k * (2 * NR)  # bytes per panel
        lda = x.strides[0]
        ldo = n * 4
        # one worker per thread, each taking the next task from an atomic counter (dynamic
        # schedule: a thread slowed by a busy core takes fewer tasks).  PAR must be read in
        # the body: Numba's disk cache keys an entry on the bytecode and the closure's values,
        # not on the ``parallel`` option, so twins with equal closures share one entry and
        # whichever is compiled first serves both (a "parallel" kernel running on one thread).
        nthr = max(1, min(threads if PAR else 1, ntask))
        counter = np.zeros(1, np.int64)
        once = PFD > 0 and m <= mr_c
        for _w in prange(nthr):
            tile = np.empty(mr_c * NR, np.float32)  # the last, partial panel's tile
            while True:
                t = atomic_next(counter)
                if t >= ntask:
                    break
                grp = t // ntm
                i_lo = (t - grp * ntm) * mrows
                i_hi = min(m, i_lo + mrows)
                p_lo = grp * G
                p_full = min(p_lo + G, nfull)  # full panels of this group: p_lo .. p_full - 1
                for i0 in range(i_lo, i_hi, mr_c):
                    mr = min(mr_c, i_hi - i0)
                    a_off = i0 * lda
                    o_row = i0 * n
                    p = p_lo
                    # Rows 1 and 2 take several panels at once: more independent FMA chains
                    # (the same sequential sum per output, so results do not change).
                    if mr == 1:
                        while p + 4 <= p_full:
                            hkr(x, a_off, b, p * ps, ps, k, 1, out, (o_row + p * NR) * 4, ldo,
                                bias, p * NR * 4, 1, 4, NV, LN, WT, RELU, BIAS, 0)  # fmt: skip
                            p += 4
                    if mr <= 2:
                        while p + 2 <= p_full:
                            hkr(x, a_off, b, p * ps, ps, k, mr, out, (o_row + p * NR) * 4, ldo,
                                bias, p * NR * 4, 2, 2, NV, LN, WT, RELU, BIAS, 0)  # fmt: skip
                            p += 2
                    elif PAIRED:
                        # one vector per panel row (AVX-512): 3..MR rows take two panels at
                        # once (6..24 FMA chains instead of 3..12)
                        while p + 2 <= p_full:
                            hkr(x, a_off, b, p * ps, ps, k, mr, out, (o_row + p * NR) * 4, ldo,
                                bias, p * NR * 4, mr_c, 2, NV, LN, WT, RELU, BIAS, 0)  # fmt: skip
                            p += 2
                    while p < p_full:
                        if once:  # each weight used by this one row tile: prefetch the stream
                            hkr(x, a_off, b, p * ps, ps, k, mr, out, (o_row + p * NR) * 4, ldo,
                                bias, p * NR * 4, mr_c, 1, NV, LN, WT, RELU, BIAS, PFD)  # fmt: skip
                        else:
                            hkr(x, a_off, b, p * ps, ps, k, mr, out, (o_row + p * NR) * 4, ldo,
                                bias, p * NR * 4, mr_c, 1, NV, LN, WT, RELU, BIAS, 0)  # fmt: skip
                        p += 1
                    if p == nfull and p < npan and p < p_lo + G:  # last, partial panel
                        col0 = p * NR
                        ncols = n - col0
                        hkr(x, a_off, b, p * ps, ps, k, mr, tile, 0, NR * 4, bias, 0, mr_c, 1,
                            NV, LN, WT, 0, 0, 0)  # fmt: skip
                        for r in range(mr):
                            o = o_row + r * n + col0
                            for c in range(ncols):
                                y = tile[r * NR + c]
                                if BIAS:
                                    y = y + bias[col0 + c]
                                if RELU and y < 0:
                                    y = np.float32(0.0)
                                out[o + c] = y

    return gemm_half


def _build_portable(WT, RELU, BIAS, PAR, opts):
    NR = PANEL
    G = GROUP
    KC = HALF_PORTABLE_KC
    fm = {"contract"}

    @numba.njit(_signature(), fastmath=fm, **opts)
    def gemm_half_portable(x, m, k, b, n, out, bias, mrows, threads):
        _ = PAR  # in the closure: the twins must not share a disk-cache entry (see above)
        npan = (n + NR - 1) // NR
        ngrp = (npan + G - 1) // G
        ntm = (m + mrows - 1) // mrows
        for t in prange(ngrp * ntm):
            grp = t // ntm
            i_lo = (t - grp * ntm) * mrows
            i_hi = min(m, i_lo + mrows)
            rows = i_hi - i_lo
            acc = np.empty(rows * NR, np.float32)
            wbits = np.empty(KC * NR, np.uint32)
            wf = wbits.view(np.float32)
            for p in range(grp * G, min(grp * G + G, npan)):
                col0 = p * NR
                ncols = min(NR, n - col0)
                acc[:] = 0
                for k0 in range(0, k, KC):
                    kc = min(KC, k - k0)
                    base = (p * k + k0) * NR
                    for j in range(kc * NR):
                        h = np.uint32(b[base + j])
                        if WT == _FP16:
                            wbits[j] = _h2f_bits(h)
                        else:
                            wbits[j] = h << np.uint32(16)
                    for r in range(rows):
                        xr = x[i_lo + r, k0 : k0 + kc]
                        ar = acc[r * NR : r * NR + NR]
                        for kk in range(kc):
                            av = xr[kk]
                            wk = wf[kk * NR : kk * NR + NR]
                            for c in range(NR):
                                ar[c] = av * wk[c] + ar[c]
                for r in range(rows):
                    o = (i_lo + r) * n + col0
                    for c in range(ncols):
                        y = acc[r * NR + c]
                        if BIAS:
                            y = y + bias[col0 + c]
                        if RELU and y < 0:
                            y = np.float32(0.0)
                        out[o + c] = y

    return gemm_half_portable
