"""Model averaging for decentralised training: weighted averages of parameter sets, running
and exponential moving averages, the cyclical learning rate, and the averaging recipe.

The recipe is that of Xu et al., "Collaborative deep learning across multiple data centers"
(2018): sites that cannot pool their data each train a copy of the model for several local
epochs with a cyclical learning rate, then the copies are averaged (weighted by site size, as
FedAvg does) and the average is broadcast back.  :func:`train_decentralized` runs it for any
model whose parameters can be expressed as numpy arrays.

A *parameter set* is a mapping of name to array; mappings may nest (``{"encoder": {"w": ...}}``)
and nested names are reported as ``"encoder.w"``.  Leaves are numpy arrays or scalars of a
float, integer or bool dtype, or one of qgemm's quantized types
(:class:`~qgemm.quantize.RowwiseQuantizedTable`, and packed GEMM weights -- see
:func:`average`).  A torch ``state_dict`` converts with
``{k: v.detach().cpu().numpy() for k, v in sd.items()}`` and back with ``torch.from_numpy``.

Float arithmetic is in float64 (fused scale-and-add kernels in :mod:`qgemm._kernels.averaging`,
parallel over large buffers) and results come back in the parameters' own dtype.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._config import sync_threads
from ._kernels import averaging as _k
from ._validate import check_choice, check_int

__all__ = [
    "INT_POLICIES",
    "CLR_MODES",
    "average",
    "RunningAverage",
    "cyclical_lr",
    "CyclicalLR",
    "train_decentralized",
    "DecentralizedResult",
]

INT_POLICIES = ("first", "max", "sum", "round")
"""How :func:`average` and :class:`RunningAverage` combine integer buffers."""

CLR_MODES = ("triangular", "triangular2", "exp_range")
"""Cyclical learning-rate policies (Smith, 2017)."""

_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


# ============================================================================================
# Parameter-set structure


def _path_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


class _Spec:
    """Structure of a parameter set: nested key order plus one descriptor per leaf."""

    __slots__ = ("tree", "leaves", "paths")

    def __init__(self, tree: Any, leaves: list, paths: list):
        self.tree = tree  # ("map", type, [(key, subtree), ...]) or ("leaf", index)
        self.leaves = leaves  # _LeafInfo per leaf, in traversal order
        self.paths = paths  # tuple path per leaf


@dataclass(frozen=True)
class _LeafInfo:
    kind: str  # "float" | "int" | "bool" | "rowwise" | "packed"
    shape: tuple
    dtype: np.dtype  # the leaf's dtype (float32 for quantized leaves: what is averaged)
    scalar: bool = False  # a numpy scalar, returned as one
    meta: Any = None  # bits of a rowwise table; the template object of a packed weight

    def describe(self) -> str:
        if self.kind == "rowwise":
            return f"RowwiseQuantizedTable(shape={self.shape}, bits={self.meta})"
        if self.kind == "packed":
            return f"{type(self.meta).__name__}(shape={self.shape})"
        return f"{self.dtype.name} array of shape {self.shape}"


def _is_rowwise(v: Any) -> bool:
    from .quantize import RowwiseQuantizedTable

    return isinstance(v, RowwiseQuantizedTable)


def _is_packed(v: Any) -> bool:
    """Packed GEMM weights, by duck typing (``qgemm.gemm`` is not imported here): any object
    with ``dequantize()`` and ``requantize_like(x)``, or qgemm's ``PackedWeight``
    (``dequantize()``, ``unpack()``, ``qparams``; rebuilt with ``qgemm.gemm.pack_weight``)."""
    if callable(getattr(v, "dequantize", None)) and callable(getattr(v, "requantize_like", None)):
        return True
    return (
        type(v).__name__ == "PackedWeight"
        and type(v).__module__.startswith("qgemm")
        and callable(getattr(v, "dequantize", None))
    )


def _leaf_info(v: Any, where: str) -> _LeafInfo:
    if isinstance(v, (np.ndarray, np.generic)):
        dt = v.dtype
        kind = {"f": "float", "i": "int", "u": "int", "b": "bool"}.get(dt.kind)
        if kind is None or (kind == "float" and dt.newbyteorder("=") not in _FLOATS):
            raise TypeError(
                f"{where}: expected a float16/32/64, integer or bool array, got dtype {dt}"
            )
        return _LeafInfo(kind, tuple(v.shape), dt.newbyteorder("="), isinstance(v, np.generic))
    if _is_rowwise(v):
        return _LeafInfo("rowwise", tuple(v.shape), np.dtype(np.float32), meta=v.bits)
    if _is_packed(v):
        shape = getattr(v, "shape", None)
        if not isinstance(shape, tuple):
            shape = tuple(_dequantize_packed(v).shape)
        return _LeafInfo("packed", tuple(int(d) for d in shape), np.dtype(np.float32), meta=v)
    hint = " (wrap Python numbers in np.asarray)" if isinstance(v, numbers.Number) else ""
    raise TypeError(
        f"{where}: expected a numpy array, numpy scalar or quantized table, "
        f"got {type(v).__name__}{hint}"
    )


# The tree walkers are module-level recursive functions, not nested closures: a recursive
# closure is a reference cycle (function -> cell -> function) that would keep the leaves it
# collects -- whole models -- alive until the garbage collector runs.


def _spec_walk(node: Any, path: tuple, where: str, leaves: list, paths: list) -> Any:
    if isinstance(node, Mapping):
        return (
            "map",
            type(node),
            [(k, _spec_walk(v, (*path, k), where, leaves, paths)) for k, v in node.items()],
        )
    leaves.append(_leaf_info(node, f"{where}: key {_path_name(path)!r}"))
    paths.append(path)
    return ("leaf", len(leaves) - 1)


def _build_spec(model: Any, where: str) -> _Spec:
    if not isinstance(model, Mapping):
        raise TypeError(f"{where}: expected a mapping of name -> array, got {type(model).__name__}")
    leaves: list = []
    paths: list = []
    tree = _spec_walk(model, (), where, leaves, paths)
    return _Spec(tree, leaves, paths)


def _gather_walk(
    node: Any, tree: Any, path: tuple, spec: _Spec, where: str, ref: str, out: list
) -> None:
    if tree[0] == "leaf":
        i = tree[1]
        name = f"{where}: key {_path_name(path)!r}"
        if isinstance(node, Mapping):
            raise TypeError(f"{name}: expected a leaf (as in {ref}), got a mapping")
        info = spec.leaves[i]
        got = _leaf_info(node, name)
        if got.kind != info.kind or (got.kind != "packed" and got.dtype != info.dtype):
            raise TypeError(
                f"{name}: expected {info.describe()} (as in {ref}), got {got.describe()}"
            )
        if got.shape != info.shape or (got.kind == "rowwise" and got.meta != info.meta):
            raise ValueError(
                f"{name}: expected {info.describe()} (as in {ref}), got {got.describe()}"
            )
        out[i] = node
        return
    if not isinstance(node, Mapping):
        raise TypeError(
            f"{where}: key {_path_name(path)!r}: expected a mapping (as in {ref}), "
            f"got {type(node).__name__}"
        )
    keys = [k for k, _ in tree[2]]
    missing = [k for k in keys if k not in node]
    if missing:
        raise ValueError(
            f"{where}: key {_path_name((*path, missing[0]))!r} is missing (present in {ref})"
        )
    if len(node) != len(keys):
        known = set(keys)
        extra = next(k for k in node if k not in known)
        raise ValueError(
            f"{where}: key {_path_name((*path, extra))!r} is unexpected (not in {ref})"
        )
    for k, sub in tree[2]:
        _gather_walk(node[k], sub, (*path, k), spec, where, ref, out)


def _gather(model: Any, spec: _Spec, where: str, ref: str) -> list:
    """The leaves of ``model`` in ``spec`` order, checked against ``spec`` (keys, kinds,
    shapes, dtypes); errors name the key and the model."""
    if not isinstance(model, Mapping):
        raise TypeError(f"{where}: expected a mapping of name -> array, got {type(model).__name__}")
    out: list = [None] * len(spec.leaves)
    _gather_walk(model, spec.tree, (), spec, where, ref, out)
    return out


def _rebuild_walk(tree: Any, values: list) -> Any:
    if tree[0] == "leaf":
        return values[tree[1]]
    typ, items = tree[1], tree[2]
    try:
        m = typ() if issubclass(typ, dict) else {}
    except Exception:  # a dict subclass that needs arguments
        m = {}
    for k, sub in items:
        m[k] = _rebuild_walk(sub, values)
    return m


def _rebuild(spec: _Spec, values: list) -> Any:
    return _rebuild_walk(spec.tree, values)


# ============================================================================================
# Leaf conversion


def _dequantize_packed(v: Any) -> np.ndarray:
    return np.asarray(v.dequantize(), dtype=np.float32)


def _requantize_packed(template: Any, x: np.ndarray) -> Any:
    """Re-quantize ``x`` like ``template`` (the first model's packed weight)."""
    if callable(getattr(template, "requantize_like", None)):
        return template.requantize_like(x)
    # qgemm.gemm.PackedWeight: symmetric int8 with the template's granularity and group size;
    # 7-bit (reduce_range) when the template is -- recorded, or recognised by its codes (a
    # symmetric full-range weight has a code of magnitude 127 in every non-zero channel).
    from .gemm import pack_weight

    qp = template.qparams
    rr = getattr(template, "reduce_range", None)
    if rr is None:
        codes = template.unpack()
        rr = bool(codes.size) and int(np.abs(codes.astype(np.int16)).max()) <= 63
    return pack_weight(
        np.ascontiguousarray(x, dtype=np.float32),
        granularity=template.granularity,
        group_size=qp.group_size if template.granularity == "group" else None,
        reduce_range=bool(rr),
    )


def _flat_float(v: Any, info: _LeafInfo) -> np.ndarray:
    """A C-contiguous 1-D float32/float64 view (or copy) of a float or quantized leaf."""
    if info.kind == "rowwise":
        x = v.dequantize()
    elif info.kind == "packed":
        x = _dequantize_packed(v)
    else:
        x = np.asarray(v)
        if x.dtype == np.float16 or not x.dtype.isnative:
            x = x.astype(np.float32 if x.dtype.itemsize == 2 else x.dtype.newbyteorder("="))
    return np.ascontiguousarray(x).reshape(-1)


def _flat_int(v: Any) -> np.ndarray:
    x = np.asarray(v)
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))
    return x.reshape(-1)


def _finish_float(buf64: np.ndarray, total: float, info: _LeafInfo, *, in_place: bool) -> Any:
    """``buf64 / total`` (``total=1`` for a plain cast) in the leaf's own type."""
    if info.dtype == np.float64 and info.kind == "float":
        out = buf64 if in_place else np.empty_like(buf64)
        _k.run("final", buf64, float(total), out, out_dtype="float64")
    elif info.dtype == np.float16:  # round once, float64 -> float16 (no float32 detour)
        out = np.empty_like(buf64)
        _k.run("final", buf64, float(total), out, out_dtype="float64")
        out = out.astype(np.float16)
    else:
        out = np.empty(buf64.size, np.float32)
        _k.run("final", buf64, float(total), out, out_dtype="float32")
    return _package(out, info)


def _package(flat: np.ndarray, info: _LeafInfo) -> Any:
    if info.kind == "rowwise":
        from .quantize import quantize_rowwise

        return quantize_rowwise(flat.reshape(info.shape), bits=info.meta)
    if info.kind == "packed":
        return _requantize_packed(info.meta, flat.reshape(info.shape))
    arr = flat.reshape(info.shape)
    return arr[()] if info.scalar else arr


# ============================================================================================
# Weights


def _check_weight(w: Any, where: str) -> float:
    if isinstance(w, (bool, np.bool_)) or not isinstance(w, (numbers.Real, np.number)):
        raise TypeError(f"{where}: expected a real number, got {type(w).__name__}")
    if isinstance(w, np.complexfloating):
        raise TypeError(f"{where}: expected a real number, got {type(w).__name__}")
    w = float(w)
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"{where}: expected a finite, non-negative weight, got {w}")
    return w


# ============================================================================================
# The accumulator shared by average() and RunningAverage


class _State:
    """Accumulated state of one structure: float leaves in float64 buffers, integer leaves by
    policy.  ``update`` validates everything (and computes integer updates) before it mutates
    anything, so a rejected update leaves the state unchanged."""

    def __init__(self, *, int_policy: str, decay: float | None, track_variance: bool):
        self.int_policy = int_policy
        self.decay = decay
        self.track_variance = track_variance
        self.spec: _Spec | None = None
        self.ref = ""
        self.count = 0
        self.total = 0.0
        self.a: list = []  # per leaf: weighted sum / mean / EMA (float64) or integer state
        self.b: list = []  # per leaf: second moment (float64) when tracking variance

    # -- structure --------------------------------------------------------------------------
    def leaves_of(self, model: Any, where: str) -> list:
        if self.spec is None:
            spec = _build_spec(model, where)
            leaves = _gather(model, spec, where, where)
            self.spec, self.ref = spec, where
            self.a = [None] * len(spec.leaves)
            self.b = [None] * len(spec.leaves)
            for info, path in zip(spec.leaves, spec.paths, strict=True):
                if info.kind == "bool" and self.int_policy not in ("first", "max"):
                    raise TypeError(
                        f"{where}: key {_path_name(path)!r}: int_policy={self.int_policy!r} "
                        f"is not defined for bool buffers (use 'first' or 'max')"
                    )
            return leaves
        return _gather(model, self.spec, where, self.ref)

    # -- update -----------------------------------------------------------------------------
    def update(self, model: Any, w: float, where: str) -> None:
        leaves = self.leaves_of(model, where)
        if w == 0.0:
            return
        spec = self.spec
        first = self.count == 0
        total = self.total + w
        # Integer leaves first: they can fail (overflow), floats cannot.
        new_int: dict[int, Any] = {}
        for i, (info, v) in enumerate(zip(spec.leaves, leaves, strict=True)):
            if info.kind in ("int", "bool"):
                new_int[i] = self._int_step(i, info, _flat_int(v), w, total, first, where)
        sync_threads()
        for i, (info, v) in enumerate(zip(spec.leaves, leaves, strict=True)):
            if info.kind in ("int", "bool"):
                self.a[i] = new_int[i]
                continue
            x = _flat_float(v, info)
            self._float_step(i, x, w, total, first)
        self.total = total
        self.count += 1

    def leaf_update(self, i: int, v: Any, w: float, total: float, first: bool, where: str):
        """One leaf's step (``total`` includes ``w``); the in-memory path of :func:`average`
        goes leaf by leaf."""
        info = self.spec.leaves[i]
        if info.kind in ("int", "bool"):
            self.a[i] = self._int_step(i, info, _flat_int(v), w, total, first, where)
        else:
            self._float_step(i, _flat_float(v, info), w, total, first)

    def leaf_value(self, i: int, *, consume: bool) -> Any:
        info = self.spec.leaves[i]
        st = self.a[i]
        if consume:
            self.a[i] = None
        if info.kind in ("int", "bool"):
            return _package(self._int_value(info, st), info)
        return _finish_float(st, self._mean_divisor(), info, in_place=consume)

    def _float_step(self, i: int, x: np.ndarray, w: float, total: float, first: bool) -> None:
        if self.decay is None and not self.track_variance:  # weighted sum
            if first:
                self.a[i] = np.empty(x.size, np.float64)
                _k.run("init", x, w, self.a[i])
            else:
                _k.run("add", x, w, self.a[i])
            return
        if first:  # mean / EMA initialised to the first value, exactly
            self.a[i] = np.empty(x.size, np.float64)
            _k.run("init", x, 1.0, self.a[i])
            if self.track_variance:
                self.b[i] = np.zeros(x.size, np.float64)
            return
        if self.decay is None:
            _k.run("welford", x, w, total, self.a[i], self.b[i])
        elif self.track_variance:
            _k.run("ema_var", x, self._alpha(w), self.a[i], self.b[i])
        else:
            _k.run("ema", x, self._alpha(w), self.a[i])

    def _alpha(self, w: float) -> float:
        # A weight-w update is w unit updates with the same value: e <- e + (1 - d**w)(x - e).
        return 1.0 - self.decay**w

    def _int_step(self, i, info, x, w, total, first, where):
        pol = self.int_policy
        st = self.a[i]
        if pol == "first":
            return x.copy() if first else st
        if pol == "max":
            if first:
                return x.copy()
            return np.logical_or(st, x) if info.kind == "bool" else np.maximum(st, x)
        if pol == "sum":
            wide = np.uint64 if info.dtype.kind == "u" else np.int64
            if first:
                return x.astype(wide)
            xw = x.astype(wide)
            with np.errstate(over="ignore"):
                new = st + xw
            if wide is np.uint64:
                bad = new < st
            else:
                bad = ((st ^ new) & (xw ^ new)) < 0
            ii = np.iinfo(info.dtype)
            if not bad.any():
                bad = (new > ii.max) | (new < ii.min) if wide is np.int64 else new > ii.max
            if bad.any():
                j = int(np.flatnonzero(bad)[0])
                name = _path_name(self.spec.paths[i])
                raise OverflowError(
                    f"{where}: key {name!r}: int_policy='sum' overflows "
                    f"{info.dtype.name} at flat index {j}"
                )
            return new
        # "round": a float64 weighted mean (or EMA) of the values, rounded at read-out
        xf = x.astype(np.float64)
        if first:
            return xf * w if self.decay is None else xf
        if self.decay is None:
            return st + w * xf
        return st + self._alpha(w) * (xf - st)

    # -- read-out ---------------------------------------------------------------------------
    def _mean_divisor(self) -> float:
        # weighted sums are divided by the total weight; means and EMAs are already means
        return self.total if (self.decay is None and not self.track_variance) else 1.0

    def value(self, *, consume: bool = False) -> Any:
        if self.count == 0:
            raise ValueError(
                "no parameters averaged yet: every weight so far was zero"
                if self.spec is not None
                else "no parameters averaged yet: call update() first"
            )
        sync_threads()
        # with consume, each accumulator is freed as its output is made
        vals = [self.leaf_value(i, consume=consume) for i in range(len(self.spec.leaves))]
        return _rebuild(self.spec, vals)

    def _int_value(self, info: _LeafInfo, st: np.ndarray) -> np.ndarray:
        if self.int_policy == "round":
            div = self.total if self.decay is None else 1.0
            r = np.rint(st / div)
            ii = np.iinfo(info.dtype)
            return np.clip(r, ii.min, ii.max).astype(info.dtype)
        return st.astype(info.dtype, copy=True)

    def variance(self) -> Any:
        if not self.track_variance:
            raise ValueError("variance: construct RunningAverage(track_variance=True) to track it")
        if self.count == 0:
            raise ValueError("no parameters averaged yet: call update() first")
        spec = self.spec
        sync_threads()
        div = self.total if self.decay is None else 1.0
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


def _prune(spec: _Spec, keep: set) -> _Spec:
    """``spec`` without the leaves not in ``keep`` (and mappings left empty by that)."""

    tree = _prune_walk(spec.tree, keep) or ("map", spec.tree[1], [])
    return _Spec(tree, spec.leaves, spec.paths)


def _prune_walk(tree: Any, keep: set) -> Any:
    if tree[0] == "leaf":
        return tree if tree[1] in keep else None
    items = [(k, s) for k, s in ((k, _prune_walk(t, keep)) for k, t in tree[2]) if s is not None]
    return ("map", tree[1], items) if items else None


# ============================================================================================
# average


def average(
    models: Iterable[Mapping[str, Any]],
    weights: Iterable[float] | None = None,
    *,
    int_policy: str = "max",
) -> dict:
    """Weighted average of parameter sets, consumed streaming.

    ``models`` may be any iterable -- a list, or a generator that loads or receives one model
    at a time: only one accumulator and the current model are held, never the whole list
    (for a generator, write ``yield load(i)`` rather than ``m = load(i); yield m`` so that
    the generator does not hold the previous model while it makes the next).

    Parameters
    ----------
    models : iterable of mappings
        Parameter sets of identical structure: the same (possibly nested) keys, and per key
        the same shape and dtype.  Leaves are numpy arrays/scalars with a float16/32/64,
        integer or bool dtype, :class:`~qgemm.quantize.RowwiseQuantizedTable`\\ s, or packed
        GEMM weights (objects with ``dequantize()`` and ``requantize_like(x)``, or qgemm's
        ``PackedWeight``).
    weights : iterable of float, optional
        One non-negative, finite weight per model (a sequence or a generator; need not sum to
        1); default uniform.  The usual choice is the number of samples per site (FedAvg).
        A zero weight excludes its model from every leaf and every integer policy (its
        structure is still checked).  At least one weight must be positive.
    int_policy : {"max", "first", "sum", "round"}
        How integer (and bool) buffers are combined, over the models with positive weight:

        - ``"max"`` (default): elementwise maximum (bool: logical or).  Integer buffers in
          models are mostly monotone counters -- optimizer steps, BatchNorm's
          ``num_batches_tracked`` -- and the maximum never moves a counter backwards (so
          step-based schedules resume where the furthest site was), is exact and does not
          depend on the weights; when all sites agree, every policy gives the same answer.
        - ``"first"``: the value of the first model with positive weight.
        - ``"sum"``: elementwise sum, ignoring the weights (e.g. total steps taken by all
          sites); ``OverflowError`` if the sum does not fit the dtype.
        - ``"round"``: the weighted mean rounded half to even (computed in float64, so exact
          for magnitudes below 2**53).  Not defined for bool buffers.

    Returns
    -------
    dict
        A parameter set of the same structure (mapping types are kept where they can be
        built empty, e.g. ``OrderedDict``): float leaves as ``sum(w_i x_i) / sum(w_i)``
        computed in float64 and rounded once to the leaf's dtype; numpy scalars come back as
        numpy scalars; quantized leaves are dequantized, averaged in float and re-quantized
        with the first model's settings: rowwise tables with the same ``bits``
        (:func:`~qgemm.quantize.quantize_rowwise`), ``PackedWeight`` objects symmetric int8 with
        the same granularity and group size, and 7-bit when the first model's weight is
        (:func:`qgemm.gemm.pack_weight`).  Non-finite values propagate.

    Notes
    -----
    A list or tuple of models is already in memory, so it is averaged leaf by leaf, reading
    every model once in a single pass per leaf (no accumulator); any other iterable is
    streamed model by model into a float64 accumulator (read and written once per model).
    Both perform the same float64 operations in the same order: the results are identical.

    Raises
    ------
    TypeError
        A model that is not a mapping, an unsupported leaf, a leaf whose dtype or kind
        differs from the first model's, a non-real weight.
    ValueError
        No models, missing or unexpected keys, a shape mismatch, a negative or non-finite
        weight, all weights zero, or fewer/more weights than models.  Messages name the
        model (``models[3]``) and the key (``"encoder.layer0.weight"``).

    Examples
    --------
    >>> import numpy as np
    >>> a = {"w": np.array([1.0, 2.0], np.float32), "steps": np.array(10)}
    >>> b = {"w": np.array([3.0, 6.0], np.float32), "steps": np.array(12)}
    >>> avg = average([a, b], weights=[1, 3])
    >>> avg["w"], avg["steps"]
    (array([2.5, 5. ], dtype=float32), array(12))
    """
    check_choice("int_policy", int_policy, INT_POLICIES)
    if isinstance(models, Mapping):
        raise TypeError("models: expected an iterable of parameter sets, got a single mapping")
    if isinstance(weights, (str, bytes, Mapping)):
        raise TypeError(f"weights: expected an iterable of numbers, got {type(weights).__name__}")
    if weights is not None and isinstance(weights, Sequence | np.ndarray):
        if np.ndim(weights) != 1:
            raise ValueError(f"weights: expected a 1-D sequence, got shape {np.shape(weights)}")
        ws = [_check_weight(w, f"weights[{i}]") for i, w in enumerate(weights)]
        if ws and not any(ws):
            raise ValueError("weights: expected at least one positive weight, got all zeros")
        if hasattr(models, "__len__") and len(models) != len(ws):
            raise ValueError(
                f"weights: expected one weight per model ({len(models)}), got {len(ws)}"
            )
        weights = ws
    if isinstance(models, (list, tuple)):
        return _average_in_memory(models, weights, int_policy)
    state = _State(int_policy=int_policy, decay=None, track_variance=False)
    model_it = iter(models)
    weight_it = None if weights is None else iter(weights)
    n = 0
    while True:
        try:
            model = next(model_it)
        except StopIteration:
            break
        if weight_it is None:
            w = 1.0
        else:
            try:
                w = _check_weight(next(weight_it), f"weights[{n}]")
            except StopIteration:
                raise ValueError(f"weights: fewer weights ({n}) than models") from None
        state.update(model, w, f"models[{n}]")
        del model  # do not hold this model while the next one is made
        n += 1
    if n == 0:
        raise ValueError("models: expected at least one parameter set, got none")
    if weight_it is not None:
        if next(weight_it, None) is not None:
            raise ValueError(f"weights: more weights than models ({n})")
    if state.count == 0:
        raise ValueError("weights: expected at least one positive weight, got all zeros")
    return state.value(consume=True)


def _average_in_memory(models: Sequence, weights: Any, int_policy: str) -> dict:
    """:func:`average` of a list or tuple: every model is in memory already, so go leaf by
    leaf and, for large float leaves, read all models in one pass (the ``multi`` kernel):
    each model is read once and the result written once, with no accumulator -- the same
    float64 operations in the same order as the streaming path, so the same bits."""
    n = len(models)
    if n == 0:
        raise ValueError("models: expected at least one parameter set, got none")
    if weights is None:
        ws = [1.0] * n
    else:
        ws = [_check_weight(w, f"weights[{j}]") for j, w in enumerate(weights)]
        if len(ws) != n:
            raise ValueError(f"weights: expected one weight per model ({n}), got {len(ws)}")
    state = _State(int_policy=int_policy, decay=None, track_variance=False)
    leaves = [state.leaves_of(m, f"models[{j}]") for j, m in enumerate(models)]
    pos = [j for j in range(n) if ws[j] > 0]
    if not pos:
        raise ValueError("weights: expected at least one positive weight, got all zeros")
    spec = state.spec
    totals = np.cumsum([ws[j] for j in pos]).tolist()
    total = totals[-1]
    state.total, state.count = total, len(pos)
    sync_threads()
    vals: list = []
    for i, info in enumerate(spec.leaves):
        size = math.prod(info.shape)
        if (
            info.kind == "float"
            and info.dtype in (np.float32, np.float64)
            and 2 <= len(pos) <= _k.MULTI_MAX
            and size >= _k.MULTI_MIN
        ):
            xs = tuple(_flat_float(leaves[j][i], info) for j in pos)
            out = np.empty(size, info.dtype)
            wv = np.array([ws[j] for j in pos], np.float64)
            _k.run("multi", xs, wv, total, out, out_dtype=info.dtype.name)
            del xs
            vals.append(_package(out, info))
            continue
        for idx, j in enumerate(pos):
            state.leaf_update(i, leaves[j][i], ws[j], totals[idx], idx == 0, f"models[{j}]")
        vals.append(state.leaf_value(i, consume=True))
    return _rebuild(spec, vals)


# ============================================================================================
# RunningAverage


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
        self._state.update(params, w, "params")
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
        return self._state.total

    def reset(self) -> None:
        """Forget everything, including the structure."""
        self._state = self._new_state()

    def __repr__(self) -> str:
        mode = "mean" if self._decay is None else f"ema(decay={self._decay})"
        return f"RunningAverage({mode}, count={self.count}, track_variance={self._track_variance})"


# ============================================================================================
# Cyclical learning rate


def _real(name: str, v: Any, *, positive: bool = False, nonneg: bool = False) -> float:
    if isinstance(v, (bool, np.bool_)) or not isinstance(
        v, (numbers.Real, np.floating, np.integer)
    ):
        raise TypeError(f"{name}: expected a real number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {v}")
    if positive and v <= 0:
        raise ValueError(f"{name}: expected a positive number, got {v}")
    if nonneg and v < 0:
        raise ValueError(f"{name}: expected a non-negative number, got {v}")
    return v


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
    if mode == "triangular":
        scale = 1.0
    elif mode == "triangular2":
        scale = 1.0 / 2.0 ** (cycle - 1.0)
    else:
        scale = gamma**s
    lr = base_lr + (max_lr - base_lr) * factor * scale
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


# ============================================================================================
# The recipe driver


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
        One training callable per site.
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
