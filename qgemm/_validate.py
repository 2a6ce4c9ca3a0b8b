"""Input checks shared by every public wrapper.

Errors use numpy's exception types -- ``TypeError`` for a wrong type or dtype, ``ValueError``
for shapes and values, ``IndexError`` for indices -- and every message names the argument,
what was expected and what came.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np


def _dtype_names(dtypes: Iterable[Any]) -> str:
    names = [np.dtype(d).name for d in dtypes]
    return names[0] if len(names) == 1 else " or ".join([", ".join(names[:-1]), names[-1]])


def as_array(
    name: str,
    x: Any,
    *,
    dtypes: Iterable[Any] | None = None,
    ndim: int | tuple[int, ...] | None = None,
    min_ndim: int | None = None,
) -> np.ndarray:
    """``x`` as an ndarray (no copy when it already is one), with dtype and rank checked.

    Python lists/scalars are converted with ``np.asarray``; a dtype outside ``dtypes`` raises
    ``TypeError`` (no silent casts: a float64 array passed where float32 is expected is an
    error, as the fix -- ``.astype(np.float32)`` -- is the caller's choice).
    """
    if not isinstance(x, np.ndarray):
        if isinstance(x, (str, bytes, dict)) or x is None:
            raise TypeError(f"{name}: expected an array, got {type(x).__name__}")
        try:
            x = np.asarray(x)
        except Exception as exc:  # ragged lists and the like
            raise TypeError(f"{name}: expected an array, got {type(x).__name__} ({exc})") from None
        if x.dtype == object:
            raise TypeError(f"{name}: expected a numeric array, got an object array")
    if dtypes is not None:
        allowed = [np.dtype(d) for d in dtypes]
        if x.dtype not in allowed:
            hint = f"; convert with .astype(np.{allowed[0].name})" if len(allowed) == 1 else ""
            raise TypeError(
                f"{name}: expected dtype {_dtype_names(allowed)}, got {x.dtype.name}{hint}"
            )
    if ndim is not None:
        ndims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in ndims:
            want = " or ".join(f"{d}-D" for d in ndims)
            raise ValueError(f"{name}: expected a {want} array, got {x.ndim}-D shape {x.shape}")
    if min_ndim is not None and x.ndim < min_ndim:
        raise ValueError(
            f"{name}: expected at least {min_ndim} dimension(s), got {x.ndim}-D shape {x.shape}"
        )
    return x


def check_finite(name: str, x: np.ndarray) -> None:
    """Raise ``ValueError`` naming the first non-finite element of a float array."""
    if x.dtype.kind != "f" or x.size == 0:
        return
    if not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        pos = tuple(int(i) for i in bad)
        pos_s = pos[0] if len(pos) == 1 else pos
        raise ValueError(f"{name}: expected finite values, got {x[tuple(bad)]} at index {pos_s}")


def check_out(name: str, out: Any, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Validate a caller-supplied output buffer: ndarray, exact dtype and shape, C-contiguous,
    writeable."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name}: expected an ndarray, got {type(out).__name__}")
    dtype = np.dtype(dtype)
    if out.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype.name}, got {out.dtype.name}")
    if out.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {out.shape}")
    if not out.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array, got strides {out.strides}")
    if not out.flags.writeable:
        raise ValueError(f"{name}: expected a writeable array, got a read-only one")
    return out


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    """``value`` as a Python int (bools rejected), optionally at least ``minimum``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def replay_out(
    bias: Any, bias_dtype: Any, bias_shape: tuple, out: Any, out_dtype: Any, out_shape: tuple
) -> np.ndarray | None:
    """The output array of a replayed GEMM call (``out``, or a new one), or None when ``bias``
    or ``out`` are not exactly what the checked call took as they are (dtype object, shape,
    C-contiguous, aligned and writeable): then the checked path runs.  The bias is looked at
    on every call because ``bias.dtype = ...`` / ``bias.shape = ...`` can change it in place."""
    if bias is not None:
        if bias.dtype is not bias_dtype or bias.shape != bias_shape or not bias.flags.carray:
            return None
    if out is None:
        return np.empty(out_shape, out_dtype)
    if type(out) is not np.ndarray or out.dtype is not out_dtype or out.shape != out_shape:
        return None
    return out if out.flags.carray else None


def compiled_entry(kernel: Any, argtypes: tuple[Any, ...]) -> Any:
    """What a wrapper may call for ``kernel`` once its own checks have fixed every argument's
    Numba type to ``argtypes``: the compiled entry point behind the dispatcher.

    Numba's dispatcher types each argument on every call before it picks the compiled
    overload (about 1.2 us for the GEMM's 25 arguments, measured); the entry point it then
    calls unboxes the same arguments without checking them, so only a caller that has
    established the types (dtype, rank, C-contiguity, alignment, writeability) may use it.
    Anything else -- a tiered kernel still on its generic tier, the ``workqueue`` launch guard
    of :mod:`qgemm._threading`, a dispatcher with several or other signatures -- is returned
    unchanged (then called through its own checks).
    """
    from numba.core.registry import CPUDispatcher

    from ._tiers import TieredKernel

    k = kernel
    if isinstance(k, TieredKernel):
        if not k.ready:
            return kernel
        k = k.kernel
    if isinstance(k, CPUDispatcher):
        overloads = k.overloads
        if len(overloads) == 1:
            cres: Any = next(iter(overloads.values()))  # numba's CompileResult
            if tuple(cres.signature.args) == tuple(argtypes):
                return cres.entry_point
    return k
