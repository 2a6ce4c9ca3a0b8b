"""Packed uint8 x int8 GEMM with a fused output stage -- qgemm's FBGEMM ``fbgemmPacked``.

Weights are quantized (if float) and packed once with :func:`pack_weight`; the GEMM then
accumulates ``uint8 activations x int8 weights`` in int32 and applies the whole output stage
in the same pass (FBGEMM's output pipeline)::

    raw[i, j]  = sum_k x_q[i, k] * w_q[j, k]                          (int32)
    raw[i, j] -= x_zp * colsum[j] + rowsum[i] * w_zp[j] - K * x_zp * w_zp[j]
    float out  = raw * x_scale * w_scale[j] + bias[j]       (then max(0, .) with relu)
    uint8 out  = clamp(rint((raw + bias[j] / (x_scale * w_scale[j]))
                             * (x_scale * w_scale[j] / out_scale)) + out_zp,
                       out_zp if relu else 0, 255)

all in float32 with round-half-to-even (FBGEMM's ``ReQuantizeForFloat`` and
``ReQuantizeOutput``; an int32 bias is added to ``raw`` before the conversion instead).

Precision
---------
Results are **exact int32 on every CPU by default**.  AVX2's ``vpmaddubsw`` adds two
``u8 x s8`` products into a *saturating* int16, so FBGEMM's numbers differ between AVX2 and
VNNI machines.  qgemm's AVX2 path uses ``vpmaddubsw`` only when saturation is provably
impossible -- ``255 * max(|w[k]| + |w[k+1]|) <= 32767`` over the weight pairs (e.g. weights
packed with ``reduce_range=True``), or the activations' maximum times that pair bound fits
(e.g. 7-bit activations) -- and otherwise an exact ``vpmaddwd`` path (int8 weights widened
in registers x int16 activations; about 0.8x the saturating speed); ``saturate=True``
reproduces FBGEMM's AVX2 numbers bit for bit on any CPU.  VNNI's ``vpdpbusd`` (AVX-512
VNNI, or AVX-VNNI's 256-bit form) is exact and is used whenever the CPU has it.  The path is
chosen by :func:`qgemm.get_isa` (``QGEMM_ISA`` / :func:`qgemm.set_isa`); which microkernel and tile
each path runs is the table in :mod:`qgemm._isa`.

Layout of the code: :class:`PackedWeight` and :func:`pack_weight` live in
:mod:`qgemm._packing` (re-exported here), with what a weight memoises per call shape: the
plan (``_plan``: kernels, task split) and the output stage of a call, one
:class:`qgemm._kernels.output_stage.OutputStage` value (``_stage``), lowered to the
microkernels' operands in one place (:func:`qgemm._kernels.output_stage.lower`).  A call
whose inputs need no conversion is replayed on later calls by the fast path here
(``_Fast``: the kernel's compiled entry point and its prebuilt weight-side arguments).

Limits: ``K <= 65793`` for symmetric weights and ``K <= 33025`` with weight zero points (the
largest ``K`` whose worst-case dot product fits int32); larger ``K`` raises ``ValueError``.
"""

from __future__ import annotations

from time import perf_counter as _perf_counter
from typing import Any

import numpy as np

from . import _config, _tiers
from ._half import HalfPackedWeight, linear_half
from ._kernels.gemm import KINDS, _signature, gemm_kernel
from ._kernels.output_stage import OutputStage
from ._packing import PackedWeight, _estimate, _Plan, _plan, _stage, pack_weight
from ._tuning import GEMM_FAST_ENTRIES, GEMM_PROBE_MAX, GEMM_PROBE_MIN
from ._validate import as_array, check_finite, check_out, compiled_entry, replay_out
from .quantize import QParams

__all__ = ["PackedWeight", "pack_weight", "linear", "quantized_linear", "matmul_u8s8"]

_INT32_MAX = 2**31 - 1
_F32: tuple[np.dtype, ...] = (np.dtype(np.float32),)
_F32_I32 = (np.dtype(np.float32), np.dtype(np.int32))
_U8: np.dtype = np.dtype(np.uint8)
_I32: np.dtype = np.dtype(np.int32)
_CFG = _config._state  # isa, threads, adaptive_threads (mutated in place by the setters)
_TIERS = _tiers._state  # epoch: bumped by cache_clear and by every tiered-kernel swap
_ARGTYPES = {kind: tuple(_signature(kind).args) for kind in KINDS}
_FAST_MAX = GEMM_FAST_ENTRIES


# ------------------------------------------------------------------------------- dispatch


def _rows(x: np.ndarray, k: int) -> np.ndarray:
    """``x [..., K]`` as 2-D ``[M, K]`` (a view when possible; works for K = 0)."""
    if x.ndim == 2:
        return x
    m = 1
    for d in x.shape[:-1]:
        m *= d
    return x.reshape(m, k)


def _activation_rows(x: np.ndarray, k: int, kg: int) -> np.ndarray:
    """``x`` as a 2-D uint8 ``[M, K]`` array whose rows can be read ``4 * kg`` bytes at a time
    (a zero-padded copy when ``K`` is not a multiple of 4, the rows are not unit-stride or the
    array is read-only)."""
    x2 = _rows(x, k)
    if (
        (k & 3) == 0
        and (k == 0 or x2.strides[1] == 1)
        and x2.strides[0] >= 0
        and x2.flags.writeable
    ):
        return x2
    buf = np.zeros((x2.shape[0], kg * 4), np.uint8)
    buf[:, :k] = x2
    return buf


def _run(
    kind: str,
    a2: np.ndarray,
    m: int,
    weight: PackedWeight,
    saturate: bool,
    stage: OutputStage,
    out2: np.ndarray,
    plan: _Plan | None = None,
) -> int:
    if plan is None:
        plan = _plan(kind, m, weight, saturate)
    args = (a2, m, weight.shape[1], *plan.head, *stage, plan.nchunks)
    if plan.par is None:
        return plan.ser(*args, 1, out2)
    if not _config._state["adaptive_threads"]:
        _config.sync_threads()
        return plan.par(*args, plan.threads, out2)
    if plan.ser is None:
        plan.ser = gemm_kernel(plan.ser_key)
    t0 = _perf_counter()
    probe = t0 >= plan.next_probe or plan.t_ser == 0.0 or plan.t_par == 0.0
    if plan.t_par == 0.0:
        use_par = True  # first call: measure the parallel twin, then the serial one
    elif plan.t_ser == 0.0:
        use_par = False
    else:
        use_par = plan.use_par != probe
    if use_par:
        _config.sync_threads()
        code = plan.par(*args, plan.threads, out2)
    else:
        code = plan.ser(*args, 1, out2)
    dt = _perf_counter() - t0
    if use_par:
        plan.t_par = _estimate(plan.t_par, dt)
    else:
        plan.t_ser = _estimate(plan.t_ser, dt)
    if plan.t_par and plan.t_ser:
        best = plan.t_par <= plan.t_ser
        if probe:
            # the probed twin lost: back off further; it won: switch and probe soon again
            plan.backoff = (
                GEMM_PROBE_MIN if best != plan.use_par else min(2 * plan.backoff, GEMM_PROBE_MAX)
            )
            plan.next_probe = t0 + plan.backoff
        plan.use_par = best
    return code


def _check_weight(weight: Any, half_ok: bool = False) -> PackedWeight:
    if not isinstance(weight, PackedWeight):
        what = "PackedWeight or HalfPackedWeight" if half_ok else "PackedWeight"
        raise TypeError(
            f"weight: expected a {what} (see qgemm.pack_weight), got {type(weight).__name__}"
        )
    return weight


def _check_bias(bias: Any, n: int, dtypes) -> np.ndarray | None:
    if bias is None:
        return None
    if not (type(bias) is np.ndarray and bias.dtype in dtypes and bias.ndim == 1):
        bias = as_array("bias", bias, dtypes=dtypes, ndim=1)
    if bias.shape[0] != n:
        raise ValueError(f"bias: expected length {n} (output features), got {bias.shape[0]}")
    flags = bias.flags
    if not (flags.c_contiguous and flags.writeable):
        bias = np.array(bias, order="C")
    return bias


def _check_bool(name: str, v: Any) -> bool:
    if v is False or v is True:
        return v
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(v).__name__}")
    return bool(v)


def _input(name: str, x: Any, dtype: Any, k: int) -> np.ndarray:
    if type(x) is not np.ndarray:
        x = as_array(name, x)
    if x.dtype != dtype:
        as_array(name, x, dtypes=(dtype,))  # raises the standard TypeError
    if x.ndim == 0:
        raise ValueError(f"{name}: expected at least 1 dimension [..., K], got a 0-D array")
    if x.shape[-1] != k:
        raise ValueError(
            f"{name}: expected last dimension K = {k} (weight.shape[1]), got shape {x.shape}"
        )
    return x


def _output(out: Any, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype)
    if type(out) is np.ndarray and out.dtype == dtype and out.shape == shape:
        flags = out.flags
        if flags.c_contiguous and flags.writeable:
            return out
    return check_out("out", out, shape, dtype)


def _raise_bias(code: int) -> None:
    j = -2 - code
    raise ValueError(f"bias: expected finite values, got non-finite at index {j}")


def _raise_x(code: int, x: np.ndarray) -> None:
    pos = np.unravel_index(code, x.shape)
    pos_s = int(pos[0]) if len(pos) == 1 else tuple(int(i) for i in pos)
    raise ValueError(f"x: expected finite values, got {x[pos]} at index {pos_s}")


# ------------------------------------------------------------------- the per-call fast path
#
# A layer called again and again with inputs of the same shape and kind pays, on the checked
# path above, ~5 us of Python (validation, normalisation, plan and stage look-ups, the
# argument tuple) plus ~1.2 us of Numba's type dispatch over 25 arguments -- more than the
# arithmetic of a 1 x 128 x 512 GEMM.  The first checked call of a shape leaves a _Fast entry
# on the weight: the kernel's compiled entry point and every argument that depends only on
# the weight, the plan and the call's options.  A later call uses it when the same option
# objects come back (``is``) and the arrays pass the few checks that fix their Numba types;
# anything else (a new shape, option, bias or ``out`` that needs converting or copying, a
# changed ISA, thread count or kernel epoch) takes the checked path, which raises the usual
# errors.  Only inputs the checked path would take as they are ever reach the kernel here.


class _Fast:
    """One memoised call: checked once by the full path, replayed with a few identity tests."""

    __slots__ = ("epoch", "isa", "threads", "bias", "bdt", "bshape", "relu", "rr", "sat",
                 "xqp", "oqp", "m", "n", "oshape", "odt", "flat", "call", "mid", "par",
                 "direct")  # fmt: skip

    def __init__(self, plan: _Plan, kind: str, mid: tuple, out: np.ndarray, x_ndim: int,
                 bias: Any, **opts: Any) -> None:  # fmt: skip
        self.epoch = _TIERS["epoch"]
        self.isa = _CFG["isa"]
        self.threads = _CFG["threads"]
        self.par = plan.par is not None
        memo = plan.entry  # resolving the entry point reads Numba's tables: tens of us
        if memo is None or memo[0] != self.epoch:
            kern = plan.par if self.par else plan.ser
            memo = (self.epoch, compiled_entry(kern, _ARGTYPES[kind]))
            plan.entry = memo
        self.call = memo[1]
        self.mid = mid
        self.m, self.n = mid[0], mid[5]
        self.oshape, self.odt = out.shape, out.dtype
        self.flat = x_ndim == 2  # x and out are 2-D already (no reshape)
        self.bias = bias
        self.bdt = None if bias is None else bias.dtype
        self.bshape = (self.n,)
        self.xqp = self.oqp = self.rr = None
        self.direct = False
        for name, value in opts.items():
            setattr(self, name, value)


class _Seen:
    """A first sighting of a call's options at an input shape (never replayed: epoch -1).  The
    checked call that sees the same options again makes the entry, so a caller that passes a
    new bias every time, or inputs that always need converting, pays no entry per call."""

    __slots__ = ("bias", "relu", "rr", "sat", "xqp", "oqp", "epoch")

    def __init__(self, bias: Any, relu: Any, rr: Any, sat: Any, xqp: Any, oqp: Any) -> None:
        self.bias, self.relu, self.rr, self.sat, self.xqp, self.oqp = bias, relu, rr, sat, xqp, oqp
        self.epoch = -1


def _due(memo: dict, key: tuple, bias: Any, relu: Any, rr: Any, sat: Any, xqp: Any,
         oqp: Any) -> bool:  # fmt: skip
    """Whether a checked call with these (replayable) options should make the entry of ``key``
    now: seen before with the same option objects, and no live entry for them yet."""
    e = memo.get(key)
    if (e is None or e.bias is not bias or e.relu is not relu or e.rr is not rr
            or e.sat is not sat or e.xqp is not xqp or e.oqp is not oqp):  # fmt: skip
        if len(memo) >= _FAST_MAX:
            memo.clear()
        memo[key] = _Seen(bias, relu, rr, sat, xqp, oqp)
        return False
    return e.epoch != _TIERS["epoch"] or e.isa != _CFG["isa"] or e.threads != _CFG["threads"]


def _replay(e: _Fast, a2: np.ndarray, bias: Any, out: Any) -> Any:
    """Run entry ``e`` on the 2-D activations ``a2`` (types already checked):
    ``(code, result)``, or None when the entry is stale or ``bias`` / ``out`` are not exactly
    as the checked path would take them as they are."""
    out = replay_out(bias, e.bdt, e.bshape, out, e.odt, e.oshape)
    if out is None:
        return None
    if e.par:
        if _CFG["adaptive_threads"]:
            return None  # adaptive threads time every parallel call: the checked path does
        _config.sync_threads()
    if e.flat:
        return e.call(a2, *e.mid, out), out
    return e.call(a2, *e.mid, out.reshape(e.m, e.n)), out


def _fast_dynamic(x: np.ndarray, weight: PackedWeight, bias: Any, relu: Any, rr: Any,
                  sat: Any, out: Any) -> np.ndarray | None:  # fmt: skip
    e = weight._fast_dyn.get(x.shape)
    if e is None or e.bias is not bias or e.relu is not relu or e.rr is not rr:
        return None
    if e.sat is not sat or x.dtype is not _F32[0]:
        return None
    if e.epoch != _TIERS["epoch"] or e.isa != _CFG["isa"] or e.threads != _CFG["threads"]:
        return None  # (a _Seen sighting, or a changed kernel epoch, ISA or thread count)
    if not x.flags.carray:  # C-contiguous, aligned and writeable
        return None
    done = _replay(e, x if e.flat else x.reshape(e.m, -1), bias, out)
    if done is None:
        return None
    code, res = done
    if code != -1:
        if code >= 0:
            _raise_x(code, x)
        _raise_bias(code)
    return res


def _fast_static(x_q: np.ndarray, x_qparams: Any, weight: PackedWeight, bias: Any, relu: Any,
                 out_qparams: Any, sat: Any, out: Any) -> np.ndarray | None:  # fmt: skip
    e = weight._fast_static.get(x_q.shape)
    if e is None or e.xqp is not x_qparams or e.oqp is not out_qparams or e.bias is not bias:
        return None
    if e.relu is not relu or e.sat is not sat or x_q.dtype is not _U8:
        return None
    if e.epoch != _TIERS["epoch"] or e.isa != _CFG["isa"] or e.threads != _CFG["threads"]:
        return None
    if e.direct and x_q.flags.carray:
        a2 = x_q if e.flat else x_q.reshape(e.m, -1)
    else:  # rows padded to whole k-groups, or a view the kernel cannot read in place: a copy
        a2 = _activation_rows(x_q, e.mid[1], weight._kg)
    done = _replay(e, a2, bias, out)
    if done is None:
        return None
    if done[0] != -1:
        _raise_bias(done[0])
    return done[1]


def _mid(plan: _Plan, m: int, k: int, stage: OutputStage) -> tuple:
    """The kernel arguments between the activations and ``out`` (see ``_run``)."""
    return (m, k, *plan.head, *stage, plan.nchunks, plan.threads if plan.par else 1)


# ------------------------------------------------------------------------------- public API


def quantized_linear(
    x_q: Any,
    x_qparams: QParams,
    weight: PackedWeight,
    bias: Any = None,
    *,
    relu: bool = False,
    out_qparams: QParams | None = None,
    saturate: bool = False,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Static quantized linear layer: ``uint8 x_q [..., K]`` times packed int8 weights.

    With ``out_qparams`` the result is requantized to uint8 (FBGEMM's ``ReQuantizeOutput``);
    otherwise it is dequantized to float32 (``ReQuantizeForFloat``).  See the module docstring
    for the formulas; rounding is half to even.

    Parameters
    ----------
    x_q : ndarray of uint8, shape (..., K)
        Quantized activations (any strides; a copy is made only when rows are not unit-stride
        or ``K`` is not a multiple of 4).
    x_qparams : QParams
        Per-tensor uint8 parameters of ``x_q``.
    weight : PackedWeight
    bias : ndarray of float32 or int32, shape (N,), optional
        Float bias is added in real units; int32 bias in accumulator units
        (``x_scale * w_scale[j]``), before the output conversion (FBGEMM's two bias types).
    relu : bool
        Fused ReLU (uint8 output: clamp at ``out_zp``).
    out_qparams : QParams, optional
        Per-tensor uint8 output parameters; requantized output when given.
    saturate : bool
        Reproduce FBGEMM's AVX2 int16 saturation (``vpmaddubsw``) bit for bit.
    out : ndarray, optional
        C-contiguous ``[..., N]`` buffer (uint8 with ``out_qparams``, else float32).

    Returns
    -------
    ndarray, shape (..., N), uint8 or float32

    Examples
    --------
    >>> import numpy as np
    >>> from qgemm import QParams
    >>> from qgemm.gemm import pack_weight, quantized_linear
    >>> pw = pack_weight(np.array([[1.0, -1.0], [0.5, 0.5]], np.float32))
    >>> xq = np.array([[130, 132]], np.uint8)  # x = [1.0, 2.0]
    >>> quantized_linear(xq, QParams(0.5, 128), pw)
    array([[-1. ,  1.5]], dtype=float32)
    >>> quantized_linear(xq, QParams(0.5, 128), pw, out_qparams=QParams(0.25, 0))
    array([[0, 6]], dtype=uint8)
    """
    if type(weight) is PackedWeight and type(x_q) is np.ndarray:
        res = _fast_static(x_q, x_qparams, weight, bias, relu, out_qparams, saturate, out)
        if res is not None:
            return res
    bias0, relu0, sat0 = bias, relu, saturate  # as passed (a replayed call tests identity)
    weight = _check_weight(weight)
    n, k = weight.shape
    x_q = _input("x_q", x_q, _U8, k)
    if not isinstance(x_qparams, QParams):
        raise TypeError(f"x_qparams: expected QParams, got {type(x_qparams).__name__}")
    if x_qparams.dtype != "uint8" or x_qparams.axis is not None:
        raise ValueError(f"x_qparams: expected per-tensor uint8 parameters, got {x_qparams!r}")
    relu = _check_bool("relu", relu)
    saturate = _check_bool("saturate", saturate)
    bias = _check_bias(bias, n, _F32_I32)
    if out_qparams is not None:
        if not isinstance(out_qparams, QParams):
            raise TypeError(
                f"out_qparams: expected QParams or None, got {type(out_qparams).__name__}"
            )
        if out_qparams.dtype != "uint8" or out_qparams.axis is not None:
            raise ValueError(
                f"out_qparams: expected per-tensor uint8 parameters, got {out_qparams!r}"
            )
        kind, odt = "requant", _U8
    else:
        kind, odt = "float", _F32[0]
    stage = _stage(weight, kind, x_qparams, out_qparams, bias, relu)
    out = _output(out, x_q.shape[:-1] + (n,), odt)
    a2 = _activation_rows(x_q, k, weight._kg)
    m = a2.shape[0]
    tmp = out if out.size == 0 or m == 0 else out.reshape(m, n)
    if m == 0 or n == 0:
        if bias is not None and bias.dtype == np.float32:
            check_finite("bias", bias)
        return out
    plan = _plan(kind, m, weight, saturate)
    memo = weight._fast_static
    if bias is bias0 and _due(memo, x_q.shape, bias, relu0, None, sat0, x_qparams, out_qparams):
        memo[x_q.shape] = _Fast(plan, kind, _mid(plan, m, k, stage), out, x_q.ndim, bias,
                                relu=relu0, sat=sat0, xqp=x_qparams, oqp=out_qparams,
                                direct=(k & 3) == 0)  # fmt: skip
    code = _run(kind, a2, m, weight, saturate, stage, tmp, plan)
    if code != -1:
        _raise_bias(code)
    return out


def linear(
    x: Any,
    weight: PackedWeight | HalfPackedWeight,
    bias: Any = None,
    *,
    relu: bool = False,
    reduce_range: bool | None = None,
    saturate: bool = False,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Dynamically quantized linear layer: float32 ``x [..., K]`` -> float32 ``[..., N]``.

    Per call, ``x`` is quantized to uint8 per tensor with parameters chosen from its range
    (FBGEMM's ``ChooseQuantizationParams``, exactly :func:`qgemm.choose_qparams`), multiplied
    by the packed int8 weights with int32 accumulation, and dequantized with bias and ReLU
    fused -- one kernel call, like FBGEMM's ``PackAWithQuantRowOffset`` + ``ReQuantizeForFloat``
    (torch's ``quantized::linear_dynamic``).

    Parameters
    ----------
    x : ndarray of float32, shape (..., K)
        Must be finite (a non-finite value raises ``ValueError`` and nothing is written).
    weight : PackedWeight or HalfPackedWeight
        A half-precision weight (``pack_weight(w, dtype="float16" | "bfloat16")``) runs
        :func:`qgemm._half.linear_half` (float32 x half -> float32; no ``reduce_range`` or
        ``saturate``).
    bias : ndarray of float32, shape (N,), optional
    relu : bool
    reduce_range : bool, optional
        Quantize activations to 7 bits (``[0, 127]``).  ``None`` (default) chooses per path:
        7 bits on the AVX2 path when the weights could saturate ``vpmaddubsw`` (so the fast
        path stays exact; costs about 1 bit of activation precision, as PyTorch's x86 default),
        full 8 bits otherwise (VNNI and portable paths are exact and fast at 8 bits).  Pass a
        bool to get the same numbers on every CPU.
    saturate : bool
        Reproduce FBGEMM's AVX2 int16 saturation (only matters with 8-bit activations).
    out : ndarray of float32, optional
        C-contiguous ``[..., N]`` buffer.

    Returns
    -------
    ndarray of float32, shape (..., N)

    Examples
    --------
    >>> import numpy as np
    >>> from qgemm.gemm import linear, pack_weight
    >>> w = np.array([[1.0, 2.0], [-1.0, 0.5]], np.float32)
    >>> y = linear(np.array([[1.0, 1.0]], np.float32), pack_weight(w), relu=True)
    >>> np.round(y, 1)
    array([[3., 0.]], dtype=float32)
    >>> linear(np.array([[1.0, 1.0]], np.float32), pack_weight(w, dtype="float16"))
    array([[ 3. , -0.5]], dtype=float32)
    """
    if isinstance(weight, HalfPackedWeight):
        if reduce_range is not None or saturate:
            raise ValueError(
                "reduce_range/saturate: only for an int8 PackedWeight, got a HalfPackedWeight"
            )
        return linear_half(x, weight, bias=bias, relu=relu, out=out)
    if type(weight) is PackedWeight and type(x) is np.ndarray:
        res = _fast_dynamic(x, weight, bias, relu, reduce_range, saturate, out)
        if res is not None:
            return res
    bias0, relu0, rr0, sat0 = bias, relu, reduce_range, saturate  # as passed (see _Fast)
    weight = _check_weight(weight, half_ok=True)
    n, k = weight.shape
    x = _input("x", x, _F32[0], k)
    relu = _check_bool("relu", relu)
    saturate = _check_bool("saturate", saturate)
    if reduce_range is not None:
        reduce_range = _check_bool("reduce_range", reduce_range)
    bias = _check_bias(bias, n, _F32)
    out = _output(out, x.shape[:-1] + (n,), _F32[0])
    x2 = _rows(x, k)
    flags = x2.flags
    if not (flags.c_contiguous and flags.writeable):
        x2 = np.array(x2, order="C")
    m = x2.shape[0]
    if m == 0 or n == 0:
        check_finite("x", x)
        if bias is not None:
            check_finite("bias", bias)
        return out
    plan = _plan("dynamic", m, weight, saturate)
    if reduce_range is None:
        reduce_range = plan.seven
    stage = _stage(weight, "dynamic", bias=bias, relu=relu, x_qmax=127 if reduce_range else 255)
    memo = weight._fast_dyn
    if bias is bias0 and _due(memo, x.shape, bias, relu0, rr0, sat0, None, None):
        memo[x.shape] = _Fast(plan, "dynamic", _mid(plan, m, k, stage), out, x.ndim, bias,
                              relu=relu0, rr=rr0, sat=sat0)  # fmt: skip
    code = _run("dynamic", x2, m, weight, saturate, stage, out.reshape(m, n), plan)
    if code >= 0:
        _raise_x(code, x)
    if code != -1:
        _raise_bias(code)
    return out


def matmul_u8s8(
    a: Any, b: Any, *, saturate: bool = False, out: np.ndarray | None = None
) -> np.ndarray:
    """Raw int32 product of uint8 ``a [M, K]`` and int8 weights.

    ``b`` is either a plain int8 ``[K, N]`` matrix (numpy orientation: ``a @ b``; packed on
    the fly) or a :class:`PackedWeight` (then ``a @ w.T`` over its int8 codes, ignoring its
    scales and zero points).  No output stage: for building your own epilogue, and testing.

    Parameters
    ----------
    a : ndarray of uint8, shape (M, K)
    b : ndarray of int8, shape (K, N), or PackedWeight of shape (N, K)
    saturate : bool
        Reproduce FBGEMM's AVX2 int16 saturation bit for bit.
    out : ndarray of int32, optional
        C-contiguous ``[M, N]`` buffer.

    Returns
    -------
    ndarray of int32, shape (M, N)

    Examples
    --------
    >>> import numpy as np
    >>> from qgemm.gemm import matmul_u8s8
    >>> a = np.array([[255, 255]], np.uint8)
    >>> b = np.array([[127], [127]], np.int8)
    >>> matmul_u8s8(a, b), matmul_u8s8(a, b, saturate=True)
    (array([[64770]], dtype=int32), array([[32767]], dtype=int32))
    """
    saturate = _check_bool("saturate", saturate)
    if isinstance(b, PackedWeight):
        weight = b
        n, k = weight.shape
    else:
        b = as_array("b", b, dtypes=(np.int8,), ndim=2)
        k, n = b.shape
        kmax = _INT32_MAX // (255 * 128)
        if k > kmax:
            raise ValueError(
                f"b: K = {k} is too large for exact int32 accumulation (at most {kmax})"
            )
        weight = None
    a = as_array("a", a, dtypes=(np.uint8,), ndim=2)
    if a.shape[1] != k:
        raise ValueError(f"a: expected shape (M, {k}) to match b's K = {k}, got shape {a.shape}")
    m = a.shape[0]
    out = _output(out, (m, n), _I32)
    if weight is None:
        weight = PackedWeight(b.T, QParams(1.0, 0, dtype="int8"))
    if m == 0 or n == 0:
        return out
    a2 = _activation_rows(a, k, weight._kg)
    _run("raw", a2, m, weight, saturate, _stage(weight, "raw"), out)
    return out
