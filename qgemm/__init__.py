"""qgemm: quantized CPU kernels for recommendation-model inference, in Numba.

Packed int8 GEMM with a fused output stage, embedding bags over float and rowwise-quantized
tables, and model averaging -- FBGEMM's job from a pure-pip install.
"""

from __future__ import annotations

from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from ._cache import cache_clear, cache_info, wait_ready
from ._config import get_isa, get_num_threads, set_isa, set_num_threads
from ._half import HalfPackedWeight, linear_half, pack_weight_half
from .averaging import (
    CyclicalLR,
    DecentralizedResult,
    RunningAverage,
    average,
    cyclical_lr,
    train_decentralized,
)
from .embedding import embedding_bag
from .embedding_batched import TableBatchedEmbeddingBags, embedding_bags
from .gemm import PackedWeight, linear, matmul_u8s8, pack_weight, quantized_linear
from .quantize import (
    QParams,
    RowwiseQuantizedTable,
    choose_qparams,
    dequantize,
    qrange,
    quantize,
    quantize_rowwise,
)
from .warmup import warmup

if _TYPE_CHECKING:  # the lazily loaded names, for type checkers and IDEs
    from .interop import from_torch
    from .models import DLRM

__version__ = "0.1.0"

# Topic subpackages loaded on first use, so ``import qgemm`` stays light and never imports Dask:
# ``qgemm.laplace`` / ``qgemm.scoring`` (uncertainty), ``qgemm.training`` (averaging by topic),
# ``qgemm.distributed`` (Dask; the optional ``distributed`` extra), ``qgemm.bench`` (the tools).
_LAZY_SUBMODULES = ("laplace", "scoring", "training", "distributed", "bench")

# Public names whose module is loaded on first use: ``import qgemm`` compiles nothing and loads
# no kernel (the DLRM model and its kernels, the torch converter come with their first use).
_LAZY_NAMES = {"DLRM": "models", "from_torch": "interop"}


def __getattr__(name: str) -> _Any:
    import importlib

    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY_NAMES[name]}"), name)
        globals()[name] = value  # later look-ups skip this hook
        return value
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES) | set(_LAZY_NAMES))


__all__ = [
    "__version__",
    "cache_clear",
    "cache_info",
    "wait_ready",
    "warmup",
    "get_isa",
    "set_isa",
    "get_num_threads",
    "set_num_threads",
    "QParams",
    "RowwiseQuantizedTable",
    "choose_qparams",
    "dequantize",
    "qrange",
    "quantize",
    "quantize_rowwise",
    "embedding_bag",
    "embedding_bags",
    "TableBatchedEmbeddingBags",
    "PackedWeight",
    "HalfPackedWeight",
    "pack_weight_half",
    "linear_half",
    "pack_weight",
    "linear",
    "quantized_linear",
    "matmul_u8s8",
    "DLRM",
    "from_torch",
    "average",
    "RunningAverage",
    "cyclical_lr",
    "CyclicalLR",
    "train_decentralized",
    "DecentralizedResult",
]
