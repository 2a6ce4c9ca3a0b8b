"""qgemm: quantized CPU kernels for recommendation-model inference, in Numba.

Packed int8 GEMM with a fused output stage, embedding bags over float and rowwise-quantized
tables, and model averaging -- FBGEMM's job from a pure-pip install.
"""

from __future__ import annotations

from ._cache import cache_clear, cache_info
from ._config import get_isa, get_num_threads, set_isa, set_num_threads
from .averaging import (
    CyclicalLR,
    DecentralizedResult,
    RunningAverage,
    average,
    cyclical_lr,
    train_decentralized,
)
from .embedding import embedding_bag
from .gemm import PackedWeight, linear, matmul_u8s8, pack_weight, quantized_linear
from .interop import from_torch
from .models import DLRM
from .quantize import (
    QParams,
    RowwiseQuantizedTable,
    choose_qparams,
    dequantize,
    qrange,
    quantize,
    quantize_rowwise,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "cache_clear",
    "cache_info",
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
    "PackedWeight",
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
