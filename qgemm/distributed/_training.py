"""Decentralised training with data locality: every site pinned to its worker.

A :class:`Site` names a *factory* that runs on the site's worker and returns the site's
training callable (``site(params, *, epochs, lr) -> params``, as in
:func:`qgemm.train_decentralized`) with the site's data inside it: the data is made or loaded
on the worker and stays there for the whole run.  Only parameter sets travel: the current
average to every site, each site's trained model into the averaging tree of
:func:`qgemm.distributed.average`.
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .._validate import check_choice, check_int
from ..averaging import INT_POLICIES, DecentralizedResult
from ._average import _finish, average_tree
from ._common import (
    RESULT_TIMEOUT,
    check_same_tree,
    copy_params,
    counter_delta,
    get_client,
    outgoing_bytes,
    resolve_worker,
    worker_table,
)

__all__ = ["Site", "SiteLostWarning", "train_decentralized"]

_POLL = 0.05  # seconds between checks of a round's futures and the workers' liveness


class SiteLostWarning(RuntimeWarning):
    """A site's worker died during a round: the site was left out of that round's average."""


@dataclass(frozen=True)
class Site:
    """One data centre of :func:`train_decentralized`.

    Parameters
    ----------
    factory : callable
        ``factory() -> site`` runs on the site's worker and returns its training callable
        ``site(params, *, epochs, lr) -> params`` (holding the site's data).  It must be
        picklable (a module-level function or a ``functools.partial`` of one).
    worker : str, optional
        The worker's name or address; the site runs only there.
    resources : mapping, optional
        Dask resources the site's worker must have (e.g. ``{"dc-eu": 1}``), instead of a
        named worker.  With neither, the scheduler picks a worker and the site stays on it.
    weight : float, optional
        Averaging weight (default: ``site_weights``, else 1).
    name : str, optional
        Label in the history and in warnings (default ``"sites[i]"``).
    """

    factory: Callable[[], Callable[..., Mapping[str, Any]]]
    worker: str | None = None
    resources: Mapping[str, float] | None = None
    weight: float | None = None
    name: str | None = None


def _make_site(factory: Callable) -> Any:
    site = factory()
    if not callable(site):
        raise TypeError(
            f"site factory: expected it to return a callable, got {type(site).__name__}"
        )
    return site


def _site_nbytes(site: Any) -> int:
    """Bytes of a site's state as Dask sizes it (its data and whatever the callable holds)."""
    from dask.sizeof import sizeof

    n = int(sizeof(site))
    for cell in getattr(site, "__closure__", None) or ():
        try:
            n += int(sizeof(cell.cell_contents))
        except ValueError:  # empty cell
            pass
    for v in (getattr(site, "__dict__", None) or {}).values():
        n += int(sizeof(v))
    for v in getattr(site, "args", ()) or ():  # functools.partial
        n += int(sizeof(v))
    return n


def _train(site: Any, params: Any, epochs: int, lr: Callable, where: str) -> Any:
    """A site's local epochs on its worker; the result is checked against the input's tree
    so that a mismatch names the site and the leaf."""
    new = site(copy_params(params), epochs=epochs, lr=lr)
    check_same_tree(new, params, where, "the broadcast parameters")
    return new


def _evaluate(evaluate: Callable | None, params: Any) -> dict:
    if evaluate is None:
        return {}
    m = evaluate(params)
    if isinstance(m, Mapping):
        return dict(m)
    if isinstance(m, numbers.Real):
        return {"metric": float(m)}
    raise TypeError(f"evaluate: expected a number or a mapping of metrics, got {type(m).__name__}")


def _real(name: str, v: Any, *, positive: bool = False, nonneg: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v) or (positive and v <= 0) or (nonneg and v < 0):
        need = "positive" if positive else "non-negative" if nonneg else "finite"
        raise ValueError(f"{name}: expected a {need} finite number, got {v}")
    return v


def _check_weight(w: Any, where: str) -> float:
    return _real(where, w, nonneg=True)


class _Placed:
    """Client-side record of one site: where it runs and the future of its state."""

    def __init__(self, i: int, site: Site, weight: float):
        self.i = i
        self.site = site
        self.weight = weight
        self.label = site.name or f"sites[{i}]"
        self.addr: str | None = None
        self.state: Any = None
        self.nbytes = 0

    def place(self, client: Any, table: Mapping) -> bool:
        """(Re)create the site's state on its worker; False when its worker is gone."""
        if not self.submit(client, table):
            return False
        self.settle(client)
        return True

    def submit(self, client: Any, table: Mapping) -> bool:
        """Start (re)creating the site's state on its worker (without waiting: sites are
        made concurrently, each worker importing qgemm at the same time); False when its
        worker is gone."""
        s = self.site
        kw: dict[str, Any] = {"pure": False}
        if s.worker is not None:
            try:
                self.addr = resolve_worker(client, s.worker, self.label, table)
            except ValueError:
                if self.state is None:
                    raise
                return False
            kw.update(workers=[self.addr], allow_other_workers=False)
        elif s.resources is not None:
            kw.update(resources=dict(s.resources))
        self.state = client.submit(_make_site, s.factory, **kw)
        return True

    def settle(self, client: Any) -> None:
        """Wait for the state made by :meth:`submit`; record its worker and its bytes."""
        self.state.result(timeout=RESULT_TIMEOUT)  # factory errors surface here
        who = client.who_has([self.state]).get(self.state.key, ())
        self.addr = sorted(who)[0]
        self.nbytes = int(
            client.submit(_site_nbytes, self.state, workers=[self.addr], pure=False).result(
                timeout=RESULT_TIMEOUT
            )
        )


def _check_sites(sites: Any, site_weights: Any) -> list[_Placed]:
    if not isinstance(sites, Sequence) or isinstance(sites, (str, bytes)):
        raise TypeError(f"sites: expected a sequence of Site, got {type(sites).__name__}")
    if len(sites) == 0:
        raise ValueError("sites: expected at least one site, got none")
    if site_weights is not None and len(site_weights) != len(sites):
        raise ValueError(
            f"site_weights: expected one weight per site ({len(sites)}), got {len(site_weights)}"
        )
    out = []
    for i, s in enumerate(sites):
        if not isinstance(s, Site):
            if callable(s):  # a bare factory: the scheduler places it
                s = Site(s)
            else:
                raise TypeError(f"sites[{i}]: expected a Site, got {type(s).__name__}")
        if not callable(s.factory):
            raise TypeError(
                f"sites[{i}].factory: expected a callable, got {type(s.factory).__name__}"
            )
        if s.worker is not None and s.resources is not None:
            raise ValueError(f"sites[{i}]: give worker or resources, not both")
        if site_weights is not None:
            w = _check_weight(site_weights[i], f"site_weights[{i}]")
        elif s.weight is not None:
            w = _check_weight(s.weight, f"sites[{i}].weight")
        else:
            w = 1.0
        out.append(_Placed(i, s, w))
    if not any(p.weight for p in out):
        raise ValueError("site_weights: expected at least one positive weight, got all zeros")
    return out


def _run_round(
    client: Any,
    placed: list[_Placed],
    params_f: Any,
    epochs: int,
    lr_round: Callable,
    timeout: float,
) -> tuple[list[tuple[_Placed, Any]], list]:
    """Submit every live site's local training and wait; a site whose worker disappears is
    dropped (its future cancelled).  Returns (site, trained future) pairs and the dropped."""
    futs = []
    dropped = []
    alive = worker_table(client)
    for p in placed:
        if p.addr not in alive or p.state is None:
            dropped.append(p)
            continue
        f = client.submit(
            _train,
            p.state,
            params_f,
            epochs,
            lr_round,
            p.label,
            workers=[p.addr],
            allow_other_workers=False,
            pure=False,
        )
        futs.append((p, f))
    deadline = time.monotonic() + timeout
    pending = list(futs)
    while pending:
        alive = worker_table(client)
        still = []
        for p, f in pending:
            if f.status == "finished":
                continue
            if f.status == "error":
                exc = f.exception(timeout=RESULT_TIMEOUT)
                if type(exc).__name__ == "KilledWorker" or p.addr not in alive:
                    dropped.append(p)
                    continue
                f.result(timeout=RESULT_TIMEOUT)  # the site's own error: raise it
            if p.addr not in alive:
                f.cancel()
                dropped.append(p)
                continue
            still.append((p, f))
        pending = still
        if pending:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"round did not finish within {timeout} s: waiting for "
                    f"{', '.join(p.label for p, _ in pending)}"
                )
            time.sleep(_POLL)
    lost = {p.i for p in dropped}
    return [(p, f) for p, f in futs if p.i not in lost], dropped


def train_decentralized(
    init_params: Mapping[str, Any],
    sites: Sequence[Site],
    *,
    client: Any = None,
    rounds: int,
    local_epochs: int = 1,
    lr: float | Callable[[float], float],
    site_weights: Sequence[float] | None = None,
    evaluate: Callable[[Any], Any] | None = None,
    int_policy: str = "max",
    round_timeout: float = RESULT_TIMEOUT,
    rejoin_timeout: float = 10.0,
) -> DecentralizedResult:
    """:func:`qgemm.train_decentralized` on a Dask cluster, each site on its own worker.

    Same rounds, learning-rate mapping, weights and integer policy as the in-process driver
    (and the same results, within float64 rounding of the averaging tree).  Each site's
    :class:`Site` factory runs once on its worker and keeps the site's data there; every
    round, the current average goes to each site, the trained models are averaged where they
    are (:func:`qgemm.distributed.average`) and ``evaluate`` runs on the worker holding the
    average (only the metrics come back).  Only the final parameters come to the client.

    A site whose worker dies during a round is dropped from that round with a
    :class:`SiteLostWarning` and the average is over the surviving sites' weights; in later
    rounds the site is re-created from its factory if a worker of the same name is back
    (a nanny restarts it), else it stays out.

    Returns
    -------
    DecentralizedResult
        As the in-process driver's; each round's history record also has ``sites`` (labels
        of the sites averaged), ``dropped`` (sites lost that round), ``bytes_moved`` (bytes
        workers sent that round: Dask's transfer counters) and ``data_bytes`` (bytes of site
        state kept on the workers).

    Raises
    ------
    ValueError
        A site naming a worker not in the cluster; trained models whose trees differ (the
        message names the site and the leaf); every site lost in a round.
    """
    sites_p = _check_sites(sites, site_weights)
    rounds = check_int("rounds", rounds, minimum=0)
    local_epochs = check_int("local_epochs", local_epochs, minimum=1)
    check_choice("int_policy", int_policy, INT_POLICIES)
    round_timeout = _real("round_timeout", round_timeout, positive=True)
    rejoin_timeout = _real("rejoin_timeout", rejoin_timeout, nonneg=True)
    if callable(lr):
        schedule = lr
    else:
        schedule = _Const(_real("lr", lr, nonneg=True))
    if not isinstance(init_params, Mapping):
        raise TypeError(
            f"init_params: expected a mapping of name -> array, got {type(init_params).__name__}"
        )
    client = get_client(client)
    table = worker_table(client)
    for p in sites_p:  # resolve every named worker before anything runs
        if p.site.worker is not None:
            resolve_worker(client, p.site.worker, p.label, table)
    for p in sites_p:  # every site's state made at once (workers import qgemm in parallel)
        p.submit(client, table)
    for p in sites_p:
        p.settle(client)
    params_f = client.scatter([copy_params(init_params)], hash=False)[0]
    history = [
        {
            "round": 0,
            "epoch": 0,
            "lr_start": float(schedule(0.0)),
            "lr_end": float(schedule(0.0)),
            "seconds": 0.0,
            **client.submit(_evaluate, evaluate, params_f, pure=False).result(
                timeout=RESULT_TIMEOUT
            ),
        }
    ]
    for r in range(rounds):
        t0 = time.perf_counter()
        before = outgoing_bytes(client)
        offset = float(r * local_epochs)
        lr_round = _Shifted(schedule, offset)
        if r:  # re-create sites lost earlier whose worker (same name) is back
            _replace_lost(client, sites_p, rejoin_timeout)
        trained, dropped = _run_round(
            client, sites_p, params_f, local_epochs, lr_round, round_timeout
        )
        for p in dropped:
            warnings.warn(
                f"{p.label}: its worker {p.addr} died during round {r + 1}; the site "
                f"is left out of this round's average",
                SiteLostWarning,
                stacklevel=2,
            )
            p.state = None
        if not trained:
            raise ValueError(f"round {r + 1}: every site was lost; nothing to average")
        addr, part = average_tree(
            client,
            [f for _, f in trained],
            [p.weight for p, _ in trained],
            [p.label for p, _ in trained],
            int_policy,
        )
        if not any(p.weight for p, _ in trained):
            raise ValueError(f"round {r + 1}: the surviving sites all have weight 0")
        new_f = client.submit(_finish, part, workers=[addr], allow_other_workers=False, pure=False)
        del part, trained
        homes = sorted({p.addr for p in sites_p if p.state is not None and p.addr} - {addr})
        if homes:  # broadcast now: the next round's start survives the loss of one worker
            client.replicate([new_f], workers=homes + [addr])
        metrics = client.submit(_evaluate, evaluate, new_f, workers=[addr], pure=False).result(
            timeout=RESULT_TIMEOUT
        )
        params_f = new_f
        seconds = time.perf_counter() - t0
        lost = {p.i for p in dropped}
        history.append(
            {
                "round": r + 1,
                "epoch": (r + 1) * local_epochs,
                "lr_start": lr_round(0.0),
                "lr_end": lr_round(float(local_epochs)),
                "seconds": seconds,
                "sites": [p.label for p in sites_p if p.i not in lost and p.state is not None],
                "dropped": [p.label for p in dropped],
                "bytes_moved": counter_delta(before, outgoing_bytes(client)),
                "data_bytes": sum(p.nbytes for p in sites_p if p.state is not None),
                **metrics,
            }
        )
    params = params_f.result(timeout=RESULT_TIMEOUT)
    if params is init_params or rounds == 0:
        params = copy_params(params)
    return DecentralizedResult(params=params, history=history)


def _replace_lost(client: Any, sites_p: list[_Placed], rejoin_timeout: float) -> None:
    """Re-create from its factory each site whose worker is gone, once a worker of the same
    name is back (a nanny restarts a dead worker under its name); wait up to
    ``rejoin_timeout`` seconds for sites lost in the previous round."""
    lost = [p for p in sites_p if p.state is None or p.addr not in worker_table(client)]
    if not lost:
        return
    deadline = time.monotonic() + rejoin_timeout
    while True:
        table = worker_table(client)
        for p in list(lost):
            if p.site.worker is None or _named(table, p.site.worker):
                p.state = None
                if p.place(client, table):
                    lost.remove(p)
        if not lost or time.monotonic() > deadline:
            return
        time.sleep(_POLL * 4)


def _named(table: Mapping, worker: Any) -> bool:
    return worker in table or any(str(i.get("name")) == str(worker) for i in table.values())


class _Const:
    """A constant learning rate as a picklable schedule."""

    def __init__(self, value: float):
        self.value = value

    def __call__(self, t: float) -> float:
        return self.value


class _Shifted:
    """``schedule(offset + t)``: a round's local clock mapped to global progress."""

    def __init__(self, schedule: Callable, offset: float):
        self.schedule = schedule
        self.offset = offset

    def __call__(self, t: float) -> float:
        return float(self.schedule(self.offset + t))
