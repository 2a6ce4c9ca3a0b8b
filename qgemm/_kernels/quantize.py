"""Affine (de)quantization kernels: one fused, parallel pass over the data.

The data is seen as ``segments`` of ``seg_len`` consecutive elements of a flat C-ordered
buffer; segment ``s`` uses channel ``(s // seg_per_channel) % channels``.  A per-tensor call has
one channel and segments of a fixed block length (so it parallelises); a per-channel call over
axis ``a`` of an array reshaped to ``[outer, C, inner]`` has ``seg_len = inner``.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from .._cache import kernel_family

_OUT_TYPES = {"uint8": numba.uint8, "int8": numba.int8}

SMALL_SCALE_THRESHOLD = np.float32(6.1e-5)
"""FBGEMM's ``SMALL_SCALE_THRESHOLD`` (QuantUtils.cc): smaller scales are raised to it."""


@numba.njit(nogil=True, error_model="numpy")
def choose_qparams_scalar(lo, hi, qmin, qmax):
    """FBGEMM's ``ChooseQuantizationParams`` for one tensor or channel (asymmetric, no
    sparsity / power-of-two options): ``(scale float32, zero_point int32)`` for data in
    ``[lo, hi]`` and codes in ``[qmin, qmax]``.

    The one implementation: :func:`qgemm.quantize.choose_qparams` runs it per channel through
    :func:`choose_qparams_kernel`, the dynamic GEMM prologue calls it in-kernel.  The range is
    widened to include 0 (in float32), ``scale = (max - min) / (qmax - qmin)`` (float64, then
    float32; 0.1 when 0 or when its inverse overflows), raised to the small-scale threshold
    (stretching the range), and the zero point taken from the end with the smaller error,
    rounded half to even and clamped.
    """
    f0 = np.float32(0.0)
    mn = np.float64(min(np.float32(lo), f0))
    mx = np.float64(max(np.float32(hi), f0))
    scale = np.float32((mx - mn) / (qmax - qmin))
    if scale == 0 or np.isinf(np.float32(1.0) / scale):
        scale = np.float32(0.1)
    thr = SMALL_SCALE_THRESHOLD
    if scale < thr:
        amp = np.float32(thr / scale)
        span = np.float64(thr) * (qmax - qmin)
        if mn == 0:
            mx = np.float64(np.float32(span))
        elif mx == 0:
            mn = np.float64(np.float32(-span))
        else:
            mn = np.float64(np.float32(mn * amp))
            mx = np.float64(np.float32(mx * amp))
        scale = thr
    s64 = np.float64(scale)
    zp_min = qmin - mn / s64
    zp_max = qmax - mx / s64
    err_min = abs(qmin) + abs(mn / s64)
    err_max = abs(qmax) + abs(mx / s64)
    init = zp_min if err_min < err_max else zp_max
    zp = np.rint(init)
    zp = min(max(zp, np.float64(qmin)), np.float64(qmax))
    return scale, np.int32(zp)


@kernel_family("choose_qparams")
def choose_qparams_kernel(key):
    """Key ``()``: :func:`choose_qparams_scalar` over per-channel ranges ``lo, hi`` (float64),
    into ``scale`` (float32) and ``zero_point`` (int32)."""
    sig = numba.void(
        numba.float64[::1],
        numba.float64[::1],
        numba.int64,
        numba.int64,
        numba.float32[::1],
        numba.int32[::1],
    )

    @numba.njit(sig, cache=True, nogil=True, error_model="numpy")
    def choose(lo, hi, qmin, qmax, scale, zero_point):
        for c in range(lo.shape[0]):
            scale[c], zero_point[c] = choose_qparams_scalar(lo[c], hi[c], qmin, qmax)

    return choose


@kernel_family("quantize")
def quantize_kernel(key):
    """Key ``(out_dtype, parallel)``: float32 -> uint8/int8 with round-half-to-even, zero point,
    clamp.

    Returns the flat index of the first non-finite input, or -1; ``out`` is complete only when
    the result is -1 (the wrapper then discards it).
    """
    out_name, parallel = key
    out_t = _OUT_TYPES[out_name]
    loop = prange if parallel else range
    sig = numba.int64(
        numba.float32[::1],  # x (flat)
        numba.float32[::1],  # scale per channel
        numba.int32[::1],  # zero point per channel
        numba.int64,  # seg_len
        numba.int64,  # channels
        numba.int32,  # qmin
        numba.int32,  # qmax
        out_t[::1],  # out (flat)
    )

    @numba.njit(sig, parallel=parallel, cache=True, nogil=True, error_model="numpy")
    def quantize(x, scale, zero_point, seg_len, channels, qmin, qmax, out):
        n = x.size
        n_seg = (n + seg_len - 1) // seg_len
        bad = np.full(max(n_seg, 1), -1, dtype=np.int64)
        xi = x.view(np.int32)
        for s in loop(n_seg):
            c = s % channels
            sc = scale[c]
            zp = np.float32(zero_point[c])
            lo = np.float32(qmin)
            hi = np.float32(qmax)
            start = s * seg_len
            stop = min(start + seg_len, n)
            # 0-based views: an index from range(start, stop) is not known to be >= 0, and
            # Numba's negative-index wrap-around then blocks vectorisation (7x slower)
            xs = x[start:stop]
            xis = xi[start:stop]
            qs = out[start:stop]
            nonfinite = 0
            # branch-free body (vectorises): the finite test is an integer reduction on the
            # exponent bits; codes of a segment with a non-finite value are discarded anyway
            for i in range(xs.size):
                nonfinite |= (xis[i] & 0x7F800000) == 0x7F800000
                q = np.rint(xs[i] / sc) + zp
                q = min(max(q, lo), hi)
                qs[i] = out_t(q)
            if nonfinite:
                for i in range(xs.size):
                    if (xis[i] & 0x7F800000) == 0x7F800000:
                        bad[s] = start + i
                        break
        first = -1
        for s in range(bad.size):
            if bad[s] >= 0:
                first = bad[s]
                break
        return first

    return quantize


@kernel_family("dequantize")
def dequantize_kernel(key):
    """Key ``(in_dtype, parallel)``: uint8/int8 -> float32, ``(q - zero_point) * scale``."""
    in_name, parallel = key
    in_t = _OUT_TYPES[in_name]
    loop = prange if parallel else range
    sig = numba.void(
        in_t[::1],
        numba.float32[::1],
        numba.int32[::1],
        numba.int64,
        numba.int64,
        numba.float32[::1],
    )

    @numba.njit(sig, parallel=parallel, cache=True, nogil=True, error_model="numpy")
    def dequantize(q, scale, zero_point, seg_len, channels, out):
        n = q.size
        n_seg = (n + seg_len - 1) // seg_len
        for s in loop(n_seg):
            c = s % channels
            sc = scale[c]
            zp = zero_point[c]
            start = s * seg_len
            stop = min(start + seg_len, n)
            qs = q[start:stop]
            os = out[start:stop]
            for i in range(qs.size):
                os[i] = np.float32(np.int32(qs[i]) - zp) * sc

    return dequantize


@kernel_family("rowwise_minmax")
def rowwise_minmax_kernel(key):
    """Key ``()``: per-row min and max of a float32 ``[rows, dim]`` table (0 for empty rows),
    and the flat index of the first non-finite element (or -1)."""
    sig = numba.int64(numba.float32[:, ::1], numba.float32[::1], numba.float32[::1])

    @numba.njit(sig, parallel=True, cache=True, nogil=True)
    def rowwise_minmax(x, mn, mx):
        rows, dim = x.shape
        bad = np.full(max(rows, 1), -1, dtype=np.int64)
        for r in prange(rows):
            lo = np.float32(np.inf)
            hi = np.float32(-np.inf)
            for j in range(dim):
                v = x[r, j]
                if not (v - v == np.float32(0.0)):
                    if bad[r] < 0:
                        bad[r] = r * dim + j
                lo = min(lo, v)
                hi = max(hi, v)
            if dim == 0:
                lo = np.float32(0.0)
                hi = np.float32(0.0)
            mn[r] = lo
            mx[r] = hi
        for r in range(rows):
            if bad[r] >= 0:
                return bad[r]
        return -1

    return rowwise_minmax


@kernel_family("rowwise_codes")
def rowwise_codes_kernel(key):
    """Key ``(bits,)``: codes ``clamp(rint((x - bias) * inverse_scale))`` of every row, packed
    ``8 // bits`` per byte (low bits first) into the first bytes of each fused row.  Float32
    arithmetic without contraction, so the bytes equal FBGEMM's."""
    (bits,) = key
    per_byte = 8 // bits
    levels = (1 << bits) - 1
    sig = numba.void(
        numba.float32[:, ::1], numba.float32[::1], numba.float32[::1], numba.uint8[:, ::1]
    )

    @numba.njit(sig, parallel=True, cache=True, nogil=True)
    def rowwise_codes(x, bias, inverse_scale, fused):
        rows, dim = x.shape
        hi = np.float32(levels)
        for r in prange(rows):
            b = bias[r]
            inv = inverse_scale[r]
            if per_byte == 1:
                for j in range(dim):
                    q = np.rint((x[r, j] - b) * inv)
                    fused[r, j] = np.uint8(min(max(q, np.float32(0.0)), hi))
            else:
                nbytes = (dim + per_byte - 1) // per_byte
                for k in range(nbytes):
                    acc = 0
                    for e in range(per_byte):
                        j = k * per_byte + e
                        if j < dim:
                            q = np.rint((x[r, j] - b) * inv)
                            code = np.int64(min(max(q, np.float32(0.0)), hi))
                            acc |= code << (e * bits)
                    fused[r, k] = np.uint8(acc)

    return rowwise_codes
