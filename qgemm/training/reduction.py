"""The engine-agnostic reduction core of model averaging: ``partial -> combine -> finish``.

A weighted average of parameter sets is a reduction of *partials*: ``partial(model, w)`` turns
one model into a :class:`Partial` (float64 weighted sums, the total weight, integer state by
policy), :func:`combine` merges two partials, and :func:`finish` divides and returns the
averaged parameter set in the leaves' own types.  Any engine can run the reduction -- a loop
(:func:`qgemm.average` streams through :meth:`Partial.fold`), a tree of Dask tasks
(:mod:`qgemm.distributed`), an MPI allreduce -- and get the same answer as
:func:`qgemm.average` of the same models, up to float64 rounding of the sums (the grouping
changes the order of the float64 additions; integer results are exact):

>>> import numpy as np
>>> from qgemm.training.reduction import combine, finish, partial
>>> a = {"w": np.array([1.0, 2.0], np.float32), "steps": np.array(10)}
>>> b = {"w": np.array([3.0, 6.0], np.float32), "steps": np.array(12)}
>>> p = combine(partial(a, 1.0, where="site a"), partial(b, 3.0, where="site b"))
>>> p.count, p.total_weight
(2, 4.0)
>>> avg = finish(p)
>>> avg["w"], avg["steps"]
(array([2.5, 5. ], dtype=float32), array(12))

Integer leaves follow :func:`qgemm.average`'s policies, each associative (so any grouping of
combines, in model order, gives the same integers): ``"first"`` keeps the earliest partial
with positive weight, ``"max"`` the elementwise maximum (bool: or), ``"sum"`` a 64-bit sum
checked against the leaf's dtype at :func:`finish` (and for 64-bit overflow at every step),
``"round"`` a float64 weighted sum rounded half to even at :func:`finish` (exact whenever the
weighted sums are exact in float64, e.g. integer weights and values below 2**53).  Rowwise
tables and packed weights are dequantised into the float64 sum and requantised like the
first model's at :func:`finish`.

A :class:`Partial` holds only plain attributes -- numpy arrays, floats, the tree spec (which
for packed weights includes the first model's packed weight, the requantisation template) --
so it pickles, and it never keeps a reference to the models folded into it.
"""

from __future__ import annotations

import copy as _copy
from typing import Any

import numpy as np

from .._config import sync_threads
from .._kernels import averaging as _k
from .._validate import check_choice
from ._tree import (
    _build_spec,
    _check_weight,
    _finish_float,
    _flat_float,
    _flat_int,
    _gather,
    _LeafInfo,
    _match,
    _package,
    _path_name,
    _rebuild,
    _Spec,
)

__all__ = ["INT_POLICIES", "Partial", "partial", "combine", "finish"]

INT_POLICIES = ("first", "max", "sum", "round")
"""How :func:`~qgemm.average`, :class:`~qgemm.RunningAverage` and the reduction core combine
integer buffers."""


class Partial:
    """A partial weighted average: float64 weighted sums per float (and quantized) leaf,
    integer state per integer leaf, the total weight and the number of models folded in.

    Make one with :func:`partial`, merge with :func:`combine`, read out with :func:`finish`.

    Attributes
    ----------
    total_weight : float
        Sum of the weights folded in.
    count : int
        Models folded in with positive weight.
    int_policy : str
        The integer policy (see :data:`INT_POLICIES`).
    where : str
        Describes the first model folded in (used in error messages).
    spec
        The tree structure (keys, leaf kinds, shapes, dtypes, requantisation templates).
    acc : list
        Per leaf: a float64 array of the weighted sums, or the integer state (``None`` until
        a model with positive weight is folded in).
    """

    def __init__(self, *, int_policy: str = "max", where: str = "model") -> None:
        self.int_policy = int_policy
        self.where = where
        self.spec: _Spec | None = None
        self.total_weight = 0.0
        self.count = 0
        self.acc: list = []

    # -- structure --------------------------------------------------------------------------
    @property
    def _s(self) -> _Spec:
        assert self.spec is not None, "a Partial made by partial() always has a structure"
        return self.spec

    def _leaves_of(self, model: Any, where: str) -> list:
        if self.spec is None:
            spec = _build_spec(model, where)
            leaves = _gather(model, spec, where, where)
            for info, path in zip(spec.leaves, spec.paths, strict=True):
                if info.kind == "bool" and self.int_policy not in ("first", "max"):
                    raise TypeError(
                        f"{where}: key {_path_name(path)!r}: int_policy={self.int_policy!r} "
                        f"is not defined for bool buffers (use 'first' or 'max')"
                    )
            self.spec, self.where = spec, where
            self._alloc(len(spec.leaves))
            return leaves
        return _gather(model, self.spec, where, self.where)

    def _alloc(self, n: int) -> None:
        self.acc = [None] * n

    # -- folding models in ------------------------------------------------------------------
    def fold(self, model: Any, weight: float = 1.0, *, where: str = "model") -> Partial:
        """Fold one more ``model`` in with ``weight`` (one fused float64 pass per leaf, no
        temporary partial) and return ``self``.  A zero weight checks the structure and
        changes nothing; a rejected model leaves the partial unchanged."""
        w = _check_weight(weight, "weight")
        leaves = self._leaves_of(model, where)
        if w == 0.0:
            return self
        spec = self._s
        first = self.count == 0
        total = self.total_weight + w
        # Integer leaves first: they can fail (overflow), floats cannot.
        new_int: dict[int, Any] = {}
        for i, (info, v) in enumerate(zip(spec.leaves, leaves, strict=True)):
            if info.kind in ("int", "bool"):
                new_int[i] = self._int_step(i, info, _flat_int(v), w, first, where)
        sync_threads()
        for i, (info, v) in enumerate(zip(spec.leaves, leaves, strict=True)):
            if info.kind in ("int", "bool"):
                self.acc[i] = new_int[i]
            else:
                self._float_step(i, _flat_float(v, info), w, total, first)
        self.total_weight = total
        self.count += 1
        return self

    def _leaf_update(self, i: int, v: Any, w: float, total: float, first: bool, where: str):
        """One leaf's step (``total`` includes ``w``); the in-memory path of
        :func:`qgemm.average` goes leaf by leaf."""
        info = self._s.leaves[i]
        if info.kind in ("int", "bool"):
            self.acc[i] = self._int_step(i, info, _flat_int(v), w, first, where)
        else:
            self._float_step(i, _flat_float(v, info), w, total, first)

    def _float_step(self, i: int, x: np.ndarray, w: float, total: float, first: bool) -> None:
        if first:
            self.acc[i] = np.empty(x.size, np.float64)
            _k.run("init", x, w, self.acc[i])
        else:
            _k.run("add", x, w, self.acc[i])

    def _int_step(self, i: int, info: _LeafInfo, x: np.ndarray, w: float, first: bool, where):
        pol = self.int_policy
        st = self.acc[i]
        if pol == "first":
            return x.copy() if first else st
        if pol == "max":
            if first:
                return x.copy()
            return np.logical_or(st, x) if info.kind == "bool" else np.maximum(st, x)
        if pol == "sum":
            wide = np.uint64 if info.dtype.kind == "u" else np.int64
            xw = x.astype(wide)
            if first:
                return xw
            new = _wide_sum(st, xw, self._key(i), where, info.dtype.name)
            ii = np.iinfo(info.dtype)
            bad = (new > ii.max) | (new < ii.min) if wide is np.int64 else new > ii.max
            if bad.any():
                raise _sum_overflow(where, self._key(i), info, int(np.flatnonzero(bad)[0]))
            return new
        return self._round_step(st, x.astype(np.float64), w, first)

    def _round_step(self, st: Any, xf: np.ndarray, w: float, first: bool) -> np.ndarray:
        # "round": a float64 weighted sum of the values, rounded at read-out
        return xf * w if first else st + w * xf

    def _key(self, i: int) -> str:
        return _path_name(self._s.paths[i])

    # -- read-out ---------------------------------------------------------------------------
    def _mean_divisor(self) -> float:
        return self.total_weight  # weighted sums are divided by the total weight

    def _round_divisor(self) -> float:
        return self.total_weight  # "round" keeps a weighted sum of the integer values

    def _leaf_value(self, i: int, *, consume: bool) -> Any:
        info = self._s.leaves[i]
        st = self.acc[i]
        if consume:
            self.acc[i] = None
        if info.kind in ("int", "bool"):
            return _package(self._int_value(i, info, st), info)
        return _finish_float(st, self._mean_divisor(), info, in_place=consume)

    def _int_value(self, i: int, info: _LeafInfo, st: np.ndarray) -> np.ndarray:
        if self.int_policy == "round":
            ii = np.iinfo(info.dtype)
            r = np.rint(st / self._round_divisor())
            return np.clip(r, ii.min, ii.max).astype(info.dtype)
        if self.int_policy == "sum":
            ii = np.iinfo(info.dtype)
            bad = (st > ii.max) | (st < ii.min) if st.dtype.kind == "i" else st > ii.max
            if bad.any():
                j = int(np.flatnonzero(bad)[0])
                raise _sum_overflow(self.where, self._key(i), info, j)
        return st.astype(info.dtype, copy=True)

    def _value(self, *, consume: bool = False) -> Any:
        spec = self._s
        sync_threads()
        # with consume, each accumulator is freed as its output is made
        vals = [self._leaf_value(i, consume=consume) for i in range(len(spec.leaves))]
        return _rebuild(spec, vals)

    def nbytes(self) -> int:
        """Bytes held by the accumulators (float64 sums and integer state)."""
        return sum(int(a.nbytes) for a in self.acc if a is not None)

    def __repr__(self) -> str:
        n = 0 if self.spec is None else len(self.spec.leaves)
        return (
            f"Partial(count={self.count}, total_weight={self.total_weight}, leaves={n}, "
            f"int_policy={self.int_policy!r}, nbytes={self.nbytes()})"
        )


def _wide_sum(st: np.ndarray, xw: np.ndarray, key: str, where: str, dt: str) -> np.ndarray:
    """``st + xw`` in int64/uint64, ``OverflowError`` (naming the leaf's dtype ``dt``) if
    that wraps."""
    with np.errstate(over="ignore"):
        new = st + xw
    bad = new < st if new.dtype == np.uint64 else ((st ^ new) & (xw ^ new)) < 0
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise OverflowError(
            f"{where}: key {key!r}: int_policy='sum' overflows {dt} at flat index {j}"
        )
    return new


def _sum_overflow(where: str, key: str, info: _LeafInfo, j: int) -> OverflowError:
    return OverflowError(
        f"{where}: key {key!r}: int_policy='sum' overflows {info.dtype.name} at flat index {j}"
    )


def partial(
    model: Any, weight: float = 1.0, *, int_policy: str = "max", where: str = "model"
) -> Partial:
    """The partial weighted average of one ``model`` with ``weight``.

    Parameters
    ----------
    model : mapping
        A parameter set, as :func:`qgemm.average` takes.
    weight : float
        Non-negative, finite (a zero-weight partial carries the structure only; it is
        checked when combined and contributes nothing).
    int_policy : {"max", "first", "sum", "round"}
        As in :func:`qgemm.average`; every partial of one reduction must use the same.
    where : str
        Describes the model (``"models[3]"``, ``"site 'eu-west'"``) in error messages.

    Returns
    -------
    Partial
        Holds copies (float64 sums), never a reference to ``model``'s arrays.
    """
    check_choice("int_policy", int_policy, INT_POLICIES)
    if not isinstance(where, str):
        raise TypeError(f"where: expected a str, got {type(where).__name__}")
    return Partial(int_policy=int_policy, where=where).fold(model, weight, where=where)


def _copy_state(st: Any) -> Any:
    return None if st is None else st.copy()


def combine(a: Partial, b: Partial, *, where: str = "partial", inplace: bool = True) -> Partial:
    """Merge partial ``b`` into ``a`` (``a`` comes first in model order: it decides the
    ``"first"`` policy and supplies the requantisation templates).

    Parameters
    ----------
    a, b : Partial
        Partials of identical structure and the same ``int_policy``.
    where : str
        Describes ``b`` (a model, a site, a worker) in error messages; ``a`` is described by
        ``a.where``.
    inplace : bool
        ``True`` (default): ``a``'s buffers are reused and ``a`` is returned (do not use ``a``
        on its own afterwards).  ``False``: ``a`` is left unchanged and a new partial returned.
        ``b`` is never modified.

    Raises
    ------
    TypeError
        ``a`` or ``b`` is not a :class:`Partial`.
    ValueError
        Different ``int_policy``, or mismatched trees: names the key and both descriptions.
    OverflowError
        ``int_policy="sum"`` overflowing 64 bits.
    """
    for name, p in (("a", a), ("b", b)):
        if not isinstance(p, Partial):
            raise TypeError(f"{name}: expected a Partial, got {type(p).__name__}")
    if a.int_policy != b.int_policy:
        raise ValueError(
            f"{where}: int_policy {b.int_policy!r} differs from {a.where}'s {a.int_policy!r}"
        )
    if a.spec is None or b.spec is None:
        raise ValueError(f"{where}: cannot combine an empty Partial (make them with partial())")
    perm = _match(a.spec, b.spec, a.where, where)
    leaves = a.spec.leaves
    out = a
    if not inplace:
        out = _copy.copy(a)
        out.acc = [_copy_state(s) for s in a.acc]
    if b.count == 0:
        return out
    if out.count == 0:
        out.acc = [_copy_state(b.acc[j]) for j in perm]
        out.total_weight, out.count = b.total_weight, b.count
        return out
    # Integer leaves first (the 64-bit sum can fail), then the float sums in place.
    new_int: dict[int, Any] = {}
    for i, info in enumerate(leaves):
        if info.kind not in ("int", "bool"):
            continue
        sa, sb = out.acc[i], b.acc[perm[i]]
        pol = out.int_policy
        if pol == "first":
            new_int[i] = sa
        elif pol == "max":
            new_int[i] = np.logical_or(sa, sb) if info.kind == "bool" else np.maximum(sa, sb)
        elif pol == "sum":
            new_int[i] = _wide_sum(sa, sb, out._key(i), where, info.dtype.name)
        else:
            new_int[i] = sa + sb
    sync_threads()
    for i in range(len(leaves)):
        if i in new_int:
            out.acc[i] = new_int[i]
        else:
            _k.run("add", b.acc[perm[i]], 1.0, out.acc[i])  # 1.0 * x is exact
    out.total_weight += b.total_weight
    out.count += b.count
    return out


def finish(p: Partial, *, consume: bool = False) -> dict:
    """The averaged parameter set of partial ``p``: float leaves ``sum / total_weight``
    rounded once to their dtype, integer leaves by policy, quantized leaves requantised like
    the first model's -- the same leaf types and dtypes as :func:`qgemm.average`.

    ``consume=True`` frees each accumulator as its output is made (``p`` is unusable after).
    ``ValueError`` if no model with positive weight was folded in; ``OverflowError`` if an
    ``int_policy="sum"`` total does not fit its dtype.
    """
    if not isinstance(p, Partial):
        raise TypeError(f"p: expected a Partial, got {type(p).__name__}")
    if p.count == 0:
        raise ValueError(
            f"p: no model with positive weight folded in (from {p.where}): nothing to average"
        )
    return p._value(consume=consume)
