"""Training-side tools of qgemm, one topic per module.

- :mod:`~qgemm.training.engine` -- :func:`average`, the weighted average of parameter sets;
- :mod:`~qgemm.training.reduction` -- the engine-agnostic reduction core it runs on
  (:class:`Partial`, :func:`partial`, :func:`combine`, :func:`finish`), shared with
  :mod:`qgemm.distributed`;
- :mod:`~qgemm.training.running` -- :class:`RunningAverage` (running mean, EMA, variance);
- :mod:`~qgemm.training.schedules` -- :func:`cyclical_lr`, :class:`CyclicalLR`;
- :mod:`~qgemm.training.decentralized` -- :func:`train_decentralized`, the averaging recipe;
- :mod:`~qgemm.training.sparse` -- :func:`rowwise_adagrad`, FBGEMM's rowwise AdaGrad for
  embedding tables;
- ``_tree`` (private) -- parameter-set structure: spec, leaves, gather, rebuild.

The public names are re-exported here, by :mod:`qgemm.averaging` and by :mod:`qgemm`.
"""

from __future__ import annotations

from .decentralized import DecentralizedResult, train_decentralized
from .engine import average
from .reduction import INT_POLICIES, Partial, combine, finish, partial
from .running import RunningAverage
from .schedules import CLR_MODES, CyclicalLR, cyclical_lr
from .sparse import rowwise_adagrad, rowwise_adagrad_state

__all__ = [
    "INT_POLICIES",
    "CLR_MODES",
    "average",
    "RunningAverage",
    "cyclical_lr",
    "CyclicalLR",
    "train_decentralized",
    "DecentralizedResult",
    "Partial",
    "partial",
    "combine",
    "finish",
    "rowwise_adagrad",
    "rowwise_adagrad_state",
]
