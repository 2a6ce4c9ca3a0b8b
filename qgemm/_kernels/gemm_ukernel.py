"""The int8 GEMM register-tile microkernels, emitted as LLVM IR through a Numba ``@intrinsic``.

``ukr(a, a_off, lda, b, b_off, bstride, kgroups, c, init, mr, MR, NV, VARIANT)`` computes an
``mr x NR`` tile (``mr <= MR``) of ``init + A @ B`` over ``kgroups`` groups of 4 consecutive
``k`` and stores it, int32, row-major with row stride ``NR`` into ``c`` (a scratch buffer):

* ``init`` (int32, ``NR`` entries) starts every row's accumulators: the output stage folds its
  per-column integer terms (``bias - a_zp * colsum``) in there for free.

* ``a`` is a uint8 array; row ``r`` of the tile starts ``a_off + r * lda`` bytes into its data
  and holds ``4 * kgroups`` readable bytes.
* ``b`` is the packed int8 weight: for each k-group, ``NR`` columns x 4 consecutive k
  (FBGEMM's ``PackBMatrix`` grouping); consecutive k-groups of the tile are ``bstride`` bytes
  apart starting ``b_off`` bytes into the data.
* ``MR``, ``NV``, ``VARIANT`` are compile-time literals.  ``mr`` is a run-time value: the
  intrinsic emits one fully unrolled tile loop per ``mr`` in ``1..MR`` behind a ``switch``.

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

Accumulators are allocas in the entry block (LLVM promotes them to registers); all loads are
unaligned (``align 1``), so numpy buffers of any alignment are safe.
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
    builder, module, a_base, lda, b_base, bstride, kgroups, c_base, init_base, rows, nv, variant
):
    """Emit the k loop of one ``rows x NR`` tile and the store of its accumulators."""
    if variant == VNNI:
        lanes = 16
        acc_t = ir.VectorType(_I32, 16)
        fn = cgutils.get_or_insert_function(
            module, ir.FunctionType(acc_t, [acc_t, acc_t, acc_t]), "llvm.x86.avx512.vpdpbusd.512"
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
            if variant == VNNI:
                av = _splat(builder, a32, acc_t)
                for v in range(nv):
                    acc = builder.load(accs[r][v])
                    builder.store(builder.call(fn, [acc, av, bv[v]]), accs[r][v])
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
    nr = nv * lanes
    for r in range(rows):
        for v in range(nv):
            off = ir.Constant(_I64, (r * nr + v * lanes) * 4)
            p = builder.bitcast(builder.gep(c_base, [off]), acc_t.as_pointer())
            builder.store(builder.load(accs[r][v]), p, align=4)


def _data_i8p(context, builder, aty, val):
    arr = cgutils.create_struct_proxy(aty)(context, builder, value=val)
    return builder.bitcast(arr.data, _I8.as_pointer())


@intrinsic
def ukr(typingctx, a, a_off, lda, b, b_off, bstride, kgroups, c, init, mr, MR, NV, VARIANT):
    for name, t in (("MR", MR), ("NV", NV), ("VARIANT", VARIANT)):
        if not isinstance(t, types.IntegerLiteral):
            raise TypingError(f"ukr: {name} must be an integer literal, got {t}")
    if not (isinstance(a, types.Array) and a.dtype == types.uint8):
        raise TypingError(f"ukr: a must be a uint8 array, got {a}")
    if not (isinstance(b, types.Array) and b.dtype == types.int8):
        raise TypingError(f"ukr: b must be an int8 array, got {b}")
    if not (isinstance(c, types.Array) and c.dtype == types.int32):
        raise TypingError(f"ukr: c must be an int32 array, got {c}")
    if not (isinstance(init, types.Array) and init.dtype == types.int32):
        raise TypingError(f"ukr: init must be an int32 array, got {init}")
    for name, t in (
        ("a_off", a_off),
        ("lda", lda),
        ("b_off", b_off),
        ("bstride", bstride),
        ("kgroups", kgroups),
        ("mr", mr),
    ):
        if not isinstance(t, types.Integer):
            raise TypingError(f"ukr: {name} must be an integer, got {t}")
    mr_max = MR.literal_value
    nv = NV.literal_value
    variant = VARIANT.literal_value
    sig = types.void(a, a_off, lda, b, b_off, bstride, kgroups, c, init, mr, MR, NV, VARIANT)

    def codegen(context, builder, signature, args):
        ints = {}
        for idx in (1, 2, 4, 5, 6, 9):
            ints[idx] = context.cast(builder, args[idx], signature.args[idx], types.int64)
        a_base = builder.gep(_data_i8p(context, builder, signature.args[0], args[0]), [ints[1]])
        b_base = builder.gep(_data_i8p(context, builder, signature.args[3], args[3]), [ints[4]])
        c_base = _data_i8p(context, builder, signature.args[7], args[7])
        init_base = _data_i8p(context, builder, signature.args[8], args[8])
        module = builder.module
        fn = builder.function
        end = fn.append_basic_block("ukr.end")
        sw = builder.switch(ints[9], end)
        for rows in range(1, mr_max + 1):
            bb = fn.append_basic_block(f"ukr.rows{rows}")
            sw.add_case(ir.Constant(_I64, rows), bb)
            builder.position_at_end(bb)
            _emit_tile(
                builder,
                module,
                a_base,
                ints[2],
                b_base,
                ints[5],
                ints[6],
                c_base,
                init_base,
                rows,
                nv,
                variant,
            )
            builder.branch(end)
        builder.position_at_end(end)
        return context.get_dummy_value()

    return sig, codegen
