"""Packing the int8 weights of the GEMM: :class:`PackedWeight` and :func:`pack_weight`
(re-exported by :mod:`qgemm.gemm`, where they are documented as ``qgemm.gemm.PackedWeight``).

A packed weight holds the codes in panels (:mod:`qgemm._kernels.gemm`'s layout, panel width
from :func:`qgemm._isa.panel_width`: the same on every ISA path) and the weight half of the
GEMM's output stage (:class:`qgemm._kernels.output_stage.OutputStage`): per-column zero points,
column sums for the zero-point correction and scales, made once here.
"""

from __future__ import annotations

from typing import Any, Literal, overload

import numpy as np

from ._half import HalfPackedWeight, pack_weight_half
from ._isa import panel_width
from ._kernels.gemm import pack_kernel
from ._kernels.output_stage import PAD
from ._validate import as_array, check_choice, check_finite, check_int
from .quantize import QParams, choose_qparams, quantize

__all__ = ["PackedWeight", "pack_weight"]

_INT32_MAX = 2**31 - 1
_GRANULARITIES = ("tensor", "channel", "group")


def _padded(v: np.ndarray) -> np.ndarray:
    """``v`` followed by :data:`PAD` zeros (vector loads of the last tile stay in bounds)."""
    out = np.zeros(v.shape[0] + PAD, v.dtype)
    out[: v.shape[0]] = v
    return out


def _aligned_empty(nbytes: int, align: int = 64) -> np.ndarray:
    """An int8 buffer of ``nbytes`` whose data starts on an ``align``-byte boundary."""
    raw = np.empty(nbytes + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off : off + nbytes].view(np.int8)


class PackedWeight:
    """Int8 weights ``[N, K]`` packed for :func:`quantized_linear`, :func:`linear` and
    :func:`matmul_u8s8`; made by :func:`pack_weight`.

    Holds the packed codes (64-byte aligned panels of 64 output columns x groups of 4 ``k``),
    per-column sums, and per-column scales and zero points (per-tensor and per-group
    parameters are expanded to one entry per output column).

    Attributes
    ----------
    shape : tuple of int
        ``(N, K)``: output features x input features (``nn.Linear`` convention).
    qparams : QParams
        The weight's quantization parameters (int8, per tensor or along axis 0).
    granularity : {"tensor", "channel", "group"}
    scale : ndarray of float32, shape (N,)
        Per-output-column scale.
    zero_point : ndarray of int32, shape (N,)
        Per-output-column zero point (all 0 for symmetric weights).
    """

    __slots__ = (
        "shape",
        "qparams",
        "granularity",
        "scale",
        "zero_point",
        "_packed",
        "_packed16",
        "_np",
        "_kg",
        "_colc",
        "_has_bzp",
        "_pairmax",
        "_zi",
        "_zf",
        "_w_scale",
        "_w_zp",
        "_smax",
        "_plans",
        "_stage_memo",
        "__weakref__",
    )

    def __init__(self, codes: np.ndarray, qparams: QParams) -> None:
        n, k = codes.shape
        self.shape = (int(n), int(k))
        self.qparams = qparams
        self.granularity = qparams.granularity
        scale, zp = qparams.channel_params(n)
        self._smax = float(scale.max()) if n else 0.0
        # the weight half of the output stage: padded, private and writeable (Numba types
        # read-only arrays apart)
        self._w_scale = _padded(scale)
        self._w_zp = _padded(zp)
        self.scale = self._w_scale[:n]
        self.zero_point = self._w_zp[:n]
        self.scale.setflags(write=False)
        self.zero_point.setflags(write=False)
        npw = panel_width(n)
        kg = -(-k // 4)
        npan = -(-n // npw) if n else 0
        packed = _aligned_empty(npan * npw * kg * 4)
        colsum = np.empty(n, np.int64)
        if not codes.flags.writeable:  # Numba types read-only arrays apart
            codes = np.array(codes)
        self._pairmax = int(pack_kernel(())(codes, npw, packed, colsum))
        self._packed = packed
        self._packed16: np.ndarray | None = None  # int16 twin, made on first use (_wide)
        self._np = npw
        self._kg = kg
        colsum -= np.int64(k) * zp.astype(np.int64)
        self._colc = colsum.astype(np.int32)  # |colsum| <= 256 K: fits int32 within the K limit
        self._has_bzp = bool(np.any(zp))
        self._plans: dict = {}  # call plans (kernels, task split) per call shape
        self._stage_memo: tuple | None = None  # the last call's OutputStage (see gemm._stage)
        self._zi = np.zeros(n, np.int32)
        self._zf = np.zeros(n, np.float32)

    _NOT_PICKLED = ("__weakref__", "_plans", "_stage_memo", "scale", "zero_point", "_packed16")

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the per-call caches (compiled kernels, the last output stage);
        the read-only ``scale`` / ``zero_point`` views are re-made on loading."""
        return {k: getattr(self, k) for k in self.__slots__ if k not in self._NOT_PICKLED}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)
        packed = _aligned_empty(self._packed.size)  # keep the 64-byte alignment
        packed[:] = self._packed
        self._packed = packed
        n = self.shape[0]
        self.scale = self._w_scale[:n]
        self.zero_point = self._w_zp[:n]
        self.scale.setflags(write=False)
        self.zero_point.setflags(write=False)
        self._plans = {}
        self._stage_memo = None
        self._packed16 = None

    def _wide(self) -> np.ndarray:
        """The int16 twin of the panels, as bytes (made once, on first use): the layout of
        :mod:`qgemm._kernels.gemm` with groups of 2 ``k`` of int16 instead of 4 of int8,
        ``wide[p, h, c, t] = w[p * NP + c, 2 * h + t]`` -- the same bytes per group and column,
        so the same panel strides.  Read by the AVX2 exact ``vpmaddwd`` microkernel."""
        if self._packed16 is None:
            n = self.shape[0]
            npan = -(-n // self._np) if n else 0
            p = self._packed.reshape(npan, self._kg, self._np, 2, 2).transpose(0, 1, 3, 2, 4)
            wide = _aligned_empty(self._packed.size * 2)
            wide.view(np.int16).reshape(p.shape)[...] = p
            self._packed16 = wide
        return self._packed16

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes (and their int16 twin once made) plus the per-column
        arrays."""
        return int(
            self._packed.nbytes
            + (0 if self._packed16 is None else self._packed16.nbytes)
            + self._colc.nbytes
            + self._w_scale.nbytes
            + self._w_zp.nbytes
            + self._zi.nbytes
            + self._zf.nbytes
        )

    @property
    def dtype(self) -> np.dtype:
        """The code type, int8."""
        return np.dtype(np.int8)

    def unpack(self) -> np.ndarray:
        """The int8 codes ``[N, K]`` (a fresh array): the exact inverse of packing.

        Examples
        --------
        >>> import numpy as np
        >>> from qgemm import QParams
        >>> from qgemm.gemm import pack_weight
        >>> w = np.arange(-6, 6, dtype=np.int8).reshape(3, 4)
        >>> pw = pack_weight(w, qparams=QParams(0.1, 0, dtype="int8"))
        >>> bool(np.array_equal(pw.unpack(), w))
        True
        """
        n, k = self.shape
        npan = -(-n // self._np) if n else 0
        p = self._packed.reshape(npan, self._kg, self._np, 4).transpose(0, 2, 1, 3)
        return np.ascontiguousarray(p.reshape(npan * self._np, self._kg * 4)[:n, :k])

    def dequantize(self) -> np.ndarray:
        """Float32 weights ``(codes - zero_point) * scale``, shape ``[N, K]``."""
        codes = self.unpack().astype(np.int32) - self.zero_point[:, None]
        return codes.astype(np.float32) * self.scale[:, None]

    def __repr__(self) -> str:
        return (
            f"PackedWeight(shape={self.shape}, granularity={self.granularity!r}, "
            f"nbytes={self.nbytes})"
        )


@overload
def pack_weight(
    w: Any,
    *,
    qparams: QParams | None = None,
    granularity: str | None = None,
    group_size: int | None = None,
    reduce_range: bool = False,
    dtype: Literal["int8"] = "int8",
    saturate: bool = False,
) -> PackedWeight: ...


@overload
def pack_weight(
    w: Any,
    *,
    qparams: None = None,
    granularity: None = None,
    group_size: None = None,
    reduce_range: bool = False,
    dtype: Literal["float16", "bfloat16"],
    saturate: bool = False,
) -> HalfPackedWeight: ...


def pack_weight(
    w: Any,
    *,
    qparams: QParams | None = None,
    granularity: str | None = None,
    group_size: int | None = None,
    reduce_range: bool = False,
    dtype: str = "int8",
    saturate: bool = False,
) -> PackedWeight | HalfPackedWeight:
    """Quantize (if needed) and pack a weight matrix ``[N, K]`` (out x in) for the GEMM.

    Parameters
    ----------
    w : ndarray, float32 or int8, shape (N, K)
        Float32 weights are quantized here to int8 (symmetric: ``scale = max|w| / 127`` per
        output channel, exactly ``choose_qparams(w, dtype="int8", symmetric=True, axis=0)``).
        Int8 weights are taken as codes and need ``qparams``.
    qparams : QParams, optional
        Int8 quantization parameters of ``w``: per tensor, or along axis 0 (per output
        channel, or per group of ``group_size`` output channels).  Required for int8 ``w``;
        with float ``w`` they are used instead of the symmetric choice.
    granularity : {"channel", "tensor", "group"}, optional
        Scale granularity for float ``w`` (default ``"channel"``); taken from ``qparams`` when
        given (passing a different one is an error).
    group_size : int, optional
        Output channels per group for ``granularity="group"`` (must divide ``N``).
    reduce_range : bool
        Quantize float weights to 7 bits (``[-63, 63]``, scale ``max|w| / 63``): the AVX2
        ``vpmaddubsw`` path is then exact with full-range activations.  For int8 ``w`` it only
        checks that the codes lie in ``[-64, 63]``.
    dtype : {"int8", "float16", "bfloat16"}
        ``"int8"`` (default): quantized codes for the int8 GEMM.  ``"float16"`` /
        ``"bfloat16"``: float weights rounded to half precision once
        (:func:`qgemm._half.pack_weight_half`, FBGEMM's ``FbgemmFP16``); :func:`linear`
        then runs float32 activations x half weights.  ``qparams``, ``granularity``,
        ``group_size`` and ``reduce_range`` apply to int8 only.
    saturate : bool
        Half precision only: clamp finite weights beyond the format's range to its largest
        finite value instead of raising ``ValueError`` (torch's ``linear_prepack_fp16``).

    Returns
    -------
    PackedWeight, or HalfPackedWeight for a half-precision ``dtype``

    Notes
    -----
    Packing is one pass of numpy copies (about 0.1 ms for 1024 x 1024).  The weight is
    validated here so that the GEMM calls need not: ``K`` must keep the worst-case dot product
    within int32 (``K <= 65793`` symmetric, ``K <= 33025`` with zero points).

    Examples
    --------
    >>> import numpy as np
    >>> from qgemm.gemm import pack_weight
    >>> w = np.array([[0.5, -1.0], [0.25, 0.125]], np.float32)
    >>> pw = pack_weight(w)
    >>> pw.shape, pw.granularity
    ((2, 2), 'channel')
    >>> pw.unpack()
    array([[  64, -127],
           [ 127,   64]], dtype=int8)
    >>> pack_weight(w, dtype="float16").dtype
    'float16'
    """
    if not (isinstance(dtype, str) and dtype == "int8") and dtype is not np.int8:
        if qparams is not None or granularity is not None or group_size is not None or reduce_range:
            raise ValueError(
                "qparams/granularity/group_size/reduce_range: only for dtype='int8', "
                f"got dtype={dtype!r}"
            )
        return pack_weight_half(w, dtype, saturate=saturate)
    if saturate is not False:
        raise ValueError(f"saturate: only for half-precision dtypes, got {saturate!r} with int8")
    w = as_array("w", w, dtypes=(np.float32, np.int8), ndim=2)
    if qparams is not None and not isinstance(qparams, QParams):
        raise TypeError(f"qparams: expected QParams or None, got {type(qparams).__name__}")
    if not isinstance(reduce_range, (bool, np.bool_)):
        raise TypeError(f"reduce_range: expected a bool, got {type(reduce_range).__name__}")
    if granularity is not None:
        check_choice("granularity", granularity, _GRANULARITIES)
    n, k = w.shape
    if qparams is None:
        if w.dtype == np.int8:
            raise ValueError(
                "qparams: int8 weights need their quantization parameters, got None "
                "(pass qparams=QParams(scale, zero_point, dtype='int8', ...))"
            )
        gran = granularity or "channel"
        if gran == "group":
            if group_size is None:
                raise ValueError("group_size: granularity='group' needs a group_size, got None")
            group_size = check_int("group_size", group_size, minimum=1)
        elif group_size is not None:
            raise ValueError(
                f"group_size: only used with granularity='group', got {group_size!r} with "
                f"granularity={gran!r}"
            )
        check_finite("w", w)
        qparams = choose_qparams(
            w,
            dtype="int8",
            symmetric=True,
            axis=None if gran == "tensor" else 0,
            group_size=group_size if gran == "group" else None,
            reduce_range=bool(reduce_range),
        )
    else:
        if qparams.dtype != "int8":
            raise ValueError(f"qparams: expected int8 parameters, got dtype={qparams.dtype!r}")
        if qparams.axis not in (None, 0):
            raise ValueError(
                f"qparams: expected per-tensor parameters or axis=0 (output channels), "
                f"got axis={qparams.axis}"
            )
        if granularity is not None and granularity != qparams.granularity:
            raise ValueError(
                f"granularity: qparams are {qparams.granularity!r}, got {granularity!r}"
            )
        if group_size is not None and group_size != qparams.group_size:
            raise ValueError(
                f"group_size: qparams have group_size={qparams.group_size}, got {group_size!r}"
            )
        qparams.channel_params(n)  # raises ValueError on a length mismatch
        if w.dtype == np.float32:
            check_finite("w", w)
    codes = quantize(w, qparams) if w.dtype == np.float32 else w
    has_zp = bool(np.any(np.asarray(qparams.zero_point)))
    kmax = _INT32_MAX // (255 * (255 if has_zp else 128))
    if k > kmax:
        raise ValueError(
            f"w: K = {k} is too large for exact int32 accumulation (at most {kmax} "
            f"{'with' if has_zp else 'without'} weight zero points)"
        )
    if reduce_range and codes.size and (codes.min() < -64 or codes.max() > 63):
        raise ValueError(
            f"w: reduce_range=True expects codes in [-64, 63], got [{codes.min()}, {codes.max()}]"
        )
    return PackedWeight(codes, qparams)


PackedWeight.__module__ = "qgemm.gemm"  # its public home (repr, pickling, docs)
pack_weight.__module__ = "qgemm.gemm"
