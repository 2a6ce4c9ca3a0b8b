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

This module is the public face; the implementation lives in :mod:`qgemm.training`, one topic
per module (the engine, the reduction core ``partial -> combine -> finish``, running averages,
schedules, the decentralised driver).
"""

from __future__ import annotations

from .training import (
    CLR_MODES,
    INT_POLICIES,
    CyclicalLR,
    DecentralizedResult,
    Partial,
    RunningAverage,
    average,
    combine,
    cyclical_lr,
    finish,
    partial,
    train_decentralized,
)

__all__ = [
    "INT_POLICIES",
    "CLR_MODES",
    "average",
    "RunningAverage",
    "cyclical_lr",
    "CyclicalLR",
    "train_decentralized",
    "DecentralizedResult",
    "Partial",
    "partial",
    "combine",
    "finish",
]
