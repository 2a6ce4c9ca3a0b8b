"""Quantization primitives: affine quantization parameters, (de)quantization, and FBGEMM's
rowwise-quantized embedding tables.

Rounding
--------
Everything in qgemm rounds **half to even** (IEEE ``nearbyint`` in the default mode, numpy's
``np.rint``), computed in float32: ``q = clamp(rint(x / scale) + zero_point, qmin, qmax)``.
This is FBGEMM's ``Quantize`` and the rounding of its requantizing output stage
(``ReQuantizeOutput``), which qgemm's GEMM output stage uses too.  Dequantization is
``(q - zero_point) * scale`` in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from . import _config
from ._kernels.quantize import (
    choose_qparams_kernel,
    dequantize_kernel,
    quantize_kernel,
    rowwise_codes_kernel,
    rowwise_minmax_kernel,
)
from ._kernels.rowwise_generic import rowwise8_fused_kernel
from ._tuning import QUANTIZE_BLOCK, QUANTIZE_PARALLEL_MIN_ELEMS, ROWWISE_ROW_CHUNK
from ._validate import as_array, check_choice, check_finite, check_int

__all__ = [
    "QParams",
    "choose_qparams",
    "quantize",
    "dequantize",
    "quantize_rowwise",
    "RowwiseQuantizedTable",
    "qrange",
]

_DTYPES = ("uint8", "int8")


def qrange(dtype: str = "uint8", reduce_range: bool = False) -> tuple[int, int]:
    """``(qmin, qmax)`` of ``dtype``; ``reduce_range`` drops one bit (7-bit codes), as
    PyTorch's x86 default: uint8 -> [0, 127], int8 -> [-64, 63]."""
    check_choice("dtype", dtype, _DTYPES)
    if dtype == "uint8":
        return (0, 127) if reduce_range else (0, 255)
    return (-64, 63) if reduce_range else (-128, 127)


def _as_param_array(name: str, v: Any, dtype: Any) -> np.ndarray | Any:
    arr = np.asarray(v)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected a number or 1-D numeric array, got {arr.dtype}")
    if arr.ndim > 1:
        raise ValueError(f"{name}: expected a scalar or 1-D array, got shape {arr.shape}")
    return arr


@dataclass(frozen=True, eq=False)
class QParams:
    """Affine quantization parameters: ``real = (q - zero_point) * scale``.

    Parameters
    ----------
    scale : float or 1-D array
        Positive, finite step size(s); stored as float32.
    zero_point : int or 1-D array
        Integer code(s) of real 0, inside the range of ``dtype``; stored as int32.
    dtype : {"uint8", "int8"}
        Code type.
    axis : int, optional
        For per-channel / per-group parameters, the axis of the data the arrays run along (the
        axis that is *kept*, as in ``torch.quantize_per_channel``).  ``None``: per tensor.
    group_size : int, optional
        Per-group parameters: channels ``[g * group_size, (g + 1) * group_size)`` along ``axis``
        share entry ``g`` (FBGEMM's GROUP granularity over output channels).
    reduce_range : bool
        Codes were chosen in the 7-bit range of :func:`qrange`; :func:`quantize` clamps to it.

    Examples
    --------
    >>> qp = QParams(scale=0.5, zero_point=3)
    >>> qp.granularity, float(qp.scale), int(qp.zero_point)
    ('tensor', 0.5, 3)
    """

    scale: Any
    zero_point: Any = 0
    dtype: str = "uint8"
    axis: int | None = None
    group_size: int | None = None
    reduce_range: bool = False

    def __post_init__(self) -> None:
        check_choice("dtype", self.dtype, _DTYPES)
        scale = _as_param_array("scale", self.scale, np.float32)
        zp = _as_param_array("zero_point", self.zero_point, np.int32)
        if zp.dtype.kind == "f":
            if not np.all(np.isfinite(zp)) or np.any(zp != np.round(zp)):
                raise ValueError(f"zero_point: expected integers, got {self.zero_point!r}")
        scale = scale.astype(np.float32)
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            raise ValueError(f"scale: expected positive finite values, got {self.scale!r}")
        qmin, qmax = qrange(self.dtype, bool(self.reduce_range))
        if np.any(zp < qmin) or np.any(zp > qmax):
            raise ValueError(
                f"zero_point: expected values in [{qmin}, {qmax}] for {self.dtype}"
                f"{' with reduce_range' if self.reduce_range else ''}, got {self.zero_point!r}"
            )
        zp = zp.astype(np.int32)
        if self.axis is None:
            if scale.ndim or zp.ndim:
                if self.group_size is not None:
                    raise ValueError("group_size: per-group parameters need an axis, got axis=None")
                raise ValueError(
                    "axis: per-channel scale/zero_point arrays need an axis, got axis=None"
                )
            if self.group_size is not None:
                raise ValueError("group_size: per-group parameters need an axis, got axis=None")
            object.__setattr__(self, "scale", np.float32(scale))
            object.__setattr__(self, "zero_point", np.int32(zp))
        else:
            check_int("axis", self.axis)
            n = max(scale.size, zp.size)
            if scale.ndim == 0:
                scale = np.full(n, scale, np.float32)
            if zp.ndim == 0:
                zp = np.full(n, zp, np.int32)
            if scale.shape != zp.shape:
                raise ValueError(
                    f"zero_point: expected the same length as scale ({scale.size}), got {zp.size}"
                )
            if self.group_size is not None:
                check_int("group_size", self.group_size, minimum=1)
            scale.setflags(write=False)
            zp.setflags(write=False)
            object.__setattr__(self, "scale", scale)
            object.__setattr__(self, "zero_point", zp)
        object.__setattr__(self, "reduce_range", bool(self.reduce_range))

    @property
    def granularity(self) -> str:
        """``"tensor"``, ``"channel"`` or ``"group"``."""
        if self.axis is None:
            return "tensor"
        return "channel" if self.group_size is None else "group"

    @property
    def qmin(self) -> int:
        return qrange(self.dtype, self.reduce_range)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.dtype, self.reduce_range)[1]

    @cached_property
    def _tensor_params(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-tensor ``(scale, zero_point)`` as length-1 arrays, made once (kernel inputs)."""
        return self.channel_params(1)

    def channel_params(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel ``(scale, zero_point)`` arrays of length ``channels`` (groups and
        per-tensor values expanded), float32 and int32; fresh, writeable copies."""
        if self.axis is None:
            return (
                np.full(channels, self.scale, np.float32),
                np.full(channels, self.zero_point, np.int32),
            )
        g = 1 if self.group_size is None else self.group_size
        expected = -(-channels // g)
        if self.scale.size != expected:
            what = "channels" if g == 1 else f"groups of {g} channels"
            raise ValueError(
                f"qparams: expected {expected} scales ({what} along axis {self.axis}), "
                f"got {self.scale.size}"
            )
        if g == 1:
            return np.array(self.scale), np.array(self.zero_point)
        return np.repeat(self.scale, g)[:channels], np.repeat(self.zero_point, g)[:channels]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QParams):
            return NotImplemented
        return (
            self.dtype == other.dtype
            and self.axis == other.axis
            and self.group_size == other.group_size
            and self.reduce_range == other.reduce_range
            and np.array_equal(self.scale, other.scale)
            and np.array_equal(self.zero_point, other.zero_point)
        )

    def __hash__(self) -> int:
        return hash(
            (
                self.dtype,
                self.axis,
                self.group_size,
                self.reduce_range,
                np.asarray(self.scale).tobytes(),
                np.asarray(self.zero_point).tobytes(),
            )
        )

    def __repr__(self) -> str:
        def short(a: Any) -> str:
            a = np.asarray(a)
            if a.ndim == 0:
                return repr(a.item())
            return f"array(shape={a.shape})" if a.size > 6 else repr(a.tolist())

        extra = ""
        if self.axis is not None:
            extra += f", axis={self.axis}"
        if self.group_size is not None:
            extra += f", group_size={self.group_size}"
        if self.reduce_range:
            extra += ", reduce_range=True"
        return (
            f"QParams(scale={short(self.scale)}, zero_point={short(self.zero_point)}, "
            f"dtype={self.dtype!r}{extra})"
        )


def _normalise_axis(axis: Any, ndim: int, name: str = "axis") -> int:
    axis = check_int(name, axis)
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}: expected an axis in [{-ndim}, {ndim}), got {axis}")
    return axis % ndim


def _float_input(name: str, x: Any) -> np.ndarray:
    x = as_array(name, x)
    if x.dtype.kind != "f":
        raise TypeError(f"{name}: expected a float array (float16/32/64), got {x.dtype.name}")
    return x


def _channel_minmax(x: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel min and max (float64), 0 for empty channels; per-tensor when axis is None."""
    if axis is None:
        flat = x.reshape(1, -1)
    else:
        c = x.shape[axis]
        inner = int(np.prod(x.shape)) // c if c else 0
        flat = np.moveaxis(x, axis, 0).reshape(c, inner)
    if flat.shape[1] == 0:
        z = np.zeros(flat.shape[0])
        return z, z.copy()
    return flat.min(axis=1).astype(np.float64), flat.max(axis=1).astype(np.float64)


def choose_qparams(
    x: Any,
    *,
    dtype: str = "uint8",
    symmetric: bool = False,
    axis: int | None = None,
    group_size: int | None = None,
    reduce_range: bool = False,
) -> QParams:
    """Choose quantization parameters covering the range of ``x``.

    Asymmetric (default): FBGEMM's ``ChooseQuantizationParams`` -- the range is widened to
    include 0, ``scale = (max - min) / (qmax - qmin)`` (0.1 when that is 0; raised to FBGEMM's
    small-scale threshold 6.1e-5 when below it), and the zero point solved from the end with
    the smaller error, then rounded half-to-even and clamped into ``[qmin, qmax]``.

    Symmetric: ``scale = max|x| / 127`` (``/ 63`` with ``reduce_range``), zero point 0 for int8
    (128, or 64 with ``reduce_range``, for uint8); codes stay in ``[-127, 127]`` around it.

    Parameters
    ----------
    x : array of float
        Data to calibrate on; must be finite.
    dtype : {"uint8", "int8"}
    symmetric : bool
    axis : int, optional
        Per-channel: one scale per ``x.shape[axis]`` (the axis that is kept).
    group_size : int, optional
        Per-group along ``axis``: one scale per ``group_size`` consecutive channels;
        ``x.shape[axis]`` must be a multiple of it.
    reduce_range : bool
        Use 7-bit codes (see :func:`qrange`).

    Examples
    --------
    >>> import numpy as np
    >>> qp = choose_qparams(np.array([-1.0, 0.0, 3.0], np.float32))
    >>> round(float(qp.scale), 6), int(qp.zero_point)
    (0.015686, 64)
    >>> choose_qparams(np.ones((2, 3), np.float32), dtype="int8", symmetric=True, axis=0).scale
    array([0.00787402, 0.00787402], dtype=float32)
    """
    x = _float_input("x", x)
    check_choice("dtype", dtype, _DTYPES)
    check_finite("x", x)
    if group_size is not None and axis is None:
        raise ValueError("group_size: per-group quantization needs an axis, got axis=None")
    if axis is not None:
        if x.ndim == 0:
            raise ValueError("axis: per-channel quantization needs at least a 1-D x, got 0-D")
        axis = _normalise_axis(axis, x.ndim)
    qmin, qmax = qrange(dtype, reduce_range)
    lo, hi = _channel_minmax(x, axis)
    if group_size is not None:
        group_size = check_int("group_size", group_size, minimum=1)
        c = x.shape[axis]
        if c % group_size:
            raise ValueError(
                f"group_size: expected a divisor of x.shape[{axis}] = {c}, got {group_size}"
            )
        lo = lo.reshape(-1, group_size).min(axis=1) if c else lo
        hi = hi.reshape(-1, group_size).max(axis=1) if c else hi

    if symmetric:
        amax = np.maximum(np.abs(lo), np.abs(hi)).astype(np.float32)
        half = np.float32(63 if reduce_range else 127)
        scale = amax / half
        bad = (scale == 0) | np.isinf(np.float32(1.0) / np.where(scale == 0, 1, scale))
        scale = np.where(bad, np.float32(0.1), scale).astype(np.float32)
        zp_val = 0 if dtype == "int8" else (64 if reduce_range else 128)
        zp = np.full(scale.shape, zp_val, np.int32)
    else:
        scale, zp = _fbgemm_choose(lo, hi, qmin, qmax)
    if axis is None:
        return QParams(scale[0], zp[0], dtype=dtype, reduce_range=reduce_range)
    return QParams(
        scale, zp, dtype=dtype, axis=axis, group_size=group_size, reduce_range=reduce_range
    )


def _fbgemm_choose(
    lo: np.ndarray, hi: np.ndarray, qmin: int, qmax: int
) -> tuple[np.ndarray, np.ndarray]:
    """FBGEMM's ``ChooseQuantizationParams`` per channel: the one implementation,
    :func:`qgemm._kernels.quantize.choose_qparams_scalar` (shared with the dynamic GEMM)."""
    lo = np.ascontiguousarray(lo, dtype=np.float64)
    hi = np.ascontiguousarray(hi, dtype=np.float64)
    scale = np.empty(lo.shape, np.float32)
    zp = np.empty(lo.shape, np.int32)
    choose_qparams_kernel(())(lo, hi, qmin, qmax, scale, zp)
    return scale, zp


def _segments(shape: tuple[int, ...], qp: QParams) -> tuple[int, int, np.ndarray, np.ndarray]:
    """``(seg_len, channels, scale, zero_point)`` describing ``qp`` over a C-ordered array."""
    if qp.axis is None:
        n = 1
        for d in shape:
            n *= d
        return max(1, min(n, QUANTIZE_BLOCK)), 1, *qp._tensor_params
    if len(shape) == 0:
        raise ValueError("x: per-channel parameters need at least a 1-D array, got 0-D")
    axis = _normalise_axis(qp.axis, len(shape), "qparams.axis")
    c = shape[axis]
    inner = int(np.prod(shape[axis + 1 :]))
    scale, zp = qp.channel_params(c)
    return max(1, inner), max(1, c), scale, zp


def quantize(x: Any, qparams: QParams) -> np.ndarray:
    """Quantize float ``x`` with ``qparams``: ``clamp(rint(x / scale) + zero_point)``.

    Computed in float32 (float64/float16 inputs are converted first), rounding half to even,
    clamped to ``[qparams.qmin, qparams.qmax]``.  Non-finite inputs raise ``ValueError``.

    Examples
    --------
    >>> import numpy as np
    >>> quantize(np.array([-1.0, 0.25, 0.75, 100.0], np.float32), QParams(0.5, 2))
    array([  0,   2,   4, 202], dtype=uint8)
    """
    if not isinstance(qparams, QParams):
        raise TypeError(f"qparams: expected QParams, got {type(qparams).__name__}")
    x = _float_input("x", x)
    seg_len, channels, scale, zp = _segments(x.shape, qparams)
    out = np.empty(x.shape, dtype=qparams.dtype)
    if x.size == 0:
        return out
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    parallel = x.size >= QUANTIZE_PARALLEL_MIN_ELEMS and _config.get_num_threads() > 1
    if parallel:
        _config.sync_threads()
    bad = quantize_kernel((qparams.dtype, parallel))(
        flat, scale, zp, seg_len, channels, qparams.qmin, qparams.qmax, out.reshape(-1)
    )
    if bad >= 0:
        pos = np.unravel_index(bad, x.shape)
        pos_s = int(pos[0]) if len(pos) == 1 else tuple(int(i) for i in pos)
        raise ValueError(f"x: expected finite values, got {x[pos]} at index {pos_s}")
    return out


def dequantize(q: Any, qparams: QParams) -> np.ndarray:
    """Float32 values of codes ``q``: ``(q - zero_point) * scale``.

    Examples
    --------
    >>> import numpy as np
    >>> dequantize(np.array([0, 2, 4], np.uint8), QParams(0.5, 2))
    array([-1.,  0.,  1.], dtype=float32)
    """
    if not isinstance(qparams, QParams):
        raise TypeError(f"qparams: expected QParams, got {type(qparams).__name__}")
    q = as_array("q", q, dtypes=(qparams.dtype,))
    seg_len, channels, scale, zp = _segments(q.shape, qparams)
    out = np.empty(q.shape, dtype=np.float32)
    if q.size == 0:
        return out
    parallel = q.size >= QUANTIZE_PARALLEL_MIN_ELEMS and _config.get_num_threads() > 1
    if parallel:
        _config.sync_threads()
    dequantize_kernel((qparams.dtype, parallel))(
        np.ascontiguousarray(q).reshape(-1), scale, zp, seg_len, channels, out.reshape(-1)
    )
    return out


# ---------------------------------------------------------------------------------------------
# Rowwise-quantized tables (FBGEMM's fused 8/4/2-bit formats)


def _code_bytes(dim: int, bits: int) -> int:
    per_byte = 8 // bits
    return -(-dim // per_byte)


def _param_bytes(bits: int) -> int:
    return 8 if bits == 8 else 4


def _check_fused_params(fused: np.ndarray, bits: int) -> None:
    """Every row's scale and bias must be finite: a NaN/inf one dequantizes the row to NaN."""
    if fused.shape[0] == 0:
        return
    pb = _param_bytes(bits)
    pdt = np.float32 if bits == 8 else np.float16
    params = np.ascontiguousarray(fused[:, fused.shape[1] - pb :]).view(pdt)  # [rows, 2]
    ok = np.isfinite(params)
    if not ok.all():
        r, c = (int(i) for i in np.argwhere(~ok)[0])
        raise ValueError(
            f"fused: row {r} has a non-finite {('scale', 'bias')[c]} ({params[r, c]}); expected "
            f"finite {pdt.__name__} scale and bias in the last {pb} bytes of every row"
        )


class RowwiseQuantizedTable:
    """An embedding table quantized row by row, in FBGEMM's fused layout.

    Each row of :attr:`fused` (uint8 ``[rows, row_bytes]``) holds the codes, then the row's
    scale, then its bias: 8-bit rows have ``dim`` code bytes and float32 scale and bias;
    4- and 2-bit rows pack 2 or 4 codes per byte (low bits first, rows padded to whole bytes)
    and have float16 scale and bias.  Value of element ``j`` = ``code_j * scale + bias``.
    This is byte-for-byte the output of ``torch.ops.quantized.embedding_bag_byte_prepack`` /
    ``embedding_bag_4bit_prepack`` / ``embedding_bag_2bit_prepack``.

    Build one with :func:`quantize_rowwise` or :meth:`from_fused`.
    """

    __slots__ = ("fused", "bits", "dim")

    def __init__(self, fused: np.ndarray, bits: int, dim: int):
        self.fused = fused
        self.bits = bits
        self.dim = dim

    @classmethod
    def from_fused(
        cls, fused: Any, *, bits: int, dim: int | None = None, copy: bool = False
    ) -> RowwiseQuantizedTable:
        """Wrap a fused byte array (e.g. ``torch.ops.quantized.embedding_bag_byte_prepack(w)
        .numpy()``).  ``dim`` defaults to the largest dim the row width allows (for 4/2-bit
        tables with an odd dim, pass it).  No copy unless ``copy`` or the array is not
        C-contiguous.

        Examples
        --------
        >>> import numpy as np
        >>> t = quantize_rowwise(np.arange(6, dtype=np.float32).reshape(2, 3), bits=4)
        >>> back = RowwiseQuantizedTable.from_fused(t.to_fused(), bits=4, dim=3)
        >>> back.shape, back.dequantize().round(1)
        ((2, 3), array([[0. , 1.1, 2. ],
               [3. , 4.1, 5. ]], dtype=float32))
        """
        bits = _check_bits(bits)
        fused = as_array("fused", fused, dtypes=(np.uint8,), ndim=2)
        pb = _param_bytes(bits)
        width = fused.shape[1]
        if width < pb:
            raise ValueError(
                f"fused: expected rows of at least {pb} bytes (scale and bias) for {bits}-bit, "
                f"got {width}"
            )
        per_byte = 8 // bits
        max_dim = (width - pb) * per_byte
        if dim is None:
            dim = max_dim
        dim = check_int("dim", dim, minimum=0)
        if _code_bytes(dim, bits) != width - pb:
            raise ValueError(
                f"dim: a {bits}-bit row of {width} bytes holds dim in "
                f"[{max(0, max_dim - per_byte + 1)}, {max_dim}], got {dim}"
            )
        _check_fused_params(fused, bits)
        fused = np.array(fused, copy=True, order="C") if copy else np.ascontiguousarray(fused)
        return cls(fused, bits, dim)

    # -- views ------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, dim)`` of the float table this represents."""
        return (self.fused.shape[0], self.dim)

    @property
    def rows(self) -> int:
        return self.fused.shape[0]

    @property
    def code_bytes(self) -> int:
        """Bytes of codes per row (before scale and bias)."""
        return _code_bytes(self.dim, self.bits)

    @property
    def row_bytes(self) -> int:
        return self.fused.shape[1]

    @property
    def param_dtype(self) -> np.dtype:
        """dtype of the per-row scale and bias (float32 for 8-bit, float16 otherwise)."""
        return np.dtype(np.float32 if self.bits == 8 else np.float16)

    @property
    def codes(self) -> np.ndarray:
        """Packed code bytes, uint8 ``[rows, code_bytes]`` (a view)."""
        return self.fused[:, : self.code_bytes]

    def _param(self, i: int) -> np.ndarray:
        cb = self.code_bytes
        w = self.param_dtype.itemsize
        if self.fused.shape[0] == 0:  # numpy cannot view an empty 2-D slice as another dtype
            return np.empty(0, self.param_dtype)
        raw = np.ascontiguousarray(self.fused[:, cb + i * w : cb + (i + 1) * w])
        return raw.view(self.param_dtype).reshape(-1)

    @property
    def scale(self) -> np.ndarray:
        """Per-row scale (float32 for 8-bit, float16 for 4/2-bit; a copy)."""
        return self._param(0)

    @property
    def bias(self) -> np.ndarray:
        """Per-row bias, i.e. the row minimum (same dtype as :attr:`scale`; a copy)."""
        return self._param(1)

    @property
    def nbytes(self) -> int:
        """Bytes of the fused table."""
        return int(self.fused.nbytes)

    def unpack_codes(self, rows: Any = slice(None)) -> np.ndarray:
        """Codes as uint8 ``[n, dim]`` (one code per element) for the selected rows."""
        codes = self.codes[rows]
        if self.bits == 8:
            return np.array(codes[:, : self.dim])
        per_byte = 8 // self.bits
        mask = np.uint8((1 << self.bits) - 1)
        parts = [(codes >> np.uint8(j * self.bits)) & mask for j in range(per_byte)]
        stacked = np.stack(parts, axis=-1)
        return stacked.reshape(codes.shape[0], codes.shape[1] * per_byte)[:, : self.dim]

    def dequantize(self, rows: Any = slice(None)) -> np.ndarray:
        """Float32 ``[n, dim]`` values of the selected rows (default: all)."""
        codes = self.unpack_codes(rows).astype(np.float32)
        scale = self.scale[rows].astype(np.float32).reshape(-1, 1)
        bias = self.bias[rows].astype(np.float32).reshape(-1, 1)
        return codes * scale + bias

    def to_fused(self) -> np.ndarray:
        """The fused byte array (a copy), as torch's prepack ops produce it."""
        return self.fused.copy()

    def __repr__(self) -> str:
        return (
            f"RowwiseQuantizedTable(rows={self.rows}, dim={self.dim}, bits={self.bits}, "
            f"nbytes={self.nbytes})"
        )


def _check_bits(bits: Any) -> int:
    bits = check_int("bits", bits)
    if bits not in (8, 4, 2):
        raise ValueError(f"bits: expected 8, 4 or 2, got {bits}")
    return bits


def quantize_rowwise(table: Any, *, bits: int = 8) -> RowwiseQuantizedTable:
    """Quantize a float32/float16 table ``[rows, dim]`` row by row (FBGEMM's quantizers).

    8-bit: ``scale = (max - min) / 255``, ``bias = min``, ``code = rint((x - min) * 255 /
    (max - min + 1e-8))``.  4/2-bit: ``bias = min`` rounded to float16, ``scale = (max - bias)
    / (2**bits - 1)`` rounded to float16 (1.0 when 0), ``code = clamp(rint((x - bias) /
    scale))``.  All in float32 with round-half-to-even, so the bytes equal torch's prepack ops'.

    Examples
    --------
    >>> import numpy as np
    >>> t = quantize_rowwise(np.array([[0.0, 1.0, 2.0, 3.0]], np.float32), bits=8)
    >>> t.fused.shape, t.dequantize().round(2)
    ((1, 12), array([[0., 1., 2., 3.]], dtype=float32))
    """
    bits = _check_bits(bits)
    table = as_array("table", table, dtypes=(np.float32, np.float16), ndim=2)
    rows, dim = table.shape
    cb = _code_bytes(dim, bits)
    fused = np.zeros((rows, cb + _param_bytes(bits)), dtype=np.uint8)
    _config.sync_threads()
    # float16 tables are converted in chunks of rows (bounded temporaries); float32 in one go
    chunk = ROWWISE_ROW_CHUNK if table.dtype != np.float32 else max(rows, 1)
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        x = np.ascontiguousarray(table[start:stop], dtype=np.float32)
        _quantize_rows(x, bits, fused[start:stop], start)
    return RowwiseQuantizedTable(fused, bits, dim)


def _quantize_rows(x: np.ndarray, bits: int, fused: np.ndarray, row0: int) -> None:
    """Quantize float32 rows ``x`` into ``fused`` (rows ``row0...`` of the whole table).

    8-bit: one parallel pass per row does all (min/max, parameters, codes).  4/2-bit: min/max
    and codes run in parallel Numba kernels; the per-row parameters (a vector per table, where
    the float16 rounding happens) are computed with numpy."""
    n, dim = x.shape
    if bits == 8:  # one pass per row, parameters written in-kernel (see _kernels/rowwise_generic)
        bad = rowwise8_fused_kernel(())(x, fused)
        if bad >= 0:
            r, c = divmod(int(bad), dim)
            raise ValueError(
                f"table: expected finite values, got {x[r, c]} at index ({row0 + r}, {c})"
            )
        return
    cb = _code_bytes(dim, bits)
    mn = np.empty(n, np.float32)
    mx = np.empty(n, np.float32)
    bad = rowwise_minmax_kernel(())(x, mn, mx)
    if bad >= 0:
        r, c = divmod(int(bad), dim)
        raise ValueError(f"table: expected finite values, got {x[r, c]} at index ({row0 + r}, {c})")
    levels = np.float32((1 << bits) - 1)
    mn16 = mn.astype(np.float16)
    mn = mn16.astype(np.float32)
    rng = (mx - mn).astype(np.float32)
    scale = np.where(rng == 0, np.float32(1.0), rng / levels).astype(np.float32)
    with np.errstate(over="ignore"):
        scale = scale.astype(np.float16).astype(np.float32)
    over = np.flatnonzero(np.isinf(mn16) | np.isinf(scale))
    if over.size:  # the float16 bias or scale would be +-inf: the row would dequantize to NaN
        r = int(over[0])
        raise ValueError(
            f"table: row {row0 + r} spans [{x[r].min()}, {x[r].max()}], beyond what a {bits}-bit "
            f"row's float16 bias and scale hold (|min| <= 65504, max - min <= "
            f"{65504 * float(levels):g}); scale the table or use bits=8"
        )
    scale = np.where(scale == 0, np.float32(1.0), scale).astype(np.float32)
    with np.errstate(divide="ignore", over="ignore"):
        inv = (np.float32(1.0) / scale).astype(np.float32)
    inf = np.isinf(inv)
    scale = np.where(inf, np.float32(1.0), scale).astype(np.float32)
    inv = np.where(inf, np.float32(1.0), inv).astype(np.float32)
    rowwise_codes_kernel((bits,))(x, mn, inv, fused)
    # (a float16 overflow of the scale or bias was rejected above)
    with np.errstate(over="ignore"):
        params = np.stack([scale.astype(np.float16), mn16], axis=1)
    fused[:, cb:] = params.view(np.uint8).reshape(n, 4)
