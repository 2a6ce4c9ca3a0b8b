"""Shared helpers of :mod:`qgemm.distributed`: the client, worker look-up, transfer counters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "get_client",
    "worker_table",
    "resolve_worker",
    "outgoing_bytes",
    "holder",
    "worker_environ",
    "local_cluster",
    "prepare_worker",
    "warm_workers",
]

RESULT_TIMEOUT = 300.0
"""Seconds any blocking wait of qgemm.distributed gives the cluster before raising
``TimeoutError`` (never hang on a lost worker)."""


DROPPED_ENVIRON = ("MALLOC_TRIM_THRESHOLD_",)
"""Variables of Dask's ``distributed.nanny.pre-spawn-environ`` that qgemm's worker processes
do without.  Dask sets ``MALLOC_TRIM_THRESHOLD_=65536``; that freezes glibc's mmap threshold at
128 KiB (every temporary above it -- a DLRM layer's activations at batch 128 -- is mmapped,
page-faulted and unmapped per call) and returns freed heap to the OS at once (the averaging
kernels' per-block float64 buffers are faulted in again per block).  Measured (Zen 3, 2 cores,
interleaved runs, medians): the inference bench's 16 batches on 1 thread 20-24 ms without it,
38-57 ms with it; folding two 5M-float32 models with the ``multi`` kernel 33 ms without,
109 ms with.  Without it a worker allocates exactly as the in-process baseline does (glibc's
defaults, as in any Python process)."""


def worker_environ(threads_per_worker: int = 1) -> dict[str, Any]:
    """The environment of worker processes started by qgemm (:func:`local_cluster`): Dask's
    own ``distributed.nanny.pre-spawn-environ`` without :data:`DROPPED_ENVIRON`, plus
    ``QGEMM_NUM_THREADS`` = the worker's thread count (qgemm's kernels use the cores the
    worker was given, never all of them next to the other workers).

    For workers started by hand, the same: ``QGEMM_NUM_THREADS=<nthreads> dask worker ...``
    with ``distributed.nanny.pre-spawn-environ`` not setting ``MALLOC_TRIM_THRESHOLD_``."""
    import dask

    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {})
    for k in DROPPED_ENVIRON:
        env.pop(k, None)
    env["QGEMM_NUM_THREADS"] = int(threads_per_worker)
    return env


def local_cluster(n_workers: int, threads_per_worker: int = 1, **kwargs: Any) -> Any:
    """A ``distributed.LocalCluster`` of worker processes with :func:`worker_environ`
    (no dashboard unless asked for)."""
    import dask
    from distributed import LocalCluster

    kwargs.setdefault("dashboard_address", None)
    kwargs.setdefault("processes", True)
    with dask.config.set(
        {"distributed.nanny.pre-spawn-environ": worker_environ(threads_per_worker)}
    ):
        return LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, **kwargs)


_PREPARED: list[int] = []


def prepare_worker() -> None:
    """In a Dask worker process, run qgemm's kernels on the worker's own thread count (once
    per process): a worker with ``threads_per_worker=1`` must not start a parallel region on
    every core next to the other workers.  Every task of qgemm.distributed calls it first."""
    if _PREPARED:
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
    _PREPARED.append(n)


def _wait_ready(timeout: float) -> bool:
    from .._cache import wait_ready

    prepare_worker()
    return bool(wait_ready(timeout))


def warm_workers(client: Any, timeout: float = RESULT_TIMEOUT) -> None:
    """Wait on every worker until the specialised kernels its warm-up queued are built
    (``qgemm.wait_ready``): timings after this measure the steady state, not compilation."""
    client.run(_wait_ready, timeout)


def get_client(client: Any = None, futures: Sequence[Any] = ()) -> Any:
    """``client``, else the client of the first future, else ``distributed.get_client()``."""
    from distributed import Client

    if client is not None:
        if not isinstance(client, Client):
            raise TypeError(f"client: expected a distributed.Client, got {type(client).__name__}")
        return client
    for f in futures:
        c = getattr(f, "client", None)
        if c is not None:
            return c
    from distributed import get_client as _get

    try:
        return _get()
    except ValueError:
        raise ValueError(
            "client: no distributed.Client given and none running; pass client=Client(...)"
        ) from None


def worker_table(client: Any) -> dict[str, dict]:
    """address -> scheduler info (``name``, ``resources``, ``memory_limit``, ...), asked of
    the scheduler on every call.

    Not ``client.scheduler_info()``: that returns the client's cached identity, which the
    client's own periodic refresh overwrites with a *worker-less* one (it asks for
    ``n_workers=0``); a refresh landing between the fresh fetch and the read gives an empty
    table, i.e. every worker "gone" (the cause of the killed-worker test's flake).
    """
    info = client.sync(client.scheduler.identity, n_workers=-1, callback_timeout=RESULT_TIMEOUT)
    return dict(info["workers"])


def resolve_worker(client: Any, worker: Any, where: str, table: Mapping | None = None) -> str:
    """The address of the worker named (or addressed) ``worker``; ``ValueError`` naming
    ``where`` when the cluster has no such worker."""
    table = worker_table(client) if table is None else table
    if worker in table:
        return str(worker)
    for addr, info in table.items():
        if info.get("name") == worker or str(info.get("name")) == str(worker):
            return addr
    names = sorted(str(i.get("name")) for i in table.values())
    raise ValueError(
        f"{where}: worker {worker!r} is not in the cluster (workers: {', '.join(names)})"
    )


def _outgoing(dask_worker: Any) -> tuple[Any, int]:
    return dask_worker.name, int(dask_worker.transfer_outgoing_bytes_total)


def outgoing_bytes(client: Any) -> dict[Any, int]:
    """Worker name -> bytes that worker has sent to other workers (and clients) so far:
    Dask's ``transfer_outgoing_bytes_total`` counter (task ``nbytes`` as Dask measures them)."""
    res = client.run(_outgoing, on_error="return")
    out = {}
    for v in res.values():
        if isinstance(v, tuple):
            out[v[0]] = v[1]
    return out


def counter_delta(before: Mapping, after: Mapping) -> int:
    """Bytes sent between two :func:`outgoing_bytes` snapshots (a restarted worker's counter
    starts again at 0: its new total counts in full)."""
    total = 0
    for name, b in after.items():
        a = before.get(name, 0)
        total += b - a if b >= a else b
    return int(total)


def holder(client: Any, future: Any) -> str | None:
    """The address of one worker holding ``future``'s result (None when none does)."""
    who = client.who_has([future])
    addrs = who.get(future.key, ())
    return sorted(addrs)[0] if addrs else None


def check_weights(weights: Any, n: int, name: str = "weights") -> list[float]:
    """``n`` finite non-negative floats with at least one positive (default all 1)."""
    if weights is None:
        return [1.0] * n
    if isinstance(weights, (str, bytes, Mapping)) or np.ndim(weights) != 1:
        raise TypeError(f"{name}: expected a 1-D sequence of numbers, got {type(weights).__name__}")
    ws = []
    for i, w in enumerate(weights):
        if isinstance(w, (bool, np.bool_)) or not isinstance(w, (int, float, np.number)):
            raise TypeError(f"{name}[{i}]: expected a real number, got {type(w).__name__}")
        if not np.isfinite(w) or w < 0:
            raise ValueError(f"{name}[{i}]: expected a finite, non-negative weight, got {w}")
        ws.append(float(w))
    if len(ws) != n:
        raise ValueError(f"{name}: expected one weight per model ({n}), got {len(ws)}")
    if n and not any(ws):
        raise ValueError(f"{name}: expected at least one positive weight, got all zeros")
    return ws


def _leaf_sig(v: Any) -> str:
    if isinstance(v, (np.ndarray, np.generic)):
        return f"{v.dtype.name} array of shape {tuple(v.shape)}"
    shape = getattr(v, "shape", None)
    bits = getattr(v, "bits", None)
    extra = f", bits={bits}" if bits is not None else ""
    return f"{type(v).__name__}(shape={tuple(shape) if shape is not None else None}{extra})"


def _flatten(node: Any, path: tuple, out: dict) -> None:
    if isinstance(node, Mapping):
        if not node:
            out[path] = "empty mapping"
        for k, v in node.items():
            _flatten(v, (*path, k), out)
        return
    out[path] = _leaf_sig(node)


def check_same_tree(model: Any, ref: Any, where: str, ref_name: str) -> None:
    """``ValueError`` naming ``where`` and the first leaf where ``model``'s tree (keys, leaf
    types, shapes, dtypes) differs from ``ref``'s."""
    if not isinstance(model, Mapping):
        raise TypeError(f"{where}: expected a mapping of name -> array, got {type(model).__name__}")
    a: dict = {}
    b: dict = {}
    _flatten(model, (), a)
    _flatten(ref, (), b)
    if a == b:
        return
    for path, sig in b.items():
        name = ".".join(map(str, path))
        if path not in a:
            raise ValueError(f"{where}: key {name!r} is missing (present in {ref_name})")
        if a[path] != sig:
            raise ValueError(
                f"{where}: key {name!r}: expected {sig} (as in {ref_name}), got {a[path]}"
            )
    extra = next(p for p in a if p not in b)
    raise ValueError(
        f"{where}: key {'.'.join(map(str, extra))!r} is unexpected (not in {ref_name})"
    )


def copy_params(p: Any) -> Any:
    """A copy of a parameter set's mappings and arrays (quantized leaves are shared)."""
    if isinstance(p, Mapping):
        return {k: copy_params(v) for k, v in p.items()}
    if isinstance(p, np.ndarray):
        return p.copy()
    return p
