"""LLVM-IR building blocks of the embedding-bag kernels (:mod:`qgemm._kernels.embedding`).

Numba intrinsics for what plain Numba code cannot say: unaligned float32/float16 loads from a
byte array, ``llvm.prefetch``, bounds-free row views, a stack-allocated accumulator, and the
vector row updates (:func:`vec_row`, :func:`vec_store_row`) that keep a bag's accumulator in
vector registers.  Every variant is chosen by *literal* integer arguments (:data:`SRC_IDS`,
:data:`OP_IDS`, element counts), never by closing over objects, so that the kernels that call
them stay cacheable on disk.
"""

from __future__ import annotations

import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.arrayobj import populate_array

__all__ = [
    "OP_IDS",
    "SRC_IDS",
    "address_mod",
    "fmax",
    "half_to_float",
    "load_f16",
    "load_f32",
    "prefetch",
    "row_view",
    "stack_array",
    "vec_row",
    "vec_store_row",
    "vec_store_shifted",
    "vector_chunks",
]

_PF_LOCALITY = 3  # prefetcht0 (measured: t1/t2 were slower)


# -- intrinsics --------------------------------------------------------------------------------
def _byte_pointer(context, builder, arrty, arr, offset):
    ary = context.make_array(arrty)(context, builder, arr)
    ptr = builder.bitcast(ary.data, ir.IntType(8).as_pointer())
    return builder.gep(ptr, [offset])


@intrinsic
def load_f32(typingctx, arr, byte_offset):
    """float32 at ``byte_offset`` of a byte array (any alignment)."""
    sig = types.float32(arr, types.intp)

    def codegen(context, builder, signature, args):
        ptr = _byte_pointer(context, builder, signature.args[0], args[0], args[1])
        fptr = builder.bitcast(ptr, ir.FloatType().as_pointer())
        return builder.load(fptr, align=1)

    return sig, codegen


@intrinsic
def load_f16(typingctx, arr, byte_offset):
    """float16 at ``byte_offset`` of a byte array (any alignment), widened to float32."""
    sig = types.float32(arr, types.intp)

    def codegen(context, builder, signature, args):
        ptr = _byte_pointer(context, builder, signature.args[0], args[0], args[1])
        hptr = builder.bitcast(ptr, ir.HalfType().as_pointer())
        return builder.fpext(builder.load(hptr, align=1), ir.FloatType())

    return sig, codegen


@intrinsic
def half_to_float(typingctx, bits):
    """The float16 whose bit pattern is the uint16 ``bits``, as float32 (``vcvtph2ps``)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def prefetch(typingctx, arr, byte_offset):
    """Hint the cache to load the line at ``byte_offset`` of ``arr`` (read, keep in all
    levels).  A prefetch never faults, but callers only pass validated offsets anyway."""
    sig = types.void(arr, types.intp)

    def codegen(context, builder, signature, args):
        ptr = _byte_pointer(context, builder, signature.args[0], args[0], args[1])
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [ptr, i32(0), i32(_PF_LOCALITY), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def address_mod(typingctx, arr, modulus):
    """The address of ``arr``'s first element modulo ``modulus`` (a power of two), in bytes:
    how far the data sits past an alignment boundary."""
    sig = types.intp(arr, types.intp)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        addr = builder.ptrtoint(ary.data, args[1].type)
        return builder.and_(addr, builder.sub(args[1], ir.Constant(args[1].type, 1)))

    return sig, codegen


@intrinsic
def row_view(typingctx, arr, start, length):
    """``arr[start:start + length]`` of a 1-D contiguous array without the slice's bounds
    arithmetic or reference counting.  Only for ranges already validated to be inside
    ``arr`` (and for the lifetime of ``arr``)."""
    if not isinstance(arr, types.Array) or arr.ndim != 1:
        return None
    arrty = types.Array(arr.dtype, 1, "C")

    def codegen(context, builder, signature, args):
        src = context.make_array(signature.args[0])(context, builder, args[0])
        ary = context.make_array(arrty)(context, builder)
        ptr = builder.gep(src.data, [args[1]])
        itemsize = context.get_constant(
            types.intp, context.get_abi_sizeof(context.get_data_type(arr.dtype))
        )
        populate_array(
            ary, data=ptr, shape=[args[2]], strides=[itemsize], itemsize=itemsize, meminfo=None
        )
        return ary._getvalue()

    return arrty(arr, types.intp, types.intp), codegen


@intrinsic
def stack_array(typingctx, size):
    """A float32 array of ``size`` (a compile-time constant) elements on the stack of the
    calling function (an ``alloca`` in its entry block), uninitialised.

    The accumulator of a bag: LLVM knows it aliases nothing, so once the row loop is unrolled
    it lives in vector registers (an accumulator in ``out`` would be loaded and stored back for
    every row)."""
    if not isinstance(size, types.IntegerLiteral):
        return None
    n = max(int(size.literal_value), 1)
    arrty = types.Array(types.float32, 1, "C")

    def codegen(context, builder, signature, args):
        ary = context.make_array(arrty)(context, builder)
        ptr = cgutils.alloca_once(builder, ir.FloatType(), size=n)
        itemsize = context.get_constant(types.intp, 4)
        populate_array(
            ary,
            data=ptr,
            shape=[context.get_constant(types.intp, n)],
            strides=[itemsize],
            itemsize=itemsize,
            meminfo=None,
        )
        return ary._getvalue()

    return arrty(size), codegen


# -- vector row operations (specialised kernels) ---------------------------------------------------
# LLVM fully unrolls short constant-trip-count loops *before* it vectorises, and the scalar
# accumulators it then gets are not re-vectorised (measured: dim 32 ran at half the speed of
# dim 64).  The specialised kernels therefore update their accumulators with explicit vector
# IR: one call handles V consecutive elements, so the code does not depend on the order of
# LLVM's passes.  Accumulators live in a stack array accessed only by these vector loads and
# stores at constant offsets, which SROA turns into vector registers.

_F32 = ir.FloatType()
_I8 = ir.IntType(8)
_I32 = ir.IntType(32)


def _splat(builder, value, n):
    vec = ir.VectorType(value.type, n)
    undef = ir.Constant(vec, ir.Undefined)
    one = builder.insert_element(undef, value, _I32(0))
    return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(_I32, n), [0] * n))


def _fmax_vec(builder, old, x):
    """max with NaN propagation: a NaN in either operand gives NaN."""
    take_x = builder.fcmp_unordered(">", x, old)  # x > old, or either is NaN
    pick = builder.select(take_x, x, old)
    old_ok = builder.fcmp_ordered("ord", old, old)
    return builder.select(old_ok, pick, old)


SRC_IDS = {"f32": 0, "f16": 1, "code8": 2, "code4": 3, "code2": 4}
OP_IDS = {"zero": 0, "max": 1, "add": 2, "addw": 3}
_SRC_NAMES = {v: k for k, v in SRC_IDS.items()}
_OP_NAMES = {v: k for k, v in OP_IDS.items()}
_SRC_ITEM = {"f32": 4, "f16": 2}


def _literal(t):
    return t.literal_value if isinstance(t, types.IntegerLiteral) else None


def vector_chunks(n: int) -> list[tuple[int, int]]:
    """``n`` consecutive elements as ``(offset, width)`` chunks of 16, 8, 4, 2, 1."""
    out, off = [], 0
    for w in (16, 8, 4, 2, 1):
        while n - off >= w:
            out.append((off, w))
            off += w
    return out


@intrinsic
def vec_row(typingctx, acc, acc_off, table, byte_off, a, b, shift, first, src_id, op_id, length):
    """``vec_row(acc, acc_off, table, byte_off, a, b, shift, first, SRC, OP, LENGTH)``, the last
    three compile-time constants (:data:`SRC_IDS`, :data:`OP_IDS`, the element count).  For
    ``i < LENGTH``, in vector chunks of 16/8/4/2/1 (:func:`vector_chunks`)::

        x[i] = row value i          (src "f32" / "f16": a float row at ``byte_off``;
                                     "codeB": byte ``byte_off + i`` >> shift & (2**B - 1))
        x[i] = x[i] * a + b         (codes: scale and bias; floats: a = weight ("addw"))
        acc[acc_off + i] = acc + x  (op "add"), max(acc, x) ("max"; x when ``first``), or 0
                                    ("zero": nothing is read)

    For codes, op "add" leaves out the bias: ``acc += x * a`` (the caller adds the sum of the
    biases once per bag, which saves one vector add per row).  Max propagates NaN.  The
    variant is given by literal arguments (not by closing over intrinsic objects) so that
    kernels stay cacheable on disk."""
    src_v, op_v, len_v = _literal(src_id), _literal(op_id), _literal(length)
    if src_v is None or op_v is None or len_v is None:
        return None
    src, op, n = _SRC_NAMES[src_v], _OP_NAMES[op_v], int(len_v)
    item = _SRC_ITEM.get(src, 1)
    sig = types.void(
        acc,
        types.intp,
        table,
        types.intp,
        types.float32,
        types.float32,
        types.intp,
        types.boolean,
        src_id,
        op_id,
        length,
    )

    def codegen(context, builder, signature, args):
        acc_a = context.make_array(signature.args[0])(context, builder, args[0])
        first = args[7]
        for off, w in vector_chunks(n):
            vf = ir.VectorType(_F32, w)
            aoff = builder.add(args[1], ir.Constant(args[1].type, off))
            aptr = builder.bitcast(builder.gep(acc_a.data, [aoff]), vf.as_pointer())
            if op == "zero":
                builder.store(ir.Constant(vf, [0.0] * w), aptr, align=4)
                continue
            boff = builder.add(args[3], ir.Constant(args[3].type, off * item))
            bptr = _byte_pointer(context, builder, signature.args[2], args[2], boff)
            if src == "f32":
                x = builder.load(builder.bitcast(bptr, vf.as_pointer()), align=1)
            elif src == "f16":
                vh = ir.VectorType(ir.HalfType(), w)
                x = builder.fpext(builder.load(builder.bitcast(bptr, vh.as_pointer()), align=1), vf)
            else:
                vb = ir.VectorType(_I8, w)
                c = builder.load(builder.bitcast(bptr, vb.as_pointer()), align=1)
                if src != "code8":
                    mask = (1 << int(src[4:])) - 1
                    sh = _splat(builder, builder.trunc(args[6], _I8), w)
                    c = builder.and_(builder.lshr(c, sh), ir.Constant(vb, [mask] * w))
                x = builder.uitofp(c, vf)
            if src.startswith("code") and op == "add":
                x = builder.fmul(x, _splat(builder, args[4], w))
            elif src.startswith("code"):
                x = builder.fadd(
                    builder.fmul(x, _splat(builder, args[4], w), flags=("contract",)),
                    _splat(builder, args[5], w),
                    flags=("contract",),
                )
            elif op == "addw":
                x = builder.fmul(x, _splat(builder, args[4], w))
            old = builder.load(aptr, align=4)
            if op == "max":
                new = builder.select(first, x, _fmax_vec(builder, old, x))
            else:
                new = builder.fadd(old, x)
            builder.store(new, aptr, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def vec_store_row(typingctx, out, acc, plane_len, bias, scale, planes, length):
    """``vec_store_row(out, acc, plane_len, bias, scale, PLANES, LENGTH)`` (the last two
    compile-time constants): for plane ``p < PLANES`` and ``j < LENGTH``,
    ``out[j * PLANES + p] = (acc[p * plane_len + j] + bias) * scale`` -- a plain copy for one
    plane, the interleave of 4/2-bit code planes back into element order otherwise."""
    planes_v, len_v = _literal(planes), _literal(length)
    if planes_v is None or len_v is None:
        return None
    n_planes, n = int(planes_v), int(len_v)
    sig = types.void(out, acc, types.intp, types.float32, types.float32, planes, length)

    def codegen(context, builder, signature, args):
        out_a = context.make_array(signature.args[0])(context, builder, args[0])
        acc_a = context.make_array(signature.args[1])(context, builder, args[1])
        for j0, w in vector_chunks(n):
            vf = ir.VectorType(_F32, w)
            vecs = []
            for p in range(n_planes):
                off = builder.add(
                    builder.mul(args[2], ir.Constant(args[2].type, p)),
                    ir.Constant(args[2].type, j0),
                )
                ptr = builder.bitcast(builder.gep(acc_a.data, [off]), vf.as_pointer())
                vecs.append(builder.load(ptr, align=4))
            m = w
            while len(vecs) > 1:  # concatenate pairwise
                vecs = [
                    builder.shuffle_vector(
                        vecs[i],
                        vecs[i + 1],
                        ir.Constant(ir.VectorType(_I32, 2 * m), list(range(2 * m))),
                    )
                    for i in range(0, len(vecs), 2)
                ]
                m *= 2
            allv = vecs[0]
            total = n_planes * w
            if n_planes > 1:
                mask = [(k % n_planes) * w + k // n_planes for k in range(total)]
                undef = ir.Constant(allv.type, ir.Undefined)
                allv = builder.shuffle_vector(
                    allv, undef, ir.Constant(ir.VectorType(_I32, total), mask)
                )
            if total == 1:  # a <1 x float> vector: fine for LLVM, kept uniform
                pass
            allv = builder.fadd(allv, _splat(builder, args[3], total))
            allv = builder.fmul(allv, _splat(builder, args[4], total))
            optr = builder.gep(out_a.data, [ir.Constant(ir.IntType(64), j0 * n_planes)])
            builder.store(
                allv, builder.bitcast(optr, ir.VectorType(_F32, total).as_pointer()), align=4
            )
        return context.get_dummy_value()

    return sig, codegen


def _concat(builder, vecs):
    """Concatenate vectors (any widths) in order into one vector."""
    vecs = list(vecs)
    while len(vecs) > 1:
        merged = []
        for i in range(0, len(vecs) - 1, 2):
            a, b = vecs[i], vecs[i + 1]
            wa, wb = a.type.count, b.type.count
            w = max(wa, wb)
            if wa < w:  # pad to a common width (padding lanes are never selected)
                mask = ir.Constant(ir.VectorType(_I32, w), list(range(wa)) + [0] * (w - wa))
                a = builder.shuffle_vector(a, a, mask)
            if wb < w:
                mask = ir.Constant(ir.VectorType(_I32, w), list(range(wb)) + [0] * (w - wb))
                b = builder.shuffle_vector(b, b, mask)
            sel = list(range(wa)) + [w + k for k in range(wb)]
            merged.append(
                builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, wa + wb), sel))
            )
        if len(vecs) % 2:
            merged.append(vecs[-1])
        vecs = merged
    return vecs[0]


@intrinsic
def vec_store_shifted(typingctx, out, acc, bias, scale, shift, acc_len, length):
    """``vec_store_shifted(out, acc, bias, scale, SHIFT, ACC_LEN, LENGTH)`` (the last three
    compile-time constants): ``out[j] = (acc[SHIFT + j] + bias) * scale`` for ``j < LENGTH``.

    The store of an accumulator updated by aligned loads that start ``SHIFT`` elements before
    the row (:func:`vec_row` over ``ACC_LEN`` elements at ``byte_off - 4 * SHIFT``): ``acc`` is
    read in the chunks :func:`vec_row` uses (so it stays in registers) and shifted by one
    shuffle, once per bag."""
    sh_v, acc_v, len_v = _literal(shift), _literal(acc_len), _literal(length)
    if sh_v is None or acc_v is None or len_v is None:
        return None
    sh, na, n = int(sh_v), int(acc_v), int(len_v)
    if sh + n > na:
        return None
    sig = types.void(out, acc, types.float32, types.float32, shift, acc_len, length)

    def codegen(context, builder, signature, args):
        out_a = context.make_array(signature.args[0])(context, builder, args[0])
        acc_a = context.make_array(signature.args[1])(context, builder, args[1])
        parts = []
        for off, w in vector_chunks(na):
            vf = ir.VectorType(_F32, w)
            ptr = builder.gep(acc_a.data, [ir.Constant(ir.IntType(64), off)])
            parts.append(builder.load(builder.bitcast(ptr, vf.as_pointer()), align=4))
        allv = _concat(builder, parts)
        sel = ir.Constant(ir.VectorType(_I32, n), list(range(sh, sh + n)))
        res = builder.shuffle_vector(allv, allv, sel)
        res = builder.fadd(res, _splat(builder, args[2], n))
        res = builder.fmul(res, _splat(builder, args[3], n))
        optr = builder.bitcast(out_a.data, ir.VectorType(_F32, n).as_pointer())
        builder.store(res, optr, align=4)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(inline="always")
def fmax(old, x):
    """``max(old, x)`` propagating NaN from either side (as the vector path does)."""
    if old != old:
        return old
    return x if (x > old or x != x) else old
