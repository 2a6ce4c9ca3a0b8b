"""Float16 / bfloat16-weight GEMM: float32 activations x half-precision weights -> float32.

qgemm's FBGEMM ``FbgemmFP16`` (torch's ``quantized::linear_dynamic_fp16`` /
``fbgemm_linear_fp16_weight``): the weights are rounded to 16 bits and packed once with
:func:`pack_weight_half` (half the bytes of float32, which is what a memory-bound small-batch
layer pays for); :func:`linear_half` widens them to float32 in registers (F16C ``vcvtph2ps``
for float16, a 16-bit shift for bfloat16), multiplies with FMA and fuses bias and ReLU into
the store.

Precision
---------
The result equals the float32 matmul of ``x`` with the *rounded* weights within float32
rounding: each output is the sequential FMA sum over ``k`` of ``x[i, k] * w16[j, k]`` plus
``bias[j]``, so ``|y - y_exact| <= (K + 1) * 2**-24 * (sum_k |x[i, k] * w16[j, k]| +
|bias[j]|)`` against the exact value computed from the rounded weights, on every ISA path
and thread count (results are bit-identical across thread counts and tilings; the portable
path may differ from the native ones in the last bits where the target lacks FMA).
Rounding at pack time is round-to-nearest-even: float16 exactly as ``numpy``'s
``astype(np.float16)``, bfloat16 from the float32 bits.

Non-finite values follow IEEE arithmetic, as ``numpy``'s float32 matmul: NaN and inf in ``x``,
the weights or the bias propagate (a NaN weight stays NaN when packed; ReLU keeps NaN).
Finite weights too large for the half format raise ``ValueError`` at pack time unless
``saturate=True``, which clamps them to the largest finite value (torch/FBGEMM's behaviour).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _config, _tiers
from ._kernels.gemm_half import GROUP, PANEL, _signature, gemm_half_kernel, tile_shape
from ._tuning import GEMM_FAST_ENTRIES, HALF_TASKS_PER_THREAD
from ._validate import as_array, check_out, compiled_entry, replay_out

__all__ = ["HalfPackedWeight", "pack_weight_half", "linear_half"]

_F32 = np.dtype(np.float32)
_FLOAT_IN = (np.dtype(np.float32), np.dtype(np.float16))
_CFG = _config._state  # isa, threads (mutated in place by the setters)
_TIERS = _tiers._state  # epoch: bumped by cache_clear
_ARGTYPES = tuple(_signature().args)
_FAST_MAX = GEMM_FAST_ENTRIES
_MAX_FINITE = {"float16": 65504.0, "bfloat16": float(np.uint32(0x7F7F0000).view(np.float32))}


def _aligned_u16(count: int, align: int = 64) -> np.ndarray:
    """A uint16 buffer of ``count`` elements starting on an ``align``-byte boundary."""
    raw = np.empty(2 * count + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off : off + 2 * count].view(np.uint16)


def _round_bf16(w: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even; NaN kept (made quiet, sign kept)."""
    bits = w.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = np.isnan(w)
    if nan.any():
        rounded = np.where(nan, (bits >> 16) | 0x40, rounded)
    return rounded.astype(np.uint16)


def _widen(codes: np.ndarray, dtype: str) -> np.ndarray:
    """16-bit codes -> float32 values (exact)."""
    if dtype == "float16":
        return codes.view(np.float16).astype(np.float32)
    return (codes.astype(np.uint32) << 16).view(np.float32)


def _check_dtype(dtype: Any) -> str:
    if isinstance(dtype, str):
        name = dtype.lower()
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = repr(dtype)
    if name in ("float16", "half", "fp16"):
        return "float16"
    if name in ("bfloat16", "bf16"):
        return "bfloat16"
    raise ValueError(f"dtype: expected 'float16' or 'bfloat16', got {dtype!r}")


def _check_bool(name: str, v: Any) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(v).__name__}")
    return bool(v)


class HalfPackedWeight:
    """Float16 or bfloat16 weights ``[N, K]`` packed for :func:`linear_half`; made by
    :func:`pack_weight_half`.

    The codes sit in 64-byte aligned panels of 16 output columns, K-major inside a panel
    (32 bytes per ``k``: the register tile's two ymm / one zmm of widened weights).

    Attributes
    ----------
    shape : tuple of int
        ``(N, K)``: output features x input features (``nn.Linear`` convention).
    dtype : {"float16", "bfloat16"}
        The storage format of the weights.
    """

    __slots__ = ("shape", "dtype", "_packed", "_zbias", "_fast", "__weakref__")

    def __init__(self, codes: np.ndarray, dtype: str):
        n, k = codes.shape
        self.shape = (int(n), int(k))
        self.dtype = dtype
        npan = -(-n // PANEL)
        padded = np.zeros((npan * PANEL, k), np.uint16)
        padded[:n] = codes
        packed = _aligned_u16(npan * PANEL * k)
        packed.reshape(npan, k, PANEL)[...] = padded.reshape(npan, PANEL, k).transpose(0, 2, 1)
        self._packed = packed
        self._zbias = np.zeros(max(n, 1), np.float32)
        self._fast: dict = {}  # replayable calls per input shape (see _Fast)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the per-call memo (compiled kernels)."""
        return {k: getattr(self, k) for k in self.__slots__ if k not in ("_fast", "__weakref__")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)
        self._fast = {}

    @property
    def nbytes(self) -> int:
        """Bytes of the packed codes (2 per weight, ``N`` padded to a multiple of 16)."""
        return int(self._packed.nbytes)

    def codes(self) -> np.ndarray:
        """The 16-bit codes ``[N, K]`` (uint16: IEEE binary16 or bfloat16 bit patterns)."""
        n, k = self.shape
        npan = -(-n // PANEL)
        p = self._packed.reshape(npan, k, PANEL).transpose(0, 2, 1).reshape(npan * PANEL, k)
        return np.ascontiguousarray(p[:n])

    def unpack(self) -> np.ndarray:
        """The rounded weights as float32 ``[N, K]`` (exactly the values the GEMM uses)."""
        return _widen(self.codes(), self.dtype)

    def __repr__(self) -> str:
        n, k = self.shape
        return f"HalfPackedWeight(shape=({n}, {k}), dtype={self.dtype!r}, nbytes={self.nbytes})"


def pack_weight_half(w: Any, dtype: str = "float16", *, saturate: bool = False) -> HalfPackedWeight:
    """Round a weight matrix ``[N, K]`` (out x in) to float16 or bfloat16 and pack it once.

    Parameters
    ----------
    w : ndarray of float32 (or float16), shape (N, K)
        NaN and inf are allowed and kept (they propagate through :func:`linear_half` as in a
        float32 matmul).
    dtype : {"float16", "bfloat16"}
        Storage format.  Both round to nearest even: float16 exactly as
        ``w.astype(np.float16)``, bfloat16 from the float32 bits (NaN stays NaN).
    saturate : bool
        Finite weights beyond the format's range (``|w| >= 65520`` for float16) raise
        ``ValueError`` by default; ``True`` clamps them to the largest finite value
        (65504 for float16), as torch's ``linear_prepack_fp16`` does.

    Returns
    -------
    HalfPackedWeight

    Examples
    --------
    >>> import numpy as np
    >>> from qgemm._half import pack_weight_half
    >>> pw = pack_weight_half(np.array([[1.0, 1.0009766], [0.1, -2.0]], np.float32))
    >>> pw.shape, pw.dtype
    ((2, 2), 'float16')
    >>> pw.unpack()
    array([[ 1.        ,  1.0009766 ],
           [ 0.09997559, -2.        ]], dtype=float32)
    """
    dtype = _check_dtype(dtype)
    saturate = _check_bool("saturate", saturate)
    w = as_array("w", w, dtypes=_FLOAT_IN, ndim=2)
    w32 = np.ascontiguousarray(w, dtype=np.float32)
    hi = _MAX_FINITE[dtype]
    if saturate:
        w32 = np.clip(w32, -hi, hi)  # NaN passes np.clip unchanged; inf becomes +-hi
        w32 = np.where(np.isinf(w), w, w32).astype(np.float32)  # ... but inf stays inf
    if dtype == "float16":
        with np.errstate(over="ignore"):
            codes = w32.astype(np.float16).view(np.uint16)
    else:
        codes = _round_bf16(w32)
    if not saturate and w32.size:
        overflow = ((codes & 0x7FFF) == (0x7C00 if dtype == "float16" else 0x7F80)) & np.isfinite(
            w32
        )
        if overflow.any():
            i, j = (int(v) for v in np.argwhere(overflow)[0])
            raise ValueError(
                f"w: expected values within the {dtype} range (|w| <= {hi:.8g} after rounding), "
                f"got {w32[i, j]} at index ({i}, {j}); pass saturate=True to clamp"
            )
    return HalfPackedWeight(codes, dtype)


def _rows(x: np.ndarray, k: int) -> np.ndarray:
    """``x [..., K]`` as a 2-D ``[M, K]`` view (a copy only when it must)."""
    if x.ndim == 2:
        return x
    if x.ndim == 1:
        return x.reshape(1, k)
    return x.reshape(-1, k)


class _Fast:
    """One memoised :func:`linear_half` call (as :class:`qgemm.gemm._Fast`): made by a checked
    call whose inputs needed no conversion, replayed when the same ``bias`` / ``relu`` objects
    come back with an ``x`` of the same shape that is float32, C-contiguous, aligned and
    writeable, the ISA, thread count and kernel epoch unchanged."""

    __slots__ = ("epoch", "isa", "threads", "bias", "bdt", "bshape", "relu", "m", "oshape",
                 "rowcheck", "call", "args", "kbias", "par", "mrows", "nthr")  # fmt: skip

    def __init__(self, x: np.ndarray, bias: Any, relu: Any, kern: Any, kbias: np.ndarray,
                 parallel: bool, mrows: int, nthr: int, m: int, n: int, k: int,
                 packed: np.ndarray) -> None:  # fmt: skip
        self.epoch = _TIERS["epoch"]
        self.isa = _CFG["isa"]
        self.threads = _CFG["threads"]
        self.bias, self.relu, self.kbias = bias, relu, kbias
        self.bdt = None if bias is None else bias.dtype
        self.bshape = (n,)
        self.m = m
        self.oshape = x.shape[:-1] + (n,)
        self.rowcheck = m == 1 and x.ndim >= 2  # C-contiguity says nothing of that row stride
        self.call = _entry_of(kern)
        self.args = (m, k, packed, n)
        self.par, self.mrows, self.nthr = parallel, mrows, nthr


class _Seen:
    """A first sighting of ``(bias, relu)`` at an input shape (never replayed: epoch -1); the
    next checked call with the same objects makes the entry (see :class:`qgemm.gemm._Seen`)."""

    __slots__ = ("bias", "relu", "epoch")

    def __init__(self, bias: Any, relu: Any) -> None:
        self.bias, self.relu, self.epoch = bias, relu, -1


def _due(memo: dict, key: tuple, bias: Any, relu: Any) -> bool:
    """Whether a replayable checked call should make the entry of ``key`` now."""
    e = memo.get(key)
    if e is None or e.bias is not bias or e.relu is not relu:
        if len(memo) >= _FAST_MAX:
            memo.clear()
        memo[key] = _Seen(bias, relu)
        return False
    return e.epoch != _TIERS["epoch"] or e.isa != _CFG["isa"] or e.threads != _CFG["threads"]


_ENTRIES: dict = {}  # id(kernel) -> (epoch, kernel, its compiled entry point)


def _entry_of(kern: Any) -> Any:
    """``compiled_entry(kern)``, resolved once per kernel and epoch (reading Numba's overload
    table costs tens of microseconds; a few kernel keys exist)."""
    memo = _ENTRIES.get(id(kern))
    epoch = _TIERS["epoch"]
    if memo is None or memo[0] != epoch or memo[1] is not kern:
        if len(_ENTRIES) >= 64:
            _ENTRIES.clear()
        memo = (epoch, kern, compiled_entry(kern, _ARGTYPES))
        _ENTRIES[id(kern)] = memo
    return memo[2]


def _fast_half(x: np.ndarray, weight: HalfPackedWeight, bias: Any, relu: Any, out: Any):
    """The result of a replayed call, or None (then the checked path runs)."""
    e = weight._fast.get(x.shape)
    if e is None or e.bias is not bias or e.relu is not relu or x.dtype is not _F32:
        return None
    if e.epoch != _TIERS["epoch"] or e.isa != _CFG["isa"] or e.threads != _CFG["threads"]:
        return None
    if not x.flags.carray:  # C-contiguous, aligned and writeable
        return None
    if e.rowcheck:
        s0 = x.strides[-2]
        if s0 < 0 or s0 % 4:
            return None
    given = out
    out = replay_out(bias, e.bdt, e.bshape, out, _F32, e.oshape)
    if out is None or (given is not None and np.may_share_memory(out, x)):
        return None
    x2 = x if x.ndim == 2 else x.reshape(e.m, -1)
    if e.par:
        _config.sync_threads()
    e.call(x2, *e.args, out.reshape(-1), e.kbias, e.mrows, e.nthr)
    return out


def linear_half(
    x: Any,
    weight: HalfPackedWeight,
    *,
    bias: Any = None,
    relu: bool = False,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Linear layer with half-precision weights: float32 ``x [..., K]`` -> float32 ``[..., N]``.

    ``y = x @ w16.T + bias`` (then ``max(y, 0)`` with ``relu``), ``w16`` the packed weights
    widened to float32; FMA accumulation in float32, bias and ReLU fused in the store.

    Parameters
    ----------
    x : ndarray of float32, shape (..., K)
        Any strides (rows with a unit inner stride are read in place, others are copied).
        Non-finite values propagate (no check).
    weight : HalfPackedWeight
    bias : ndarray of float32, shape (N,), optional
    relu : bool
        ``y < 0 -> 0``; NaN stays NaN (as ``torch.relu`` and ``np.maximum``).
    out : ndarray of float32, optional
        C-contiguous ``[..., N]`` buffer (it may overlap ``x``: the result is then computed
        aside and copied).

    Returns
    -------
    ndarray of float32, shape (..., N)

    Notes
    -----
    Error bound against the exact product with the rounded weights (``u = 2**-24``):
    ``|y - y_exact| <= (K + 1) * u * (sum_k |x[i, k] w16[j, k]| + |bias[j]|)``.

    Examples
    --------
    >>> import numpy as np
    >>> from qgemm._half import linear_half, pack_weight_half
    >>> pw = pack_weight_half(np.array([[1.0, 2.0], [-1.0, 0.5]], np.float32), "bfloat16")
    >>> linear_half(np.array([[1.0, 1.0]], np.float32), pw, bias=np.ones(2, np.float32))
    array([[4. , 0.5]], dtype=float32)
    """
    if type(weight) is HalfPackedWeight and type(x) is np.ndarray:
        res = _fast_half(x, weight, bias, relu, out)
        if res is not None:
            return res
    bias0, relu0 = bias, relu  # as passed (a replayed call tests identity)
    if not isinstance(weight, HalfPackedWeight):
        raise TypeError(
            "weight: expected a HalfPackedWeight (see qgemm.pack_weight(w, dtype='float16')), "
            f"got {type(weight).__name__}"
        )
    n, k = weight.shape
    if type(x) is not np.ndarray or x.dtype != _F32:
        x = as_array("x", x, dtypes=(_F32,))
    if x.ndim == 0:
        raise ValueError("x: expected at least 1 dimension [..., K], got a 0-D array")
    if x.shape[-1] != k:
        raise ValueError(
            f"x: expected last dimension K = {k} (weight.shape[1]), got shape {x.shape}"
        )
    relu = _check_bool("relu", relu)
    has_bias = bias is not None
    if has_bias:
        if not (type(bias) is np.ndarray and bias.dtype == _F32 and bias.ndim == 1):
            bias = as_array("bias", bias, dtypes=(_F32,), ndim=1)
        if bias.shape[0] != n:
            raise ValueError(f"bias: expected length {n} (output features), got {bias.shape[0]}")
    oshape = x.shape[:-1] + (n,)
    if out is None:
        out = np.empty(oshape, np.float32)
        res = out
    else:
        out = check_out("out", out, oshape, np.float32)
        res = np.empty(oshape, np.float32) if np.may_share_memory(out, x) else out
    m = math.prod(x.shape[:-1])
    if m == 0 or n == 0:
        return out
    if k == 0:
        res[...] = bias if has_bias else np.float32(0.0)
        if relu:
            np.copyto(res, np.float32(0.0), where=res < 0)  # NaN kept
    else:
        x2 = _rows(x, k)
        s0, s1 = x2.strides
        if s1 != 4 or s0 < 0 or s0 % 4 or not x2.flags.aligned or not x2.flags.writeable:
            x2 = np.array(x2, order="C")  # a copy (also of read-only arrays)
        if has_bias:
            if not (bias.flags.c_contiguous and bias.flags.writeable):
                bias = np.array(bias, order="C")
        else:
            bias = weight._zbias
        isa = _config.get_isa()
        mr = tile_shape(isa)[0]
        threads = _config.get_num_threads()
        parallel = threads > 1 and _config.isa_path().parallel(m * n * k, 2 * n * k)
        if parallel:
            threads = _config.sync_threads()
            ngrp = -(-n // (PANEL * GROUP))
            ntm = min(-(-HALF_TASKS_PER_THREAD * threads // ngrp), -(-m // mr))
            per_task = -(-m // ntm)
            mrows = mr * -(-per_task // mr)
        else:
            threads = 1
            mrows = mr * -(-m // mr)
        kern = gemm_half_kernel((isa, weight.dtype, relu, has_bias, parallel, mr))
        if (
            (bias is bias0 or not has_bias)
            and res is out
            and _due(weight._fast, x.shape, bias0, relu0)
        ):
            weight._fast[x.shape] = _Fast(
                x, bias0, relu0, kern, bias, parallel, mrows, threads, m, n, k, weight._packed
            )
        kern(x2, m, k, weight._packed, n, res.reshape(-1), bias, mrows, threads)
    if res is not out:
        out[...] = res
    return out
