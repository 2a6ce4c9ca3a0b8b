"""The decentralised-training driver: :func:`train_decentralized` runs the model-averaging
recipe of Xu et al., "Collaborative deep learning across multiple data centers" (2018), and
returns a :class:`DecentralizedResult`.

Sites that cannot pool their data each train a copy of the model for several local epochs
with a cyclical learning rate, then the copies are averaged (weighted by site size, as FedAvg
does) and the average is broadcast back.  In-process by default; with ``client=`` a Dask
client, the sites run on the cluster through :mod:`qgemm.distributed`.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from .._validate import check_choice, check_int
from ._tree import _build_spec, _check_weight, _real
from .engine import average
from .reduction import INT_POLICIES

__all__ = ["train_decentralized", "DecentralizedResult"]


@dataclass
class DecentralizedResult:
    """What :func:`train_decentralized` returns.

    Attributes
    ----------
    params : dict
        The final averaged parameter set.
    history : list of dict
        One record per evaluation: ``round`` (0 = the initial parameters), ``epoch`` (epochs
        of local training per site so far), ``lr_start``/``lr_end`` (the schedule at the
        round's start and end), ``seconds`` (wall time of the round) and every metric
        ``evaluate`` returned.
    """

    params: dict
    history: list = field(default_factory=list)

    def metric(self, name: str) -> np.ndarray:
        """The values of one recorded field, one per history record."""
        try:
            return np.array([h[name] for h in self.history])
        except KeyError:
            known = sorted({k for h in self.history for k in h})
            raise KeyError(f"name: no metric {name!r} in the history; recorded: {known}") from None


def _copy_params(p: Any) -> Any:
    if isinstance(p, Mapping):
        return {k: _copy_params(v) for k, v in p.items()}
    if isinstance(p, np.ndarray):
        return p.copy()
    return p  # numpy scalars and quantized types are immutable in practice


def _metrics(evaluate: Callable | None, params: Any) -> dict:
    if evaluate is None:
        return {}
    m = evaluate(params)
    if isinstance(m, Mapping):
        return dict(m)
    if isinstance(m, numbers.Real):
        return {"metric": float(m)}
    raise TypeError(f"evaluate: expected a number or a mapping of metrics, got {type(m).__name__}")


def train_decentralized(
    init_params: Mapping[str, Any],
    sites: Sequence[Callable[..., Mapping[str, Any]]],
    *,
    rounds: int,
    local_epochs: int = 1,
    lr: float | Callable[[float], float],
    site_weights: Sequence[float] | None = None,
    evaluate: Callable[[Any], Any] | None = None,
    int_policy: str = "max",
    client: Any = None,
) -> DecentralizedResult:
    """Decentralised training by model averaging (Xu et al., 2018; FedAvg).

    Each of ``rounds`` rounds: every site trains its own copy of the current parameters for
    ``local_epochs`` epochs on its own data, the copies are averaged with ``site_weights``
    (streaming: one accumulator and one site's model at a time) and the average is
    broadcast as the next round's start.  Framework-agnostic: a site is any callable

        ``site(params, *, epochs, lr) -> new_params``

    that receives a private copy of the parameter set (it may modify it in place) and a
    learning-rate function ``lr(t)`` of its local progress ``t`` in epochs
    (``0 <= t < epochs``; e.g. ``t = epoch + batch / n_batches``).  The driver maps ``t`` to
    global progress ``round * local_epochs + t`` and evaluates the schedule there, so a
    :class:`CyclicalLR` with ``step_size = local_epochs / 2`` completes one cycle per round
    and every site reaches the average at the bottom of a cycle -- the paper's recipe.

    Parameters
    ----------
    init_params : mapping
        The initial parameter set (not modified).
    sites : sequence of callables
        One training callable per site (with ``client``: what
        :func:`qgemm.distributed.train_decentralized` takes, e.g. its ``Site`` descriptions
        that build the site's callable and data on its worker).
    rounds : int
        Averaging rounds (``>= 0``).
    local_epochs : int
        Local epochs per round (``>= 1``).
    lr : float or callable
        A constant rate, or a schedule of the global progress in epochs (float).
    site_weights : sequence of float, optional
        Averaging weights, typically samples per site; default uniform.
    evaluate : callable, optional
        ``evaluate(params) -> float | mapping`` on the averaged parameters, before the first
        round and after every round; recorded in the history.
    int_policy : str
        Integer buffers, as in :func:`average`.
    client : dask.distributed.Client, optional
        ``None`` (default): the sites run in this process, one after the other.  A Dask
        client: the call is handed to :func:`qgemm.distributed.train_decentralized` with the
        same arguments -- each site runs on its own worker, its data stays there, and the
        averaging rounds reduce on the workers.  Dask is imported only then (importing qgemm
        never imports it); install the ``qgemm[distributed]`` extra.

    Returns
    -------
    DecentralizedResult

    Examples
    --------
    >>> import numpy as np
    >>> targets = [np.array([1.0]), np.array([3.0])]     # each site pulls w to its target
    >>> def make_site(t):
    ...     def site(p, *, epochs, lr):
    ...         for e in range(epochs):
    ...             p["w"] -= lr(e) * (p["w"] - t)
    ...         return p
    ...     return site
    >>> res = train_decentralized({"w": np.zeros(1)}, [make_site(t) for t in targets],
    ...                           rounds=3, local_epochs=2, lr=0.5, site_weights=[1, 1],
    ...                           evaluate=lambda p: {"w": float(p["w"][0])})
    >>> res.metric("w")
    array([0.     , 1.5    , 1.875  , 1.96875])
    """
    if client is not None:
        from ..distributed import train_decentralized as distributed_train

        return distributed_train(
            init_params,
            cast(Any, sites),  # qgemm.distributed.Site descriptions
            client=client,
            rounds=rounds,
            local_epochs=local_epochs,
            lr=lr,
            site_weights=site_weights,
            evaluate=evaluate,
            int_policy=int_policy,
        )
    if not isinstance(sites, Sequence) or isinstance(sites, (str, bytes)):
        raise TypeError(f"sites: expected a sequence of callables, got {type(sites).__name__}")
    if len(sites) == 0:
        raise ValueError("sites: expected at least one site, got none")
    for i, s in enumerate(sites):
        if not callable(s):
            raise TypeError(f"sites[{i}]: expected a callable, got {type(s).__name__}")
    rounds = check_int("rounds", rounds, minimum=0)
    local_epochs = check_int("local_epochs", local_epochs, minimum=1)
    check_choice("int_policy", int_policy, INT_POLICIES)
    if callable(lr):
        schedule = lr
    else:
        const = _real("lr", lr, nonneg=True)

        def schedule(t: float) -> float:
            return const

    if site_weights is None:
        ws = [1.0] * len(sites)
    else:
        ws = [_check_weight(w, f"site_weights[{i}]") for i, w in enumerate(site_weights)]
        if len(ws) != len(sites):
            raise ValueError(
                f"site_weights: expected one weight per site ({len(sites)}), got {len(ws)}"
            )
        if not any(ws):
            raise ValueError("site_weights: expected at least one positive weight, got all zeros")
    _build_spec(init_params, "init_params")  # check the structure up front
    params = _copy_params(init_params)
    history = [
        {
            "round": 0,
            "epoch": 0,
            "lr_start": float(schedule(0.0)),
            "lr_end": float(schedule(0.0)),
            "seconds": 0.0,
            **_metrics(evaluate, params),
        }
    ]
    for r in range(rounds):
        t0 = time.perf_counter()
        offset = float(r * local_epochs)

        def lr_round(t: float, offset: float = offset) -> float:
            return float(schedule(offset + t))

        def trained(current: Any = params, lr_round: Callable = lr_round) -> Iterator[Any]:
            for site in sites:
                yield site(_copy_params(current), epochs=local_epochs, lr=lr_round)

        params = average(trained(), ws, int_policy=int_policy)
        seconds = time.perf_counter() - t0
        history.append(
            {
                "round": r + 1,
                "epoch": (r + 1) * local_epochs,
                "lr_start": lr_round(0.0),
                "lr_end": lr_round(float(local_epochs)),
                "seconds": seconds,
                **_metrics(evaluate, params),
            }
        )
    return DecentralizedResult(params=params, history=history)
