"""Learning-rate schedules for local training: Smith's cyclical learning rate
(:func:`cyclical_lr`, :class:`CyclicalLR`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._validate import check_choice
from ._tree import _real

__all__ = ["CLR_MODES", "cyclical_lr", "CyclicalLR"]

CLR_MODES = ("triangular", "triangular2", "exp_range")
"""Cyclical learning-rate policies (Smith, 2017)."""


def cyclical_lr(
    step: Any,
    *,
    base_lr: float,
    max_lr: float,
    step_size: float,
    mode: str = "triangular",
    gamma: float = 1.0,
    step_size_down: float | None = None,
) -> Any:
    """Cyclical learning rate at ``step`` (Smith, "Cyclical Learning Rates for Training
    Neural Networks", 2017).

    The rate rises linearly from ``base_lr`` to ``max_lr`` over ``step_size`` steps and falls
    back over ``step_size_down`` (default ``step_size``) steps, forever.  ``mode`` scales the
    amplitude: ``"triangular"`` keeps it, ``"triangular2"`` halves it every cycle,
    ``"exp_range"`` multiplies it by ``gamma**step``.  With ``step_size_down=None`` this is
    Smith's ``cycle = floor(1 + step / (2 step_size))``, ``x = |step / step_size - 2 cycle +
    1|``, ``lr = base_lr + (max_lr - base_lr) max(0, 1 - x) scale``; the values equal
    ``torch.optim.lr_scheduler.CyclicLR``'s (whose ``last_epoch`` is ``step``).

    Parameters
    ----------
    step : float or array_like
        Step (iteration) number(s), ``>= 0``; fractional steps are allowed (e.g. progress in
        epochs, with ``step_size`` in epochs).
    base_lr, max_lr : float
        The bounds of the cycle, ``>= 0``.
    step_size, step_size_down : float
        Half-cycle lengths in steps, ``> 0``.
    mode : {"triangular", "triangular2", "exp_range"}
    gamma : float
        ``exp_range``'s decay per step, ``> 0``.

    Returns
    -------
    float or ndarray
        A float for a scalar ``step``, else a float64 array of ``step``'s shape.

    Examples
    --------
    >>> [cyclical_lr(s, base_lr=0.1, max_lr=1.0, step_size=2) for s in range(5)]
    [0.1, 0.55, 1.0, 0.55, 0.1]
    >>> cyclical_lr(5, base_lr=0.0, max_lr=1.0, step_size=1, mode="triangular2")
    0.25
    """
    base_lr = _real("base_lr", base_lr, nonneg=True)
    max_lr = _real("max_lr", max_lr, nonneg=True)
    up = _real("step_size", step_size, positive=True)
    down = up if step_size_down is None else _real("step_size_down", step_size_down, positive=True)
    check_choice("mode", mode, CLR_MODES)
    gamma = _real("gamma", gamma, positive=True)
    scalar = np.ndim(step) == 0
    if scalar:
        s = np.asarray(_real("step", step, nonneg=True), np.float64)
    else:
        s = np.asarray(step)
        if s.dtype.kind not in "iuf":
            raise TypeError(f"step: expected real numbers, got dtype {s.dtype}")
        s = s.astype(np.float64)
        if not np.isfinite(s).all() or (s < 0).any():
            raise ValueError("step: expected finite, non-negative steps")
    total = up + down
    ratio = up / total
    cycle = np.floor(1.0 + s / total)
    x = 1.0 + s / total - cycle
    # x in [0, 1) is the position in the cycle; for step_size_down == step_size,
    # 1 - |2x - 1| is Smith's max(0, 1 - |step/step_size - 2 cycle + 1|).  torch's arithmetic.
    factor = np.where(x <= ratio, x / ratio, (x - 1.0) / (ratio - 1.0))
    term = (max_lr - base_lr) * factor
    if mode != "triangular":
        # The amplitude's decay, without overflow: 0.5**k is 1 / 2**k exactly (both are
        # powers of two) but never overflows -- past cycle 1075 it underflows to 0, the limit
        # 1 / 2**k had reached through inf.  gamma**step may overflow (gamma > 1): its limit
        # inf, times a zero term (the bottom of a cycle, or max_lr == base_lr) is 0, not nan.
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            if mode == "triangular2":
                scale = np.power(0.5, cycle - 1.0)
            else:
                scale = np.power(gamma, s)
            term = np.where(term == 0.0, 0.0, term * scale)
    lr = base_lr + term
    return float(lr) if scalar else lr


@dataclass(frozen=True)
class CyclicalLR:
    """The cyclical learning rate as a schedule object: call it with a step, or iterate it
    for the rates of steps 0, 1, 2, ... (endless).  Arguments as in :func:`cyclical_lr`.

    Examples
    --------
    >>> from itertools import islice
    >>> clr = CyclicalLR(base_lr=0.0, max_lr=1.0, step_size=2)
    >>> list(islice(clr, 6))
    [0.0, 0.5, 1.0, 0.5, 0.0, 0.5]
    >>> clr(1.5), clr.cycle_length
    (0.75, 4.0)
    """

    base_lr: float
    max_lr: float
    step_size: float
    mode: str = "triangular"
    gamma: float = 1.0
    step_size_down: float | None = None

    def __post_init__(self) -> None:
        self(0)  # validate every argument now

    def __call__(self, step: Any) -> Any:
        return cyclical_lr(
            step,
            base_lr=self.base_lr,
            max_lr=self.max_lr,
            step_size=self.step_size,
            mode=self.mode,
            gamma=self.gamma,
            step_size_down=self.step_size_down,
        )

    def __iter__(self) -> Iterator[float]:
        step = 0
        while True:
            yield self(step)
            step += 1

    @property
    def cycle_length(self) -> float:
        """Steps per cycle (``step_size + step_size_down``)."""
        down = self.step_size if self.step_size_down is None else self.step_size_down
        return float(self.step_size) + float(down)
