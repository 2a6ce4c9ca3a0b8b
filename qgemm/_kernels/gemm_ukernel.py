"""The int8 GEMM register-tile microkernels with the output stage fused, emitted as LLVM IR
through a Numba ``@intrinsic`` (qgemm's counterpart of FBGEMM's asmjit-generated kernels).

``ukr(a, a_off, lda, b, b_off, bstride, kgroups, init, mr, out, o_off, ldo, p1, p2, bzp, rs,
col, row, s1, s2, s3, MR, NV, VARIANT, MODE)`` computes an ``mr x NR`` tile (``mr <= MR``) of
``init + A @ B`` over ``kgroups`` groups of 4 consecutive ``k`` in int32 registers, applies the
output stage to the registers and stores the tile:

* ``a`` (uint8): row ``r`` of the tile starts ``a_off + r * lda`` bytes into its data and holds
  ``4 * kgroups`` readable bytes.
* ``b`` (int8): the packed weight -- per k-group, ``NR`` columns x 4 consecutive ``k``
  (FBGEMM's ``PackBMatrix`` grouping); k-groups ``bstride`` bytes apart from ``b_off``.
* ``init`` (int32, ``NR``): starts every row's accumulators; the caller folds the per-column
  integer terms (``int bias - a_zp * colsum``) in there for free.
* output stage (``MODE``): the flat operands ``p1, p2, bzp, rs, s1, s2, s3`` that
  :func:`qgemm._kernels.output_stage.lower` -- the one place -- makes from an
  :class:`~qgemm._kernels.output_stage.OutputStage`.  ``RAW`` stores the int32 accumulators;
  ``FLOAT`` stores ``(raw - rs[row + r] * bzp[col + j]) * s1 * p1[col + j] + p2[col + j]`` then
  ``max(., s2)`` (FBGEMM's ``ReQuantizeForFloat``: ``s1`` = activation scale, ``p1`` = weight
  scales, ``p2`` = float bias, ``s2`` = 0 or -inf for ReLU); ``REQUANT`` stores uint8
  ``clamp(rint((raw' + p1) * p2) + s1, s2, s3)`` (``ReQuantizeOutput``: ``p1`` = bias / (a_s *
  w_s), ``p2`` = a_s * w_s / out_s, ``s1`` = out zero point, ``[s2, s3]`` the clamp range).
  All float arithmetic in float32 in that order, ``rint`` = round half to even.  The per-column
  vectors are read ``NR`` wide from ``col``: they are padded.  Row ``r`` of the output is
  ``o_off + r * ldo`` bytes into ``out``'s data.
* ``MR``, ``NV``, ``VARIANT``, ``MODE`` are compile-time literals; ``mr`` is a run-time value:
  one fully unrolled tile per ``mr`` in ``1..MR`` behind a ``switch``.

Variants (``NR`` = columns per tile):

``VNNI`` (0)
    AVX-512 VNNI: ``NV`` zmm accumulators of 16 columns per row, ``vpdpbusd`` (exact u8 x s8
    dot products of 4 bytes added into int32; no int16 step).  ``NR = 16 * NV``.
``AVX2_FAST`` (1)
    AVX2: ``NV`` ymm accumulators of 8 columns per row; ``vpmaddubsw`` (pairs of u8 x s8
    products summed into a *saturating* int16), ``vpmaddwd`` with ones, ``vpaddd``.  Exact
    whenever no pair sum leaves int16 (the wrapper proves it); otherwise bit-for-bit FBGEMM's
    AVX2 numbers (``saturate=True``).  ``NR = 8 * NV``.
``AVX2_EXACT`` (2)
    AVX2, exact for every input: each activation byte is split as ``a = (a & 0x7f) + 128 *
    (a >> 7)``; both halves go through ``vpmaddubsw`` without saturating (|pair| <= 32512),
    the high half is weighted by 128 in ``vpmaddwd``.  About 0.6x the fast variant.
``AVX2_WIDE`` (3)
    AVX2, exact for every input: int16 activations x int16 weights, ``vpmaddwd`` (two exact
    ``i16 x i16`` products summed into int32; ``|x| <= 255``, ``|w| <= 128`` cannot overflow)
    and ``vpaddd``.  Operands are pre-widened: the activation rows are int16, the weight is
    the int16 twin of the panel (``PackedWeight._wide``), and a "k-group"
    is a *pair* of ``k`` (4 bytes of each operand, so the byte layout and strides are those
    of the int8 panel with twice the groups).  The same number of multiplies as
    ``AVX2_FAST`` (one ``vpmaddwd`` per 16 MACs instead of ``vpmaddubsw`` + ``vpmaddwd`` per
    32), twice the weight bytes.
``AVX2_WIDEN`` (5)
    AVX2, exact for every input: ``AVX2_WIDE``'s ``vpmaddwd`` on the *int8* panel, widened in
    registers (``vpmovsxbw``: 16 bytes = 4 columns x 4 ``k`` per ymm) against int16
    activations broadcast 4 at a time; each int32 lane holds half a column's sum (``k`` pairs
    0-1 / 2-3), the halves are added once after the ``k`` loop.  Reads the int8 bytes (no
    twin), so small-batch calls on big weights stay as fast as ``vpmaddubsw``; each 8-column
    vector of the tile runs its own ``k`` loop (8 accumulators for 4 rows).
``VNNI256`` (4)
    AVX-VNNI (CPUs with VNNI but without AVX-512: Intel Alder Lake and later client cores,
    Sierra Forest): the ``VNNI`` loop on ymm registers (VEX ``vpdpbusd``, 8 columns per
    vector); exact.  ``NR = 8 * NV``.

Accumulators are allocas in the entry block (LLVM promotes them to registers); all vector
loads and stores are unaligned (``align 1``), so numpy buffers of any alignment are safe.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

VNNI = 0
AVX2_FAST = 1
AVX2_EXACT = 2
AVX2_WIDE = 3
VNNI256 = 4
AVX2_WIDEN = 5

# Output stages (MODE literal)
RAW = 1
FLOAT = 2
REQUANT = 3

_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


def _splat(builder: ir.IRBuilder, scalar: ir.Value, vty: ir.VectorType) -> ir.Value:
    undef = ir.Constant(vty, ir.Undefined)
    v = builder.insert_element(undef, scalar, ir.Constant(_I32, 0))
    mask = ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count)
    return builder.shuffle_vector(v, undef, mask)


def _emit_tile(
    builder, module, a_base, lda, b_base, bstride, kgroups, init_base, outp, rows, nv, variant
):
    """Emit the k loop of one ``rows x NR`` tile and the store of its accumulators."""
    if variant == AVX2_WIDEN:
        _emit_tile_widen(builder, module, a_base, lda, b_base, bstride, kgroups, init_base, outp,
                         rows, nv)  # fmt: skip
        return
    if variant in (VNNI, VNNI256):
        lanes = 16 if variant == VNNI else 8
        acc_t = ir.VectorType(_I32, lanes)
        fn = cgutils.get_or_insert_function(
            module,
            ir.FunctionType(acc_t, [acc_t, acc_t, acc_t]),
            f"llvm.x86.avx512.vpdpbusd.{32 * lanes}",
        )
    else:
        lanes = 8
        acc_t = ir.VectorType(_I32, 8)
        b8_t = ir.VectorType(_I8, 32)
        w16_t = ir.VectorType(_I16, 16)
        maddubs = cgutils.get_or_insert_function(
            module, ir.FunctionType(w16_t, [b8_t, b8_t]), "llvm.x86.avx2.pmadd.ub.sw"
        )
        maddwd = cgutils.get_or_insert_function(
            module, ir.FunctionType(acc_t, [w16_t, w16_t]), "llvm.x86.avx2.pmadd.wd"
        )
        ones = ir.Constant(w16_t, [1] * 16)
        w128 = ir.Constant(w16_t, [128] * 16)
    vbytes = lanes * 4
    accs = []
    inits = []
    for v in range(nv):
        p = builder.bitcast(
            builder.gep(init_base, [ir.Constant(_I64, v * vbytes)]), acc_t.as_pointer()
        )
        inits.append(builder.load(p, align=4))
    for _r in range(rows):
        accs.append([cgutils.alloca_once_value(builder, inits[v]) for v in range(nv)])
    a_rows = [builder.gep(a_base, [builder.mul(lda, ir.Constant(_I64, r))]) for r in range(rows)]
    with cgutils.for_range(builder, kgroups) as loop:
        k = loop.index
        bk = builder.gep(b_base, [builder.mul(k, bstride)])
        bv = []
        for v in range(nv):
            p = builder.bitcast(
                builder.gep(bk, [ir.Constant(_I64, v * vbytes)]), acc_t.as_pointer()
            )
            bv.append(builder.load(p, align=1))
        k4 = builder.mul(k, ir.Constant(_I64, 4))
        for r in range(rows):
            pa = builder.bitcast(builder.gep(a_rows[r], [k4]), _I32.as_pointer())
            a32 = builder.load(pa, align=1)
            if variant in (VNNI, VNNI256):
                av = _splat(builder, a32, acc_t)
                for v in range(nv):
                    acc = builder.load(accs[r][v])
                    builder.store(builder.call(fn, [acc, av, bv[v]]), accs[r][v])
            elif variant == AVX2_WIDE:
                # a32 = two int16 activations (k, k + 1); bv[v] = 8 columns x 2 int16 weights
                av = builder.bitcast(_splat(builder, a32, acc_t), w16_t)
                for v in range(nv):
                    t = builder.call(maddwd, [av, builder.bitcast(bv[v], w16_t)])
                    acc = builder.load(accs[r][v])
                    builder.store(builder.add(acc, t), accs[r][v])
            elif variant == AVX2_FAST:
                av = builder.bitcast(_splat(builder, a32, acc_t), b8_t)
                for v in range(nv):
                    bb = builder.bitcast(bv[v], b8_t)
                    t = builder.call(maddwd, [builder.call(maddubs, [av, bb]), ones])
                    acc = builder.load(accs[r][v])
                    builder.store(builder.add(acc, t), accs[r][v])
            else:
                lo = builder.and_(a32, ir.Constant(_I32, 0x7F7F7F7F))
                hi = builder.and_(
                    builder.lshr(a32, ir.Constant(_I32, 7)), ir.Constant(_I32, 0x01010101)
                )
                avl = builder.bitcast(_splat(builder, lo, acc_t), b8_t)
                avh = builder.bitcast(_splat(builder, hi, acc_t), b8_t)
                for v in range(nv):
                    bb = builder.bitcast(bv[v], b8_t)
                    tl = builder.call(maddwd, [builder.call(maddubs, [avl, bb]), ones])
                    th = builder.call(maddwd, [builder.call(maddubs, [avh, bb]), w128])
                    acc = builder.load(accs[r][v])
                    builder.store(builder.add(acc, builder.add(tl, th)), accs[r][v])
    _emit_output(builder, module, accs, rows, nv, lanes, acc_t, outp)


def _emit_tile_widen(builder, module, a_base, lda, b_base, bstride, kgroups, init_base, outp,
                     rows, nv):  # fmt: skip
    """``AVX2_WIDEN``: int8 panel widened in registers x int16 activations (``a`` rows hold
    int16: 8 bytes per k-group)."""
    acc_t = ir.VectorType(_I32, 8)
    w16_t = ir.VectorType(_I16, 16)
    b16_t = ir.VectorType(_I8, 16)
    a4_t = ir.VectorType(_I64, 4)
    maddwd = cgutils.get_or_insert_function(
        module, ir.FunctionType(acc_t, [w16_t, w16_t]), "llvm.x86.avx2.pmadd.wd"
    )
    zero = ir.Constant(acc_t, [0] * 8)
    even = ir.Constant(ir.VectorType(_I32, 8), list(range(0, 16, 2)))
    odd = ir.Constant(ir.VectorType(_I32, 8), list(range(1, 16, 2)))
    a_rows = [builder.gep(a_base, [builder.mul(lda, ir.Constant(_I64, r))]) for r in range(rows)]
    final = [[None] * nv for _ in range(rows)]
    for v in range(nv):
        part = [
            (cgutils.alloca_once_value(builder, zero), cgutils.alloca_once_value(builder, zero))
            for _ in range(rows)
        ]
        with cgutils.for_range(builder, kgroups) as loop:
            k = loop.index
            bk = builder.gep(b_base, [builder.mul(k, bstride)])
            ws = []
            for h in range(2):
                p = builder.gep(bk, [ir.Constant(_I64, v * 32 + 16 * h)])
                w8 = builder.load(builder.bitcast(p, b16_t.as_pointer()), align=1)
                ws.append(builder.sext(w8, w16_t))
            k8 = builder.mul(k, ir.Constant(_I64, 8))
            for r in range(rows):
                pa = builder.bitcast(builder.gep(a_rows[r], [k8]), _I64.as_pointer())
                av = builder.bitcast(_splat(builder, builder.load(pa, align=1), a4_t), w16_t)
                for h in range(2):
                    t = builder.call(maddwd, [av, ws[h]])
                    builder.store(builder.add(builder.load(part[r][h]), t), part[r][h])
        pi = builder.bitcast(
            builder.gep(init_base, [ir.Constant(_I64, v * 32)]), acc_t.as_pointer()
        )
        init_v = builder.load(pi, align=4)
        for r in range(rows):
            lo = builder.load(part[r][0])  # columns 0-3 of the vector, two halves each
            hi = builder.load(part[r][1])  # columns 4-7
            s = builder.add(
                builder.shuffle_vector(lo, hi, even), builder.shuffle_vector(lo, hi, odd)
            )
            final[r][v] = cgutils.alloca_once_value(builder, builder.add(s, init_v))
    _emit_output(builder, module, final, rows, nv, 8, acc_t, outp)


def _emit_output(builder, module, accs, rows, nv, lanes, acc_t, outp):
    """The fused output stage on the accumulator registers (FBGEMM's output pipeline).

    ``outp``: dict with ``mode`` (RAW, FLOAT, REQUANT), ``o_base`` (i8* of the tile's first
    output element), ``ldo`` (bytes between output rows), ``p1``/``p2`` (float* per-column
    vectors at the tile's first column), ``bzp`` (i32* per-column weight zero points), ``rs``
    (i64* row sums at the tile's first row) and the float scalars ``s1``, ``s2``, ``s3``.
    """
    mode = outp["mode"]
    f_t = ir.VectorType(ir.FloatType(), lanes)
    esize = {RAW: 4, FLOAT: 4, REQUANT: 1}[mode]
    if mode != RAW:
        bzps = []
        p1s = []
        p2s = []
        for v in range(nv):
            off = ir.Constant(_I64, v * lanes * 4)
            bzps.append(_vload(builder, outp["bzp"], off, acc_t))
            p1s.append(_vload(builder, outp["p1"], off, f_t))
            p2s.append(_vload(builder, outp["p2"], off, f_t))
        s1 = _splat(builder, outp["s1"], f_t)
        s2 = _splat(builder, outp["s2"], f_t)
        s3 = _splat(builder, outp["s3"], f_t)
        if mode == REQUANT:
            rint = cgutils.get_or_insert_function(
                module, ir.FunctionType(f_t, [f_t]), f"llvm.rint.v{lanes}f32"
            )
    for r in range(rows):
        row_base = builder.gep(outp["o_base"], [builder.mul(outp["ldo"], ir.Constant(_I64, r))])
        if mode != RAW:
            rs_p = builder.gep(outp["rs"], [ir.Constant(_I64, r * 8)])
            rs = builder.trunc(
                builder.load(builder.bitcast(rs_p, _I64.as_pointer()), align=8), _I32
            )
            rsv = _splat(builder, rs, acc_t)
        for v in range(nv):
            acc = builder.load(accs[r][v])
            dst = builder.gep(row_base, [ir.Constant(_I64, v * lanes * esize)])
            if mode == RAW:
                builder.store(acc, builder.bitcast(dst, acc_t.as_pointer()), align=1)
                continue
            acc = builder.sub(acc, builder.mul(rsv, bzps[v]))  # - rowsum[i] * w_zp[j]
            f = builder.sitofp(acc, f_t)
            if mode == FLOAT:
                # raw * a_scale * w_scale[j] + bias[j], max(., flo)  (FBGEMM's order)
                f = builder.fadd(builder.fmul(builder.fmul(f, s1), p1s[v]), p2s[v])
                f = builder.select(builder.fcmp_ordered(">", f, s2), f, s2)
                builder.store(f, builder.bitcast(dst, f_t.as_pointer()), align=1)
            else:
                # rint((raw + bias / ab) * mult) + c_zp, clamped to [qlo, qmax]
                f = builder.fmul(builder.fadd(f, p1s[v]), p2s[v])
                f = builder.fadd(builder.call(rint, [f]), s1)
                f = builder.select(builder.fcmp_ordered(">", f, s2), f, s2)
                f = builder.select(builder.fcmp_ordered("<", f, s3), f, s3)
                q = builder.trunc(builder.fptosi(f, acc_t), ir.VectorType(_I8, lanes))
                builder.store(q, builder.bitcast(dst, q.type.as_pointer()), align=1)


def _vload(builder, base, off, vty):
    p = builder.bitcast(builder.gep(base, [off]), vty.as_pointer())
    return builder.load(p, align=1)


def _data_i8p(context, builder, aty, val):
    arr = cgutils.create_struct_proxy(aty)(context, builder, value=val)
    return builder.bitcast(arr.data, _I8.as_pointer())


@intrinsic
def ukr(
    typingctx, a, a_off, lda, b, b_off, bstride, kgroups, init, mr, out, o_off, ldo, p1, p2, bzp,
    rs, col, row, s1, s2, s3, MR, NV, VARIANT, MODE,
):  # fmt: skip
    for name, t in (("MR", MR), ("NV", NV), ("VARIANT", VARIANT), ("MODE", MODE)):
        if not isinstance(t, types.IntegerLiteral):
            raise TypingError(f"ukr: {name} must be an integer literal, got {t}")
    arrays = (("a", a, types.uint8), ("b", b, types.int8), ("init", init, types.int32),
              ("p1", p1, types.float32), ("p2", p2, types.float32), ("bzp", bzp, types.int32),
              ("rs", rs, types.int64))  # fmt: skip
    for name, t, dt in arrays:
        if not (isinstance(t, types.Array) and t.dtype == dt):
            raise TypingError(f"ukr: {name} must be a {dt} array, got {t}")
    mode = MODE.literal_value
    out_dt = {RAW: types.int32, FLOAT: types.float32, REQUANT: types.uint8}[mode]
    if not (isinstance(out, types.Array) and out.dtype == out_dt):
        raise TypingError(f"ukr: out must be a {out_dt} array for mode {mode}, got {out}")
    ints = (("a_off", a_off), ("lda", lda), ("b_off", b_off), ("bstride", bstride),
            ("kgroups", kgroups), ("mr", mr), ("o_off", o_off), ("ldo", ldo), ("col", col),
            ("row", row))  # fmt: skip
    for name, t in ints:
        if not isinstance(t, types.Integer):
            raise TypingError(f"ukr: {name} must be an integer, got {t}")
    for name, t in (("s1", s1), ("s2", s2), ("s3", s3)):
        if t != types.float32:
            raise TypingError(f"ukr: {name} must be float32, got {t}")
    mr_max = MR.literal_value
    nv = NV.literal_value
    variant = VARIANT.literal_value
    sig = types.void(
        a, a_off, lda, b, b_off, bstride, kgroups, init, mr, out, o_off, ldo, p1, p2, bzp, rs,
        col, row, s1, s2, s3, MR, NV, VARIANT, MODE,
    )  # fmt: skip

    def codegen(context, builder, signature, args):
        def i64(idx):
            return context.cast(builder, args[idx], signature.args[idx], types.int64)

        def data(idx):
            return _data_i8p(context, builder, signature.args[idx], args[idx])

        a_base = builder.gep(data(0), [i64(1)])
        b_base = builder.gep(data(3), [i64(4)])
        init_base = data(7)
        col4 = builder.mul(i64(16), ir.Constant(_I64, 4))
        outp = {
            "mode": mode,
            "o_base": builder.gep(data(9), [i64(10)]),
            "ldo": i64(11),
            "p1": builder.gep(data(12), [col4]),
            "p2": builder.gep(data(13), [col4]),
            "bzp": builder.gep(data(14), [col4]),
            "rs": builder.gep(data(15), [builder.mul(i64(17), ir.Constant(_I64, 8))]),
            "s1": args[18],
            "s2": args[19],
            "s3": args[20],
        }
        lda_v, bstride_v, kg_v = i64(2), i64(5), i64(6)
        module = builder.module
        fn = builder.function
        end = fn.append_basic_block("ukr.end")
        sw = builder.switch(i64(8), end)
        for rows in range(1, mr_max + 1):
            bb = fn.append_basic_block(f"ukr.rows{rows}")
            sw.add_case(ir.Constant(_I64, rows), bb)
            builder.position_at_end(bb)
            _emit_tile(builder, module, a_base, lda_v, b_base, bstride_v, kg_v, init_base, outp,
                       rows, nv, variant)  # fmt: skip
            builder.branch(end)
        builder.position_at_end(end)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def atomic_next(typingctx, counter):
    """``counter[0]++`` atomically, returning the old value (dynamic task scheduling)."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64):
        raise TypingError(f"atomic_next: counter must be an int64 array, got {counter}")
    sig = types.int64(counter)

    def codegen(context, builder, signature, args):
        arr = cgutils.create_struct_proxy(signature.args[0])(context, builder, value=args[0])
        return builder.atomic_rmw("add", arr.data, ir.Constant(_I64, 1), "monotonic")

    return sig, codegen
