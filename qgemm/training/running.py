"""Running averages of parameter sets: :class:`RunningAverage` (weighted running mean or
exponential moving average, optionally with the per-element variance, SWA-style).

The state is a :class:`~qgemm.training.reduction.Partial` whose float steps are a mean or an
EMA instead of a weighted sum when ``decay`` or ``track_variance`` asks for it; without them
it *is* the reduction core's weighted sum, so :attr:`RunningAverage.value` equals
:func:`qgemm.average` of the same updates bit for bit.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

from .._config import sync_threads
from .._kernels import averaging as _k
from .._validate import check_choice
from ._tree import _check_weight, _finish_float, _LeafInfo, _prune, _rebuild
from .reduction import INT_POLICIES, Partial

__all__ = ["RunningAverage"]


class _State(Partial):
    """A :class:`Partial` that can also keep a running mean or EMA (and a second moment).
    ``fold`` validates everything (and computes integer updates) before it mutates anything,
    so a rejected update leaves the state unchanged."""

    def __init__(self, *, int_policy: str, decay: float | None, track_variance: bool):
        super().__init__(int_policy=int_policy, where="params")
        self.decay = decay
        self.track_variance = track_variance
        self.b: list = []  # per leaf: second moment (float64) when tracking variance

    def _alloc(self, n: int) -> None:
        self.acc = [None] * n
        self.b = [None] * n

    def _plain(self) -> bool:
        return self.decay is None and not self.track_variance

    def _float_step(self, i: int, x: np.ndarray, w: float, total: float, first: bool) -> None:
        if self._plain():  # weighted sum
            super()._float_step(i, x, w, total, first)
            return
        if first:  # mean / EMA initialised to the first value, exactly
            self.acc[i] = np.empty(x.size, np.float64)
            _k.run("init", x, 1.0, self.acc[i])
            if self.track_variance:
                self.b[i] = np.zeros(x.size, np.float64)
            return
        if self.decay is None:
            _k.run("welford", x, w, total, self.acc[i], self.b[i])
        elif self.track_variance:
            _k.run("ema_var", x, self._alpha(w), self.acc[i], self.b[i])
        else:
            _k.run("ema", x, self._alpha(w), self.acc[i])

    def _alpha(self, w: float) -> float:
        # A weight-w update is w unit updates with the same value: e <- e + (1 - d**w)(x - e).
        assert self.decay is not None
        return 1.0 - self.decay**w

    def _round_step(self, st: Any, xf: np.ndarray, w: float, first: bool) -> np.ndarray:
        if self.decay is None:  # weighted sum, divided at read-out
            return super()._round_step(st, xf, w, first)
        return xf if first else st + self._alpha(w) * (xf - st)

    def _mean_divisor(self) -> float:
        # weighted sums are divided by the total weight; means and EMAs are already means
        return self.total_weight if self._plain() else 1.0

    def _round_divisor(self) -> float:
        return self.total_weight if self.decay is None else 1.0

    def value(self) -> Any:
        if self.count == 0:
            raise ValueError(
                "no parameters averaged yet: every weight so far was zero"
                if self.spec is not None
                else "no parameters averaged yet: call update() first"
            )
        return self._value()

    def variance(self) -> Any:
        if not self.track_variance:
            raise ValueError("variance: construct RunningAverage(track_variance=True) to track it")
        if self.count == 0:
            raise ValueError("no parameters averaged yet: call update() first")
        spec = self.spec
        assert spec is not None
        sync_threads()
        div = self.total_weight if self.decay is None else 1.0
        vals: list = []
        keep: list = []
        for i, info in enumerate(spec.leaves):
            if info.kind in ("int", "bool"):
                vals.append(None)
                continue
            out_info = _LeafInfo("float", info.shape, info.dtype, info.scalar)
            vals.append(_finish_float(self.b[i], div, out_info, in_place=False))
            keep.append(i)
        return _rebuild(_prune(spec, set(keep)), vals)


class RunningAverage:
    """Running (weighted) mean or exponential moving average of parameter sets.

    Parameters
    ----------
    decay : float, optional
        ``None`` (default): the weighted running mean of everything passed to
        :meth:`update` (stochastic weight averaging's mean).  A float in ``[0, 1)``: an
        exponential moving average that starts from the first update, as
        ``torch.optim.swa_utils.get_ema_multi_avg_fn`` does: ``e = decay * e +
        (1 - decay) * x``.  With ``weight=w`` an update counts as ``w`` unit updates with the
        same value (``e = decay**w * e + (1 - decay**w) * x``).
    track_variance : bool
        Also keep the second moment, for SWA-Gaussian's diagonal variance: the weighted
        population variance (weighted Welford/West update) for the mean, the exponentially
        weighted variance (Finch, 2009) for the EMA.  Read it from :attr:`variance`.
    int_policy : {"max", "first", "sum", "round"}
        Integer buffers, as in :func:`average` (``"round"`` rounds the running mean or EMA).

    Notes
    -----
    State is float64 (8 bytes per parameter, 16 with the variance).  The first update fixes
    the structure; later ones are checked against it and a rejected update leaves the state
    unchanged.  Without variance, the running mean is kept as a weighted sum, so after the
    same updates :attr:`value` equals :func:`average` bit for bit.

    Examples
    --------
    >>> import numpy as np
    >>> ra = RunningAverage()
    >>> for k in range(4):
    ...     _ = ra.update({"w": np.full(2, k, np.float32)})
    >>> ra.value["w"], ra.count
    (array([1.5, 1.5], dtype=float32), 4)
    >>> ema = RunningAverage(decay=0.5)
    >>> for k in range(3):
    ...     _ = ema.update({"w": np.full(1, 4.0 * k)})
    >>> ema.value["w"]  # 0 -> 2 -> 5
    array([5.])
    """

    def __init__(
        self, *, decay: float | None = None, track_variance: bool = False, int_policy: str = "max"
    ):
        if decay is not None:
            if isinstance(decay, (bool, np.bool_)) or not isinstance(decay, (numbers.Real,)):
                raise TypeError(f"decay: expected a float or None, got {type(decay).__name__}")
            decay = float(decay)
            if not (0.0 <= decay < 1.0):
                raise ValueError(f"decay: expected 0 <= decay < 1, got {decay}")
        if not isinstance(track_variance, (bool, np.bool_)):
            raise TypeError(f"track_variance: expected a bool, got {type(track_variance).__name__}")
        check_choice("int_policy", int_policy, INT_POLICIES)
        self._decay = decay
        self._track_variance = bool(track_variance)
        self._int_policy = int_policy
        self._state = self._new_state()

    def _new_state(self) -> _State:
        return _State(
            int_policy=self._int_policy, decay=self._decay, track_variance=self._track_variance
        )

    @property
    def decay(self) -> float | None:
        return self._decay

    def update(self, params: Mapping[str, Any], weight: float = 1.0) -> RunningAverage:
        """Fold ``params`` in with ``weight`` (non-negative; 0 checks the structure and
        changes nothing).  Returns ``self``."""
        w = _check_weight(weight, "weight")
        self._state.fold(params, w, where="params")
        return self

    @property
    def value(self) -> dict:
        """The current average as a new parameter set in the parameters' dtypes (computed on
        each access).  ``ValueError`` before the first update with positive weight."""
        return self._state.value()

    @property
    def variance(self) -> dict:
        """Per-element variance of the float (and quantized, dequantized) leaves in their
        float dtype; integer and bool leaves are left out.  Requires ``track_variance``."""
        return self._state.variance()

    @property
    def count(self) -> int:
        """Number of updates with positive weight."""
        return self._state.count

    @property
    def total_weight(self) -> float:
        """Sum of the weights of all updates."""
        return self._state.total_weight

    def reset(self) -> None:
        """Forget everything, including the structure."""
        self._state = self._new_state()

    def __repr__(self) -> str:
        mode = "mean" if self._decay is None else f"ema(decay={self._decay})"
        return f"RunningAverage({mode}, count={self.count}, track_variance={self._track_variance})"
