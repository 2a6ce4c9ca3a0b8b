"""The averaging engine: :func:`average`, a weighted average of parameter sets.

Streams go through the reduction core (:meth:`~qgemm.training.reduction.Partial.fold` into one
:class:`~qgemm.training.reduction.Partial`, then :func:`~qgemm.training.reduction.finish`);
lists and tuples, already in memory, take a leaf-by-leaf path whose large float leaves read
all models in one pass (the ``multi`` kernel).  Both do the same float64 operations in the
same order, so the same bits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence, Sized
from typing import Any

import numpy as np

from .._config import sync_threads
from .._kernels import averaging as _k
from .._validate import check_choice
from ._tree import _check_weight, _flat_float, _package, _rebuild
from .reduction import INT_POLICIES, Partial, finish

__all__ = ["average"]


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
        if isinstance(models, Sized) and len(models) != len(ws):
            raise ValueError(
                f"weights: expected one weight per model ({len(models)}), got {len(ws)}"
            )
        weights = ws
    if isinstance(models, (list, tuple)):
        return _average_in_memory(models, weights, int_policy)
    state = Partial(int_policy=int_policy)
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
        state.fold(model, w, where=f"models[{n}]")
        del model  # do not hold this model while the next one is made
        n += 1
    if n == 0:
        raise ValueError("models: expected at least one parameter set, got none")
    if weight_it is not None:
        if next(weight_it, None) is not None:
            raise ValueError(f"weights: more weights than models ({n})")
    if state.count == 0:
        raise ValueError("weights: expected at least one positive weight, got all zeros")
    return finish(state, consume=True)


def fold_leaf_multi(
    leaves: Sequence[Sequence[Any]],
    i: int,
    info: Any,
    pos: Sequence[int],
    ws: Sequence[float],
    total: float,
    out_dtype: Any,
    alloc: Any = None,
) -> np.ndarray | None:
    """Leaf ``i`` of the models ``pos`` (``leaves[j][i]``, weights ``ws[j]``) folded in one
    pass of the ``multi`` kernel: ``sum_j ws[j] * x_j / total`` as flat ``out_dtype`` (each
    model read once, the result written once; the same float64 operations in the same order
    as a partial's ``init`` + ``add``, so the same bits).  None when the leaf does not take
    that path (not a large float32/float64 leaf, or fewer than 2 / too many models).
    ``alloc(size, dtype)`` makes the output (default ``np.empty``; the distributed average
    passes one that writes into shared memory)."""
    size = math.prod(info.shape)
    if not (
        info.kind == "float"
        and info.dtype in (np.float32, np.float64)
        and 2 <= len(pos) <= _k.MULTI_MAX
        and size >= _k.MULTI_MIN
    ):
        return None
    xs = tuple(_flat_float(leaves[j][i], info) for j in pos)
    out = (alloc or np.empty)(size, out_dtype)
    wv = np.array([ws[j] for j in pos], np.float64)
    _k.run("multi", xs, wv, total, out, out_dtype=out.dtype.name)
    return out


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
    state = Partial(int_policy=int_policy)
    leaves = [state._leaves_of(m, f"models[{j}]") for j, m in enumerate(models)]
    pos = [j for j in range(n) if ws[j] > 0]
    if not pos:
        raise ValueError("weights: expected at least one positive weight, got all zeros")
    spec = state.spec
    assert spec is not None
    totals = np.cumsum([ws[j] for j in pos]).tolist()
    total = totals[-1]
    state.total_weight, state.count = total, len(pos)
    sync_threads()
    vals: list = []
    for i, info in enumerate(spec.leaves):
        out = fold_leaf_multi(leaves, i, info, pos, ws, total, info.dtype)
        if out is not None:
            vals.append(_package(out, info))
            continue
        for idx, j in enumerate(pos):
            state._leaf_update(i, leaves[j][i], ws[j], totals[idx], idx == 0, f"models[{j}]")
        vals.append(state._leaf_value(i, consume=True))
    return _rebuild(spec, vals)
