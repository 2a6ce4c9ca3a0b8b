"""Sparse optimizer steps for embedding tables: FBGEMM's rowwise AdaGrad.

Training a recommendation model, the gradient of a pooled embedding bag reaches only the rows
the bag looked up.  :func:`rowwise_adagrad` applies FBGEMM's ``EXACT_ROWWISE_ADAGRAD`` update
(TBE's default optimizer) to those rows only, with one float32 momentum per row (instead of one
per element: the state is ``rows`` floats, not ``rows x dim``), for the tables and bags of a
table-batched lookup (:func:`qgemm.embedding_batched.embedding_bags`).  It is what each site
of :func:`qgemm.train_decentralized` would run locally on a DLRM's tables between averaging
rounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import _config
from .._kernels.sparse_optim import rowwise_adagrad_kernel
from .._tuning import EMBEDDING_PARALLEL_MIN_WORK
from .._validate import as_array
from ..embedding import check_bags, entry_point
from ..embedding_batched import TableBatchedEmbeddingBags

__all__ = ["rowwise_adagrad", "rowwise_adagrad_state"]

_NAMES = {np.dtype(np.int32): "int32", np.dtype(np.int64): "int64"}
_EMPTY = np.empty(0, np.float32)


def rowwise_adagrad_state(tables: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Zero momenta for :func:`rowwise_adagrad`: one float32 ``[rows]`` array per table."""
    return [np.zeros(np.shape(t)[0], np.float32) for t in tables]


def _float_tables(tables: Any) -> list[np.ndarray]:
    if isinstance(tables, TableBatchedEmbeddingBags):
        tables = tables.tables
    if isinstance(tables, np.ndarray) or not isinstance(tables, Sequence) or not tables:
        raise TypeError(
            f"tables: expected a non-empty sequence of float32 tables, got {type(tables).__name__}"
        )
    for t, tab in enumerate(tables):
        if not (
            type(tab) is np.ndarray
            and tab.dtype == np.float32
            and tab.ndim == 2
            and tab.flags.c_contiguous
            and tab.flags.writeable
        ):
            what = getattr(tab, "dtype", type(tab).__name__)
            raise TypeError(
                f"tables[{t}]: expected a writeable C-contiguous float32 [rows, dim] ndarray "
                f"(updated in place), got {what}"
            )
    return list(tables)


def rowwise_adagrad(
    tables: Sequence[np.ndarray] | TableBatchedEmbeddingBags,
    momentum: Sequence[np.ndarray],
    indices: Any,
    offsets: Any,
    grad_output: Any,
    *,
    lr: float,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mode: str = "sum",
    per_sample_weights: Any = None,
) -> None:
    """One rowwise-AdaGrad step on the rows the bags looked up (FBGEMM's
    ``EXACT_ROWWISE_ADAGRAD``), in place.

    For every table ``t`` and every distinct row ``r`` its bags use: ``g = sum of w_k *
    grad_output[bag(k), cols[t]:cols[t + 1]]`` over the positions ``k`` holding ``r`` (``w_k``
    the per-sample weight, divided by the bag size for ``mode="mean"``); ``g += weight_decay *
    table[r]``; ``momentum[r] += mean(g ** 2)``; ``table[r] -= lr / (sqrt(momentum[r]) + eps) *
    g``.  Rows not looked up are left alone.

    Parameters
    ----------
    tables : sequence of float32 ``[rows, dim]`` C-contiguous ndarrays, or a
        TableBatchedEmbeddingBags over such tables.  Updated in place.
    momentum : sequence of float32 ``[rows]`` arrays (:func:`rowwise_adagrad_state`), in place.
    indices, offsets
        The bags of the forward lookup, as :func:`qgemm.embedding_batched.embedding_bags` takes
        them (flat with ``offsets [T * B + 1]``, or per-table lists).
    grad_output : float32 ``[B, sum(dims)]``
        Gradient of the loss with respect to the pooled output.
    lr, eps, weight_decay : float (keyword)
    mode : {"sum", "mean"}
    per_sample_weights : optional, as for the forward lookup (``mode="sum"``).

    Raises
    ------
    IndexError, ValueError, TypeError
        As the forward lookup, plus wrong momentum/gradient shapes; nothing is updated then.

    Examples
    --------
    >>> import numpy as np
    >>> table = np.ones((4, 2), np.float32)
    >>> state = rowwise_adagrad_state([table])
    >>> rowwise_adagrad([table], state, np.array([1, 1, 3]), np.array([0, 2, 3]),
    ...                 np.array([[1.0, 1.0], [0.5, 0.5]], np.float32), lr=0.1)
    >>> table.round(4), state[0]
    (array([[1. , 1. ],
           [0.9, 0.9],
           [1. , 1. ],
           [0.9, 0.9]], dtype=float32), array([0.  , 4.  , 0.  , 0.25], dtype=float32))
    """
    tabs = _float_tables(tables)
    T = len(tabs)
    if mode not in ("sum", "mean"):
        raise ValueError(f"mode: expected 'sum' or 'mean' (as TBE's optimizer), got {mode!r}")
    if not isinstance(momentum, Sequence) or len(momentum) != T:
        raise ValueError(f"momentum: expected {T} arrays (one per table)")
    moms = []
    for t in range(T):
        m = momentum[t]
        if not (
            type(m) is np.ndarray
            and m.dtype == np.float32
            and m.shape == (tabs[t].shape[0],)
            and m.flags.c_contiguous
            and m.flags.writeable
        ):
            raise ValueError(
                f"momentum[{t}]: expected a writeable float32 array of shape "
                f"({tabs[t].shape[0]},), got {getattr(m, 'dtype', type(m).__name__)} "
                f"{getattr(m, 'shape', '')}"
            )
        moms.append(m)
    tbe = TableBatchedEmbeddingBags(tabs)
    idx, offs, batch, wts, starts = tbe._flat_bags(indices, offsets, None, per_sample_weights)
    weighted = wts is not None
    if weighted:
        if mode != "sum":
            raise ValueError("per_sample_weights: only supported with mode='sum'")
        wts = np.ascontiguousarray(
            as_array("per_sample_weights", wts, dtypes=(np.float32, np.float16)).reshape(-1),
            dtype=np.float32,
        )
        if wts.shape != idx.shape:
            raise ValueError(
                f"per_sample_weights: expected one weight per index ({idx.size}), got {wts.size}"
            )
    grad = as_array("grad_output", grad_output, dtypes=(np.float32,), ndim=2)
    if grad.shape != (batch, tbe.total_dim):
        raise ValueError(
            f"grad_output: expected shape {(batch, tbe.total_dim)} (bags x sum of dims), got "
            f"{grad.shape}"
        )
    grad = np.ascontiguousarray(grad)
    # ---- validate every table's bags before any update ----
    if offs[0] != 0:
        raise ValueError(f"offsets: offsets[0] must be 0 (bags start at index 0), got {offs[0]}")
    if offs.size > 1 and np.any(offs[1:] < offs[:-1]):
        pos = int(np.argmax(offs[1:] < offs[:-1])) + 1
        raise ValueError(f"offsets: expected non-decreasing offsets, offsets[{pos}] decreases")
    if offs[-1] != idx.size:
        raise ValueError(
            f"offsets: expected offsets[-1] == len(indices) ({idx.size}), got {offs[-1]}"
        )
    parts = []
    for t in range(T):
        s, e = int(offs[t * batch]), int(offs[(t + 1) * batch])
        it = idx[s:e]
        ot = offs[t * batch : (t + 1) * batch + 1] - s
        try:
            check_bags(it, ot[:-1], tbe.rows[t])
        except IndexError:
            pos = int(np.argmax((it < 0) | (it >= tbe.rows[t])))
            b = int(np.searchsorted(ot, pos, side="right")) - 1
            where = "" if starts is None else f" (indices[{t}][{s + pos - int(starts[t])}])"
            raise IndexError(
                f"indices: index {int(it[pos])} of table {t} at bag {b}{where} is out of range "
                f"for a table of {tbe.rows[t]} rows (expected 0 <= index < {tbe.rows[t]})"
            ) from None
        parts.append((it, ot, s, e))
    threads = _config.get_num_threads()
    for t, (it, ot, s, e) in enumerate(parts):
        dim = tbe.dims[t]
        parallel = threads > 1 and it.size * max(dim, 16) >= EMBEDDING_PARALLEL_MIN_WORK
        key = (_NAMES[it.dtype], _NAMES[ot.dtype], weighted, mode == "mean", parallel)
        kern = entry_point(rowwise_adagrad_kernel(key))
        if parallel:
            _config.sync_threads()
        w = wts[s:e] if weighted else _EMPTY
        code, b, pos, val = kern(
            tabs[t], moms[t], it, ot, grad, int(tbe.cols[t]), w,
            np.float32(lr), np.float32(eps), np.float32(weight_decay),
        )  # fmt: skip
        if code:  # pragma: no cover - validated above
            raise RuntimeError(f"rowwise_adagrad: kernel status {code} for table {t}")
