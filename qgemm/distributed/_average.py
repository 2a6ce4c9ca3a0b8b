"""Averaging where the models are: a tree of weighted partial sums on the workers.

The arithmetic is the engine-agnostic reduction core of :mod:`qgemm.training.reduction`
(``partial`` -> ``combine`` -> ``finish``); this module only decides *where* each step runs:
every model's partial is made on the worker that holds the model, partials are folded on
their worker first, then combined pairwise across workers (each combine on the worker of its
left input, so only one partial crosses the network per combine), and ``finish`` runs where
the last partial is.  The client sees futures only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._validate import check_choice
from ..averaging import INT_POLICIES
from ._common import RESULT_TIMEOUT, check_weights, get_client

__all__ = ["average", "average_tree"]


def _reduction() -> Any:
    from ..training import reduction

    return reduction


def _fold_local(
    weights: Sequence[float], wheres: Sequence[str], int_policy: str, *models: Any
) -> Any:
    """One worker's models folded into one partial (``Partial.fold``: one float64
    accumulator, no temporary partial per model)."""
    red = _reduction()
    acc = red.partial(models[0], weights[0], int_policy=int_policy, where=wheres[0])
    for w, where, m in zip(weights[1:], wheres[1:], models[1:], strict=True):
        acc.fold(m, w, where=where)
    return acc


def _combine(where: str, a: Any, b: Any) -> Any:
    # in place: ``a`` is an intermediate released once this task has run
    return _reduction().combine(a, b, where=where, inplace=True)


def _finish(p: Any) -> dict:
    return _reduction().finish(p, consume=True)


def average_tree(
    client: Any,
    models: Sequence[Any],
    weights: Sequence[float],
    wheres: Sequence[str],
    int_policy: str,
) -> Any:
    """The partial of ``models`` (futures) as a future, reduced where they live."""
    from distributed import wait

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
    level: list[tuple[str, Any, str]] = []
    for addr, idx in groups.items():
        fut = client.submit(
            _fold_local,
            [weights[i] for i in idx],
            [wheres[i] for i in idx],
            int_policy,
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
            fut = client.submit(
                _combine,
                f"the partial from {label_b}",
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
    addr, fut = average_tree(
        client, list(models), ws, [f"models[{i}]" for i in range(len(models))], int_policy
    )
    return client.submit(_finish, fut, workers=[addr], allow_other_workers=False, pure=False)
