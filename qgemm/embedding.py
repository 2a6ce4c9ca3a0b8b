"""Pooled embedding lookups (embedding bags) over float and rowwise-quantized tables.

The job of FBGEMM's ``EmbeddingSpMDM`` kernels, exposed by PyTorch as
``torch.nn.functional.embedding_bag`` (float tables) and
``torch.ops.quantized.embedding_bag_{byte,4bit,2bit}_rowwise_offsets`` (quantized tables):
for every bag (one sample's categorical feature) gather a handful of rows of a large table and
reduce them (sum, mean or max).

Semantics follow ``torch.nn.functional.embedding_bag`` wherever torch defines them (bags by
``offsets`` with ``offsets[0] == 0`` and ``include_last_offset``; a 2-D ``indices`` means
fixed-size bags; ``per_sample_weights`` with ``mode="sum"`` only; rows equal to
``padding_idx`` are skipped and not counted by the mean; empty bags give zeros), with these
differences, all deliberate:

* ``mode`` is honoured for quantized tables too (torch's quantized ops silently return the sum
  for "mean" and "max", pytorch#106105); a quantized row is dequantized on the fly
  (``code * scale + bias``, in float32) and then reduced like a float row.
* Bags can also be given by ``lengths`` (Caffe2's convention; they must add up to the number of
  indices).
* Everything is validated before anything is computed: a bad index raises ``IndexError``
  naming its position and value; bad offsets or lengths raise ``ValueError`` naming the
  position; ``out`` is left untouched by a failed call.  Every index is checked, including
  indices after the final offset that no bag uses (torch checks them too).
* With ``padding_idx`` and ``include_last_offset``, torch 2.13 adds the indices after
  ``offsets[-1]`` to the last bag (sum and mean); here, as documented for
  ``include_last_offset``, bags end at ``offsets[-1]`` whatever ``padding_idx`` is.
* Accumulation is in float32 for every table type (a float16 table is widened on load); the
  output is float32, or float16 on request (rounded once at the end).

Many tables in one call (FBGEMM's table-batched op, TBE): :mod:`qgemm.embedding_batched`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _config, _tiers
from ._kernels.embedding import (
    BAD_FIRST_OFFSET,
    BAD_INDEX,
    DECREASING_OFFSET,
    LENGTHS_SUM,
    NEGATIVE_LENGTH,
    OFFSET_PAST_END,
    check_bags_kernel,
    embedding_bag_kernel,
    specialised_dim,
)
from ._tuning import EMBEDDING_PARALLEL_MIN_WORK
from ._validate import as_array, check_choice, check_out
from .quantize import RowwiseQuantizedTable

__all__ = ["embedding_bag"]

_MODES = ("sum", "mean", "max")
_INDEX_DTYPES = (np.int32, np.int64)
_OUT_DTYPES = (np.float32, np.float16)
_EMPTY_WEIGHTS = np.empty(0, np.float32)
_EMPTY_OFFSETS = np.empty(0, np.int64)

PARALLEL_MIN_WORK = EMBEDDING_PARALLEL_MIN_WORK
"""Calls touching fewer than this many table elements (indices x dim) run on one thread
(:data:`qgemm._tuning.EMBEDDING_PARALLEL_MIN_WORK`; read at call time, so tests lower it)."""


_U8 = np.dtype(np.uint8)
_FLOAT_KINDS = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}
_ROWWISE_KINDS = {8: "rowwise8", 4: "rowwise4", 2: "rowwise2"}


def _table_args(table: Any) -> tuple[str, np.ndarray, int, int, int]:
    """``(kind, flat table, row_stride, rows, dim)`` for the kernel; no copy of a table whose
    rows are contiguous."""
    if isinstance(table, RowwiseQuantizedTable):
        fused = table.fused
        if not isinstance(fused, np.ndarray) or fused.dtype != _U8 or fused.ndim != 2:
            raise TypeError("table: a RowwiseQuantizedTable must hold a 2-D uint8 fused array")
        bits, dim = table.bits, table.dim
        kind = _ROWWISE_KINDS.get(bits)
        if kind is None:
            raise ValueError(f"table: expected a table of 8, 4 or 2 bits, got {bits}")
        per_byte = 8 // bits
        expected = -(-dim // per_byte) + (8 if bits == 8 else 4)
        if fused.shape[1] != expected:
            raise ValueError(
                f"table: a {bits}-bit table of dim {dim} has rows of {expected} bytes, "
                f"got {fused.shape[1]}"
            )
        if not fused.flags.c_contiguous:
            fused = np.ascontiguousarray(fused)
        return kind, fused.reshape(-1), fused.shape[1], fused.shape[0], int(dim)
    if not (type(table) is np.ndarray and table.dtype in _FLOAT_KINDS and table.ndim == 2):
        if not isinstance(table, np.ndarray) and hasattr(table, "fused"):
            raise TypeError(
                f"table: expected an ndarray or RowwiseQuantizedTable, got {type(table)}"
            )
        table = as_array("table", table, dtypes=(np.float32, np.float16), ndim=2)
    rows, dim = table.shape
    item = table.itemsize
    kind = _FLOAT_KINDS[table.dtype]
    if table.flags.c_contiguous:
        flat, stride = table.reshape(-1), dim
    elif (
        rows > 0
        and table.strides[1] == item
        and table.strides[0] % item == 0
        and table.strides[0] >= dim * item
    ):
        # Rows are contiguous but spaced (e.g. a column slice of a wider table): read in place.
        stride = table.strides[0] // item
        flat = np.lib.stride_tricks.as_strided(
            table, shape=((rows - 1) * stride + dim,), strides=(item,)
        )
    else:
        table = np.ascontiguousarray(table)  # other layouts: one copy
        flat, stride = table.reshape(-1), dim
    if kind == "float16":
        flat = flat.view(np.uint16)
    return kind, flat, stride, rows, dim


_INDEX_NAMES = {np.dtype(np.int32): "int32", np.dtype(np.int64): "int64"}

_ENTRIES: dict[Any, Any] = {}
_TIERS = _tiers._state  # epoch: bumped by cache_clear, every tiered-kernel swap, JIT mode change
_BAG_ENTRIES: dict[tuple, tuple[int, Any]] = {}
"""Kernel key -> ``(epoch, compiled entry)`` of :func:`embedding_bag`: one dict read instead of
the family lookup and :func:`entry_point` per call; stale once the epoch moves."""


def entry_point(kern: Any) -> Any:
    """The compiled entry of a kernel built for one explicit signature: calling it skips the
    Numba dispatcher's per-call type resolution (measured 3.3 -> 0.8 us for the 10 arguments
    of a bag kernel, most of a single-bag call's overhead).  Only for callers that pass exactly
    the signature's types, C-contiguous arrays included (the wrappers here normalise every
    argument first).  A plain function (``NUMBA_DISABLE_JIT=1``) is returned as is."""
    ep = _ENTRIES.get(kern)
    if ep is None:
        sigs = getattr(kern, "signatures", None)
        ep = kern.overloads[sigs[0]].entry_point if sigs and len(sigs) == 1 else kern
        if len(_ENTRIES) >= 4096:  # stale entries after cache_clear(): drop them all
            _ENTRIES.clear()
        _ENTRIES[kern] = ep
    return ep


# -- bags: the one validator (embedding_bag and qgemm.models.DLRM) ----------------------------
def index_array(name: str, x: Any, ndim: int | tuple[int, ...] = 1) -> np.ndarray:
    """``x`` as a C-contiguous int32/int64 array of rank ``ndim`` (indices, offsets, lengths);
    ``TypeError``/``ValueError`` naming ``name`` otherwise.  No copy of a contiguous array."""
    # Fast path first: this runs on every call, and single-bag latency is mostly overhead.
    if not (
        type(x) is np.ndarray
        and x.dtype in _INDEX_NAMES
        and (x.ndim == ndim if isinstance(ndim, int) else x.ndim in ndim)
    ):
        x = as_array(name, x, dtypes=_INDEX_DTYPES, ndim=ndim)
    if x.flags.c_contiguous and x.flags.writeable:
        return x
    # Kernels are compiled for writable C arrays: read-only views (pandas, np.load mmap) and
    # strided ones are copied (an index array is small next to the rows it selects).
    return np.array(x, order="C", copy=True)


def bag_error(
    code: int,
    pos: int,
    val: int,
    *,
    rows: int,
    shape: tuple[int, ...],
    indices: str = "indices",
    offsets: str = "offsets",
) -> Exception:
    """The exception for a bag kernel's status ``(code, pos, val)`` (codes of
    :data:`qgemm._kernels.embedding.ERRORS`), naming the arguments ``indices`` / ``offsets``
    (e.g. ``"indices[2]"`` for a model's third table).  ``shape`` is that of the indices: a
    position in 2-D (fixed-size) bags is given as ``(bag, j)``."""
    if code == BAD_INDEX:
        where = pos if len(shape) == 1 else tuple(int(i) for i in np.unravel_index(pos, shape))
        return IndexError(
            f"{indices}: index {val} at position {where} is out of range for a table of "
            f"{rows} rows (expected 0 <= index < {rows})"
        )
    if code == BAD_FIRST_OFFSET:
        return ValueError(f"{offsets}: {offsets}[0] must be 0 (bags start at index 0), got {val}")
    if code == DECREASING_OFFSET:
        return ValueError(
            f"{offsets}: expected non-decreasing offsets, {offsets}[{pos}] = {val} is smaller "
            "than the offset before it"
        )
    if code == OFFSET_PAST_END:
        return ValueError(
            f"{offsets}: {offsets}[{pos}] = {val} is past the end of {indices} "
            f"({int(np.prod(shape))} indices)"
        )
    if code == NEGATIVE_LENGTH:
        return ValueError(f"lengths: expected non-negative lengths, lengths[{pos}] = {val}")
    if code == LENGTHS_SUM:
        return ValueError(
            f"lengths: expected lengths adding up to the number of indices ({val}), got {pos}"
        )
    return RuntimeError(f"embedding_bag: unexpected kernel status {code}")  # pragma: no cover


def check_bags(
    indices: np.ndarray,
    offsets: np.ndarray | None,
    rows: int,
    *,
    indices_name: str = "indices",
    offsets_name: str = "offsets",
) -> None:
    """Check bags before anything runs, in one pass that reads no table row: ``offsets``
    (torch's convention; None for 2-D fixed-size ``indices``) start at 0, never decrease and
    stay within ``indices``, and every index is in ``[0, rows)``.  Both arrays as returned by
    :func:`index_array`.  Raises what :func:`bag_error` words.

    :func:`embedding_bag` checks the same inside its kernel, as the rows are read; this pass is
    for callers that must reject a bad bag before any work (:class:`qgemm.models.DLRM` checks
    every table before its first layer).

    Examples
    --------
    >>> check_bags(np.array([0, 4, 2]), np.array([0, 2]), rows=5)
    >>> check_bags(np.array([0, 5, 2]), np.array([0, 2]), rows=5)
    Traceback (most recent call last):
    ...
    IndexError: indices: index 5 at position 1 is out of range for a table of 5 rows \
(expected 0 <= index < 5)
    """
    flat = indices.reshape(-1)
    offs = flat[:0] if offsets is None else offsets
    code, pos, val = check_bags_kernel((_INDEX_NAMES[flat.dtype], _INDEX_NAMES[offs.dtype]))(
        flat, offs, rows
    )
    if code:
        raise bag_error(
            code,
            pos,
            val,
            rows=rows,
            shape=indices.shape,
            indices=indices_name,
            offsets=offsets_name,
        )


def embedding_bag(
    table: np.ndarray | RowwiseQuantizedTable,
    indices: Any,
    offsets: Any = None,
    *,
    lengths: Any = None,
    mode: str = "sum",
    per_sample_weights: Any = None,
    include_last_offset: bool = False,
    padding_idx: int | None = None,
    out: np.ndarray | None = None,
    out_dtype: Any = None,
) -> np.ndarray:
    """Pool rows of ``table`` over bags of ``indices`` (sum, mean or max).

    Parameters
    ----------
    table : ndarray of float32 or float16 ``[rows, dim]``, or RowwiseQuantizedTable
        The embedding table; a quantized table (8, 4 or 2 bits, from
        :func:`qgemm.quantize_rowwise` or ``RowwiseQuantizedTable.from_fused``) is read in its
        fused layout and dequantized on the fly.  A float table whose rows are contiguous
        (C order, or a column slice of one) is read in place; any other layout is copied once.
    indices : array of int32 or int64, 1-D or 2-D
        Row numbers, ``0 <= i < rows``.  2-D ``[bags, n]`` means fixed-size bags of ``n``
        (then ``offsets`` and ``lengths`` must be None).
    offsets : array of int32 or int64, optional
        torch convention: bag ``b`` is ``indices[offsets[b]:offsets[b + 1]]`` and the last one
        runs to the end of ``indices`` -- or to ``offsets[-1]``, which is then not a bag, when
        ``include_last_offset``.  ``offsets[0]`` must be 0 and offsets must not decrease.
        The dtype is independent of that of ``indices``.
    lengths : array of int32 or int64, optional (keyword)
        Caffe2 convention, instead of ``offsets``: bag ``b`` holds the next ``lengths[b]``
        indices; lengths must be non-negative and add up to ``len(indices)``.
    mode : {"sum", "mean", "max"}
        Reduction over each bag, for every table type.  Empty bags give zeros.
    per_sample_weights : array of float32 or float16, optional
        One weight per index (same shape as ``indices``), multiplying its row (``mode="sum"``
        only, as in torch).
    include_last_offset : bool
        See ``offsets``.  Ignored for 2-D ``indices`` (as in torch).
    padding_idx : int, optional
        Rows equal to it are skipped (and not counted by the mean).  Negative values count
        from the end, as in torch: ``-1`` is the last row.  Must be in ``[-rows, rows)``.
    out : ndarray of float32 or float16 ``[bags, dim]``, optional
        Written in place (C-contiguous) and returned; untouched if the call fails (to
        guarantee it, the indices are then validated in a pass of their own before anything
        is written; without ``out`` they are checked as the rows are read, which is faster
        when the indices are not in the cache).
    out_dtype : float32 or float16, optional
        Output dtype when ``out`` is not given (default float32).  Accumulation is float32
        either way.

    Returns
    -------
    ndarray ``[bags, dim]``

    Raises
    ------
    IndexError
        An index outside ``[0, rows)`` (the message gives its position and value).
    ValueError
        Bad offsets/lengths, shapes, ``mode``, ``padding_idx``, or weights with a mode other
        than "sum".
    TypeError
        Wrong dtypes (no silent casts) or argument types.

    Examples
    --------
    >>> import numpy as np
    >>> table = np.arange(12, dtype=np.float32).reshape(6, 2)
    >>> embedding_bag(table, np.array([0, 2, 4, 5]), np.array([0, 3]))
    array([[12., 15.],
           [10., 11.]], dtype=float32)
    >>> embedding_bag(table, np.array([[0, 1], [2, 5]]), mode="max")
    array([[ 2.,  3.],
           [10., 11.]], dtype=float32)
    >>> from qgemm import quantize_rowwise
    >>> q = quantize_rowwise(table, bits=8)
    >>> embedding_bag(q, np.array([0, 1, 3, 5]), lengths=np.array([1, 3]), mode="mean").round(4)
    array([[0., 1.],
           [6., 7.]], dtype=float32)
    """
    kind, flat, row_stride, rows, dim = _table_args(table)
    if mode not in _MODES:
        check_choice("mode", mode, _MODES)
    if not isinstance(include_last_offset, (bool, np.bool_)):
        raise TypeError(
            f"include_last_offset: expected a bool, got {type(include_last_offset).__name__}"
        )

    # ---- bags ----
    idx = index_array("indices", indices, ndim=(1, 2))
    ishape = idx.shape
    fixed = idx.ndim == 2
    if fixed:
        if offsets is not None or lengths is not None:
            raise ValueError(
                "offsets: 2-D indices are fixed-size bags; offsets and lengths must be None, "
                f"got {'offsets' if offsets is not None else 'lengths'}"
            )
        bags, per_bag = idx.shape
        offs = np.arange(bags, dtype=np.int64) * per_bag
        by = "offsets"
        idx = idx.reshape(-1)
    elif offsets is not None and lengths is not None:
        raise ValueError("offsets: give offsets or lengths, not both")
    elif lengths is not None:
        if include_last_offset:
            raise ValueError("include_last_offset: only meaningful with offsets, not lengths")
        offs = index_array("lengths", lengths)
        bags = offs.size
        by = "lengths"
    elif offsets is not None:
        offs = index_array("offsets", offsets)
        by = "offsets"
        if include_last_offset:
            if offs.size == 0:
                raise ValueError(
                    "offsets: expected at least one offset with include_last_offset, got none"
                )
            bags = offs.size - 1
        else:
            bags = offs.size
    else:
        raise ValueError("offsets: 1-D indices need offsets or lengths, got neither")

    # ---- options ----
    weighted = per_sample_weights is not None
    if weighted:
        if mode != "sum":
            raise ValueError(
                f"per_sample_weights: only supported with mode='sum' (as in torch), "
                f"got mode={mode!r}"
            )
        wts = as_array("per_sample_weights", per_sample_weights, dtypes=(np.float32, np.float16))
        if wts.shape != ishape:
            raise ValueError(
                f"per_sample_weights: expected the shape of indices {ishape}, got {wts.shape}"
            )
        wts = np.ascontiguousarray(wts.reshape(-1), dtype=np.float32)
    else:
        wts = _EMPTY_WEIGHTS
    if padding_idx is None:
        pad = -1
    else:
        if isinstance(padding_idx, (bool, np.bool_)) or not isinstance(
            padding_idx, (int, np.integer)
        ):
            raise TypeError(f"padding_idx: expected an int or None, got {type(padding_idx)}")
        pad = int(padding_idx)
        if not -rows <= pad < rows:
            raise ValueError(
                f"padding_idx: expected a row in [{-rows}, {rows}) (table of {rows} rows), "
                f"got {pad}"
            )
        if pad < 0:
            pad += rows

    # ---- output ----
    if out_dtype is not None:
        try:
            out_dtype = np.dtype(out_dtype)
        except TypeError:
            raise TypeError(f"out_dtype: expected float32 or float16, got {out_dtype!r}") from None
    if out is not None:
        if out_dtype is not None and out_dtype != getattr(out, "dtype", None):
            raise TypeError(
                f"out_dtype: {np.dtype(out_dtype).name} does not match out "
                f"({getattr(out, 'dtype', type(out).__name__)})"
            )
        odt = getattr(out, "dtype", np.dtype(np.float32))
        if odt not in (np.float32, np.float16):
            raise TypeError(f"out: expected dtype float32 or float16, got {odt}")
        check_out("out", out, (bags, dim), odt)
    else:
        odt = np.dtype(np.float32 if out_dtype is None else out_dtype)
        if odt not in _OUT_DTYPES:
            raise TypeError(f"out_dtype: expected float32 or float16, got {odt.name}")
    if (
        out is not None
        and odt == np.float32
        and not np.may_share_memory(out, flat)
        and not np.may_share_memory(out, wts)
    ):
        res = out
    else:  # our own buffer (also when out overlaps the table or the weights: pooled aside)
        res = np.empty((bags, dim), np.float32)

    # ---- kernel ----
    n = idx.size
    threads = _config.get_num_threads()
    parallel = threads > 1 and bags > 1 and n * max(dim, 16) >= PARALLEL_MIN_WORK
    # A caller's out must stay untouched by a failing call: validate every index in a pass of
    # its own first.  Writing to our own buffer, the indices are checked as the rows are read
    # (one pass over them less; the partial result of a failing call is discarded).
    prevalidate = res is out
    key = (
        _config.get_isa(),
        kind,
        _INDEX_NAMES[idx.dtype],
        _INDEX_NAMES[offs.dtype],
        by,
        mode,
        weighted,
        specialised_dim(dim),
        parallel,
        prevalidate,
    )
    memo = _BAG_ENTRIES.get(key)
    if memo is not None and memo[0] == _TIERS["epoch"]:
        kern = memo[1]
    else:
        ep = _TIERS["epoch"]  # read before the lookup: a swap during it leaves the memo stale
        kern = entry_point(embedding_bag_kernel(key))
        if len(_BAG_ENTRIES) >= 4096:
            _BAG_ENTRIES.clear()
        _BAG_ENTRIES[key] = (ep, kern)
    if parallel:
        _config.sync_threads()
    code, pos, val = kern(flat, row_stride, rows, dim, idx, offs, bags, wts, pad, res)
    if code:
        raise bag_error(code, pos, val, rows=rows, shape=ishape)
    if out is None:
        return res if odt == np.float32 else res.astype(odt)
    if res is not out:
        out[...] = res  # float16 out: rounded once from the float32 result
    return out
