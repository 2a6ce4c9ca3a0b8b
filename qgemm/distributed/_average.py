"""Averaging where the models are: a tree of weighted partial sums on the workers.

The arithmetic is the engine-agnostic reduction core of :mod:`qgemm.training.reduction`
(``partial`` -> ``combine`` -> ``finish``); this module only decides *where* each step runs:
every model's partial is made on the worker that holds the model, partials are folded on
their worker first, then combined pairwise across workers (each combine on the worker of its
left input, so only one partial crosses the network per combine), and ``finish`` runs where
the last partial is, fused into the last combine (one task).  The client sees futures only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .._validate import check_choice
from ..averaging import INT_POLICIES
from . import _handoff
from ._common import RESULT_TIMEOUT, check_weights, get_client, prepare_worker

__all__ = ["average", "average_tree", "release_shared_memory", "WIRES"]


def _reduction() -> Any:
    from ..training import reduction

    return reduction


def _register_sizeof() -> None:
    """Teach Dask the size of a :class:`~qgemm.training.reduction.Partial`: without it
    Dask's ``sizeof`` falls back to ``sys.getsizeof`` (56 bytes), so its memory accounting,
    its scheduling and the transfer counters behind ``bytes_moved`` would not see the
    float64 sums.  Registered wherever this module is imported (the client, and every
    worker that runs one of its tasks)."""
    from dask.sizeof import sizeof

    @sizeof.register(_reduction().Partial)
    def _sizeof_partial(p: Any) -> int:
        return int(p.nbytes()) + 256


_register_sizeof()


WIRES = ("float64", "float32")
"""How a partial crosses the network: ``"float64"`` (exact float64 sums) or ``"float32"``
(the sums of float32/float16/quantized leaves rounded to float32: half the bytes)."""


def _compact(p: Any) -> Any:
    """``p`` with the float64 sums of its float32/float16/quantized leaves rounded to
    float32 (in place; float64 leaves and integer state untouched)."""
    for i, info in enumerate(p.spec.leaves):
        st = p.acc[i]
        if (
            info.kind in ("float", "rowwise", "packed")
            and info.dtype != np.float64
            and st is not None
            and st.dtype == np.float64
        ):
            p.acc[i] = st.astype(np.float32)
    return p


def _expand(p: Any) -> Any:
    """Undo :func:`_compact` (float64 sums again), for a partial that is combined into."""
    p.acc = [
        st.astype(np.float64) if isinstance(st, np.ndarray) and st.dtype == np.float32 else st
        for st in p.acc
    ]
    return p


def _fold_local(
    weights: Sequence[float],
    wheres: Sequence[str],
    int_policy: str,
    compact: bool,
    *models: Any,
    handoff: bool = False,
) -> Any:
    """One worker's models folded into one partial; ``compact``: rounded for the wire;
    ``handoff``: its large accumulators written into shared memory for a worker of this
    host (:mod:`._handoff`).

    Large float32/float64 leaves of two or more models take one pass over all of them (the
    ``multi`` kernel of :func:`qgemm.average`'s in-memory path with ``total=1``: the same
    float64 operations in the same order as ``init`` + ``add``, so the same sums, read
    once, written once -- straight to float32 when ``compact``); the other leaves fold
    model by model (``Partial`` leaf steps: integer policies, quantized leaves)."""
    prepare_worker()
    red = _reduction()
    ws = [float(w) for w in weights]
    alloc = _handoff.Allocator() if handoff and _handoff.host_token() else None

    def done(acc: Any) -> Any:
        acc = _compact(acc) if compact else acc
        return _handoff.share_partial(acc, alloc) if handoff else acc

    if len(models) == 1:
        return done(red.partial(models[0], ws[0], int_policy=int_policy, where=wheres[0]))
    from ..training.engine import fold_leaf_multi

    acc = red.Partial(int_policy=int_policy, where=wheres[0])
    leaves = [acc._leaves_of(m, where) for m, where in zip(models, wheres, strict=True)]
    pos = [j for j, w in enumerate(ws) if w > 0]
    if not pos:
        return done(acc)  # structure checked, nothing folded in (count 0)
    spec = acc.spec
    assert spec is not None
    totals = np.cumsum([ws[j] for j in pos]).tolist()
    for i, info in enumerate(spec.leaves):
        low = compact and info.dtype == np.float32
        out = fold_leaf_multi(
            leaves, i, info, pos, ws, 1.0, np.float32 if low else np.float64, alloc
        )
        if out is not None:
            acc.acc[i] = out
            continue
        for idx, j in enumerate(pos):
            acc._leaf_update(i, leaves[j][i], ws[j], totals[idx], idx == 0, wheres[j])
    acc.total_weight, acc.count = totals[-1], len(pos)
    return done(acc)


def _combine_into(where: str, a: Any, b: Any) -> Any:
    # in place: ``a`` is an intermediate released once this task has run; a partial that
    # takes ``b``'s sums as its own (``a`` had no weight: ``combine`` copies them) must hold
    # float64 sums
    red = _reduction()
    b, check = _handoff.open_partial(b)  # (only right inputs are ever handed off)
    if a.count == 0:
        b = _expand(b)
    elif any(isinstance(st, np.ndarray) and st.dtype == np.float32 for st in a.acc):
        a = _expand(a)
    out = red.combine(a, b, where=where, inplace=True)
    check(where)  # b's shared memory still b's after reading it
    return out


def _combine(where: str, compact: bool, a: Any, b: Any, handoff: bool = False) -> Any:
    prepare_worker()
    out = _combine_into(where, a, b)
    out = _compact(out) if compact else out
    return _handoff.share_partial(out) if handoff else out


def _finish(p: Any) -> dict:
    prepare_worker()
    p, check = _handoff.open_partial(p)
    out = _reduction().finish(_expand(p), consume=True)
    check("the partial")
    return out


def _combine_finish(where: str, compact: bool, a: Any, b: Any) -> dict:
    """The last combine and ``finish`` in one task: one scheduler round trip fewer, and the
    combined partial never stored as a task result of its own."""
    prepare_worker()
    return _reduction().finish(_combine_into(where, a, b), consume=True)


def _fold_finish(
    weights: Sequence[float], wheres: Sequence[str], int_policy: str, compact: bool, *models: Any
) -> dict:
    """Every model on one worker: fold and ``finish`` in one task."""
    p = _fold_local(weights, wheres, int_policy, False, *models)
    return _reduction().finish(p, consume=True)


def _receivers(addrs: Sequence[str]) -> list[str | None]:
    """Per node of the pairwise tree over groups on workers ``addrs`` (the folds, then the
    combines in the order :func:`average_tree` makes them): the worker its result is sent
    to (the left input's, for the right input of a combine), or None (kept where it is)."""
    ids = list(range(len(addrs)))
    where = list(addrs)
    recv: list[str | None] = [None] * max(len(addrs), 1)
    while len(ids) > 1:
        nxt = []
        for j in range(0, len(ids) - 1, 2):
            recv[ids[j + 1]] = where[ids[j]]
            nxt.append(len(recv))
            recv.append(None)
            where.append(where[ids[j]])
        if len(ids) % 2:
            nxt.append(ids[-1])
        ids = nxt
    return recv


_TOKENS: dict[tuple, dict[str, Any]] = {}  # (scheduler, workers) -> worker -> host token


def _host_tokens(client: Any, addrs: Sequence[str]) -> dict[str, Any]:
    """``worker -> host token`` (:func:`._handoff.host_token`), asked once per set of
    workers of a scheduler."""
    key = (str(getattr(client.scheduler, "address", "")), tuple(sorted(addrs)))
    got = _TOKENS.get(key)
    if got is None:
        got = client.run(_handoff.host_token, workers=list(addrs))
        if len(_TOKENS) >= 64:
            _TOKENS.clear()
        _TOKENS[key] = got
    return got


def average_tree(
    client: Any,
    models: Sequence[Any],
    weights: Sequence[float],
    wheres: Sequence[str],
    int_policy: str,
    *,
    finish: bool = False,
    wire: str = "float64",
) -> Any:
    """``(address, future)``: the partial of ``models`` (futures) reduced where they live,
    or with ``finish`` the averaged parameter set (the last step fused with ``finish``).

    Every task is submitted at once (the whole tree is one graph: no client round trip
    between levels).  ``wire="float32"``: every partial that crosses the network is
    rounded first (:data:`WIRES`)."""
    from distributed import wait

    if not all(f.done() for f in models):
        wait(list(models), timeout=RESULT_TIMEOUT)
    who = client.who_has(list(models))
    groups: dict[str, list[int]] = {}
    for i, f in enumerate(models):
        if f.status == "error":
            f.result(timeout=RESULT_TIMEOUT)  # re-raises the model's own error
        addrs = sorted(who.get(f.key, ()))
        if not addrs:
            raise ValueError(f"{wheres[i]}: the model's data is on no worker (lost or released)")
        groups.setdefault(addrs[0], []).append(i)
    recv = _receivers(list(groups))
    tokens = _host_tokens(client, list(groups)) if len(groups) > 1 else {}
    node = 0

    def plan(addr: str) -> tuple[bool, bool]:
        """(compact, handoff) of the next node, on worker ``addr``: rounded for the wire
        if it is sent and the wire is float32; through shared memory if it is sent to a
        worker of the same host."""
        nonlocal node
        to = recv[node]
        node += 1
        if to is None:
            return False, False
        same_host = tokens.get(addr) is not None and tokens.get(addr) == tokens.get(to)
        return wire == "float32", same_host

    level: list[tuple[str, Any, str]] = []
    for addr, idx in groups.items():
        compact, handoff = plan(addr)
        fut = client.submit(
            _fold_finish if finish and len(groups) == 1 else _fold_local,
            [weights[i] for i in idx],
            [wheres[i] for i in idx],
            int_policy,
            compact,
            *[models[i] for i in idx],
            **({"handoff": True} if handoff else {}),
            workers=[addr],
            allow_other_workers=False,
            pure=False,
        )
        level.append((addr, fut, wheres[idx[0]]))
    while len(level) > 1:  # pairwise tree across workers; intermediates dropped when consumed
        nxt: list[tuple[str, Any, str]] = []
        for j in range(0, len(level) - 1, 2):
            (addr_a, a, label_a), (_, b, label_b) = level[j], level[j + 1]
            last = len(level) == 2
            compact, handoff = plan(addr_a)
            fut = client.submit(
                _combine_finish if finish and last else _combine,
                f"the partial from {label_b}",
                compact,
                a,
                b,
                **({"handoff": True} if handoff else {}),
                workers=[addr_a],
                allow_other_workers=False,
                pure=False,
            )
            nxt.append((addr_a, fut, label_a))
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0][0], level[0][1]


def average(
    models: Sequence[Any],
    weights: Sequence[float] | None = None,
    *,
    client: Any = None,
    int_policy: str = "max",
    wire: str = "float64",
) -> Any:
    """Weighted average of parameter sets that live on Dask workers, computed there.

    Parameters
    ----------
    models : sequence of distributed.Future
        Futures of parameter sets (the trees :func:`qgemm.average` takes: nested dicts of
        arrays, rowwise-quantized tables, packed weights), on any workers.
    weights : sequence of float, optional
        One non-negative weight per model; default uniform.
    client : distributed.Client, optional
        Default: the futures' client.
    int_policy : {"max", "first", "sum", "round"}
        Integer buffers, as in :func:`qgemm.average`.
    wire : {"float64", "float32"}
        How a partial crosses the network.  ``"float64"`` (default): the exact float64 sums
        (8 bytes per parameter).  ``"float32"``: the sums of float32, float16 and quantized
        leaves are rounded to float32 before they leave their worker (4 bytes per
        parameter: half the transfer, which dominates the reduction's time); float64
        leaves and integers are unchanged.  Each rounding adds at most ``2**-24`` times
        the weighted sum of ``|x|`` of the models in that partial, divided by the total
        weight, to a leaf's error (results may then differ from ``qgemm.average`` by an
        ulp or so).

    Returns
    -------
    distributed.Future
        A future of the averaged parameter set, on the worker of the last combine;
        ``.result()`` brings it to the client.  Equal to ``qgemm.average`` of the same models
        within float64 rounding (integers exact).

    Notes
    -----
    Each model's partial (float64 sums + total weight) is made on the worker holding the
    model and folded with that worker's other models; per-worker partials are combined
    pairwise, each combine on the worker of its left input.  No model goes to the client,
    and the intermediate partials are released as soon as they are consumed.
    """
    from distributed import Future

    check_choice("int_policy", int_policy, INT_POLICIES)
    check_choice("wire", wire, WIRES)
    if not isinstance(models, Sequence) or isinstance(models, (str, bytes)):
        raise TypeError(f"models: expected a sequence of futures, got {type(models).__name__}")
    if len(models) == 0:
        raise ValueError("models: expected at least one future, got none")
    for i, f in enumerate(models):
        if not isinstance(f, Future):
            raise TypeError(
                f"models[{i}]: expected a distributed.Future (scatter the model first), "
                f"got {type(f).__name__}"
            )
    ws = check_weights(weights, len(models))
    client = get_client(client, models)
    _, fut = average_tree(
        client,
        list(models),
        ws,
        [f"models[{i}]" for i in range(len(models))],
        int_policy,
        finish=True,
        wire=wire,
    )
    return fut


def release_shared_memory(client: Any = None) -> dict[str, int]:
    """Let go of the shared memory :func:`average` keeps on the workers for the next
    reduction of the same size (a producer's segments, a consumer's mappings of them; see
    :mod:`qgemm.distributed._handoff`); returns ``worker -> bytes unlinked``."""
    client = get_client(client)
    return client.run(_handoff.release_pool)
