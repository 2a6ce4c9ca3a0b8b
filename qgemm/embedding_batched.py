"""Table-batched embedding bags: many tables of mixed types and dims in one call.

FBGEMM's table-batched embedding op (TBE: ``IntNBitTableBatchedEmbeddingBagsCodegen``,
``SplitTableBatchedEmbeddingBagsCodegen``) on the CPU: ``T`` tables -- any mix of float32,
float16 and rowwise-quantized 8/4/2-bit tables, of any row counts and dims -- pooled in one
call, one validation pass and one parallel region whose tasks are balanced by work, not by
table.  The result is ``[B, sum(dims)]`` (table ``t`` in columns ``[cols[t], cols[t + 1])``),
written in place, so a DLRM interaction or the next layer reads it without a concatenate.

Bags come in TBE's convention -- one flat ``indices`` array and ``offsets`` of length
``T * B + 1`` (bag ``b`` of table ``t`` is ``indices[offsets[t * B + b]:offsets[t * B + b +
1]]``, ``offsets[0] == 0`` and ``offsets[-1] == len(indices)``), or flat ``lengths`` of ``T *
B`` -- or as per-table lists (``indices[t]`` with torch-convention ``offsets[t]`` of length
``B``, or 2-D ``[B, L]`` fixed-size bags).  Modes, per-sample weights and ``padding_idx`` mean
what they mean in :func:`qgemm.embedding_bag`; a bad index raises ``IndexError`` naming the
table, the bag and the value, and ``out`` is untouched by a failing call.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _config
from ._kernels.embedding import (
    BAD_FIRST_OFFSET,
    BAD_INDEX,
    DECREASING_OFFSET,
    specialised_dim,
)
from ._kernels.embedding_batched import MAX_GROUPS, batched_kernel, row_read_bytes
from ._tuning import EMBEDDING_BATCHED_TASKS_PER_THREAD as TASKS_PER_THREAD
from ._tuning import EMBEDDING_PARALLEL_MIN_WORK
from ._validate import as_array, check_choice
from .embedding import _table_args, entry_point, index_array
from .quantize import RowwiseQuantizedTable

__all__ = ["TableBatchedEmbeddingBags", "embedding_bags"]

_MODES = ("sum", "mean", "max")
_INDEX_NAMES = {np.dtype(np.int32): "int32", np.dtype(np.int64): "int64"}
_F32 = np.dtype(np.float32)
_F16 = np.dtype(np.float16)
_EMPTY_WEIGHTS = np.empty(0, np.float32)
_ITEM = {"float32": 4, "float16": 2}

PARALLEL_MIN_WORK = EMBEDDING_PARALLEL_MIN_WORK
"""Calls touching fewer table elements (indices x mean dim) run on one thread."""


def flatten_bags(
    bags: list[tuple[np.ndarray, np.ndarray | None]], batch: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(flat indices, int64 offsets [T*batch+1], int64 table starts [T+1])`` of per-table
    bags already checked: ``(indices, offsets)`` with C-contiguous int32/int64 index arrays,
    ``offsets`` of ``batch`` bags or None for fixed-size bags ``indices [batch, L]`` (the
    table-batched op's input, built without another pass over the bags)."""
    nt = len(bags)
    flat = [i.reshape(-1) for i, _ in bags]
    starts = np.zeros(nt + 1, np.int64)
    np.cumsum([f.size for f in flat], out=starts[1:])
    offs = np.empty(nt * batch + 1, np.int64)
    for t, (idx, off) in enumerate(bags):
        seg = offs[t * batch : (t + 1) * batch]
        if off is None:  # fixed-size bags [batch, L]
            np.multiply(np.arange(batch, dtype=np.int64), idx.shape[1], out=seg)
            seg += starts[t]
        else:
            np.add(off, starts[t], out=seg, casting="unsafe")
    offs[-1] = starts[-1]
    idx = np.concatenate(flat) if nt > 1 else np.ascontiguousarray(flat[0])
    return idx, offs, starts


def _choose_groups(sigs: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """At most ``MAX_GROUPS`` kernel groups covering ``sigs``: the most common specialised
    signatures, the rest folded into their kind's run-time-dim group ``(kind, 0)``."""
    counts = Counter(sigs)
    keep = sorted(counts, key=lambda s: (-counts[s], sigs.index(s)))
    while True:
        fallback = {(k, 0) for k, d in counts if (k, d) not in keep}
        groups = keep + sorted(fallback - set(keep))
        if len(groups) <= MAX_GROUPS:
            return groups
        keep = [s for s in keep[:-1]]


class TableBatchedEmbeddingBags:
    """``T`` embedding tables pooled together in one call (FBGEMM's TBE on the CPU).

    Parameters
    ----------
    tables : sequence of tables
        Each a float32/float16 ndarray ``[rows, dim]`` or a :class:`qgemm.RowwiseQuantizedTable`
        (8, 4 or 2 bits), as :func:`qgemm.embedding_bag` takes them; read in place (the object
        keeps a reference to each).
    mode : {"sum", "mean", "max"}, keyword
        Default pooling of calls that give none (TBE fixes it per module).
    out_dtype : float32 or float16, keyword
        Default output dtype of calls without ``out`` / ``out_dtype``.

    Attributes
    ----------
    dims, rows : tuple of int
        Per table.
    cols : ndarray of int64 ``[T + 1]``
        Table ``t`` fills output columns ``cols[t]:cols[t + 1]``.

    Examples
    --------
    >>> import numpy as np
    >>> from qgemm import quantize_rowwise
    >>> a = np.arange(8, dtype=np.float32).reshape(4, 2)
    >>> tbe = TableBatchedEmbeddingBags([a, quantize_rowwise(a * 2, bits=8)])
    >>> tbe(np.array([0, 1, 3, 2, 2]), np.array([0, 2, 3, 4, 5]))  # T=2, B=2
    array([[ 2.,  4.,  8., 10.],
           [ 6.,  7.,  8., 10.]], dtype=float32)
    """

    def __reduce__(self) -> tuple[Any, ...]:
        # The object holds raw row addresses of this process: pickle the tables and rebuild
        # (addresses are recomputed where it is unpickled).
        return (_rebuild_tbe, (self.tables, self.mode, self.out_dtype.str))

    def __init__(
        self,
        tables: Sequence[np.ndarray | RowwiseQuantizedTable],
        *,
        mode: str = "sum",
        out_dtype: Any = np.float32,
    ):
        if mode not in _MODES:
            check_choice("mode", mode, _MODES)
        self.mode = mode
        self.out_dtype = np.dtype(out_dtype)
        if self.out_dtype not in (_F32, _F16):
            raise TypeError(f"out_dtype: expected float32 or float16, got {self.out_dtype.name}")
        if isinstance(tables, (np.ndarray, RowwiseQuantizedTable)) or not isinstance(
            tables, Sequence
        ):
            raise TypeError(f"tables: expected a sequence of tables, got {type(tables).__name__}")
        kinds, flats, addrs, row_bytes, rows, dims = [], [], [], [], [], []
        for t, table in enumerate(tables):
            try:
                kind, flat, stride, nr, dim = _table_args(table)
            except (TypeError, ValueError) as err:
                msg = str(err).removeprefix("table: ")
                raise type(err)(f"tables[{t}]: {msg}") from None
            kinds.append(kind)
            flats.append(flat)
            addrs.append(flat.ctypes.data)
            row_bytes.append(stride * _ITEM.get(kind, 1))
            rows.append(nr)
            dims.append(dim)
        if not kinds:
            raise ValueError("tables: expected at least one table, got none")
        self.tables = tuple(tables)
        self._flats = tuple(flats)  # keeps every address valid
        self.kinds = tuple(kinds)
        self.rows = tuple(int(r) for r in rows)
        self.dims = tuple(int(d) for d in dims)
        self.num_tables = len(kinds)
        self.cols = np.concatenate([[0], np.cumsum(dims)]).astype(np.int64)
        self.total_dim = int(self.cols[-1])
        sigs = [(k, specialised_dim(d)) for k, d in zip(kinds, dims, strict=True)]
        groups = _choose_groups(sigs)
        gid = [groups.index(s) if s in groups else groups.index((s[0], 0)) for s in sigs]
        self._groups = tuple(groups)
        self._addrs = np.array(addrs, np.int64)
        self._row_bytes = np.array(row_bytes, np.int64)
        self._rows = np.array(rows, np.int64)
        self._dims = np.array(dims, np.int64)
        self._gid = np.array(gid, np.int64)
        self._no_pad = np.full(self.num_tables, -1, np.int64)
        self._obase = self.cols[:-1].copy()
        self._ostride = np.full(self.num_tables, self.total_dim, np.int64)
        self._mean_dim = max(16, self.total_dim // self.num_tables)
        self._read = tuple(row_read_bytes(k, d) for k, d in zip(kinds, dims, strict=True))

    def __repr__(self) -> str:
        return (
            f"TableBatchedEmbeddingBags({self.num_tables} tables, dims={list(self.dims)}, "
            f"kinds={sorted(set(self.kinds))})"
        )

    @property
    def nbytes(self) -> int:
        """Bytes of the tables."""
        return int(sum(f.nbytes for f in self._flats))

    # -- inputs -------------------------------------------------------------------------------
    def _flat_bags(
        self, indices: Any, offsets: Any, lengths: Any, weights: Any
    ) -> tuple[np.ndarray, np.ndarray, int, Any, np.ndarray | None]:
        """``(flat indices, offsets [T*B+1], B, weights, table starts or None)``."""
        T = self.num_tables
        if type(indices) is np.ndarray or not isinstance(indices, (list, tuple)):
            idx = index_array("indices", indices)
            if offsets is not None and lengths is not None:
                raise ValueError("offsets: give offsets or lengths, not both")
            if lengths is not None:
                ln = index_array("lengths", lengths)
                if ln.size % T:
                    raise ValueError(
                        f"lengths: expected T * B = a multiple of {T} lengths (one per bag of "
                        f"each table), got {ln.size}"
                    )
                if ln.size and ln.min() < 0:
                    pos = int(np.argmax(ln < 0))
                    raise ValueError(
                        f"lengths: expected non-negative lengths, lengths[{pos}] = {ln[pos]}"
                    )
                offs = np.zeros(ln.size + 1, np.int64)
                np.cumsum(ln, out=offs[1:])
                if offs[-1] != idx.size:
                    raise ValueError(
                        f"lengths: expected lengths adding up to the number of indices "
                        f"({idx.size}), got {int(offs[-1])}"
                    )
            elif offsets is None:
                raise ValueError(
                    "offsets: flat indices need offsets (T * B + 1) or lengths (T * B), got neither"
                )
            else:
                offs = index_array("offsets", offsets)
                if offs.size % T != 1 and not (T == 1 and offs.size >= 1):
                    raise ValueError(
                        f"offsets: expected T * B + 1 offsets for T = {T} tables, got {offs.size}"
                    )
            return idx, offs, (offs.size - 1) // T, weights, None
        # ---- per-table lists ----
        idx_l = list(indices)
        if len(idx_l) != T:
            raise ValueError(f"indices: expected {T} arrays (one per table), got {len(idx_l)}")
        if lengths is not None:
            raise ValueError("lengths: only with flat indices; per-table lists take offsets")
        off_l = [None] * T if offsets is None else list(offsets)
        if len(off_l) != T:
            raise ValueError(f"offsets: expected {T} arrays (one per table), got {len(off_l)}")
        bags, batch = [], None
        for t in range(T):
            fixed = off_l[t] is None
            it = index_array(f"indices[{t}]", idx_l[t], ndim=2 if fixed else 1)
            if fixed:
                nb = it.shape[0]
                ot = None
            else:
                ot = index_array(f"offsets[{t}]", off_l[t])
                nb = ot.size
                if nb and ot[0] != 0:
                    raise ValueError(
                        f"offsets[{t}]: offsets[{t}][0] must be 0 (bags start at index 0), "
                        f"got {ot[0]}"
                    )
                if nb and ot[-1] > it.size:
                    raise ValueError(
                        f"offsets[{t}]: offsets[{t}][{nb - 1}] = {ot[-1]} is past the end of "
                        f"indices[{t}] ({it.size} indices)"
                    )
            if batch is None:
                batch = nb
            elif nb != batch:
                raise ValueError(f"offsets[{t}]: expected {batch} bags (as table 0), got {nb}")
            bags.append((it, ot))
        idx, offs, starts = flatten_bags(bags, int(batch or 0))
        if weights is not None and isinstance(weights, (list, tuple)):
            if len(weights) != T:
                raise ValueError(
                    f"per_sample_weights: expected {T} arrays (one per table), got {len(weights)}"
                )
            ws = []
            for t in range(T):
                wt = as_array(
                    f"per_sample_weights[{t}]", weights[t], dtypes=(np.float32, np.float16)
                )
                if wt.size != bags[t][0].size:
                    raise ValueError(
                        f"per_sample_weights[{t}]: expected one weight per index of table {t} "
                        f"({bags[t][0].size}), got {wt.size}"
                    )
                ws.append(wt.reshape(-1).astype(np.float32, copy=False))
            weights = np.concatenate(ws)
        return idx, offs, int(batch or 0), weights, starts

    def _pads(self, padding_idx: Any) -> np.ndarray:
        if padding_idx is None:
            return self._no_pad
        T = self.num_tables
        if isinstance(padding_idx, (list, tuple)):
            if len(padding_idx) != T:
                raise ValueError(
                    f"padding_idx: expected one per table ({T}), got {len(padding_idx)}"
                )
            items = list(padding_idx)
        else:
            items = [padding_idx] * T
        pads = np.full(T, -1, np.int64)
        for t, p in enumerate(items):
            if p is None:
                continue
            if isinstance(p, (bool, np.bool_)) or not isinstance(p, (int, np.integer)):
                raise TypeError(f"padding_idx: expected an int or None, got {type(p).__name__}")
            rows = self.rows[t]
            p = int(p)
            if not -rows <= p < rows:
                raise ValueError(
                    f"padding_idx: expected a row in [{-rows}, {rows}) for table {t} "
                    f"({rows} rows), got {p}"
                )
            pads[t] = p + rows if p < 0 else p
        return pads

    # -- the op -------------------------------------------------------------------------------
    def __call__(
        self,
        indices: Any,
        offsets: Any = None,
        *,
        lengths: Any = None,
        mode: str | None = None,
        per_sample_weights: Any = None,
        padding_idx: int | Sequence[int | None] | None = None,
        out: np.ndarray | None = None,
        out_dtype: Any = None,
    ) -> np.ndarray:
        """Pool the bags of every table; ``[B, total_dim]`` (see :func:`embedding_bags`;
        ``mode`` and ``out_dtype`` default to the object's)."""
        if mode is None:
            mode = self.mode
        elif mode not in _MODES:
            check_choice("mode", mode, _MODES)
        idx, offs, batch, wts, starts = self._flat_bags(
            indices, offsets, lengths, per_sample_weights
        )
        D = self.total_dim
        if out is not None:
            if type(out) is not np.ndarray:
                raise TypeError(f"out: expected an ndarray, got {type(out).__name__}")
            odt = out.dtype
            if odt != _F32 and odt != _F16:
                raise TypeError(f"out: expected dtype float32 or float16, got {odt}")
            if out_dtype is not None and np.dtype(out_dtype) != odt:
                raise TypeError(f"out_dtype: {np.dtype(out_dtype).name} does not match out ({odt})")
            if out.shape != (batch, D):
                raise ValueError(f"out: expected shape {(batch, D)}, got {out.shape}")
            if not out.flags.c_contiguous or not out.flags.writeable:
                raise ValueError("out: expected a writeable C-contiguous array")
        elif out_dtype is not None:
            try:
                odt = np.dtype(out_dtype)
            except TypeError:
                raise TypeError(
                    f"out_dtype: expected float32 or float16, got {out_dtype!r}"
                ) from None
            if odt != _F32 and odt != _F16:
                raise TypeError(f"out_dtype: expected float32 or float16, got {odt.name}")
        else:
            odt = self.out_dtype
        res = out if (out is not None and odt == _F32) else np.empty((batch, D), np.float32)
        self._pool(
            idx, offs, batch, wts, mode, self._pads(padding_idx), res.reshape(-1),
            self._obase, self._ostride, starts,
        )  # fmt: skip
        if out is None:
            return res if odt == _F32 else res.astype(odt)
        if res is not out:
            out[...] = res
        return out

    def _pool(
        self,
        idx: np.ndarray,
        offs: np.ndarray,
        batch: int,
        wts: Any,
        mode: str,
        pads: np.ndarray,
        out_flat: np.ndarray,
        obase: np.ndarray,
        ostride: Any,
        starts: np.ndarray | None = None,
    ) -> None:
        """Run the kernel into ``out_flat`` (bag ``(t, b)`` at ``obase[t] + b * ostride[t]``;
        a scalar ``ostride`` for every table).  Raises on a bad bag, ``out_flat`` untouched."""
        T = self.num_tables
        weighted = wts is not None
        if weighted:
            if mode != "sum":
                raise ValueError(
                    f"per_sample_weights: only supported with mode='sum' (as in torch), "
                    f"got mode={mode!r}"
                )
            if not (type(wts) is np.ndarray and wts.dtype == _F32 and wts.flags.c_contiguous):
                wts = as_array("per_sample_weights", wts, dtypes=(np.float32, np.float16))
                wts = np.ascontiguousarray(wts.reshape(-1), dtype=np.float32)
            if wts.shape != idx.shape:
                raise ValueError(
                    f"per_sample_weights: expected one weight per index ({idx.size}), got "
                    f"shape {wts.shape}"
                )
        else:
            wts = _EMPTY_WEIGHTS
        if isinstance(ostride, (int, np.integer)):
            ostride = np.full(T, ostride, np.int64)
        n = idx.size
        threads = _config.get_num_threads()
        nb = T * batch
        parallel = threads > 1 and nb > 1 and n * self._mean_dim >= PARALLEL_MIN_WORK
        key = (
            _config.get_isa(),
            self._groups,
            _INDEX_NAMES[idx.dtype],
            _INDEX_NAMES[offs.dtype],
            mode,
            weighted,
            parallel,
        )
        kern = entry_point(batched_kernel(key))
        if parallel:
            _config.sync_threads()
        code, t, b, pos, val = kern(
            self._addrs, self._row_bytes, self._rows, self._dims, self._gid, pads, obase,
            ostride, idx, offs, batch, wts, threads * TASKS_PER_THREAD, threads, out_flat,
        )  # fmt: skip
        if code:
            raise self._error(code, t, b, pos, val, starts)

    def _error(
        self, code: int, t: int, b: int, pos: int, val: int, starts: np.ndarray | None
    ) -> Exception:
        if code == BAD_INDEX:
            rows = self.rows[t]
            where = f"position {pos}" if starts is None else f"indices[{t}][{pos - int(starts[t])}]"
            return IndexError(
                f"indices: index {val} of table {t} at bag {b} ({where}) is out of range for "
                f"a table of {rows} rows (expected 0 <= index < {rows})"
            )
        if code == BAD_FIRST_OFFSET:
            return ValueError(f"offsets: offsets[0] must be 0 (bags start at index 0), got {val}")
        if code == DECREASING_OFFSET:
            return ValueError(
                f"offsets: expected non-decreasing offsets, offsets[{pos}] = {val} (table {t}, "
                f"bag {b}) is smaller than the offset before it"
            )
        return ValueError(
            f"offsets: expected offsets[-1] == len(indices), got offsets[{pos}] = {val}"
        )


def embedding_bags(
    tables: TableBatchedEmbeddingBags | Sequence[np.ndarray | RowwiseQuantizedTable],
    indices: Any,
    offsets: Any = None,
    *,
    lengths: Any = None,
    mode: str | None = None,
    per_sample_weights: Any = None,
    padding_idx: int | Sequence[int | None] | None = None,
    out: np.ndarray | None = None,
    out_dtype: Any = None,
) -> np.ndarray:
    """Pool bags of ``T`` tables in one call: FBGEMM's table-batched embedding op.

    Parameters
    ----------
    tables : TableBatchedEmbeddingBags or sequence of tables
        float32/float16 ndarrays and/or :class:`qgemm.RowwiseQuantizedTable` (8/4/2-bit), any
        mix of row counts and dims.  Build a :class:`TableBatchedEmbeddingBags` once to save
        the per-call table checks.
    indices : int32/int64 array, or sequence of ``T`` arrays
        Flat: every table's row ids back to back (TBE).  Per table: 1-D with ``offsets[t]``,
        or 2-D ``[B, L]`` fixed-size bags (with ``offsets=None``).
    offsets : int32/int64 array ``[T * B + 1]``, or sequence of ``T`` arrays ``[B]``
        Flat (TBE): bag ``b`` of table ``t`` is ``indices[offsets[t*B + b]:offsets[t*B + b +
        1]]``; ``offsets[0] == 0``, non-decreasing, ``offsets[-1] == len(indices)``.  Per table:
        torch's convention (``offsets[t][0] == 0``, the last bag runs to the end).
    lengths : int32/int64 array ``[T * B]``, optional (keyword)
        Instead of flat ``offsets``: bag sizes, table-major.
    mode : {"sum", "mean", "max"}, optional
        Default: the object's mode, "sum" for a sequence of tables.
    per_sample_weights : float32/float16 array (one per index), or sequence of ``T``
        ``mode="sum"`` only.
    padding_idx : int, or sequence of ``T`` ints/None, optional
        Rows skipped (and not counted by the mean); negative counts from each table's end.
    out : float32/float16 ndarray ``[B, sum(dims)]``, optional
        Written in place and returned; untouched if the call fails.
    out_dtype : float32 or float16, optional

    Returns
    -------
    ndarray ``[B, sum(dims)]``: table ``t`` in columns ``cols[t]:cols[t + 1]``.

    Raises
    ------
    IndexError
        A row id outside its table: the message names the table, the bag and the value.
    ValueError, TypeError
        Bad offsets/lengths/shapes/options, wrong dtypes.

    Examples
    --------
    >>> import numpy as np
    >>> from qgemm import quantize_rowwise
    >>> a = np.ones((10, 4), np.float32)
    >>> b = quantize_rowwise(np.full((5, 8), 2.0, np.float32), bits=4)
    >>> embedding_bags([a, b], [np.array([1, 2, 3]), np.array([4, 0])],
    ...                [np.array([0, 2]), np.array([0, 1])]).round(3)
    array([[2., 2., 2., 2., 2., 2., 2., 2., 2., 2., 2., 2.],
           [1., 1., 1., 1., 2., 2., 2., 2., 2., 2., 2., 2.]], dtype=float32)
    """
    tbe = (
        tables
        if isinstance(tables, TableBatchedEmbeddingBags)
        else TableBatchedEmbeddingBags(tables)
    )
    return tbe(
        indices,
        offsets,
        lengths=lengths,
        mode=mode,
        per_sample_weights=per_sample_weights,
        padding_idx=padding_idx,
        out=out,
        out_dtype=out_dtype,
    )


def _rebuild_tbe(tables: Any, mode: str, out_dtype: str) -> TableBatchedEmbeddingBags:
    return TableBatchedEmbeddingBags(tables, mode=mode, out_dtype=np.dtype(out_dtype))
