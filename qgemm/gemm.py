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
:mod:`qgemm._packing` (re-exported here); the output stage of a call is one
:class:`qgemm._kernels.output_stage.OutputStage` value, made by ``_stage`` below (memoised per
weight) and lowered to the microkernels' operands in one place
(:func:`qgemm._kernels.output_stage.lower`).

Limits: ``K <= 65793`` for symmetric weights and ``K <= 33025`` with weight zero points (the
largest ``K`` whose worst-case dot product fits int32); larger ``K`` raises ``ValueError``.
"""

from __future__ import annotations

from time import perf_counter as _perf_counter
from typing import Any

import numpy as np

from . import _config
from ._half import HalfPackedWeight, linear_half
from ._kernels.gemm import gemm_kernel
from ._kernels.output_stage import OutputStage
from ._packing import PackedWeight, pack_weight
from ._tuning import GEMM_PARALLEL_MIN_MACS, GEMM_PROBE_MAX, GEMM_PROBE_MIN
from ._validate import as_array, check_finite, check_out
from .quantize import QParams

__all__ = ["PackedWeight", "pack_weight", "linear", "quantized_linear", "matmul_u8s8"]

_INT32_MAX = 2**31 - 1
_INT16_MAX = 32767
_F32: tuple[np.dtype, ...] = (np.dtype(np.float32),)
_F32_I32 = (np.dtype(np.float32), np.dtype(np.int32))
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_U8: np.dtype = np.dtype(np.uint8)
_I32: np.dtype = np.dtype(np.int32)
_ONE = np.float32(1.0)
_ZERO = np.int32(0)


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


class _Plan:
    """How one call shape runs: the kernel(s), the task split and -- when the problem is big
    enough for threads and ``QGEMM_ADAPTIVE_THREADS=1`` (:func:`qgemm._config.adaptive_threads`)
    -- a tiny online choice between the parallel kernel and its serial twin.  By default a
    parallel-eligible call always runs the parallel kernel (deterministic).

    Both twins give bit-identical results.  Calls of a parallel-eligible plan are timed (two
    ``perf_counter`` reads) and the faster twin so far is used; the other one is re-tried
    after a back-off (0.25 s, doubling up to 8 s while it keeps losing).  On an idle machine
    the parallel kernel wins and stays chosen; when another process occupies a core, a
    fork/join region waits for a descheduled worker (milliseconds per call) and the serial
    twin takes over until a probe shows the cores are free again.
    """

    __slots__ = ("ser", "par", "nchunks", "threads", "t_ser", "t_par", "use_par", "next_probe",
                 "backoff", "head", "seven", "ser_key")  # fmt: skip

    def __init__(self, ser, par, nchunks, threads, head, seven, ser_key=None):
        # ser is None for a parallel plan until adaptive threads need its serial twin (built
        # then from ser_key): with adaptive threads off it is never called, and compiling it
        # would double the cold compile of a parallel-eligible call.
        self.ser_key = ser_key
        # the kernel arguments after (a, M, K) that only depend on the weight and the plan
        # (b16: the exact variant's int16 weight twin, or the int8 panels, then unread)
        self.head = head
        # linear(reduce_range=None) quantizes to 7 bits (the weight could saturate the fast
        # variant's int16 pairs on this path)
        self.seven = seven
        self.ser = ser
        self.par = par
        self.nchunks = nchunks
        self.threads = threads
        self.t_ser = 0.0  # running estimates (seconds per call); 0: not measured yet
        self.t_par = 0.0
        self.use_par = True
        self.next_probe = 0.0
        self.backoff = GEMM_PROBE_MIN


def _estimate(old: float, dt: float) -> float:
    """Running per-call time: follows drops at once, rises halfway per sample."""
    return dt if old == 0.0 or dt < old else 0.5 * (old + dt)


def _plan(kind: str, m: int, weight: PackedWeight, saturate: bool) -> _Plan:
    """The plan of a call; memoised per weight (the per-call fast path: one dict look-up)."""
    state = _config._state
    pkey = (kind, m, saturate, state["isa"], state["threads"])
    plan = weight._plans.get(pkey)
    if plan is not None:
        return plan
    threads = _config.get_num_threads()
    n, k = weight.shape
    row = _config.isa_path()
    fast, exact, tile = row.tile(saturate, weight._np)
    mr, nv, nr = tile.mr, tile.nv, tile.nr
    nct = -(-n // nr)
    parallel = threads > 1 and m * n * k >= GEMM_PARALLEL_MIN_MACS and (nct > 1 or m > mr)
    nchunks = 1
    if parallel and nct < 4 * threads:
        nchunks = -(-4 * threads // max(nct, 1))
    ser_key = (kind, fast, exact, mr, nv, nr, False)
    ser = None if parallel and not _config.adaptive_threads() else gemm_kernel(ser_key)
    par = gemm_kernel((kind, fast, exact, mr, nv, nr, True)) if parallel else None
    can_saturate = weight._pairmax * 255 > _INT16_MAX
    b16 = weight._wide() if exact == "avx2w" and can_saturate else weight._packed
    head = (weight._kg, weight._packed, b16, n, weight._np, weight._pairmax)
    seven = not saturate and row.int16_pairs and can_saturate
    plan = _Plan(ser, par, nchunks, threads if parallel else 1, head, seven, ser_key)
    if len(weight._plans) > 64:
        weight._plans.clear()
    weight._plans[pkey] = plan
    return plan


def _stage(
    weight: PackedWeight,
    kind: str,
    x_qparams: QParams | None = None,
    out_qparams: QParams | None = None,
    bias: np.ndarray | None = None,
    relu: bool = False,
    x_qmax: int = 255,
) -> OutputStage:
    """The output stage of one call: the weight half made at pack time, the call half here.

    Memoised per weight on the identity of the call's inputs (the hot path of a layer called
    again and again is a few ``is`` tests): ``QParams`` are immutable, and the bias array is
    referenced, not copied -- the kernels read its current values on every call.
    """
    memo = weight._stage_memo
    if (
        memo is not None
        and memo[0] is bias
        and memo[1] is x_qparams
        and memo[2] is out_qparams
        and memo[3] is relu
        and memo[4] == x_qmax
        and memo[5] == kind
    ):
        return memo[6]
    x_zp, x_scale = (_ZERO, _ONE) if x_qparams is None else (x_qparams.zero_point, x_qparams.scale)
    if out_qparams is None:
        o_scale, o_zp, o_qmax = _ONE, _ZERO, 255
    else:
        o_scale, o_zp = out_qparams.scale, out_qparams.zero_point
        o_qmax = 127 if out_qparams.reduce_range else 255
        if float(x_scale) * weight._smax / float(o_scale) > _FLOAT32_MAX:
            raise ValueError(
                "out_qparams: x_scale * w_scale / out_scale overflows float32; "
                f"got out scale {float(o_scale)}"
            )
    int_bias = bias is not None and bias.dtype == np.int32
    ib = bias if int_bias and bias is not None else weight._zi
    fb = weight._zf if bias is None or int_bias else bias
    stage = OutputStage(
        weight._w_zp,
        weight._has_bzp,
        weight._colc,
        weight._w_scale,
        x_zp,
        x_scale,
        x_qmax,
        ib,
        fb,
        relu,
        o_scale,
        o_zp,
        o_qmax,
    )
    weight._stage_memo = (bias, x_qparams, out_qparams, relu, x_qmax, kind, stage)
    return stage


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
    code = _run(kind, a2, m, weight, saturate, stage, tmp)
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
    code = _run("dynamic", x2, m, weight, saturate, stage, out.reshape(m, n), plan)
    if code >= 0:
        pos = np.unravel_index(code, x.shape)
        pos_s = int(pos[0]) if len(pos) == 1 else tuple(int(i) for i in pos)
        raise ValueError(f"x: expected finite values, got {x[pos]} at index {pos_s}")
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
