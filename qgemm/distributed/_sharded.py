"""Sharded embedding tables and DLRM serving on a Dask cluster.

Tables are placed on workers whole (table-wise, greedy by bytes), and a table larger than
``max_shard_bytes`` (default: a fraction of the smallest worker memory limit) is split by
rows into contiguous ranges, one per worker.  Lookups run where the rows live: each shard
pools its own rows of every bag with the same pooling the single-process model uses
(:func:`qgemm.embedding_bag`, or numpy's gather + ``reduceat`` for the float baseline) and
sends a ``[B, D]`` float32 result to the *interaction worker*, which runs the bottom MLP,
adds the row-split partial sums in shard order, and runs the interaction and the top MLP
with the model's own code.

Exactness.  Table-wise shards compute exactly what ``DLRM.predict`` computes: the
predictions are equal bit for bit.  A row-split table's bag sum is re-associated: the single
process folds a bag's rows left to right in index order, the shards fold their own rows and
the partials are then added.  float32 addition is not associative, so the results can
differ in the last bits; reproducing the single-process fold exactly would need the rows
themselves (``L x D`` per bag) to travel instead of one ``D`` vector per bag and shard.  Both
sums are within ``gamma_{n-1} * sum_i |x_i|`` (``gamma_k = k u / (1 - k u)``, ``u = 2**-24``,
``n`` terms; Higham, *Accuracy and Stability of Numerical Algorithms*, 4.2) of the exact sum,
so they differ by at most twice that; the results are deterministic (fixed shard order).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .._tuning import DIST_SHARD_MEMORY_FRACTION
from ..embedding import embedding_bag
from ..models import DLRM, _numpy_bag_sum, _sigmoid, add_part_times
from ..quantize import RowwiseQuantizedTable
from ._common import RESULT_TIMEOUT, get_client, resolve_worker, worker_table

__all__ = ["ShardedDLRM", "TableShard", "row_ranges"]


class TableShard:
    """Rows ``[start, stop)`` of table ``table`` (the whole table when table-wise), with
    the pooling the single-process model uses for it."""

    __slots__ = ("table", "start", "stop", "data", "use_kernel")

    def __init__(self, table: int, start: int, stop: int, data: Any, use_kernel: bool):
        self.table = table
        self.start = start
        self.stop = stop
        self.data = data
        self.use_kernel = use_kernel

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def __sizeof__(self) -> int:
        return self.nbytes

    def pool(self, idx: np.ndarray, off: np.ndarray | None, batch: int, dim: int) -> np.ndarray:
        out = np.empty((batch, dim), np.float32)
        if self.use_kernel:
            embedding_bag(self.data, idx, off, mode="sum", out=out)
        else:
            _numpy_bag_sum(self.data, idx, off, out)
        return out


def row_ranges(rows: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous, nearly equal row ranges covering ``[0, rows)``."""
    edges = [rows * p // parts for p in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def _slice_rows(t: Any, start: int, stop: int) -> Any:
    if isinstance(t, RowwiseQuantizedTable):
        return RowwiseQuantizedTable(np.ascontiguousarray(t.fused[start:stop]), t.bits, t.dim)
    return np.ascontiguousarray(t[start:stop])


def _split_bags(
    idx: np.ndarray, off: np.ndarray | None, start: int, stop: int
) -> tuple[np.ndarray, np.ndarray]:
    """The bags restricted to rows ``[start, stop)``, re-based to the shard: flat indices and
    offsets (fixed-size bags become offset bags)."""
    if off is None:
        batch, length = idx.shape
        flat = idx.reshape(-1)
        off = np.arange(0, batch * length, length, dtype=np.int64)
    else:
        flat = idx
    keep = (flat >= start) & (flat < stop)
    before = np.concatenate(([0], np.cumsum(keep, dtype=np.int64)))
    new_off = before[off].astype(np.int64)
    return (flat[keep] - start).astype(flat.dtype, copy=False), new_off


def _dense_forward(stub: DLRM, dense: np.ndarray, parts: list, times: bool) -> Any:
    """Bottom MLP, the pooled tables (row-split partials added in shard order), interaction
    and top MLP, exactly as ``DLRM.predict`` runs them."""
    import time

    clock = time.perf_counter
    t0 = clock()
    x = stub._mlp(stub.bottom, dense, last_relu=True)
    t1 = clock()
    emb = np.empty((len(parts), dense.shape[0], stub._dim), np.float32)
    for k, p in enumerate(parts):
        if isinstance(p, np.ndarray):
            emb[k] = p
        else:
            acc = p[0].copy()
            for q in p[1:]:
                acc += q
            emb[k] = acc
    t2 = clock()
    z = stub._interact(x, emb)
    t3 = clock()
    p = _sigmoid(stub._mlp(stub.top, z, last_relu=False))
    t4 = clock()
    if times:
        d: dict = {}
        add_part_times(d, t0, t1, t2, t3, t4)
        return p, d
    return p


def _pool(shard: TableShard, idx: np.ndarray, off: Any, batch: int, dim: int) -> np.ndarray:
    return shard.pool(idx, off, batch, dim)


def _pool_split(shard: TableShard, idx: np.ndarray, off: Any, batch: int, dim: int) -> np.ndarray:
    i, o = _split_bags(idx, off, shard.start, shard.stop)
    return shard.pool(i, o, batch, dim)


class ShardedDLRM:
    """A :class:`qgemm.DLRM` served from a Dask cluster with its tables sharded.

    Parameters
    ----------
    model : DLRM
        The model (float or int8); its tables are sent to the workers shard by shard (no
        worker receives a whole row-split table) and not kept by this object.
    client : distributed.Client
    workers : sequence of str, optional
        Workers (names or addresses) to place tables on; default every worker.
    row_split : sequence of int, optional
        Tables to split by rows across ``workers``; default: those larger than
        ``max_shard_bytes``.
    max_shard_bytes : int, optional
        Default ``DIST_SHARD_MEMORY_FRACTION`` of the smallest worker memory limit.
    interaction_worker : str, optional
        Where the dense part runs; default the worker with the fewest table bytes.

    Notes
    -----
    Predictions equal ``model.predict`` bit for bit when no table is row-split; a row-split
    table's sums are re-associated (see the module docstring for the bound).
    """

    def __init__(
        self,
        model: DLRM,
        client: Any = None,
        *,
        workers: Sequence[str] | None = None,
        row_split: Sequence[int] | None = None,
        max_shard_bytes: int | None = None,
        interaction_worker: str | None = None,
    ):
        if not isinstance(model, DLRM):
            raise TypeError(f"model: expected a qgemm.DLRM, got {type(model).__name__}")
        self.client = client = get_client(client)
        table = worker_table(client)
        if workers is None:
            addrs = sorted(table)
        else:
            addrs = [
                resolve_worker(client, w, f"workers[{i}]", table) for i, w in enumerate(workers)
            ]
        if not addrs:
            raise ValueError("workers: expected at least one worker, got none")
        nt = model.num_tables
        if max_shard_bytes is None:
            limits = [int(table[a].get("memory_limit") or 0) for a in addrs]
            limit = min((x for x in limits if x > 0), default=0)
            max_shard_bytes = int(limit * DIST_SHARD_MEMORY_FRACTION) if limit else None
        if row_split is None:
            split = {
                k
                for k, t in enumerate(model.tables)
                if max_shard_bytes is not None and t.nbytes > max_shard_bytes and len(addrs) > 1
            }
        else:
            split = set()
            for j, k in enumerate(row_split):
                if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
                    raise TypeError(
                        f"row_split[{j}]: expected a table number, got {type(k).__name__}"
                    )
                if not 0 <= k < nt:
                    raise ValueError(f"row_split[{j}]: expected a table in [0, {nt}), got {k}")
                split.add(int(k))
        load = dict.fromkeys(addrs, 0)
        self.placement: dict[int, list[tuple[str, int, int]]] = {}
        self._shards: dict[int, list[Any]] = {}
        use_kernel = [
            isinstance(t, RowwiseQuantizedTable) or model.engine == "qgemm" for t in model.tables
        ]
        order = sorted(range(nt), key=lambda k: -model.tables[k].nbytes)
        for k in order:
            t = model.tables[k]
            if k in split:
                pieces = [
                    (a, s, e)
                    for a, (s, e) in zip(addrs, row_ranges(t.shape[0], len(addrs)), strict=True)
                ]
            else:
                a = min(addrs, key=lambda w: load[w])
                pieces = [(a, 0, t.shape[0])]
            futs = []
            for a, s, e in pieces:
                shard = TableShard(
                    k, s, e, _slice_rows(t, s, e) if k in split else t, use_kernel[k]
                )
                load[a] += shard.nbytes
                futs.append(client.scatter(shard, workers=[a], hash=False))
                del shard
            self.placement[k] = pieces
            self._shards[k] = futs
        if interaction_worker is None:
            self.interaction_worker = min(addrs, key=lambda w: load[w])
        else:
            self.interaction_worker = resolve_worker(
                client, interaction_worker, "interaction_worker", table
            )
        self.row_split = tuple(sorted(split))
        self._load = load
        # the dense part: the model's layers with one-row stand-in tables (never pooled)
        stub = DLRM(
            model.bottom,
            model.top,
            [np.zeros((1, model.dim), np.float32)] * nt,
            self_interaction=model.self_interaction,
            engine=model.engine,
        )
        self._stub_f = client.scatter(stub, workers=[self.interaction_worker], hash=False)
        # a client-side checker of inputs (same metadata as the model, no tables)
        stub._rows = model.rows
        self._checker = stub
        self._dim = model.dim

    def shard_bytes(self) -> dict[str, int]:
        """Table bytes placed on each worker (address -> bytes)."""
        return dict(self._load)

    def submit(
        self, dense: Any, indices: Any, offsets: Any = None, *, timings: bool = False
    ) -> Any:
        """Score one batch; returns a future of the predictions (``(p, part_times)`` with
        ``timings``), computed on the interaction worker."""
        client = self.client
        dense, bags = self._checker._check_inputs(dense, indices, offsets)
        batch = dense.shape[0]
        parts: list = []
        for k, (idx, off) in enumerate(bags):
            pieces = self.placement[k]
            shards = self._shards[k]
            if len(pieces) == 1:
                a = pieces[0][0]
                parts.append(
                    client.submit(
                        _pool,
                        shards[0],
                        idx,
                        off,
                        batch,
                        self._dim,
                        workers=[a],
                        allow_other_workers=False,
                        pure=False,
                    )
                )
            else:
                parts.append(
                    [
                        client.submit(
                            _pool_split,
                            f,
                            idx,
                            off,
                            batch,
                            self._dim,
                            workers=[a],
                            allow_other_workers=False,
                            pure=False,
                        )
                        for (a, _, _), f in zip(pieces, shards, strict=True)
                    ]
                )
        return client.submit(
            _dense_forward,
            self._stub_f,
            dense,
            parts,
            timings,
            workers=[self.interaction_worker],
            allow_other_workers=False,
            pure=False,
        )

    def predict(
        self,
        dense: Any,
        indices: Any,
        offsets: Any = None,
        *,
        timings: dict[str, float] | None = None,
    ) -> np.ndarray:
        """Click probabilities, as ``DLRM.predict`` (same arguments); ``timings`` receives
        the interaction worker's part times (embedding = adding the pooled parts)."""
        fut = self.submit(dense, indices, offsets, timings=timings is not None)
        res = fut.result(timeout=RESULT_TIMEOUT)
        if timings is not None:
            p, d = res
            for key, v in d.items():
                timings[key] = timings.get(key, 0.0) + v
            return p
        return res

    __call__ = predict

    def close(self) -> None:
        """Release the shards on the workers."""
        for futs in self._shards.values():
            for f in futs:
                f.release()
        self._stub_f.release()
        self._shards = {}

    def __repr__(self) -> str:
        return (
            f"ShardedDLRM(tables={len(self.placement)}, row_split={list(self.row_split)}, "
            f"workers={len({a for p in self.placement.values() for a, _, _ in p})}, "
            f"interaction_worker={self.interaction_worker!r})"
        )


def shard_contents(client: Any) -> dict[str, list[tuple[int, int, int]]]:
    """Per worker, the ``(table, start, stop)`` of every table shard it holds (for checks)."""

    def look(dask_worker: Any) -> list[tuple[int, int, int]]:
        return [
            (v.table, v.start, v.stop)
            for v in list(dask_worker.data.values())
            if isinstance(v, TableShard)
        ]

    return dict(client.run(look))
