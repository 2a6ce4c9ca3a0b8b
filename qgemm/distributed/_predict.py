"""Batch inference on a Dask cluster: the model broadcast once, each partition scored where
it lies, the result a dask collection; and the main job's cluster inference."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..models import DLRM
from ._common import RESULT_TIMEOUT, get_client, worker_table

__all__ = ["predict", "run_main_job_inference", "use_worker_threads"]

_THREADS_SET: list[int] = []


def use_worker_threads() -> None:
    """In a Dask worker process, run qgemm's kernels on the worker's own thread count (once
    per process): a worker with ``threads_per_worker=1`` must not start a parallel region on
    every core next to the other workers."""
    if _THREADS_SET:
        return
    import multiprocessing

    if multiprocessing.parent_process() is None:
        # not a worker process of its own (a threaded worker inside the client's process,
        # or ``dask worker --no-nanny``): leave the hosting process's thread count alone
        return
    try:
        from distributed import get_worker

        n = int(get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        return
    from .._config import set_num_threads

    set_num_threads(max(1, n))
    _THREADS_SET.append(n)


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


def _score_batch(model: DLRM, batch: tuple) -> int:
    use_worker_threads()
    dense, indices, offsets = batch
    indices, offsets = _own_bags(indices, offsets)
    model.predict(_own(dense, np.float32), indices, offsets)
    return int(dense.shape[0])


def _measure(client: Any, model: DLRM, requests: Sequence[tuple], repeat: int) -> dict:
    from distributed import wait

    n_workers = len(worker_table(client))
    model_f = client.scatter(_shippable(model), broadcast=True, hash=False)
    reqs = client.scatter(list(requests), hash=False)  # spread over the workers
    wait(reqs, timeout=RESULT_TIMEOUT)
    # warm-up: every worker compiles (or loads) its kernels before the clock starts
    warm = [
        client.submit(_score_batch, model_f, reqs[0], workers=[a], pure=False)
        for a in worker_table(client)
    ]
    wait(warm, timeout=RESULT_TIMEOUT)
    best = float("inf")
    samples = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        futs = [client.submit(_score_batch, model_f, r, pure=False) for r in reqs]
        samples = sum(client.gather(futs))
        best = min(best, time.perf_counter() - t0)
    first = client.submit(_score, model_f, requests[0][0], requests[0][1:], pure=False)
    got = first.result(timeout=RESULT_TIMEOUT)
    want = model.predict(*requests[0])
    return {
        "workers": n_workers,
        "batches": len(requests),
        "samples": samples,
        "seconds": best,
        "samples_per_s": samples / best if best > 0 else float("inf"),
        "max_abs_diff": float(np.max(np.abs(got - want))) if got.size else 0.0,
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
    from distributed import Client, LocalCluster

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
        with (
            LocalCluster(
                n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None
            ) as cluster,
            Client(cluster) as client,
        ):
            results.append(_measure(client, model, requests, repeat))
    return {"scheduler": None, "results": results}
