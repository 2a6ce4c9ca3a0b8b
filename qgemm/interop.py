"""PyTorch interop: :func:`from_torch` turns torch modules into qgemm's packed objects.

torch stays optional: it is imported only inside :func:`from_torch` (never when ``qgemm`` is
imported), and everything is read through numpy -- the returned objects hold numpy arrays and
run on qgemm's kernels without torch.

Supported modules:

=========================================== =================================================
``torch.nn.Linear``                          :class:`Linear`: ``pack_weight`` of the float
                                             weight (int8, symmetric, per output channel by
                                             default), float32 bias; called with float32 x it
                                             runs :func:`qgemm.linear` (dynamic quantization)
``torch.ao.nn.quantized.dynamic.Linear``     :class:`Linear` over torch's own int8 codes and
                                             scales (per tensor or per channel), no requant
``torch.ao.nn.quantized.Linear`` (static)    :class:`Linear` with torch's codes and the output
                                             ``scale``/``zero_point`` as ``output_qparams``;
                                             called with uint8 x and its QParams it runs
                                             :func:`qgemm.quantized_linear` (uint8 out)
``torch.nn.EmbeddingBag``                    :class:`EmbeddingBag` over the float32 table, or
                                             (``bits=8|4|2``) a ``quantize_rowwise`` table --
                                             byte-identical to torch's prepack ops
``torch.ao.nn.quantized.EmbeddingBag``       :class:`EmbeddingBag` over torch's quint8 /
                                             quint4x2 codes with its per-row scale and zero
                                             point (``bias = -zero_point * scale``)
a facebookresearch/dlrm ``DLRM_Net``         the float :class:`qgemm.models.DLRM` (call
                                             ``.quantize()`` for the int8 one)
FBGEMM's ``IntNBitTableBatchedEmbedding``     :class:`qgemm.TableBatchedEmbeddingBags` with
``BagsCodegen`` (fbgemm-gpu-cpu)              the same pooled output: int8/4/2 tables
                                             rewritten in torch's prepack layout (TBE keeps
                                             the float16 scale and bias in front of the
                                             codes), fp16/fp32 tables read in place; its
                                             pooling mode, output dtype, feature_table_map
``SplitTableBatchedEmbeddingBagsCodegen``    the same over its float tables (read in place,
                                             so training updates show through)
=========================================== =================================================
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from ._validate import check_choice
from .embedding import embedding_bag
from .gemm import linear, pack_weight, quantized_linear
from .quantize import QParams, RowwiseQuantizedTable, quantize_rowwise

__all__ = ["from_torch", "Linear", "EmbeddingBag"]


class Linear:
    """A linear layer on qgemm's int8 GEMM: ``weight`` (:class:`qgemm.PackedWeight`,
    ``[out, in]``), ``bias`` (float32 ``[out]`` or None) and, for a statically quantized layer,
    ``output_qparams``.  Unpacks as ``weight, bias = layer``.

    Call it with float32 ``x [..., in]`` for :func:`qgemm.linear` (float out), or with uint8
    ``x`` and ``x_qparams`` for :func:`qgemm.quantized_linear` (uint8 out when
    ``output_qparams`` is set, else float32).
    """

    __slots__ = ("weight", "bias", "output_qparams")

    def __init__(
        self, weight: Any, bias: np.ndarray | None = None, output_qparams: QParams | None = None
    ):
        self.weight = weight
        self.bias = bias
        self.output_qparams = output_qparams

    def __iter__(self) -> Iterator[Any]:
        yield self.weight
        yield self.bias

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)``."""
        return tuple(self.weight.shape)

    def __call__(
        self,
        x: Any,
        x_qparams: QParams | None = None,
        *,
        relu: bool = False,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        if x_qparams is None:
            return linear(x, self.weight, self.bias, relu=relu, out=out)
        return quantized_linear(
            x,
            x_qparams,
            self.weight,
            self.bias,
            relu=relu,
            out_qparams=self.output_qparams,
            out=out,
        )

    def __repr__(self) -> str:
        extra = "" if self.output_qparams is None else f", output_qparams={self.output_qparams}"
        return (
            f"Linear(out={self.shape[0]}, in={self.shape[1]}, bias={self.bias is not None}{extra})"
        )


class EmbeddingBag:
    """An embedding bag on qgemm's kernels: ``table`` (float32 ndarray or
    :class:`qgemm.RowwiseQuantizedTable`) with the module's ``mode``, ``padding_idx`` and
    ``include_last_offset``.  Call it as torch's module: ``bag(indices, offsets=None,
    per_sample_weights=None)`` -> float32 ``[bags, dim]`` via :func:`qgemm.embedding_bag`
    (``mode`` is honoured on quantized tables too, unlike torch's quantized ops)."""

    __slots__ = ("table", "mode", "padding_idx", "include_last_offset")

    def __init__(
        self,
        table: Any,
        mode: str = "sum",
        padding_idx: int | None = None,
        include_last_offset: bool = False,
    ):
        self.table = table
        self.mode = check_choice("mode", mode, ("sum", "mean", "max"))
        self.padding_idx = padding_idx
        self.include_last_offset = bool(include_last_offset)

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, dim)``."""
        return tuple(self.table.shape)

    def __call__(
        self,
        indices: Any,
        offsets: Any = None,
        per_sample_weights: Any = None,
        *,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        return embedding_bag(
            self.table,
            indices,
            offsets,
            mode=self.mode,
            per_sample_weights=per_sample_weights,
            include_last_offset=self.include_last_offset,
            padding_idx=self.padding_idx,
            out=out,
        )

    def __repr__(self) -> str:
        kind = (
            f"{self.table.bits}-bit" if isinstance(self.table, RowwiseQuantizedTable) else "float32"
        )
        return (
            f"EmbeddingBag(rows={self.shape[0]}, dim={self.shape[1]}, {kind}, mode={self.mode!r})"
        )


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy()


def _qparams_of(qw: Any, torch: Any, *, dtype: str) -> QParams:
    """QParams of a torch int8 weight tensor (per tensor or per channel along ``axis``)."""
    scheme = qw.qscheme()
    if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        return QParams(np.float32(qw.q_scale()), np.int32(qw.q_zero_point()), dtype=dtype)
    if scheme in (torch.per_channel_affine, torch.per_channel_symmetric):
        axis = int(qw.q_per_channel_axis())
        if axis != 0:
            raise ValueError(
                f"module: expected per-channel weight scales along the output "
                f"axis 0, got axis {axis}"
            )
        return QParams(
            _np(qw.q_per_channel_scales()).astype(np.float32),
            _np(qw.q_per_channel_zero_points()).astype(np.int32),
            dtype=dtype,
            axis=0,
        )
    raise ValueError(f"module: unsupported weight quantization scheme {scheme}")


def _linear_from_quantized(module: Any, torch: Any, static: bool) -> Linear:
    qw = module.weight()
    if qw.dtype != torch.qint8:
        raise TypeError(f"module: expected a qint8 weight, got {qw.dtype}")
    codes = np.ascontiguousarray(_np(qw.int_repr()).astype(np.int8, copy=False))
    pw = pack_weight(codes, qparams=_qparams_of(qw, torch, dtype="int8"))
    b = module.bias()
    bias = None if b is None else np.ascontiguousarray(_np(b), dtype=np.float32)
    outq = None
    if static:
        outq = QParams(np.float32(module.scale), np.int32(module.zero_point), dtype="uint8")
    return Linear(pw, bias, outq)


def _embedding_from_quantized(module: Any, torch: Any) -> EmbeddingBag:
    qw = module.weight()
    if qw.qscheme() != torch.per_channel_affine_float_qparams:
        raise ValueError(
            f"module: expected per_channel_affine_float_qparams weights, got {qw.qscheme()}"
        )
    bits = {torch.quint8: 8, torch.quint4x2: 4, torch.quint2x4: 2}.get(qw.dtype)
    if bits is None:
        raise TypeError(f"module: unsupported quantized table dtype {qw.dtype}")
    rows, dim = int(qw.shape[0]), int(qw.shape[1])
    scale = _np(qw.q_per_channel_scales()).astype(np.float32)
    zp = _np(qw.q_per_channel_zero_points()).astype(np.float32)
    bias = (-zp * scale).astype(np.float32)  # value = (q - zp) * scale = q * scale + bias
    per_byte = 8 // bits
    code_bytes = -(-dim // per_byte)
    codes = _np(qw.int_repr()).astype(np.uint8, copy=False).reshape(rows, code_bytes)
    pdt = np.float32 if bits == 8 else np.float16
    params = np.stack([scale.astype(pdt), bias.astype(pdt)], axis=1)
    fused = np.concatenate([codes, params.view(np.uint8).reshape(rows, -1)], axis=1)
    table = RowwiseQuantizedTable.from_fused(fused, bits=bits, dim=dim)
    mode = getattr(module, "mode", "sum")
    return EmbeddingBag(
        table,
        mode=mode,
        padding_idx=getattr(module, "padding_idx", None),
        include_last_offset=getattr(module, "include_last_offset", False),
    )


def from_torch(
    module: Any,
    *,
    bits: int | None = None,
    granularity: str = "channel",
    reduce_range: bool = False,
) -> Any:
    """qgemm's object for a torch module (see the module docstring for the table).

    Parameters
    ----------
    module : torch.nn.Module
        ``nn.Linear``, ``nn.EmbeddingBag``, torch's quantized ``Linear`` (static or dynamic)
        and ``EmbeddingBag``, a facebookresearch/dlrm ``DLRM_Net``, or FBGEMM's TBE modules
        (``IntNBitTableBatchedEmbeddingBagsCodegen``, ``SplitTableBatchedEmbeddingBagsCodegen``
        from fbgemm-gpu-cpu).
    bits : {None, 8, 4, 2}
        For ``nn.EmbeddingBag``: None keeps the float32 table, 8/4/2 quantizes it row-wise.
        Ignored for other modules.
    granularity, reduce_range
        Passed to :func:`qgemm.pack_weight` for a float ``nn.Linear``.

    Returns
    -------
    Linear, EmbeddingBag, qgemm.models.DLRM or qgemm.embedding_batched.TableBatchedEmbeddingBags

    Examples
    --------
    >>> import numpy as np, pytest
    >>> torch = pytest.importorskip("torch")
    >>> lin = torch.nn.Linear(16, 4)
    >>> layer = from_torch(lin)
    >>> layer
    Linear(out=4, in=16, bias=True)
    >>> x = np.ones((2, 16), np.float32)
    >>> bool(np.allclose(layer(x), lin(torch.from_numpy(x)).detach().numpy(), atol=0.05))
    True
    >>> bag = from_torch(torch.nn.EmbeddingBag(100, 8), bits=4)
    >>> bag
    EmbeddingBag(rows=100, dim=8, 4-bit, mode='mean')
    """
    try:
        import torch
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("from_torch: torch is not installed") from None
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    if bits is not None and bits not in (8, 4, 2):
        raise ValueError(f"bits: expected None, 8, 4 or 2, got {bits!r}")
    ao = torch.ao.nn
    if _is_tbe(module):
        return _tbe_from_fbgemm(module)
    if isinstance(module, ao.quantized.dynamic.Linear):
        return _linear_from_quantized(module, torch, static=False)
    if isinstance(module, ao.quantized.Linear):
        return _linear_from_quantized(module, torch, static=True)
    if isinstance(module, ao.quantized.EmbeddingBag):
        return _embedding_from_quantized(module, torch)
    if isinstance(module, torch.nn.Linear):
        w = np.ascontiguousarray(_np(module.weight), dtype=np.float32)
        b = (
            None
            if module.bias is None
            else np.ascontiguousarray(_np(module.bias), dtype=np.float32)
        )
        return Linear(pack_weight(w, granularity=granularity, reduce_range=reduce_range), b)
    if isinstance(module, torch.nn.EmbeddingBag):
        if module.max_norm is not None:
            raise ValueError(
                "module: EmbeddingBag with max_norm renormalises rows on lookup; not supported"
            )
        table: Any = np.ascontiguousarray(_np(module.weight), dtype=np.float32)
        if bits is not None:
            table = quantize_rowwise(table, bits=bits)
        return EmbeddingBag(
            table,
            mode=module.mode,
            padding_idx=module.padding_idx,
            include_last_offset=module.include_last_offset,
        )
    if all(hasattr(module, a) for a in ("emb_l", "bot_l", "top_l")):
        from .models import DLRM

        itself = getattr(module, "arch_interaction_itself", None)
        return DLRM.from_state_dict(
            module.state_dict(), self_interaction=None if itself is None else bool(itself)
        )
    raise TypeError(
        f"module: unsupported module type {type(module).__name__}; expected nn.Linear, "
        f"nn.EmbeddingBag, torch.ao.nn.quantized(.dynamic).Linear, "
        f"torch.ao.nn.quantized.EmbeddingBag or a DLRM_Net"
    )


# -- FBGEMM's table-batched embedding modules (fbgemm-gpu-cpu) --------------------------------
_TBE_NAMES = ("IntNBitTableBatchedEmbeddingBagsCodegen", "SplitTableBatchedEmbeddingBagsCodegen")
_TBE_BITS = {"int8": 8, "int4": 4, "int2": 2}
_TBE_FLOATS = {"fp32": np.float32, "fp16": np.float16}


# fbgemm's SparseType.as_int() codes (TBE stores its output dtype as one)
_SPARSE_INTS = {0: "fp32", 1: "fp16", 2: "int8", 3: "int4", 4: "int2", 5: "bf16", 6: "fp8"}


def _sparse_type_name(ty: Any) -> str:
    """``"fp32"``, ``"int4"``, ... for an fbgemm ``SparseType`` or its ``as_int()`` code."""
    if isinstance(ty, (int, np.integer)) and not isinstance(ty, bool):
        return _SPARSE_INTS.get(int(ty), str(ty))
    return str(getattr(ty, "value", ty))


def _is_tbe(module: Any) -> bool:
    return type(module).__name__ in _TBE_NAMES and hasattr(module, "split_embedding_weights")


def _tbe_mode(module: Any) -> str:
    pm = getattr(module.pooling_mode, "name", module.pooling_mode)
    modes = {"SUM": "sum", "MEAN": "mean", 0: "sum", 1: "mean"}
    if pm not in modes:
        raise ValueError(
            f"module: pooling_mode {pm} is not supported (expected SUM or MEAN; NONE returns "
            "sequence embeddings, not bags)"
        )
    return modes[pm]


def _tbe_float_table(w: Any, dtype: Any, dim: int) -> np.ndarray:
    """A float TBE table (uint8 rows, or float rows) as a ``[rows, dim]`` view, in place."""
    a = _np(w)
    if a.dtype == np.uint8:
        a = a.view(dtype)
    return a[:, :dim]


def _tbe_quantized_table(w: Any, sb: Any, bits: int, dim: int, reverse: bool) -> Any:
    """An N-bit TBE table (codes, and ``[rows, 4]`` float16 scale then bias -- TBE keeps them in
    front of the codes) rewritten in torch's prepack layout (codes, then scale and bias:
    float32 for 8-bit, float16 for 4/2-bit).  One copy; float16 -> float32 is exact."""
    codes = _np(w)
    qp = _np(sb).view(np.float16)  # [rows, 2]
    if reverse:  # reverse_qparam: bias first
        qp = qp[:, ::-1]
    cb = -(-dim * bits // 8)
    rows = codes.shape[0]
    if bits == 8:
        fused = np.empty((rows, cb + 8), np.uint8)
        fused[:, cb:] = np.ascontiguousarray(qp.astype(np.float32)).view(np.uint8)
    else:
        fused = np.empty((rows, cb + 4), np.uint8)
        fused[:, cb:] = np.ascontiguousarray(qp).view(np.uint8)
    fused[:, :cb] = codes[:, :cb]
    return RowwiseQuantizedTable(fused, bits, dim)


def _tbe_from_fbgemm(module: Any) -> Any:
    from .embedding_batched import TableBatchedEmbeddingBags

    mode = _tbe_mode(module)
    inference = type(module).__name__ == _TBE_NAMES[0]
    weights = module.split_embedding_weights()
    tables: list[Any] = []
    if inference:
        for name in ("index_remappings_array", "index_remapping_hash_table"):
            remap = getattr(module, name, None)
            if remap is not None and remap.numel() > 0:
                raise ValueError("module: TBE index remapping (pruning) is not supported")
        out_name = _sparse_type_name(module.output_dtype)
        if out_name not in _TBE_FLOATS:
            raise ValueError(f"module: output_dtype {out_name} not supported (fp32 or fp16)")
        out_dtype = _TBE_FLOATS[out_name]
        reverse = bool(getattr(module, "reverse_qparam", False))
        for t, ((_, _rows, dim, sparse_type, *_), (w, sb)) in enumerate(
            zip(module.embedding_specs, weights, strict=True)
        ):
            ty = _sparse_type_name(sparse_type)
            if ty in _TBE_BITS:
                tables.append(_tbe_quantized_table(w, sb, _TBE_BITS[ty], int(dim), reverse))
            elif ty in _TBE_FLOATS:
                tables.append(_tbe_float_table(w, _TBE_FLOATS[ty], int(dim)))
            else:
                raise ValueError(
                    f"module: table {t} has weight type {ty}; supported: int8, int4, int2, "
                    "fp16, fp32"
                )
    else:
        out_dtype = np.float32
        for w in weights:
            a = _np(w)
            if a.dtype not in (np.float32, np.float16):
                raise ValueError(f"module: weights of dtype {a.dtype} not supported")
            tables.append(a)
    ftm = list(getattr(module, "feature_table_map", None) or range(len(tables)))
    return TableBatchedEmbeddingBags([tables[f] for f in ftm], mode=mode, out_dtype=out_dtype)
