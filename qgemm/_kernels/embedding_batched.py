"""Table-batched embedding-bag kernel: T tables of mixed types and dims in one parallel region.

The job of FBGEMM's table-batched embedding op (TBE): bags of ``T`` tables, given in TBE's
convention -- one flat ``indices`` array and ``offsets`` of length ``T * B + 1``, global bag
``g = t * B + b`` being ``indices[offsets[g]:offsets[g + 1]]`` of table ``t`` -- are pooled
into one output buffer.  Tables are passed by address (an ``int64`` array of data pointers,
kept alive by the caller), so tables of different storage types share one kernel.

``batched_kernel(key)`` with key ``(isa, groups, index dtype, offsets dtype, mode, weighted,
parallel)``:

``groups``
    A tuple of ``(kind, dim)`` pairs, at most :data:`MAX_GROUPS`, one per distinct table
    signature (``kind`` as in :mod:`qgemm._kernels.embedding`; ``dim`` a compile-time dim of
    :func:`qgemm._kernels.embedding.specialised_dim`, or 0 for a run-time dim).  Each table
    names its group; a bag is pooled by its group's specialised code (register accumulators and
    explicit vector IR for a compile-time dim, as the single-table kernel).

``kern(addrs, row_bytes, rows, dims, group, pad, obase, ostride, indices, offsets, batch,
weights, ntasks, nthreads, out) -> (code, table, bag, position, value)``

The kernel first validates everything serially (offsets start at 0, never decrease and end at
``len(indices)``; every index of table ``t`` in ``[0, rows[t])``), so that a failing call
returns before writing ``out``; then it splits the ``T * B`` global bags into ``ntasks``
contiguous ranges of equal estimated work (indices x bytes read per row, plus a per-bag cost)
-- across table boundaries, so a batch-1 call over 26 tables still uses every thread -- and
runs them in one ``prange`` over ``nthreads`` workers, each taking the next task from a shared
atomic counter until none is left (numba's ``prange`` splits statically: a worker slowed down
by another process would hold its whole share).  Bag ``(t, b)`` is written at
``out[obase[t] + b * ostride[t]:]`` (``dims[t]`` floats): ``[B, sum(dims)]`` and DLRM's
table-major ``[T, B, d]`` are both such layouts; which worker pools a bag changes nothing in
its arithmetic.  Prefetching is that of the single-table kernel (every line of the row, and the
line of its last byte), clamped to the current table's indices, plus a burst when a task
enters a table: its first ``prefetch_distance`` rows at once, which the running prefetch
(``PF`` rows ahead) never covers -- at batch 16 over 26 tables that was a third of the rows,
read cold (measured, rows from DRAM, 8-bit: 26 tables batch 16 ~38 -> ~30 us, 8 tables batch
128 ~103 -> ~89 us, medians of 4 alternating process pairs; 3.55x fbgemm's TBE against
2.0x before in the bench's 26-table batch-16 cell); float32 tables whose rows sit
16 bytes past a vector boundary (numpy's large arrays) are read by the single-table kernel's
aligned loads.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload
from numba.np.arrayobj import populate_array

from .._cache import kernel_family
from .._config import fastmath_flags
from .._tuning import EMBEDDING_BATCHED_BAG_COST as BAG_COST
from .._tuning import EMBEDDING_PREFETCH_ALL_LINES as PREFETCH_ALL_LINES
from .._tuning import EMBEDDING_PREFETCH_TAIL as PREFETCH_TAIL
from .embedding import (
    _TABLE_OFFSET,
    BAD_FIRST_OFFSET,
    BAD_INDEX,
    DECREASING_OFFSET,
    KINDS,
    OFFSET_PAST_END,
    OK,
    aligned_row_layout,
    prefetch_distance,
)
from .embedding_ir import (
    OP_IDS,
    SRC_IDS,
    fmax,
    load_f16,
    load_f32,
    prefetch,
    row_view,
    stack_array,
    vec_row,
    vec_store_row,
    vec_store_shifted,
)
from .gemm_ukernel import atomic_next

__all__ = ["batched_kernel", "MAX_GROUPS", "KIND_IDS", "row_read_bytes"]

MAX_GROUPS = 8
"""Distinct ``(kind, dim)`` signatures one kernel specialises; tables beyond are pooled by the
run-time-dim code of their kind (the wrapper folds them into ``(kind, 0)`` groups)."""

KIND_IDS = {k: i for i, k in enumerate(KINDS)}
_MODE_IDS = {"sum": 0, "mean": 1, "max": 2}
_BITS = {"float32": 32, "float16": 16, "rowwise8": 8, "rowwise4": 4, "rowwise2": 2}
_LINE = 64


def row_read_bytes(kind: str, dim: int) -> int:
    """Bytes a bag reads per row of a ``kind`` table of ``dim`` (the work estimate)."""
    bits = _BITS[kind]
    if bits >= 16:
        return dim * bits // 8
    return -(-dim * bits // 8) + (8 if bits == 8 else 4)


@intrinsic
def ptr_bytes(typingctx, addr, nbytes):
    """The ``nbytes`` bytes at address ``addr`` as a uint8 array (no ownership: the caller keeps
    the memory alive for the duration of the call)."""
    arrty = types.Array(types.uint8, 1, "C")

    def codegen(context, builder, signature, args):
        ary = context.make_array(arrty)(context, builder)
        ptr = builder.inttoptr(args[0], ir.IntType(8).as_pointer())
        one = context.get_constant(types.intp, 1)
        populate_array(ary, data=ptr, shape=[args[1]], strides=[one], itemsize=one, meminfo=None)
        return ary._getvalue()

    return arrty(types.int64, types.int64), codegen


@intrinsic
def borrow(typingctx, arr):
    """A 1-D array's view without its meminfo: passing it to a (non-inlined) function per bag
    then costs no reference counting (numba increfs array arguments; two threads doing that on
    the same indices array per bag contended for its cache line: 5x slower at batch 512).
    Only while the original is alive (the kernel's argument)."""
    if not isinstance(arr, types.Array) or arr.ndim != 1:
        return None

    def codegen(context, builder, signature, args):
        src = context.make_array(signature.args[0])(context, builder, args[0])
        ary = context.make_array(signature.return_type)(context, builder)
        populate_array(
            ary,
            data=src.data,
            shape=cgutils.unpack_tuple(builder, src.shape, 1),
            strides=cgutils.unpack_tuple(builder, src.strides, 1),
            itemsize=src.itemsize,
            meminfo=None,
        )
        return ary._getvalue()

    return arr(arr), codegen


def pool_bag(
    src, dim_c, mode, weighted, vbytes, shifted, tab, row_bytes, dim, idx, s, e, pf_end, wts, pad,
    orow,
):  # fmt: skip
    """Pool one bag (see the overload); a stub for numba's typing."""
    raise NotImplementedError  # pragma: no cover - only called from compiled code


def _fastmath():
    fm = fastmath_flags()
    return fm if isinstance(fm, bool) else set(fm)


@overload(pool_bag, prefer_literal=True, jit_options={"fastmath": _fastmath()})
def _pool_bag_ov(src, dim_c, mode, weighted, vbytes, shifted, tab, row_bytes, dim, idx, s, e,
                 pf_end, wts, pad, orow):  # fmt: skip
    """Pool rows ``idx[s:e]`` of the table ``tab`` (bytes; rows ``row_bytes`` apart) into
    ``orow`` (``dim`` float32), with ``src`` a kind id (:data:`KIND_IDS`), ``dim_c`` the
    compile-time dim (0: run time), ``mode`` 0/1/2 (sum/mean/max), ``weighted`` 0/1,
    ``vbytes`` the vector width in bytes of the aligned-load path (0: none) -- all five literal.
    ``shifted`` (run time): every row of ``tab`` sits ``_TABLE_OFFSET`` bytes past a
    ``vbytes`` boundary, so a float32 row is read by aligned loads from that many bytes before
    it, as in the single-table kernel (the extra lanes are dropped when the bag is stored).
    Indices are already validated.  Prefetches row ``k + prefetch_distance(row bytes)``
    (below ``pf_end``)."""
    lits = (src, dim_c, mode, weighted, vbytes)
    if not all(isinstance(x, types.IntegerLiteral) for x in lits):
        return None
    kind = KINDS[src.literal_value]
    DIM = int(dim_c.literal_value)
    MODE_MEAN = mode.literal_value == 1
    MODE_MAX = mode.literal_value == 2
    WEIGHTED = bool(weighted.literal_value)
    QUANT = kind.startswith("rowwise")
    BITS = _BITS[kind]
    Q8 = BITS == 8
    F16 = kind == "float16"
    PER = 8 // BITS if QUANT else 1
    MASK = (1 << BITS) - 1 if QUANT else 0
    ITEM = BITS // 8 if not QUANT else 1
    VEC = DIM > 0
    CB = (DIM * BITS + 7) // 8 if QUANT else DIM
    ACC = max(CB * PER, 1)
    NEED = row_read_bytes(kind, DIM) if VEC else 0
    SRC = SRC_IDS[{"float32": "f32", "float16": "f16"}.get(kind, "code" + str(BITS))]
    OP_ZERO = OP_IDS["zero"]
    OP_ROW = OP_IDS["max" if MODE_MAX else ("addw" if WEIGHTED and not QUANT else "add")]
    ONE = np.float32(1.0)
    ZERO = np.float32(0.0)
    PF = prefetch_distance(NEED)
    HAS_PF = PF > 0
    PF_ALL = PREFETCH_ALL_LINES
    # Rows need not start on a line: the line of the row's last byte is prefetched too (as the
    # single-table kernel does, whatever the row size).
    PF_TAIL = PREFETCH_TAIL
    LINE = _LINE
    SBYTES = 8 if Q8 else 4  # scale + bias bytes of a quantized row
    VB = int(vbytes.literal_value)
    SHIFTABLE, SHIFT, ACC_SH, ACC_ALLOC, SH_BYTES = aligned_row_layout(kind, VB, VEC, DIM, ACC)

    def impl(src, dim_c, mode, weighted, vbytes, shifted, tab, row_bytes, dim, idx, s, e, pf_end,
             wts, pad, orow):  # fmt: skip
        if VEC:
            acc = stack_array(ACC_ALLOC)
            sh = SHIFTABLE and shifted
            if not MODE_MAX:
                if sh:
                    vec_row(acc, 0, tab, 0, ONE, ZERO, 0, False, SRC, OP_ZERO, ACC_SH)
                else:
                    for p in range(PER):
                        vec_row(acc, p * CB, tab, 0, ONE, ZERO, 0, False, SRC, OP_ZERO, CB)
            cnt = 0
            bsum = ZERO
            for k in range(s, e):
                if HAS_PF:
                    kp = min(k + PF, pf_end - 1)
                    pfirst = np.int64(idx[np.uint64(kp)]) * row_bytes
                    prefetch(tab, pfirst)
                    if PF_ALL:
                        for c in range(LINE, NEED, LINE):
                            prefetch(tab, pfirst + c)
                        if PF_TAIL and NEED > 1:
                            prefetch(tab, pfirst + NEED - 1)
                r = np.int64(idx[np.uint64(k)])
                if r == pad:
                    continue
                first = cnt == 0
                cnt += 1
                if WEIGHTED:
                    w = wts[np.uint64(k)]
                else:
                    w = ONE
                base = r * row_bytes
                if QUANT:
                    if Q8:
                        a = load_f32(tab, base + CB)
                        z = load_f32(tab, base + CB + 4)
                    else:
                        a = load_f16(tab, base + CB)
                        z = load_f16(tab, base + CB + 2)
                    if WEIGHTED:
                        a = a * w
                        z = z * w
                    bsum += z
                else:
                    a = w
                    z = ZERO
                if sh:
                    vec_row(acc, 0, tab, base - SH_BYTES, a, z, 0, first, SRC, OP_ROW, ACC_SH)
                else:
                    for p in range(PER):
                        vec_row(acc, p * CB, tab, base, a, z, p * BITS, first, SRC, OP_ROW, CB)
            if MODE_MAX and cnt == 0:
                if sh:
                    vec_row(acc, 0, tab, 0, ONE, ZERO, 0, False, SRC, OP_ZERO, ACC_SH)
                else:
                    for p in range(PER):
                        vec_row(acc, p * CB, tab, 0, ONE, ZERO, 0, False, SRC, OP_ZERO, CB)
            scale = ONE
            if MODE_MEAN and cnt > 1:
                scale = ONE / np.float32(cnt)
            if MODE_MAX:
                bsum = ZERO
            if sh:
                vec_store_shifted(orow, acc, bsum, scale, SHIFT, ACC_SH, DIM)
            else:
                vec_store_row(orow, acc, CB, bsum, scale, PER, CB)
            return
        # ---- run-time dim: scalar loops, accumulating in orow (element order) ----
        cb = (dim * BITS + 7) // 8 if QUANT else dim
        need = cb + SBYTES if QUANT else dim * ITEM
        if not MODE_MAX:
            for j in range(dim):
                orow[j] = ZERO
        cnt = 0
        for k in range(s, e):
            if HAS_PF:
                kp = min(k + PF, pf_end - 1)
                pfirst = np.int64(idx[np.uint64(kp)]) * row_bytes
                prefetch(tab, pfirst)
                if PF_ALL:
                    for c in range(LINE, need, LINE):
                        prefetch(tab, pfirst + c)
            r = np.int64(idx[np.uint64(k)])
            if r == pad:
                continue
            first = MODE_MAX and cnt == 0
            cnt += 1
            if WEIGHTED:
                w = wts[np.uint64(k)]
            else:
                w = ONE
            base = r * row_bytes
            if QUANT:
                if Q8:
                    sc = load_f32(tab, base + cb)
                    bi = load_f32(tab, base + cb + 4)
                else:
                    sc = load_f16(tab, base + cb)
                    bi = load_f16(tab, base + cb + 2)
                if WEIGHTED:
                    sc = sc * w
                    bi = bi * w
                for j in range(dim):
                    code = (tab[base + j // PER] >> np.uint8((j % PER) * BITS)) & np.uint8(MASK)
                    x = sc * np.float32(code) + bi
                    if first:
                        orow[j] = x
                    elif MODE_MAX:
                        orow[j] = fmax(orow[j], x)
                    else:
                        orow[j] += x
            else:
                for j in range(dim):
                    if F16:
                        x = load_f16(tab, base + 2 * j)
                    else:
                        x = load_f32(tab, base + 4 * j)
                    if first:
                        orow[j] = x
                    elif MODE_MAX:
                        orow[j] = fmax(orow[j], x)
                    elif WEIGHTED:
                        orow[j] += w * x
                    else:
                        orow[j] += x
        if MODE_MAX and cnt == 0:
            for j in range(dim):
                orow[j] = ZERO
        if MODE_MEAN and cnt > 1:
            scale = ONE / np.float32(cnt)
            for j in range(dim):
                orow[j] *= scale

    return impl


_INT = {"int32": numba.int32, "int64": numba.int64}


def signature(key):
    """Numba signature of the batched kernel for ``key``."""
    i64 = types.int64
    v64 = types.int64[::1]
    return types.UniTuple(i64, 5)(
        v64,  # addrs: data address of each table
        v64,  # row_bytes: bytes from one row to the next
        v64,  # rows
        v64,  # dims
        v64,  # group of each table (index into the key's groups)
        v64,  # padding row of each table, -1 for none
        v64,  # obase: out element of bag (t, 0)
        v64,  # ostride: out elements from bag (t, b) to (t, b + 1)
        _INT[key[2]][::1],  # indices, flat
        _INT[key[3]][::1],  # offsets, T * B + 1
        i64,  # batch B
        numba.float32[::1],  # per-sample weights (empty when unweighted)
        i64,  # ntasks (parallel kernels)
        i64,  # threads of the parallel region (parallel kernels)
        numba.float32[::1],  # out, flat
    )


@kernel_family("embedding_bags")
def batched_kernel(key):
    """Key ``(isa, groups, index dtype, offsets dtype, mode, weighted, parallel)``; see the
    module docstring."""
    isa, groups, idx_name, off_name, mode, weighted, parallel = key
    groups = tuple(groups)
    if not 1 <= len(groups) <= MAX_GROUPS or mode not in _MODE_IDS:
        raise ValueError(f"embedding_bags kernel: bad key {key!r}")
    for kind, d in groups:
        if kind not in KIND_IDS or d < 0 or (d and d % 4):
            raise ValueError(f"embedding_bags kernel: bad group {(kind, d)!r}")
    NG = len(groups)
    padded = groups + (groups[0],) * (MAX_GROUPS - NG)
    # Compile-time constants, one pair per group slot (literal arguments of pool_bag).
    S0, S1, S2, S3, S4, S5, S6, S7 = (KIND_IDS[k] for k, _ in padded)
    D0, D1, D2, D3, D4, D5, D6, D7 = (int(d) for _, d in padded)
    MODE = _MODE_IDS[mode]
    W = 1 if weighted else 0
    PAR = bool(parallel)
    BAGC = BAG_COST
    # Aligned loads for float32 tables whose rows all sit _TABLE_OFFSET bytes past a vector
    # boundary (checked per table and call), as the single-table kernel does.
    VB = 0 if isa == "portable" else (64 if isa.startswith("avx512") else 32)
    VBM = max(VB, 1)
    SH_OFF = _TABLE_OFFSET if VB else -1
    loop = prange if PAR else range
    # Rows a task prefetches in one burst when it starts on a table (``prefetch_distance`` of
    # the table's row bytes, at run time: tables differ): the pooling loop prefetches PF rows
    # ahead, so without the burst the first PF rows of every table a task enters are read cold
    HEAD = prefetch_distance(0) > 0
    LINE_B = _LINE

    @numba.njit(signature(key), parallel=PAR, cache=True, nogil=True, fastmath=_fastmath())
    def embedding_bags(
        addrs, row_bytes, rows, dims, group, pad, obase, ostride, indices, offs, batch, wts,
        ntasks, nthreads, out,
    ):  # fmt: skip
        nt = addrs.size
        n = indices.size
        nb = nt * batch
        # ---- validation: nothing is written before it passes ----
        if np.int64(offs[0]) != 0:
            return (BAD_FIRST_OFFSET, 0, 0, 0, np.int64(offs[0]))
        dec = False
        for g in range(1, nb + 1):
            dec |= offs[g] < offs[g - 1]
        if dec:
            for g in range(1, nb + 1):
                if offs[g] < offs[g - 1]:
                    return (DECREASING_OFFSET, g // batch, g % batch, g, np.int64(offs[g]))
        if np.int64(offs[nb]) != n:
            return (OFFSET_PAST_END, nt, 0, nb, np.int64(offs[nb]))
        for t in range(nt):
            s = np.int64(offs[t * batch])
            e = np.int64(offs[(t + 1) * batch])
            nr = rows[t]
            bad = False
            for k in range(s, e):
                bad |= np.uint64(np.int64(indices[k])) >= np.uint64(nr)
            if bad:
                for k in range(s, e):
                    v = np.int64(indices[k])
                    if v < 0 or v >= nr:
                        b = 0
                        while np.int64(offs[t * batch + b + 1]) <= k:
                            b += 1
                        return (BAD_INDEX, t, b, k, v)
        # ---- split the global bags into ntasks ranges of equal work ----
        tasks = max(1, min(ntasks, nb))
        bounds = np.empty(tasks + 1, np.int64)
        bounds[0] = 0
        bounds[tasks] = nb
        if tasks > 1:
            total = np.float64(0.0)
            for t in range(nt):
                c = np.float64(row_bytes[t] if dims[t] > 0 else 0)
                total += c * np.float64(offs[(t + 1) * batch] - offs[t * batch]) + BAGC * batch
            step = total / tasks
            j = 1
            acc = np.float64(0.0)
            for g in range(nb):
                t = g // batch
                c = np.float64(row_bytes[t] if dims[t] > 0 else 0)
                acc += c * np.float64(offs[g + 1] - offs[g]) + BAGC
                while j < tasks and acc >= step * j:
                    bounds[j] = g + 1
                    j += 1
            while j < tasks:
                bounds[j] = nb
                j += 1
        # ---- pool: one parallel region; each thread takes the next task until none is left
        # (a shared atomic counter), so a thread slowed down by another process does less ----
        ib = borrow(indices)
        wb = borrow(wts)
        workers = max(1, min(nthreads, tasks)) if PAR else 1
        counter = np.zeros(1, np.int64)
        for _wk in loop(workers):
            while True:
                q = atomic_next(counter)
                if q >= tasks:
                    break
                g0 = bounds[q]
                g1 = bounds[q + 1]
                for g in range(g0, g1):
                    t = g // batch
                    b = g - t * batch
                    dim = dims[t]
                    if dim == 0:
                        continue
                    nr = rows[t]
                    rb = row_bytes[t]
                    tab = ptr_bytes(addrs[t], nr * rb)
                    sh = rb % VBM == 0 and addrs[t] % VBM == SH_OFF
                    s = np.int64(offs[g])
                    e = np.int64(offs[g + 1])
                    pf_end = np.int64(offs[(t + 1) * batch])
                    if HEAD and (g == g0 or b == 0):  # this task enters table t: burst
                        for k in range(s, min(s + prefetch_distance(rb), pf_end)):
                            pfirst = np.int64(ib[np.uint64(k)]) * rb
                            for c in range(0, rb, LINE_B):
                                prefetch(tab, pfirst + c)
                            prefetch(tab, pfirst + rb - 1)
                    orow = row_view(out, obase[t] + b * ostride[t], dim)
                    p = pad[t]
                    k = group[t]
                    if k == 0:
                        pool_bag(
                            S0, D0, MODE, W, VB, sh, tab, rb, dim, ib, s, e, pf_end, wb, p, orow
                        )
                    elif NG > 1 and k == 1:
                        pool_bag(
                            S1, D1, MODE, W, VB, sh, tab, rb, dim, ib, s, e, pf_end, wb, p, orow
                        )
                    elif NG > 2 and k == 2:
                        pool_bag(
                            S2, D2, MODE, W, VB, sh, tab, rb, dim, ib, s, e, pf_end, wb, p, orow
                        )
                    elif NG > 3 and k == 3:
                        pool_bag(
                            S3, D3, MODE, W, VB, sh, tab, rb, dim, ib, s, e, pf_end, wb, p, orow
                        )
                    elif NG > 4 and k == 4:
                        pool_bag(
                            S4, D4, MODE, W, VB, sh, tab, rb, dim, ib, s, e, pf_end, wb, p, orow
                        )
                    elif NG > 5 and k == 5:
                        pool_bag(
                            S5, D5, MODE, W, VB, sh, tab, rb, dim, ib, s, e, pf_end, wb, p, orow
                        )
                    elif NG > 6 and k == 6:
                        pool_bag(
                            S6, D6, MODE, W, VB, sh, tab, rb, dim, ib, s, e, pf_end, wb, p, orow
                        )
                    elif NG > 7 and k == 7:
                        pool_bag(
                            S7, D7, MODE, W, VB, sh, tab, rb, dim, ib, s, e, pf_end, wb, p, orow
                        )
        return (OK, 0, 0, 0, 0)

    return embedding_bags
