"""Shared helpers of :mod:`qgemm.distributed`: the client, worker look-up, transfer counters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["get_client", "worker_table", "resolve_worker", "outgoing_bytes", "holder"]

RESULT_TIMEOUT = 300.0
"""Seconds any blocking wait of qgemm.distributed gives the cluster before raising
``TimeoutError`` (never hang on a lost worker)."""


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
