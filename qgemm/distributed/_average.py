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
from ._common import RESULT_TIMEOUT, check_weights, get_client, prepare_worker

__all__ = ["average", "average_tree", "WIRES"]


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
) -> Any:
    """One worker's models folded into one partial; ``compact``: rounded for the wire.

    Large float32/float64 leaves of two or more models take one pass over all of them (the
    ``multi`` kernel of :func:`qgemm.average`'s in-memory path with ``total=1``: the same
    float64 operations in the same order as ``init`` + ``add``, so the same sums, read
    once, written once -- straight to float32 when ``compact``); the other leaves fold
    model by model (``Partial`` leaf steps: integer policies, quantized leaves)."""
    prepare_worker()
    red = _reduction()
    ws = [float(w) for w in weights]
    if len(models) == 1:
        acc = red.partial(models[0], ws[0], int_policy=int_policy, where=wheres[0])
        return _compact(acc) if compact else acc
    from ..training.engine import fold_leaf_multi

    acc = red.Partial(int_policy=int_policy, where=wheres[0])
    leaves = [acc._leaves_of(m, where) for m, where in zip(models, wheres, strict=True)]
    pos = [j for j, w in enumerate(ws) if w > 0]
    if not pos:
        return acc  # structure checked, nothing folded in (count 0)
    spec = acc.spec
    assert spec is not None
    totals = np.cumsum([ws[j] for j in pos]).tolist()
    for i, info in enumerate(spec.leaves):
        low = compact and info.dtype == np.float32
        out = fold_leaf_multi(leaves, i, info, pos, ws, 1.0, np.float32 if low else np.float64)
        if out is not None:
            acc.acc[i] = out
            continue
        for idx, j in enumerate(pos):
            acc._leaf_update(i, leaves[j][i], ws[j], totals[idx], idx == 0, wheres[j])
    acc.total_weight, acc.count = totals[-1], len(pos)
    return _compact(acc) if compact else acc


def _combine_into(where: str, a: Any, b: Any) -> Any:
    # in place: ``a`` is an intermediate released once this task has run; a partial that
    # takes ``b``'s sums as its own (``a`` had no weight) must hold float64 sums
    red = _reduction()
    if a.count == 0:
        b = _expand(b)
    elif any(isinstance(st, np.ndarray) and st.dtype == np.float32 for st in a.acc):
        a = _expand(a)
    return red.combine(a, b, where=where, inplace=True)


def _combine(where: str, compact: bool, a: Any, b: Any) -> Any:
    prepare_worker()
    out = _combine_into(where, a, b)
    return _compact(out) if compact else out


def _finish(p: Any) -> dict:
    prepare_worker()
    return _reduction().finish(_expand(p), consume=True)


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


def _shipped(n: int) -> list[bool]:
    """Per node of the pairwise tree over ``n`` groups (the ``n`` folds, then the combines
    in the order :func:`average_tree` makes them): is its result sent to another worker
    (the right input of a combine)?"""
    ids = list(range(n))
    ship = [False] * max(n, 1)
    while len(ids) > 1:
        nxt = []
        for j in range(0, len(ids) - 1, 2):
            ship[ids[j + 1]] = True
            nxt.append(len(ship))
            ship.append(False)
        if len(ids) % 2:
            nxt.append(ids[-1])
        ids = nxt
    return ship


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
    ship = _shipped(len(groups)) if wire == "float32" else None
    node = 0

    def compact() -> bool:
        nonlocal node
        node += 1
        return ship is not None and ship[node - 1]

    level: list[tuple[str, Any, str]] = []
    for addr, idx in groups.items():
        fut = client.submit(
            _fold_finish if finish and len(groups) == 1 else _fold_local,
            [weights[i] for i in idx],
            [wheres[i] for i in idx],
            int_policy,
            compact(),
            *[models[i] for i in idx],
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
            fut = client.submit(
                _combine_finish if finish and last else _combine,
                f"the partial from {label_b}",
                compact(),
                a,
                b,
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
