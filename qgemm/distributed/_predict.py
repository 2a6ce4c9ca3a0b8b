"""Batch inference on a Dask cluster: the model broadcast once, each partition scored where
it lies, the result a dask collection; and the main job's cluster inference."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..models import DLRM
from ._common import (
    RESULT_TIMEOUT,
    get_client,
    local_cluster,
    prepare_worker,
    warm_workers,
    worker_table,
)

__all__ = [
    "predict",
    "run_main_job_inference",
    "use_worker_threads",
    "ClusterScorer",
    "partition_ranges",
]

use_worker_threads = prepare_worker
"""Alias of :func:`qgemm.distributed._common.prepare_worker` (what every scoring task calls
first)."""


def _own(a: Any, dtype: Any = None) -> np.ndarray:
    """``a`` as a C-contiguous, writeable array (copied only when it is not one): pandas'
    ``to_numpy`` and arrays deserialised by Dask can be read-only views, which qgemm's
    kernels are not compiled for."""
    return np.require(a, dtype=dtype, requirements=["C", "W"])


def _own_bags(indices: Any, offsets: Any) -> tuple[list, list | None]:
    idx = [_own(i) for i in indices]
    off = None if offsets is None else [None if o is None else _own(o) for o in offsets]
    return idx, off


_PROCESS_LOCAL = ("_tbe",)
"""DLRM attributes that only make sense in the process that made them: the table-batched
embedding cache (``TableBatchedEmbeddingBags``) holds raw table addresses, and a pickled copy
would be trusted on the worker (its tables unpickle as the same objects) and read freed
memory.  Models are shipped without them; the worker rebuilds its own on first use."""


def _shippable(model: DLRM) -> DLRM:
    """``model``, or a shallow copy without its process-local caches, to send to workers."""
    if not any(k in vars(model) for k in _PROCESS_LOCAL):
        return model
    m = copy.copy(model)
    for k in _PROCESS_LOCAL:
        vars(m).pop(k, None)
    return m


def _score(model: DLRM, dense: np.ndarray, bags: Any) -> np.ndarray:
    use_worker_threads()
    indices, offsets = _own_bags(*bags)
    return model.predict(_own(dense, np.float32), indices, offsets)


def _score_frame(df: Any, model: DLRM, dense_cols: list, sparse_cols: list, out: int) -> Any:
    import pandas as pd

    use_worker_threads()
    n = len(df)
    dense = _own(df[dense_cols].to_numpy(dtype=np.float32))
    indices = [_own(df[c].to_numpy(dtype=np.int64)) for c in sparse_cols]
    offsets = [np.arange(n, dtype=np.int64)] * len(sparse_cols)
    p = model.predict(dense, indices, offsets)
    cols = ["p"] if out == 1 else [f"p{j}" for j in range(out)]
    return pd.DataFrame(p, index=df.index, columns=cols)


def predict(
    model: DLRM,
    batches: Any,
    *,
    client: Any = None,
    bags: Sequence[Any] | None = None,
    dense_columns: Sequence[str] | None = None,
    sparse_columns: Sequence[str] | None = None,
) -> Any:
    """Score a click log that lives on the cluster.

    The model is scattered once to every worker (broadcast); every partition is scored by
    ``model.predict`` on a worker that holds it.  Each partition's predictions equal
    ``model.predict`` of that partition bit for bit (an int8 model quantizes activations per
    call, so partitioning is part of the definition, as batching is for one process).

    Parameters
    ----------
    model : DLRM
    batches : dask.array.Array or dask.dataframe.DataFrame
        Dense features ``[N, num_dense]`` chunked by rows, with ``bags`` giving each row
        chunk's ``(indices, offsets)`` (lists of one array per table; numpy arrays,
        futures or delayed); or a click log data frame with float dense columns and one
        integer column of row ids per table (one id per sample, Criteo's layout).
    client : distributed.Client, optional
    bags : sequence of (indices, offsets), optional
        One per row chunk of a dask array (required with one).
    dense_columns, sparse_columns : sequence of str, optional
        Data frame columns; default the float columns, then the integer columns, in order.

    Returns
    -------
    dask.array.Array or dask.dataframe.DataFrame
        float32 ``[N, top[-1]]`` predictions (a frame with column ``p``, or ``p0..``),
        lazy: ``.compute()`` runs it.
    """
    import dask
    import dask.array as da

    if not isinstance(model, DLRM):
        raise TypeError(f"model: expected a qgemm.DLRM, got {type(model).__name__}")
    client = get_client(client)
    out = model.top_sizes[-1]
    model_f = client.scatter(_shippable(model), broadcast=True, hash=False)
    if isinstance(batches, da.Array):
        if batches.ndim != 2 or batches.shape[1] != model.num_dense:
            raise ValueError(
                f"batches: expected a dask array [N, {model.num_dense}], got shape {batches.shape}"
            )
        if len(batches.chunks[1]) != 1:
            batches = batches.rechunk({1: -1})
        blocks = batches.to_delayed().ravel()
        if bags is None or len(bags) != len(blocks):
            raise ValueError(
                f"bags: expected one (indices, offsets) per row chunk "
                f"({len(blocks)}), got {None if bags is None else len(bags)}"
            )
        score = dask.delayed(_score, pure=False)
        parts = [
            da.from_delayed(score(model_f, b, bg), shape=(n, out), dtype=np.float32)
            for b, bg, n in zip(blocks, bags, batches.chunks[0], strict=True)
        ]
        return da.concatenate(parts, axis=0)
    frame_type: Any = None
    try:
        import dask.dataframe as dd

        frame_type = dd.DataFrame
    except ImportError:  # pragma: no cover - dask without its dataframe extra (pandas, pyarrow)
        pass
    if frame_type is not None and isinstance(batches, frame_type):
        cols = list(batches.columns)
        dtypes = batches.dtypes
        if dense_columns is None:
            dense_columns = [c for c in cols if dtypes[c].kind == "f"]
        if sparse_columns is None:
            sparse_columns = [c for c in cols if dtypes[c].kind in "iu"]
        for name, got, want in (
            ("dense_columns", dense_columns, model.num_dense),
            ("sparse_columns", sparse_columns, model.num_tables),
        ):
            if len(got) != want:
                raise ValueError(f"{name}: expected {want} columns, got {len(got)}: {list(got)}")
        import pandas as pd

        names = ["p"] if out == 1 else [f"p{j}" for j in range(out)]
        meta = pd.DataFrame({c: np.array([], np.float32) for c in names})
        return batches.map_partitions(
            _score_frame, model_f, list(dense_columns), list(sparse_columns), out, meta=meta
        )
    raise TypeError(
        f"batches: expected a dask.array.Array or a dask.dataframe.DataFrame, got "
        f"{type(batches).__name__}"
    )


def _score_batches(model: DLRM, batches: Sequence[tuple]) -> np.ndarray:
    """One partition of requests scored on its worker: the predictions, concatenated."""
    prepare_worker()
    out = []
    for dense, indices, offsets in batches:
        idx, off = _own_bags(indices, offsets)
        out.append(model.predict(_own(dense, np.float32), idx, off))
    if not out:
        return np.empty((0, model.top_sizes[-1]), np.float32)
    return np.concatenate(out, axis=0)


def partition_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ``(start, stop)`` ranges covering ``range(n)``, sizes differing
    by at most one (the first ``n % parts`` one longer); empty ranges when ``parts > n``."""
    if parts < 1:
        raise ValueError(f"parts: expected an int >= 1, got {parts}")
    q, r = divmod(n, parts)
    out = []
    lo = 0
    for j in range(parts):
        hi = lo + q + (j < r)
        out.append((lo, hi))
        lo = hi
    return out


class _PartitionScorer:
    """A Dask actor on one worker: holds the model and that worker's requests, and scores
    them when asked (an actor call goes straight from the client to the worker and back,
    about 2 ms here, where a task's round trip through the scheduler takes 8-13 ms)."""

    def __init__(self, model: DLRM, requests: list) -> None:
        prepare_worker()
        self.model, self.requests = model, requests
        if requests:  # build (or load) the specialised kernels before any timed pass
            _score_batches(model, requests[:1])

    def score(self) -> np.ndarray:
        return _score_batches(self.model, self.requests)


class ClusterScorer:
    """Scores a fixed list of requests on ``client``'s workers in the steady state, the data
    already there (what :func:`run_main_job_inference` times; the bench interleaves its
    passes with in-process ones).

    Set-up (untimed): the requests are split into contiguous partitions, one per worker,
    sized by the worker's thread count, each scattered to its worker (a click log lives on
    the cluster: it is not shipped from the client in the timed region); the model is
    broadcast once; on every worker a Dask actor takes the model and the partition and
    scores one batch (kernels built; :func:`warm_workers` waits for the specialised tier).
    A pass (:meth:`run`) is one actor call per worker -- client to worker and back, no
    scheduler hop, no transfer but the predictions -- and ends when every partition's
    predictions are on the client.  A pass on a lost worker raises (no re-scheduling:
    make a new scorer)."""

    def __init__(self, client: Any, model: DLRM, requests: Sequence[tuple]) -> None:
        from distributed import wait

        self.client, self.model, self.requests = client, model, requests
        table = worker_table(client)
        self.workers = len(table)
        slots = [a for a in sorted(table) for _ in range(max(1, int(table[a].get("nthreads", 1))))]
        self.model_f = client.scatter(_shippable(model), broadcast=True, hash=False)
        chunks: dict[str, list] = {}
        for addr, (lo, hi) in zip(slots, partition_ranges(len(requests), len(slots)), strict=True):
            chunks.setdefault(addr, []).extend(requests[lo:hi])
        self.parts = []
        for addr, chunk in chunks.items():
            if chunk:
                self.parts.append((addr, client.scatter([chunk], workers=[addr], hash=False)[0]))
        wait([f for _, f in self.parts], timeout=RESULT_TIMEOUT)
        self._actor_futures = [
            client.submit(
                _PartitionScorer,
                self.model_f,
                f,
                workers=[a],
                allow_other_workers=False,
                actor=True,
                pure=False,
            )
            for a, f in self.parts
        ]
        wait(self._actor_futures, timeout=RESULT_TIMEOUT)
        self.actors = [f.result(timeout=RESULT_TIMEOUT) for f in self._actor_futures]
        warm_workers(client)

    def run(self) -> tuple[float, list[np.ndarray]]:
        """One timed pass: ``(seconds, predictions per partition)``."""
        t0 = time.perf_counter()
        calls = [actor.score() for actor in self.actors]
        preds = [c.result(timeout=RESULT_TIMEOUT) for c in calls]
        return time.perf_counter() - t0, preds

    def close(self) -> None:
        """Release the actors, the model and the partitions on the workers."""
        self.actors = []
        for f in self._actor_futures:
            f.release()
        for _, f in self.parts:
            f.release()
        self.model_f.release()
        self._actor_futures, self.parts = [], []


def _measure(client: Any, model: DLRM, requests: Sequence[tuple], repeat: int) -> dict:
    scorer = ClusterScorer(client, model, requests)
    try:
        best = float("inf")
        samples = 0
        got = None
        for _ in range(repeat):
            t, preds = scorer.run()
            best = min(best, t)
            samples = sum(int(p.shape[0]) for p in preds)
            got = preds[0][: requests[0][0].shape[0]]
    finally:
        scorer.close()
    want = model.predict(*requests[0])
    return {
        "workers": scorer.workers,
        "batches": len(requests),
        "samples": samples,
        "seconds": best,
        "samples_per_s": samples / best if best > 0 else float("inf"),
        "max_abs_diff": float(np.max(np.abs(got - want))) if got is not None and got.size else 0.0,
    }


def run_main_job_inference(
    model: DLRM,
    requests: Sequence[tuple],
    *,
    workers: int | Sequence[int] | None = None,
    scheduler: str | None = None,
    repeat: int = 3,
) -> dict:
    """The main job's inference on a cluster: throughput per worker count.

    Parameters
    ----------
    model : DLRM
    requests : sequence of (dense, indices, offsets)
        The batches to score (``model.random_inputs`` output, say).
    workers : int or sequence of int, optional
        Worker counts to measure, each on its own ``LocalCluster`` of single-threaded worker
        processes (default ``[1, 2]``); ignored with ``scheduler``.
    scheduler : str, optional
        Address of a running scheduler: measure on its workers instead.
    repeat : int
        Timed passes over ``requests`` per cluster; the fastest counts.

    Returns
    -------
    dict
        ``{"scheduler": addr or None, "results": [{"workers", "batches", "samples",
        "seconds", "samples_per_s", "max_abs_diff"}, ...]}`` (``max_abs_diff``: the cluster's
        predictions of the first batch against ``model.predict`` here; 0 when identical).
    """
    from distributed import Client

    if not isinstance(model, DLRM):
        raise TypeError(f"model: expected a qgemm.DLRM, got {type(model).__name__}")
    if not isinstance(requests, Sequence) or len(requests) == 0:
        raise ValueError("requests: expected a non-empty sequence of (dense, indices, offsets)")
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat: expected an int >= 1, got {repeat!r}")
    if scheduler is not None:
        with Client(scheduler, timeout=RESULT_TIMEOUT) as client:
            return {"scheduler": scheduler, "results": [_measure(client, model, requests, repeat)]}
    counts = [1, 2] if workers is None else [workers] if isinstance(workers, int) else workers
    results = []
    for j, n in enumerate(counts):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"workers[{j}]: expected a worker count >= 1, got {n!r}")
        with local_cluster(n, threads_per_worker=1) as cluster, Client(cluster) as client:
            results.append(_measure(client, model, requests, repeat))
    return {"scheduler": None, "results": results}
