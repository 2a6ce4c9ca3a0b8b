"""Embedding-bag kernels (FBGEMM's ``EmbeddingSpMDM`` family), one per signature.

A kernel is specialised, through :func:`qgemm._cache.kernel_family`, on the key
``(isa, kind, index dtype, offsets dtype, bags_by, mode, weighted, dim, parallel,
prevalidate)``:

``kind``
    ``"float32"``, ``"float16"`` (a float table, row-major with unit inner stride), or
    ``"rowwise8"``, ``"rowwise4"``, ``"rowwise2"`` (the fused rowwise-quantized layout: each row
    holds the packed codes, then the scale, then the bias -- float32 for 8-bit, float16 for
    4/2-bit, at unaligned byte offsets).
``bags_by``
    ``"offsets"`` (torch: bag ``b`` is ``[offsets[b], offsets[b + 1])``, the last bag runs to
    the end of ``indices`` unless ``offsets`` carries the final offset) or ``"lengths"``
    (Caffe2: consecutive runs of ``lengths[b]`` indices).
``mode``
    ``"sum"``, ``"mean"`` or ``"max"``.
``dim``
    The embedding dimension as a compile-time constant (:func:`specialised_dim`: multiples of
    4 up to 1024), or 0 for the generic kernel that reads it at run time.  Specialised
    kernels keep the bag's accumulator in vector registers and update it with explicit
    vector IR (:func:`vec_row`); the generic one uses scalar loops that LLVM vectorises,
    accumulating in ``out``.
``parallel``
    Parallel over bags (``prange``) or serial (small calls, where the cost of waking the
    worker threads is larger than the work).

Every kernel first *validates* the bag boundaries (offsets or lengths), then, with
``prevalidate``, the index range in one vectorised min/max pass, and only then writes ``out``:
an invalid call returns an error code before touching the output or reading any row.  Without
``prevalidate`` (the wrapper's choice when ``out`` is its own buffer) each index is checked as
its row is about to be read -- an invalid one is skipped, never read -- and the first invalid
position is looked up after the loop; this saves a pass over the indices, which costs as
much as the lookups themselves when the indices are not in the cache.  The kernel returns
``(code, position, value)``: code 0 is success; the others are listed in :data:`ERRORS` and
turned into exceptions by the wrapper.

Rows are read straight from the table (the quantized ones are dequantized on the fly, never
materialised), with the float32/float16 scale and bias fetched by unaligned loads; the row
``PREFETCH`` indices ahead is prefetched (``llvm.prefetch``, one line per 64 bytes), as FBGEMM
does, plus the line holding the row's last byte (rows need not start on a line).  float32
rows that all start 16 bytes past a vector boundary -- numpy's large arrays, whose data sits
16 bytes past a page -- are read with aligned vector loads from 16 bytes before the row (the
accumulator carries the extra lanes, dropped when the bag is stored): a split load per two
vectors less; the choice is made per call from the table's address (:func:`address_mod`).
Accumulation is in float32 (a float16 table is widened on load).  For quantized rows the
sum mode accumulates ``code * scale`` and adds the sum of the biases once per bag (one vector
operation per row less than ``code * scale + bias``); 4/2-bit rows are accumulated as code
planes (all low nibbles, then all high nibbles) so that each update is one contiguous vector
operation, and the planes are interleaved back into element order when the bag is stored.

Kernels are cached on disk by Numba.  Everything a kernel closes over must pickle the same way
in every process (ints, strings, bools, numpy scalars): the vector intrinsics
(:mod:`qgemm._kernels.embedding_ir`) therefore take their variant as literal integer arguments
instead of being captured as objects.  Prefetch settings come from :mod:`qgemm._tuning`.

``check_bags_kernel`` is the standalone form of the same bag checks (no table read), for
callers that validate every bag before any work (:func:`qgemm.embedding.check_bags`).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic, register_jitable
from numba.np.arrayobj import populate_array

from .._cache import kernel_family
from .._config import fastmath_flags
from .._tuning import EMBEDDING_ALIGNED_LOADS as ALIGNED_LOADS
from .._tuning import EMBEDDING_PREFETCH as PREFETCH
from .._tuning import EMBEDDING_PREFETCH_ALL_LINES as PREFETCH_ALL_LINES
from .._tuning import EMBEDDING_PREFETCH_BYTES as PREFETCH_BYTES
from .._tuning import EMBEDDING_PREFETCH_MAX as PREFETCH_MAX
from .._tuning import EMBEDDING_PREFETCH_TAIL as PREFETCH_TAIL
from .embedding_codes import (  # (re-exported: KINDS, MODES, the error codes)
    BAD_FIRST_OFFSET,
    BAD_INDEX,
    DECREASING_OFFSET,
    ERRORS,
    KINDS,
    LENGTHS_SUM,
    MODES,
    NEGATIVE_LENGTH,
    OFFSET_PAST_END,
    OK,
)
from .embedding_ir import (
    OP_IDS,
    SRC_IDS,
    address_mod,
    fmax,
    half_to_float,
    load_f16,
    load_f32,
    prefetch,
    row_view,
    stack_array,
    vec_row,
    vec_store_row,
    vec_store_shifted,
)

__all__ = [
    "embedding_bag_kernel",
    "check_bags_kernel",
    "specialised_dim",
    "aligned_row_layout",
    "prefetch_distance",
    "ERRORS",
    "KINDS",
    "PREFETCH",
]

_CACHE_LINE = 64
_TABLE_OFFSET = 16
"""Bytes past a line boundary where a large numpy array starts (glibc's mmap chunk header:
``np.empty((1 << 20, 64), np.float32).ctypes.data % 64 == 16``): the offset the aligned-load
path of float32 tables handles."""
_SHIFT_MAX_VECTORS = {32: 17, 64: 30}
"""Most accumulator vectors (by vector bytes) of the aligned-load path; wider rows take the
split loads.  AVX2 allows 17 (dim 128: one accumulator more than the 16 ymm, spilled to the
stack): measured 1.08-1.10x torch against 1.02-1.06x for the split loads on 1M x 128, one
thread, same run -- the loop waits on memory, an L1 spill is cheap next to a split line."""


@register_jitable
def prefetch_distance(row_bytes_read: int) -> int:
    """Indices ahead at which a kernel prefetches the row it will read, for rows of
    ``row_bytes_read`` bytes (0: a run-time dim, then ``PREFETCH``): about ``PREFETCH_BYTES``
    of rows in flight, at least ``PREFETCH`` and at most ``PREFETCH_MAX`` rows (0 turns
    prefetching off).  Short quantized rows need many rows ahead to keep enough misses in
    flight to DRAM; :mod:`qgemm._tuning` has the measurements.  Callable from compiled code
    too (the batched kernel, for a table's row bytes known at run time)."""
    if PREFETCH <= 0:
        return 0
    if row_bytes_read <= 0:
        return PREFETCH
    return max(PREFETCH, min(PREFETCH_MAX, PREFETCH_BYTES // row_bytes_read))


def aligned_row_layout(
    kind: str, vbytes: int, vec: bool, dim: int, acc: int
) -> tuple[bool, int, int, int, int]:
    """The aligned-load path of a kernel pooling ``kind`` rows of compile-time ``dim`` (``vec``)
    with vectors of ``vbytes`` bytes (0: none) and an ``acc``-float accumulator, shared by the
    single-table and the batched kernels: ``(shiftable, shift, acc_sh, acc_alloc, sh_bytes)``
    -- whether float32 rows sitting :data:`_TABLE_OFFSET` bytes past a vector boundary are read
    by aligned loads from ``shift`` floats (``sh_bytes`` bytes) before the row into an
    ``acc_sh``-float accumulator (the row plus the lanes before and after it, dropped at the
    store), and the accumulator size to allocate."""
    shiftable = bool(
        ALIGNED_LOADS
        and vbytes > 0
        and kind == "float32"
        and vec
        and dim % 16 == 0
        and (dim * 4 + vbytes) // vbytes <= _SHIFT_MAX_VECTORS[vbytes]
    )
    acc_sh = dim + vbytes // 4 if shiftable else max(acc, 1)
    return (
        shiftable,
        _TABLE_OFFSET // 4 if shiftable else 0,
        acc_sh,
        max(acc, acc_sh),
        _TABLE_OFFSET if shiftable else 0,
    )


@intrinsic
def out_row(typingctx, arr, row):
    """Row ``row`` of a C-contiguous 2-D array as a 1-D view, without the meminfo reference
    counting of ``arr[row]`` (two atomic operations per bag in a ``prange``; the view never
    outlives ``arr``).  ``row`` must be in range."""
    if not isinstance(arr, types.Array) or arr.ndim != 2 or arr.layout != "C":
        return None
    rowty = types.Array(arr.dtype, 1, "C")

    def codegen(context, builder, signature, args):
        src = context.make_array(signature.args[0])(context, builder, args[0])
        ary = context.make_array(rowty)(context, builder)
        ncols = cgutils.unpack_tuple(builder, src.shape, 2)[1]
        ptr = builder.gep(src.data, [builder.mul(args[1], ncols)])
        itemsize = context.get_constant(
            types.intp, context.get_abi_sizeof(context.get_data_type(arr.dtype))
        )
        populate_array(
            ary, data=ptr, shape=[ncols], strides=[itemsize], itemsize=itemsize, meminfo=None
        )
        return ary._getvalue()

    return rowty(arr, types.intp), codegen


@kernel_family("check_bags")
def check_bags_kernel(key):
    """Validate one bag set in a single pass, reading no table; key ``(index dtype, offsets
    dtype)`` names.

    ``kern(indices, offsets, rows) -> (code, position, value)``: offsets (torch convention,
    possibly empty) must start at 0, never decrease and not pass ``len(indices)``; every index
    must be in ``[0, rows)``.  Code 0 is success, the others are those of :data:`ERRORS`.  Used
    where the bags are checked before anything runs (the DLRM model checks every table's bags
    before its first layer).
    """
    idx_name, off_name = key
    idx_t = types.Array(getattr(types, idx_name), 1, "C")
    off_t = types.Array(getattr(types, off_name), 1, "C")
    sig = types.UniTuple(types.int64, 3)(idx_t, off_t, types.int64)

    @numba.njit(sig, cache=True, nogil=True)
    def kern(indices, offsets, rows):  # pragma: no cover - compiled
        n = indices.shape[0]
        bags = offsets.shape[0]
        if bags > 0:
            if offsets[0] != 0:
                return (BAD_FIRST_OFFSET, 0, np.int64(offsets[0]))
            for b in range(1, bags):
                if offsets[b] < offsets[b - 1]:
                    return (DECREASING_OFFSET, b, np.int64(offsets[b]))
            if offsets[bags - 1] > n:
                return (OFFSET_PAST_END, bags - 1, np.int64(offsets[bags - 1]))
        bad = 0
        for i in range(n):  # branch-free scan (vectorises); locate only on failure
            v = np.int64(indices[i])
            bad |= (v < 0) | (v >= rows)
        if bad:
            for i in range(n):
                v = np.int64(indices[i])
                if v < 0 or v >= rows:
                    return (BAD_INDEX, i, v)
        return (OK, 0, 0)

    return kern


# -- the kernel family ---------------------------------------------------------------------------
_INT = {"int32": numba.int32, "int64": numba.int64}
_TABLE = {
    "float32": numba.float32,
    "float16": numba.uint16,  # float16 bits, widened with half_to_float
    "rowwise8": numba.uint8,
    "rowwise4": numba.uint8,
    "rowwise2": numba.uint8,
}
MAX_SPECIALISED_DIM = 1024


def specialised_dim(dim: int) -> int:
    """The ``dim`` entry of the key: ``dim`` itself when it is a multiple of 4 up to
    :data:`MAX_SPECIALISED_DIM` (the usual embedding sizes; their kernels keep the accumulator
    in vector registers), else 0 (the generic kernel)."""
    return dim if 0 < dim <= MAX_SPECIALISED_DIM and dim % 4 == 0 else 0


def signature(key):
    """Numba signature of the kernel for ``key``."""
    kind, idx_name, off_name = key[1], key[2], key[3]
    return types.UniTuple(types.int64, 3)(
        _TABLE[kind][::1],  # table, flat (row r starts at element r * row_stride)
        types.int64,  # row_stride, in elements of table
        types.int64,  # rows
        types.int64,  # dim (run time; must equal the key's dim when specialised)
        _INT[idx_name][::1],  # indices
        _INT[off_name][::1],  # offsets or lengths
        types.int64,  # bags
        numba.float32[::1],  # per-sample weights (empty when unweighted)
        types.int64,  # padding index, -1 for none
        numba.float32[:, ::1],  # out [bags, dim]
    )


@kernel_family("embedding_bag")
def embedding_bag_kernel(key):
    """Key ``(isa, kind, index dtype, offsets dtype, bags_by, mode, weighted, dim, parallel,
    prevalidate)``;
    see the module docstring.  The ISA is part of the key so that each path gets its own
    compiled copy; the code itself is plain loops that LLVM vectorises for the host."""
    isa, kind, idx_name, off_name, bags_by, mode, weighted, dim_c, parallel, prevalidate = key
    if kind not in KINDS or mode not in MODES or bags_by not in ("offsets", "lengths"):
        raise ValueError(f"embedding_bag kernel: bad key {key!r}")
    # Compile-time constants of this kernel (numba freezes closure variables).
    KIND = kind
    PREVALIDATE = bool(prevalidate)
    BY_LENGTHS = bags_by == "lengths"
    MODE_MEAN = mode == "mean"
    MODE_MAX = mode == "max"
    WEIGHTED = bool(weighted)
    DIM = int(dim_c)
    QUANT = kind.startswith("rowwise")
    BITS = {"rowwise8": 8, "rowwise4": 4, "rowwise2": 2}.get(kind, 32)
    PER = 8 // BITS if BITS < 8 else 1  # codes per byte
    MASK = (1 << BITS) - 1 if BITS < 8 else 255
    ITEM = {"float32": 4, "float16": 2}.get(kind, 1)  # bytes per table element
    # Accumulator layout: float and 8-bit tables accumulate element j at acc[j]; 4/2-bit tables
    # accumulate "bit planes" (code p of byte j at acc[p * code_bytes + j]) so that every row
    # update is a contiguous, vectorisable loop; the planes are interleaved once per bag.
    CB = (DIM * BITS + 7) // 8 if QUANT else DIM  # code bytes per row (0: run time)
    ACC = CB * PER if QUANT else DIM
    # Bytes read per row (specialised kernels): the codes and the scale/bias, or the floats.
    # A compile-time constant: computed inside the kernel, numba's parallel lowering passed it
    # to the outlined loop body as a run-time value and the prefetch loop over it was lost.
    NEED = (CB + (8 if BITS == 8 else 4)) if QUANT else DIM * ITEM
    # Specialised kernels: one vec_row call per code plane (CB elements) and row.
    SRC = SRC_IDS[{"float32": "f32", "float16": "f16"}.get(kind, "code" + str(BITS))]
    OP_ZERO = OP_IDS["zero"]
    OP_ROW = OP_IDS["max" if MODE_MAX else ("addw" if WEIGHTED and not QUANT else "add")]
    # Branch conditions as plain booleans: numba prunes the dead side of ``if FLAG:`` before
    # typing, so each kernel compiles only its own path.
    VEC = DIM > 0
    Q8 = BITS == 8
    QN = QUANT and BITS < 8
    F16 = KIND == "float16"
    ONE = np.float32(1.0)
    ZERO = np.float32(0.0)
    PF = prefetch_distance(NEED if DIM > 0 else 0)
    PF_ALL = PREFETCH_ALL_LINES
    HAS_PF = PF > 0
    LINE = _CACHE_LINE
    # Rows need not start on a line (numpy's large arrays start 16 bytes past one): then a row
    # spans one line more than its size suggests, and its last line is prefetched too.
    PF_TAIL = PREFETCH_TAIL
    # Aligned loads for float32 rows that all sit _TABLE_OFFSET bytes past a vector boundary
    # (checked per call): the accumulator covers the row plus the bytes before and after it in
    # its first and last vector (ACC_SH elements, loaded from SHIFT floats before the row), so
    # no load straddles two lines; the extra lanes are dropped when the bag is stored.
    VBYTES = 64 if isa.startswith("avx512") else 32
    SHIFTABLE, SHIFT, ACC_SH, ACC_ALLOC, SH_BYTES = aligned_row_layout(
        KIND, 0 if isa == "portable" else VBYTES, VEC, DIM, ACC
    )
    loop = prange if parallel else range
    sig = signature(key)
    fastmath = fastmath_flags()
    if not isinstance(fastmath, bool):
        fastmath = set(fastmath)  # numba wants a set, not a frozenset

    @numba.njit(sig, parallel=bool(parallel), cache=True, nogil=True, fastmath=fastmath)
    def embedding_bag(table, row_stride, rows, dim_rt, indices, offs, bags, weights, pad, out):
        n = indices.size
        dim = DIM if VEC else dim_rt
        if QUANT:
            cb = CB if VEC else (dim * BITS + 7) // 8
            need = cb + (8 if Q8 else 4)  # bytes read per row
        else:
            cb = dim
            need = dim * ITEM
        row_bytes = row_stride * ITEM
        shifted = False
        if SHIFTABLE:
            shifted = row_bytes % VBYTES == 0 and address_mod(table, VBYTES) == SH_BYTES
        # ---- validation: nothing below reads a row or writes out before this passes ----
        n_offs = offs.size
        if BY_LENGTHS:
            starts = np.empty(bags + 1, np.int64)
            total = 0
            for b in range(bags):
                ln = np.int64(offs[b])
                if ln < 0:
                    return (NEGATIVE_LENGTH, b, ln)
                starts[b] = total
                total += ln
            starts[bags] = total
            if total != n:
                return (LENGTHS_SUM, total, n)
        else:
            starts = np.empty(0, np.int64)
            if n_offs > 0:
                if offs[0] != 0:
                    return (BAD_FIRST_OFFSET, 0, np.int64(offs[0]))
                decreasing = False
                for b in range(1, n_offs):
                    decreasing |= offs[b] < offs[b - 1]
                if decreasing:
                    for b in range(1, n_offs):
                        if offs[b] < offs[b - 1]:
                            return (DECREASING_OFFSET, b, np.int64(offs[b]))
                if np.int64(offs[n_offs - 1]) > n:
                    return (OFFSET_PAST_END, n_offs - 1, np.int64(offs[n_offs - 1]))
        if PREVALIDATE and n > 0:
            lo = np.int64(indices[0])
            hi = lo
            for i in range(n):
                v = np.int64(indices[i])
                lo = min(lo, v)
                hi = max(hi, v)
            if lo < 0 or hi >= rows:
                for i in range(n):
                    v = np.int64(indices[i])
                    if v < 0 or v >= rows:
                        return (BAD_INDEX, i, v)
        # ---- compute: one bag per iteration ----
        nbad = 0  # invalid indices met (inline validation only; a reduction over bags)
        for b in loop(bags):
            if BY_LENGTHS:
                s = starts[b]
                e = starts[b + 1]
            else:
                s = np.int64(offs[b])
                e = np.int64(offs[b + 1]) if b + 1 < n_offs else n
            orow = out_row(out, b)
            if VEC:
                # ---- specialised: vector updates of a register-resident accumulator ----
                acc = stack_array(ACC_ALLOC)
                if not MODE_MAX:
                    if SHIFTABLE and shifted:
                        vec_row(acc, 0, table, 0, ONE, ZERO, 0, False, SRC, OP_ZERO, ACC_SH)
                    else:
                        for p in range(PER):
                            vec_row(acc, p * CB, table, 0, ONE, ZERO, 0, False, SRC, OP_ZERO, CB)
                cnt = 0
                bsum = ZERO  # sum of the (weighted) biases of the rows added (codes)
                for k in range(s, e):
                    if HAS_PF:
                        kp = np.uint64(min(k + PF, n - 1))
                        pfirst = np.int64(indices[kp]) * row_bytes
                        prefetch(table, pfirst)
                        if PF_ALL:  # every line of the row (rows need not be aligned)
                            for c in range(LINE, NEED, LINE):  # constant trip count
                                prefetch(table, pfirst + c)
                            if PF_TAIL and NEED > 1:
                                prefetch(table, pfirst + NEED - 1)
                    r = np.int64(indices[np.uint64(k)])
                    if not PREVALIDATE and np.uint64(r) >= np.uint64(rows):
                        nbad += 1  # checked inline; reported (first position) after the loop
                        continue
                    if r == pad:
                        continue
                    first = cnt == 0
                    cnt += 1
                    if WEIGHTED:
                        w = weights[np.uint64(k)]
                    else:
                        w = ONE
                    base = r * row_bytes
                    if QUANT:
                        if Q8:
                            a = load_f32(table, base + CB)
                            z = load_f32(table, base + CB + 4)
                        else:
                            a = load_f16(table, base + CB)
                            z = load_f16(table, base + CB + 2)
                        if WEIGHTED:
                            a = a * w
                            z = z * w
                        bsum += z
                    else:
                        a = w
                        z = ZERO
                    if SHIFTABLE and shifted:
                        sb = base - SH_BYTES
                        vec_row(acc, 0, table, sb, a, z, 0, first, SRC, OP_ROW, ACC_SH)
                    else:
                        for p in range(PER):
                            pb = p * BITS
                            vec_row(acc, p * CB, table, base, a, z, pb, first, SRC, OP_ROW, CB)
                if MODE_MAX and cnt == 0:
                    if SHIFTABLE and shifted:
                        vec_row(acc, 0, table, 0, ONE, ZERO, 0, False, SRC, OP_ZERO, ACC_SH)
                    else:
                        for p in range(PER):
                            vec_row(acc, p * CB, table, 0, ONE, ZERO, 0, False, SRC, OP_ZERO, CB)
                scale = ONE
                if MODE_MEAN and cnt > 1:
                    scale = ONE / np.float32(cnt)
                if MODE_MAX:
                    bsum = ZERO
                if SHIFTABLE and shifted:
                    vec_store_shifted(orow, acc, bsum, scale, SHIFT, ACC_SH, DIM)
                else:
                    vec_store_row(orow, acc, CB, bsum, scale, PER, CB)
                continue
            # ---- generic dim: scalar loops (accumulating in out, or in code planes) ----
            if QN:
                acc = np.empty(cb * PER, np.float32)
            else:
                acc = orow
            na = cb * PER if QUANT else dim
            if not MODE_MAX:
                for j in range(na):
                    acc[j] = np.float32(0.0)
            cnt = 0
            for k in range(s, e):
                if HAS_PF:
                    kp = np.uint64(min(k + PF, n - 1))
                    pfirst = np.int64(indices[kp]) * row_bytes
                    prefetch(table, pfirst)
                    if PF_ALL:
                        for c in range(LINE, need, LINE):
                            prefetch(table, pfirst + c)
                r = np.int64(indices[np.uint64(k)])
                if not PREVALIDATE and np.uint64(r) >= np.uint64(rows):
                    nbad += 1
                    continue
                if r == pad:
                    continue
                base = r * row_stride
                first = MODE_MAX and cnt == 0
                cnt += 1
                if WEIGHTED:
                    w = weights[np.uint64(k)]
                else:
                    w = np.float32(1.0)
                if QUANT:
                    if Q8:
                        sc = load_f32(table, base + cb)
                        bi = load_f32(table, base + cb + 4)
                    else:
                        sc = load_f16(table, base + cb)
                        bi = load_f16(table, base + cb + 2)
                    if WEIGHTED:
                        sc = sc * w
                        bi = bi * w
                    row = row_view(table, base, cb)
                    for p in range(PER):
                        plane = acc[p * cb : (p + 1) * cb]
                        shift = np.uint8(p * BITS)
                        if first:
                            for j in range(cb):
                                code = (row[j] >> shift) & np.uint8(MASK)
                                plane[j] = sc * np.float32(code) + bi
                        elif MODE_MAX:
                            for j in range(cb):
                                code = (row[j] >> shift) & np.uint8(MASK)
                                plane[j] = fmax(plane[j], sc * np.float32(code) + bi)
                        else:
                            for j in range(cb):
                                code = (row[j] >> shift) & np.uint8(MASK)
                                plane[j] += sc * np.float32(code) + bi
                else:
                    row = row_view(table, base, dim)
                    if F16:
                        if first:
                            for j in range(dim):
                                acc[j] = half_to_float(row[j])
                        elif MODE_MAX:
                            for j in range(dim):
                                acc[j] = fmax(acc[j], half_to_float(row[j]))
                        elif WEIGHTED:
                            for j in range(dim):
                                acc[j] += w * half_to_float(row[j])
                        else:
                            for j in range(dim):
                                acc[j] += half_to_float(row[j])
                    else:
                        if first:
                            for j in range(dim):
                                acc[j] = row[j]
                        elif MODE_MAX:
                            for j in range(dim):
                                acc[j] = fmax(acc[j], row[j])
                        elif WEIGHTED:
                            for j in range(dim):
                                acc[j] += w * row[j]
                        else:
                            for j in range(dim):
                                acc[j] += row[j]
            # ---- finish the bag: mean, empty max bags, planes -> elements ----
            if MODE_MAX and cnt == 0:
                for j in range(na):
                    acc[j] = np.float32(0.0)
            scale = np.float32(1.0)
            if MODE_MEAN and cnt > 1:
                scale = np.float32(1.0) / np.float32(cnt)
            if QN:
                for p in range(PER):
                    for j in range(cb):
                        d = j * PER + p
                        if d < dim:
                            if MODE_MEAN:
                                orow[d] = acc[p * cb + j] * scale
                            else:
                                orow[d] = acc[p * cb + j]
            elif VEC:
                if MODE_MEAN:
                    for j in range(dim):
                        orow[j] = acc[j] * scale
                else:
                    for j in range(dim):
                        orow[j] = acc[j]
            elif MODE_MEAN:
                for j in range(dim):
                    orow[j] *= scale
        if not PREVALIDATE and not BY_LENGTHS and bags < n_offs:
            # indices after the final offset belong to no bag; they are checked all the same
            for i in range(np.int64(offs[bags]), n):
                v = np.int64(indices[i])
                if v < 0 or v >= rows:
                    nbad += 1
        if not PREVALIDATE and nbad > 0:
            for i in range(n):
                v = np.int64(indices[i])
                if v < 0 or v >= rows:
                    return (BAD_INDEX, i, v)
        return (OK, 0, 0)

    return embedding_bag
