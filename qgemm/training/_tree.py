"""Parameter-set trees: the structure (spec) of a parameter set, its leaves, and the leaf
conversions shared by the averaging engine, the reduction core and the running averages.

A *parameter set* is a mapping of name to array; mappings may nest (``{"encoder": {"w": ...}}``)
and nested names are reported as ``"encoder.w"``.  Leaves are numpy arrays or scalars of a
float, integer or bool dtype, or one of qgemm's quantized types
(:class:`~qgemm.quantize.RowwiseQuantizedTable`, and packed GEMM weights).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._kernels import averaging as _k

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
    from ..quantize import RowwiseQuantizedTable

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
    from ..gemm import pack_weight

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
        from ..quantize import quantize_rowwise

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


def _prune(spec: _Spec, keep: set) -> _Spec:
    """``spec`` without the leaves not in ``keep`` (and mappings left empty by that)."""

    tree: Any = _prune_walk(spec.tree, keep) or ("map", spec.tree[1], [])
    return _Spec(tree, spec.leaves, spec.paths)


def _prune_walk(tree: Any, keep: set) -> Any:
    if tree[0] == "leaf":
        return tree if tree[1] in keep else None
    items = [(k, s) for k, s in ((k, _prune_walk(t, keep)) for k, t in tree[2]) if s is not None]
    return ("map", tree[1], items) if items else None


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


# ============================================================================================
# Matching two structures (combining partial reductions)


def _mismatch(where: str, path: tuple, what: str) -> ValueError:
    return ValueError(f"{where}: key {_path_name(path)!r}: {what}")


def _match_walk(ta: Any, tb: Any, path: tuple, sa: _Spec, sb: _Spec, wa: str, wb: str, perm: list):
    if ta[0] == "leaf":
        if tb[0] != "leaf":
            raise _mismatch(wb, path, f"expected a leaf (as in {wa}), got a mapping")
        la, lb = sa.leaves[ta[1]], sb.leaves[tb[1]]
        same = (
            la.kind == lb.kind
            and (la.kind == "packed" or la.dtype == lb.dtype)
            and la.shape == lb.shape
            and (la.kind != "rowwise" or la.meta == lb.meta)
        )
        if not same:
            raise _mismatch(wb, path, f"expected {la.describe()} (as in {wa}), got {lb.describe()}")
        perm[ta[1]] = tb[1]
        return
    if tb[0] == "leaf":
        raise _mismatch(
            wb, path, f"expected a mapping (as in {wa}), got {sb.leaves[tb[1]].describe()}"
        )
    items_b = dict(tb[2])
    for k, _ in ta[2]:
        if k not in items_b:
            raise ValueError(f"{wb}: key {_path_name((*path, k))!r} is missing (present in {wa})")
    if len(items_b) != len(ta[2]):
        known = {k for k, _ in ta[2]}
        extra = next(k for k in items_b if k not in known)
        raise ValueError(f"{wb}: key {_path_name((*path, extra))!r} is unexpected (not in {wa})")
    for k, sub in ta[2]:
        _match_walk(sub, items_b[k], (*path, k), sa, sb, wa, wb, perm)


def _match(sa: _Spec, sb: _Spec, wa: str, wb: str) -> list:
    """For each leaf of ``sa``, the index of the same leaf in ``sb`` (keys may come in another
    order); ``ValueError`` naming the key and both descriptions when the structures differ."""
    if sa is sb:
        return list(range(len(sa.leaves)))
    perm: list = [None] * len(sa.leaves)
    _match_walk(sa.tree, sb.tree, (), sa, sb, wa, wb, perm)
    return perm
