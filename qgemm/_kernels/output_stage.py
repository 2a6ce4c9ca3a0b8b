"""FBGEMM's output pipeline as one value: :class:`OutputStage`, and the one function that turns
it into the microkernels' operands (:func:`lower`).

After the int32 accumulation ``raw[i, j] = sum_k x_q[i, k] * w_q[j, k]`` every GEMM call runs
the same pipeline (gemmlowp's output stages, FBGEMM's ``ReQuantizeForFloat`` /
``ReQuantizeOutput``), in float32 with round half to even::

    zero-point correction  raw -= x_zp * colsum[j] + rowsum[i] * w_zp[j] - K * x_zp * w_zp[j]
                           (+ int_bias[j], in accumulator units)
    float output           max(raw * x_scale * w_scale[j] + float_bias[j], 0 if relu else -inf)
    uint8 output           clamp(rint((raw + float_bias[j] / ab[j]) * (ab[j] / out_scale))
                                 + out_zp, out_zp if relu else 0, out_qmax)
                           with ab[j] = x_scale * w_scale[j]

An :class:`OutputStage` holds every operand of that pipeline under its name.  The weight half
(zero points, column sums, scales) is made once per packed weight, the call half (activation
parameters, bias, ReLU, requantization target) once per call; the output dtype is the static
part, the ``kind`` of the kernel key (``"raw"`` int32, ``"float"``, ``"requant"`` uint8,
``"dynamic"`` float32 with the activation quantization fused in front), which selects the
compiled pipeline (FBGEMM's template flags).

Numba takes the value as it is inside kernels (a ``NamedTuple``).  At the Python -> Numba
boundary the kernels take its fields in order (``kernel(..., *stage, ...)``) and re-form the
value on their first line: unboxing a ``NamedTuple`` argument costs ~1.2 us more per call than
its fields (measured), a tenth of a small GEMM.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from numba import types

from .gemm_ukernel import FLOAT, RAW, REQUANT

__all__ = ["OutputStage", "STAGE_TYPES", "PAD", "MODES", "lower", "ep_float", "ep_requant"]

PAD = 64
"""Per-column vectors the microkernels read ``NR`` wide are padded by this many entries
(the widest tile), so full-width vector loads at the last tile stay in bounds."""

MODES = {"raw": RAW, "float": FLOAT, "requant": REQUANT, "dynamic": FLOAT}
"""Microkernel output stage (``MODE`` literal) of each kernel kind."""


class OutputStage(NamedTuple):
    """Every operand of the GEMM output pipeline (see the module docstring), by name.

    Per-column arrays have one entry per output column (per-tensor and per-group weight
    parameters are expanded at pack time); those marked *padded* have :data:`PAD` extra zeros.
    """

    # -- zero-point correction (weight half)
    w_zero_point: np.ndarray
    """int32 [N + PAD], padded: weight zero point of each output column."""
    has_w_zero_point: bool
    """Any ``w_zero_point`` non-zero (the ``rowsum * w_zp`` term is skipped otherwise)."""
    w_colsum: np.ndarray
    """int32 [N]: ``sum_k w_q[j, k] - K * w_zp[j]``, multiplied by the activation zero point."""
    # -- scale (weight half)
    w_scale: np.ndarray
    """float32 [N + PAD], padded: weight scale of each output column."""
    # -- activations (call half)
    x_zero_point: np.int32
    """Activation zero point (static kinds; the dynamic kind chooses its own per call)."""
    x_scale: np.float32
    """Activation scale (static kinds; the dynamic kind chooses its own per call)."""
    x_qmax: int
    """Activation code maximum the dynamic kind quantizes to: 255, or 127 (7-bit)."""
    # -- bias, ReLU
    int_bias: np.ndarray
    """int32 [N]: bias in accumulator units (``x_scale * w_scale[j]``); zeros when none."""
    float_bias: np.ndarray
    """float32 [N]: bias in real units; zeros when none.  Must be finite (checked in-kernel)."""
    relu: bool
    """Fused ReLU: float output ``max(., 0)``; uint8 output clamped below at ``out_zero_point``."""
    # -- requantization target (uint8 output)
    out_scale: np.float32
    out_zero_point: np.int32
    out_qmax: int
    """Output code maximum: 255, or 127 for 7-bit output parameters."""


_I32V = types.Array(types.int32, 1, "C")
_F32V = types.Array(types.float32, 1, "C")
STAGE_TYPES: tuple[types.Type, ...] = (
    _I32V,  # w_zero_point
    types.boolean,  # has_w_zero_point
    _I32V,  # w_colsum
    _F32V,  # w_scale
    types.int32,  # x_zero_point
    types.float32,  # x_scale
    types.int64,  # x_qmax
    _I32V,  # int_bias
    _F32V,  # float_bias
    types.boolean,  # relu
    types.float32,  # out_scale
    types.int32,  # out_zero_point
    types.int64,  # out_qmax
)
"""Numba types of the :class:`OutputStage` fields, in order (the kernels' signatures)."""
assert len(STAGE_TYPES) == len(OutputStage._fields)


@numba.njit(nogil=True, error_model="numpy")
def lower(stage, x_scale, mode, pad_bias):
    """The one place the description becomes the microkernels' flat operands.

    ``x_scale`` is the activation scale in effect (the stage's own for static kinds, the
    per-call choice for the dynamic kind; the zero-point correction is integer and starts the
    accumulators, see :func:`.gemm.gemm_kernel`); ``mode`` is the microkernel's
    output stage (``RAW``, ``FLOAT``, ``REQUANT`` of :mod:`.gemm_ukernel`); ``pad_bias``: give
    the float bias as a padded copy (vector microkernels read it ``NR`` wide).

    Returns ``(p1, p2, s1, s2, s3)`` as :func:`.gemm_ukernel.ukr` and :func:`ep_float` /
    :func:`ep_requant` read them:

    * ``FLOAT``: ``p1`` = weight scales, ``p2`` = float bias, ``s1`` = activation scale,
      ``s2`` = the ReLU floor (0 or -inf).
    * ``REQUANT``: ``p1`` = ``float_bias / ab``, ``p2`` = ``ab / out_scale`` (``ab`` =
      ``x_scale * w_scale``, padded), ``s1`` = output zero point, ``[s2, s3]`` the clamp range
      (``out_zero_point`` or 0 .. ``out_qmax``).
    * ``RAW``: unused placeholders.
    """
    n = stage.float_bias.shape[0]
    zero = np.float32(0.0)
    if mode == FLOAT:
        if pad_bias:
            p2 = np.zeros(n + PAD, np.float32)
            fb = stage.float_bias
            for j in range(n):  # (a loop: an array-to-array slice assignment compiles
                p2[j] = fb[j]  # Numba's shape-mismatch error message, ~1 s of compile)
        else:
            p2 = stage.float_bias
        floor = zero if stage.relu else np.float32(-np.inf)
        return stage.w_scale, p2, x_scale, floor, zero
    if mode == REQUANT:
        mult = np.zeros(n + PAD, np.float32)
        bias_q = np.zeros(n + PAD, np.float32)
        for j in range(n):
            ab = x_scale * stage.w_scale[j]
            mult[j] = ab / stage.out_scale
            bias_q[j] = stage.float_bias[j] / ab
        ozp = np.float32(stage.out_zero_point)
        qlo = ozp if stage.relu else zero
        return bias_q, mult, ozp, qlo, np.float32(stage.out_qmax)
    dummy = np.zeros(1, np.float32)
    return dummy, dummy, zero, zero, zero


# One row of one tile on the portable path; 0-based loops over views so LLVM vectorises them.
# The same float32 operations in the same order as the vector microkernels' output stage.


@numba.njit(nogil=True, error_model="numpy")
def ep_float(s, o, w_scale, bias, x_scale, floor, rs, bzp, has_bzp):
    """ReQuantizeForFloat: ``raw * x_scale * w_scale[j] + bias[j]``, then ``max(., floor)``."""
    if has_bzp:
        for c in range(s.size):
            v = np.int64(s[c]) - rs * np.int64(bzp[c])
            o[c] = max(np.float32(v) * x_scale * w_scale[c] + bias[c], floor)
    else:
        for c in range(s.size):
            o[c] = max(np.float32(s[c]) * x_scale * w_scale[c] + bias[c], floor)


@numba.njit(nogil=True, error_model="numpy")
def ep_requant(s, o, bias_q, mult, ozp, qlo, qmax, rs, bzp, has_bzp):
    """ReQuantizeOutput: ``clamp(rint((raw + bias_q[j]) * mult[j]) + ozp, qlo, qmax)``."""
    if has_bzp:
        for c in range(s.size):
            v = np.int64(s[c]) - rs * np.int64(bzp[c])
            f = np.rint((np.float32(v) + bias_q[c]) * mult[c]) + ozp
            o[c] = np.uint8(min(max(f, qlo), qmax))
    else:
        for c in range(s.size):
            f = np.rint((np.float32(s[c]) + bias_q[c]) * mult[c]) + ozp
            o[c] = np.uint8(min(max(f, qlo), qmax))
