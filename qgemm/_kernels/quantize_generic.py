"""Numpy generic tiers of the quantization kernel families (no Numba, nothing to compile).

Each builder returns a plain callable with the call signature and the result codes of the
specialised kernel of its family, and bit-identical results, so the first ``pack_weight`` /
``quantize`` / ``dequantize`` / ``choose_qparams`` / 4- and 2-bit ``quantize_rowwise`` call of a
process is served at once while the specialised kernel compiles in the background (see
:mod:`qgemm._cache`; registered through ``GENERIC_PROVIDERS`` there):

=================  ===============================  ==========================================
family             specialised kernel               generic (here)
=================  ===============================  ==========================================
``choose_qparams`` ``_kernels.quantize``            :func:`choose_qparams_np`, vectorised
``quantize``       ``_kernels.quantize``            ``clamp(rint(x / scale) + zp)`` per channel
``dequantize``     ``_kernels.quantize``            ``float32(int32(q) - zp) * scale``
``rowwise_minmax`` ``_kernels.quantize``            min/max with Python's tie rule
``rowwise_codes``  ``_kernels.quantize``            codes, packed ``8 // bits`` per byte
``rowwise8_fused`` ``_kernels.rowwise_generic``     the one-pass 8-bit row quantizer (*)
``gemm_pack``      ``_kernels.gemm``                reshape/transpose into panels
=================  ===============================  ==========================================

(*) Bit-identical and tested, but not registered as the family's generic tier: the main job
quantizes 8 tables of 1M x 64 rows in a row, about 1 s each in numpy (2 busy cores) against
~0.1 s specialised, and the background queue may not swap the specialised kernel in before the
last table -- slower than compiling first.  The 4/2-bit pair is registered (~1.3 s a table).

None of those kernels uses fastmath, so the same float32 (or float64) operations in the same
order give the same bits in numpy: ``np.rint`` rounds half to even as LLVM's ``rint``; Numba's
``min(a, b)`` / ``max(a, b)`` keep ``a`` unless ``b`` is strictly smaller / larger (which decides
the sign of a zero min/max, and so the bytes of a rowwise bias): reproduced by taking the first
element equal to the row's min/max.  Work is done in row/element chunks (bounded temporaries).

This module must not import Numba (a test checks it).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import numpy as np

from .._tuning import GENERIC_QUANTIZE_CHUNK_ELEMS

__all__ = [
    "choose_qparams_np",
    "generic_choose_qparams_kernel",
    "generic_quantize_kernel",
    "generic_dequantize_kernel",
    "generic_rowwise_minmax_kernel",
    "generic_rowwise_codes_kernel",
    "generic_rowwise8_fused_kernel",
    "generic_pack_kernel",
    "SMALL_SCALE_THRESHOLD",
]

SMALL_SCALE_THRESHOLD = np.float32(6.1e-5)
"""FBGEMM's ``SMALL_SCALE_THRESHOLD`` (:data:`.quantize.SMALL_SCALE_THRESHOLD`; a test checks)."""
_CHUNK = GENERIC_QUANTIZE_CHUNK_ELEMS
_F0 = np.float32(0.0)


def _one(key: Hashable) -> Hashable:
    return ()


def _by_key(key: Hashable) -> Hashable:
    return key


def _by_dtype(key: Hashable) -> Hashable:
    """``(dtype,)`` of a ``(dtype, parallel)`` key: the numpy kernel is the same either way."""
    return (key[0],)  # type: ignore[index]


# ------------------------------------------------------------------------- choose_qparams


def choose_qparams_np(lo: Any, hi: Any, qmin: int, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Numpy twin of :func:`.quantize.choose_qparams_scalar`, element-wise over ``lo, hi``
    (float64, any shape; at least 1-D out): ``(scale float32, zero_point int32)``.

    The same float32/float64 operations in the same order as the Numba function (FBGEMM's
    ``ChooseQuantizationParams``), so the results are bit-identical."""
    lo32 = np.atleast_1d(np.asarray(lo, np.float64)).astype(np.float32)
    hi32 = np.atleast_1d(np.asarray(hi, np.float64)).astype(np.float32)
    with np.errstate(all="ignore"):
        mn = np.where(_F0 < lo32, _F0, lo32).astype(np.float64)  # min(float32(lo), 0)
        mx = np.where(_F0 > hi32, _F0, hi32).astype(np.float64)  # max(float32(hi), 0)
        scale = ((mx - mn) / np.float64(qmax - qmin)).astype(np.float32)
        bad = (scale == 0) | np.isinf(np.float32(1.0) / scale)
        scale = np.where(bad, np.float32(0.1), scale)
        thr = SMALL_SCALE_THRESHOLD
        small = scale < thr
        if small.any():
            amp = (thr / scale).astype(np.float32)
            span = np.float64(thr) * (qmax - qmin)
            mn0 = mn == 0
            mx0 = mx == 0
            mn_amp = (mn * amp).astype(np.float32).astype(np.float64)
            mx_amp = (mx * amp).astype(np.float32).astype(np.float64)
            neg_span = np.float64(np.float32(-span))
            pos_span = np.float64(np.float32(span))
            mn_s = np.where(mn0, mn, np.where(mx0, neg_span, mn_amp))
            mx_s = np.where(mn0, pos_span, np.where(mx0, mx, mx_amp))
            mn = np.where(small, mn_s, mn)
            mx = np.where(small, mx_s, mx)
            scale = np.where(small, thr, scale)
        s64 = scale.astype(np.float64)
        zp_min = qmin - mn / s64
        zp_max = qmax - mx / s64
        err_min = abs(qmin) + np.abs(mn / s64)
        err_max = abs(qmax) + np.abs(mx / s64)
        zp = np.rint(np.where(err_min < err_max, zp_min, zp_max))
        lo_q = np.float64(qmin)
        hi_q = np.float64(qmax)
        zp = np.where(lo_q > zp, lo_q, zp)  # max(zp, qmin)
        zp = np.where(hi_q < zp, hi_q, zp)  # min(., qmax)
        return scale.astype(np.float32), zp.astype(np.int32)


def generic_choose_qparams_kernel(key: Hashable) -> Callable[..., None]:
    """``choose(lo, hi, qmin, qmax, scale, zero_point)`` like ``choose_qparams_kernel(())``."""

    def choose(lo, hi, qmin, qmax, scale, zero_point):
        s, z = choose_qparams_np(lo, hi, int(qmin), int(qmax))
        n = lo.shape[0]
        scale[:n] = s[:n]
        zero_point[:n] = z[:n]

    return choose


generic_choose_qparams_kernel.generic_key = _one  # type: ignore[attr-defined]


# ---------------------------------------------------------------------- (de)quantize


def _channel_blocks(n: int, seg_len: int, channels: int):
    """``(start, stop, channel or None)`` blocks covering ``[0, n)``: whole runs of one channel
    (per-channel data), or chunks of the single channel (``channels == 1``)."""
    if channels == 1:
        for start in range(0, n, _CHUNK):
            yield start, min(n, start + _CHUNK), 0
        return
    n_seg = -(-n // seg_len)
    for s in range(n_seg):
        start = s * seg_len
        yield start, min(n, start + seg_len), s % channels


def _per_element(n: int, seg_len: int, channels: int, values: np.ndarray, start: int, stop: int):
    """``values[channel of e]`` for ``e`` in ``[start, stop)`` (``channel = (e // seg_len) %
    channels``)."""
    idx = (np.arange(start, stop, dtype=np.int64) // seg_len) % channels
    return values[idx]


def _segments(n: int, seg_len: int, channels: int):
    """Blocks ``(start, stop, params_index)`` where ``params_index`` is an int (one channel) or
    ``None`` (the block spans several channels: gather per element)."""
    seg_len = max(1, int(seg_len))
    channels = max(1, int(channels))
    if channels == 1 or seg_len >= _CHUNK // 4:
        yield from _channel_blocks(n, seg_len, channels)
        return
    # short segments (per-channel over a late axis): element chunks, parameters gathered
    step = max(seg_len, (_CHUNK // seg_len) * seg_len)
    for start in range(0, n, step):
        yield start, min(n, start + step), None


def generic_quantize_kernel(key: tuple) -> Callable[..., int]:
    """``quantize(x, scale, zero_point, seg_len, channels, qmin, qmax, out) -> first bad`` like
    ``quantize_kernel((out_dtype, parallel))``: codes ``clamp(rint(x / scale) + zp)``; -1, or
    the flat index of the first non-finite ``x`` (``out`` then incomplete)."""
    out_name = key[0]
    out_dt = np.dtype(out_name)

    def quantize(x, scale, zero_point, seg_len, channels, qmin, qmax, out):
        n = x.size
        lo = np.float32(qmin)
        hi = np.float32(qmax)
        with np.errstate(all="ignore"):
            for start, stop, c in _segments(n, seg_len, channels):
                xs = x[start:stop]
                if c is None:
                    sc = _per_element(n, seg_len, channels, scale, start, stop)
                    zp = _per_element(n, seg_len, channels, zero_point, start, stop)
                    zp = zp.astype(np.float32)
                else:
                    sc = scale[c]
                    zp = np.float32(zero_point[c])
                bad = ~np.isfinite(xs)
                if bad.any():
                    return start + int(np.argmax(bad))
                q = np.rint(xs / sc) + zp
                out[start:stop] = np.clip(q, lo, hi).astype(out_dt)
        return -1

    return quantize


generic_quantize_kernel.generic_key = _by_dtype  # type: ignore[attr-defined]


def generic_dequantize_kernel(key: tuple) -> Callable[..., None]:
    """``dequantize(q, scale, zero_point, seg_len, channels, out)`` like
    ``dequantize_kernel((in_dtype, parallel))``: ``float32(int32(q) - zp) * scale``."""

    def dequantize(q, scale, zero_point, seg_len, channels, out):
        n = q.size
        for start, stop, c in _segments(n, seg_len, channels):
            if c is None:
                sc = _per_element(n, seg_len, channels, scale, start, stop)
                zp = _per_element(n, seg_len, channels, zero_point, start, stop)
            else:
                sc = scale[c]
                zp = np.int32(zero_point[c])
            d = q[start:stop].astype(np.int32) - zp
            out[start:stop] = d.astype(np.float32) * sc

    return dequantize


generic_dequantize_kernel.generic_key = _by_dtype  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- rowwise


def _row_chunks(rows: int, dim: int):
    step = max(1, _CHUNK // max(dim, 1))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _first_min_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row ``(min, max)`` of finite rows ``x [r, dim >= 1]`` as Numba's running
    ``lo = min(lo, v)`` from ``+inf`` finds them: the *first* element equal to the min (max),
    so the sign of a zero result is the first zero's."""
    mn = x.min(axis=1)
    mx = x.max(axis=1)
    for v in (mn, mx):  # only a zero has two elements equal to it (+0.0 and -0.0)
        z = np.flatnonzero(v == 0)
        if z.size:
            xz = x[z]
            v[z] = xz[np.arange(z.size), np.argmax(xz == 0, axis=1)]
    return mn, mx


def _first_bad_row(x: np.ndarray) -> int:
    bad = ~np.isfinite(x)
    if not bad.any():
        return -1
    return int(np.argmax(bad.reshape(-1)))


def generic_rowwise_minmax_kernel(key: Hashable) -> Callable[..., int]:
    """``rowwise_minmax(x, mn, mx) -> first bad`` like ``rowwise_minmax_kernel(())``."""

    def rowwise_minmax(x, mn, mx):
        rows, dim = x.shape
        if dim == 0:
            mn[:rows] = 0
            mx[:rows] = 0
            return -1
        first = -1
        for r0, r1 in _row_chunks(rows, dim):
            xc = x[r0:r1]
            bad = _first_bad_row(xc)
            if bad >= 0:
                # rows with a non-finite value: the caller raises; report the first one
                if first < 0:
                    first = r0 * dim + bad
                good = np.isfinite(xc).all(axis=1)
                lo = np.zeros(r1 - r0, np.float32)
                hi = np.zeros(r1 - r0, np.float32)
                if good.any():
                    lo[good], hi[good] = _first_min_max(xc[good])
                mn[r0:r1], mx[r0:r1] = lo, hi
                continue
            mn[r0:r1], mx[r0:r1] = _first_min_max(xc)
        return first

    return rowwise_minmax


generic_rowwise_minmax_kernel.generic_key = _one  # type: ignore[attr-defined]


def _codes(x: np.ndarray, bias: np.ndarray, inv: np.ndarray, hi: np.float32) -> np.ndarray:
    """``uint8(min(max(rint((x - bias) * inv), 0), hi))`` per row (float32, no contraction)."""
    with np.errstate(all="ignore"):
        q = x - bias[:, None]
        q *= inv[:, None]
        np.rint(q, out=q)
    np.clip(q, _F0, hi, out=q)
    return q.astype(np.uint8)


def generic_rowwise_codes_kernel(key: tuple) -> Callable[..., None]:
    """``rowwise_codes(x, bias, inverse_scale, fused)`` like ``rowwise_codes_kernel((bits,))``:
    codes packed ``8 // bits`` per byte, low bits first."""
    (bits,) = key
    per_byte = 8 // bits
    hi = np.float32((1 << bits) - 1)
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)

    def rowwise_codes(x, bias, inverse_scale, fused):
        rows, dim = x.shape
        nbytes = -(-dim // per_byte)
        for r0, r1 in _row_chunks(rows, dim):
            c = _codes(x[r0:r1], bias[r0:r1], inverse_scale[r0:r1], hi)
            if per_byte == 1:
                fused[r0:r1, :dim] = c
                continue
            packed = np.zeros((r1 - r0, nbytes), np.uint8)
            for e in range(per_byte):  # code j in bits [e * bits, (e + 1) * bits) of byte j // pb
                sub = c[:, e::per_byte]
                packed[:, : sub.shape[1]] |= sub << shifts[e]
            fused[r0:r1, :nbytes] = packed

    return rowwise_codes


generic_rowwise_codes_kernel.generic_key = _by_key  # type: ignore[attr-defined]


def generic_rowwise8_fused_kernel(key: Hashable) -> Callable[..., int]:
    """``rowwise8_fused(x, fused) -> first bad`` like ``rowwise8_fused_kernel(())``: codes, then
    float32 scale and bias in each row's last 8 bytes; rows with a non-finite value are left
    as they were and the flat index of the first such value is returned."""

    def rowwise8_fused(x, fused):
        rows, dim = x.shape
        first = -1
        f255 = np.float32(255.0)
        eps = np.float32(1e-8)
        for r0, r1 in _row_chunks(rows, dim):
            xc = x[r0:r1]
            good = np.ones(r1 - r0, np.bool_)
            bad = _first_bad_row(xc)
            if bad >= 0:
                if first < 0:
                    first = r0 * dim + bad
                good = np.isfinite(xc).all(axis=1)
                xc = xc[good]
            n = xc.shape[0]
            if dim == 0:
                lo = np.zeros(n, np.float32)
                hi = np.zeros(n, np.float32)
            else:
                lo, hi = _first_min_max(xc)
            with np.errstate(all="ignore"):
                rng = (hi - lo).astype(np.float32)
                scale = rng / f255
                inv = f255 / (rng + eps)
            block = np.empty((n, dim + 8), np.uint8)
            block[:, :dim] = _codes(xc, lo, inv, f255)
            params = np.stack([scale, lo], axis=1).astype(np.float32)
            block[:, dim:] = params.view(np.uint8).reshape(n, 8)
            dst = fused[r0:r1]
            if bad >= 0:
                dst[good, : dim + 8] = block
            else:
                dst[:, : dim + 8] = block
        return first

    return rowwise8_fused


generic_rowwise8_fused_kernel.generic_key = _one  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- gemm_pack


def generic_pack_kernel(key: Hashable) -> Callable[..., int]:
    """``pack(w, NP, packed, colsum) -> pairmax`` like ``pack_kernel(())``: panels
    ``packed[p, g, c, t] = w[p NP + c, 4 g + t]`` (zero padded), ``colsum[j] = sum_k w[j, k]``,
    and ``max |w[j, 2i]| + |w[j, 2i + 1]|``."""

    def pack(w, NP, packed, colsum):
        N, K = w.shape
        NP = int(NP)
        KG = -(-K // 4)
        npan = -(-N // NP) if N else 0
        full = np.zeros((npan * NP, KG * 4), np.int8)
        full[:N, :K] = w
        panels = full.reshape(npan, NP, KG, 4).transpose(0, 2, 1, 3)
        packed[: npan * KG * NP * 4] = panels.reshape(-1)
        colsum[:N] = w.sum(axis=1, dtype=np.int64)
        if N == 0 or KG == 0:
            return 0
        a16 = np.abs(full[:N].astype(np.int16))
        return int((a16[:, 0::2] + a16[:, 1::2]).max())

    return pack


generic_pack_kernel.generic_key = _one  # type: ignore[attr-defined]
