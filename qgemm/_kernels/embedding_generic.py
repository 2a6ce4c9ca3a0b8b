"""Numpy generic tier of the ``embedding_bag`` and ``check_bags`` kernel families (issue 12).

Plain callables with the call signature, return codes and bit-identical results of the
specialised kernels of :mod:`qgemm._kernels.embedding`, so the first :func:`qgemm.embedding_bag`
of a process compiles nothing while the specialised kernel builds in the background
(registered through ``GENERIC_PROVIDERS`` in :mod:`qgemm._cache`).

The specialised kernels are compiled with fastmath (``contract``: a multiply feeding an add
becomes one FMA; ``reassoc``, ``nsz``: LLVM regroups sums and folds ``0 + x``), so their
per-element arithmetic is not the source's.  Measured against them (numba 0.68 / LLVM, znver4
and znver3 hosts), in the order of a bag's pooled (non-padding) positions:

===============================  ==============================================================
float rows, sum / mean           ``acc = acc + x``; weighted ``acc = fma(x, w, acc)``
quantized, specialised dim       ``acc = fma(code, scale * w, acc)``, ``bsum = fma(bias, w,
(sum / mean)                     bsum)`` (unweighted: ``+ bias``); the bag stores ``acc + bsum``
quantized, run-time dim          weighted: ``acc = fma(w, fma(code, scale, bias), acc)``;
(sum / mean)                     unweighted (serial kernel): ``fma(code, scale, acc + bias)``
max                              the first value, then ``max(acc, x)`` propagating NaN
                                 (quantized values ``fma(code, scale, bias)``)
mean                             times ``float32(1) / float32(count)`` when count > 1
===============================  ==============================================================

Sums start at +0.0, except in specialised-dim kernels whose bag's first index is pooled (LLVM
peels it: ``0 + x`` is ``x``, so an all-zero sum keeps the sign).  A float32 FMA is computed
in float64 (the product of two float32 is exact there) and rounded to float32 through *round
to odd* (the float64 sum made odd when inexact), which avoids double rounding.  The kernels are
compiled for the host CPU whatever the key's ISA; every qgemm path needs FMA.  Only the
default fastmath flags are reproduced: with ``QGEMM_FASTMATH=0`` the builder raises
``NotImplementedError`` and the tiers compile the specialised kernel first.  It declines the same
way for the one variant whose vectorisation depends on the host (the parallel unweighted sum /
mean over quantized rows of a run-time dim, i.e. a dim that is not a multiple of 4 or above
``MAX_SPECIALISED_DIM``: LLVM's vector bodies there pool some elements as
``acc + fma(code, scale, bias)``, and which ones depends on the host's vector width).
Tests compare the two tiers bit for bit over every family key
(``tests/test_tiers_embedding.py``): rerun them after a Numba/LLVM upgrade or a kernel change.

The reduction runs over the pooled positions, vectorised over the bags (and ``dim``) of a
chunk of :data:`qgemm._tuning.GENERIC_EMBEDDING_CHUNK_ELEMS` output elements: one numpy step
per position of the longest bag of the chunk.

This module must not import Numba (a test checks it); kinds, modes and error codes come from
:mod:`qgemm._kernels.embedding_codes`, shared with the kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, cast

import numpy as np

from .._tuning import GENERIC_EMBEDDING_CHUNK_ELEMS
from .embedding_codes import (
    BAD_FIRST_OFFSET,
    BAD_INDEX,
    DECREASING_OFFSET,
    KINDS,
    LENGTHS_SUM,
    MODES,
    NEGATIVE_LENGTH,
    OFFSET_PAST_END,
    OK,
)

__all__ = [
    "generic_embedding_bag_kernel",
    "generic_check_bags_kernel",
    "fma32",
    "KINDS",
    "MODES",
]

_BITS = {"rowwise8": 8, "rowwise4": 4, "rowwise2": 2}
_CHUNK = GENERIC_EMBEDDING_CHUNK_ELEMS
_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_LOW29 = (1 << 29) - 1  # float64 mantissa bits below float32's
_HALF29 = 1 << 28
_F32_NORMAL_MIN = 2.0**-126
_Z0 = np.float32(-0.0)
_FASTMATH = frozenset({"reassoc", "contract", "nsz", "arcp"})
"""The flags whose effects are reproduced (:func:`qgemm._config.fastmath_flags`; a test checks)."""


def fma32(a: Any, b: Any, c: Any) -> np.ndarray:
    """``fma(a, b, c)`` of float32 operands, correctly rounded to float32 (broadcasting).

    ``a * b`` is exact in float64, so the float64 sum ``s`` is the exact sum rounded once; the
    rounding of ``s`` to float32 is then right unless ``s`` sits exactly halfway between two
    float32 (a double-rounding candidate) or in the float32 subnormal range.  Only there the
    exact error of ``s`` is computed (TwoSum) and ``s`` rounded to odd (moved one float64 step
    towards the exact sum when inexact and even), which makes the final rounding correct."""
    with np.errstate(invalid="ignore", over="ignore"):  # inf * 0: NaN, as the kernels give
        p = np.multiply(a, b, dtype=np.float64)
        c = np.asarray(c, np.float64)
        s = np.atleast_1d(p + c)  # a new array (written below)
        shape = np.broadcast_shapes(p.shape, c.shape)
        bits = s.view(np.int64)
        risky = (bits & _LOW29) == _HALF29  # halfway between two float32 (normal range)
        risky |= np.abs(s) < _F32_NORMAL_MIN
        if risky.any():
            p, c = np.broadcast_to(p, s.shape)[risky], np.broadcast_to(c, s.shape)[risky]
            r = s[risky]
            t = r - p
            err = (p - (r - t)) + (c - t)  # exact rounding error of r (NaN if not finite)
            rb = r.view(np.int64)
            fix = ((err < 0) | (err > 0)) & ((rb & 1) == 0)  # (never for a NaN err)
            step = np.where((err > 0) == (r > 0), 1, -1)
            s[risky] = np.where(fix, rb + step, rb).view(np.float64)
        return s.astype(np.float32).reshape(shape)


def _fmax(old: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The kernels' ``fmax``: ``old`` if it is NaN, else ``x`` if ``x > old`` or ``x`` is NaN."""
    take = (x > old) | (x != x)
    return np.where(old != old, old, np.where(take, x, old))


def _first_bad(indices: np.ndarray, rows: int) -> tuple[int, int, int] | None:
    """``(BAD_INDEX, position, value)`` of the first index outside ``[0, rows)``, or None."""
    for s in range(0, indices.size, _CHUNK):
        v = indices[s : s + _CHUNK].astype(np.int64)
        bad = (v < 0) | (v >= rows)
        if bad.any():
            i = int(np.argmax(bad))
            return (BAD_INDEX, s + i, int(v[i]))
    return None


def _check_offsets(offs: np.ndarray, n: int) -> tuple[int, int, int] | None:
    """The torch-convention offset checks of the kernels, in their order."""
    m = offs.size
    if m == 0:
        return None
    o = offs.astype(np.int64)
    if o[0] != 0:
        return (BAD_FIRST_OFFSET, 0, int(o[0]))
    dec = np.flatnonzero(o[1:] < o[:-1])
    if dec.size:
        b = int(dec[0]) + 1
        return (DECREASING_OFFSET, b, int(o[b]))
    if o[m - 1] > n:
        return (OFFSET_PAST_END, m - 1, int(o[m - 1]))
    return None


def generic_check_bags_kernel(key: Hashable) -> Callable:
    """Numpy twin of :func:`qgemm._kernels.embedding.check_bags_kernel` (any key)."""

    def check_bags(indices: np.ndarray, offsets: np.ndarray, rows: int) -> tuple[int, int, int]:
        err = _check_offsets(offsets, indices.size) or _first_bad(indices, rows)
        return err or (OK, 0, 0)

    return check_bags


generic_check_bags_kernel.generic_key = lambda key: ()  # type: ignore[attr-defined]


# ------------------------------------------------------------------------ embedding_bag
def _row_reader(kind: str, table: np.ndarray, row_stride: int, rows: int, dim: int):
    """``read(r) -> (x, scale, bias)`` for row numbers ``r``: float rows as float32 ``x``
    (scale, bias None), quantized rows as float32 codes in element order and their float32
    scale and bias."""
    if kind in ("float32", "float16"):
        item = table.itemsize
        src = table if kind == "float32" else table.view(np.float16)
        if rows == 0 or dim == 0:
            tab = np.zeros((rows, dim), src.dtype)
        else:
            tab = np.lib.stride_tricks.as_strided(
                src, shape=(rows, dim), strides=(row_stride * item, item), writeable=False
            )
        return lambda r: (tab[r].astype(np.float32, copy=False), None, None)
    bits = _BITS[kind]
    per = 8 // bits
    cb = -(-dim // per)
    tail = 8 if bits == 8 else 4
    fused = table[: rows * row_stride].reshape(rows, row_stride)
    pdt = np.float32 if bits == 8 else np.float16
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    mask = np.uint8((1 << bits) - 1)

    def read(r):
        g = fused[r]
        params = np.ascontiguousarray(g[:, cb : cb + tail]).view(pdt).astype(np.float32)
        codes = g[:, :cb]
        if per > 1:  # code p of byte j is element j * per + p
            codes = ((codes[:, :, None] >> shifts) & mask).reshape(len(r), cb * per)[:, :dim]
        return codes.astype(np.float32), params[:, 0], params[:, 1]

    return read


def _bounds(by_lengths: bool, offs: np.ndarray, bags: int, n: int):
    """``(starts, ends)`` (int64) of the bags, after the kernels' checks, or an error tuple."""
    if by_lengths:
        ln = offs.astype(np.int64)
        neg = np.flatnonzero(ln < 0)
        if neg.size:
            b = int(neg[0])
            return (NEGATIVE_LENGTH, b, int(ln[b]))
        ends = np.cumsum(ln)
        total = int(ends[-1]) if bags else 0
        if total != n:
            return (LENGTHS_SUM, total, n)
        return ends - ln, ends
    err = _check_offsets(offs, n)
    if err:
        return err
    o = offs.astype(np.int64)
    starts = o[:bags]
    ends = np.empty(bags, np.int64)
    ends[: bags - 1] = o[1:bags]
    if bags:
        ends[bags - 1] = o[bags] if bags < o.size else n
    return starts, ends


def generic_embedding_bag_kernel(key: Hashable) -> Callable:
    """Numpy twin of :func:`qgemm._kernels.embedding.embedding_bag_kernel` for ``key`` (see
    the module docstring for the per-element arithmetic)."""
    _isa, kind, _i, _o, bags_by, mode, weighted, dim_c, _par, prevalidate = cast(
        "tuple[Any, ...]", key
    )
    if kind not in KINDS or mode not in MODES or bags_by not in ("offsets", "lengths"):
        raise ValueError(f"embedding_bag kernel: bad key {key!r}")
    from .._config import fastmath_flags  # the kernels' flags (imports Numba: at build only)

    if fastmath_flags() != _FASTMATH:
        raise NotImplementedError(
            f"embedding_bag generic tier: reproduces fastmath flags {sorted(_FASTMATH)} only, "
            f"got {fastmath_flags()!r}"
        )
    by_lengths = bags_by == "lengths"
    quant = kind in _BITS
    vec = int(dim_c) > 0
    is_max = mode == "max"
    is_mean = mode == "mean"
    weighted = bool(weighted)
    prevalidate = bool(prevalidate)
    parallel = bool(_par)
    if quant and parallel and not (vec or weighted or is_max):
        # Which elements LLVM pools in these kernels' vector bodies depends on the host's
        # vector width and unrolling: not reproducible here, so no generic tier.
        raise NotImplementedError(
            "embedding_bag generic tier: parallel unweighted sum/mean over quantized rows of a "
            "run-time dim is vectorised host-dependently; the specialised kernel serves it"
        )

    def update(acc, x, sc, bi, w, first):
        """One pooled position for the active bags (rows of ``acc``)."""
        if quant:
            if is_max:
                x = fma32(x, sc[:, None], bi[:, None])
            elif vec:  # the bias goes to the bag's bias sum
                return fma32(x, (sc * w if weighted else sc)[:, None], acc)
            elif weighted:  # LLVM factors the weight out: w * (code * scale + bias)
                return fma32(w[:, None], fma32(x, sc[:, None], bi[:, None]), acc)
            else:  # (acc + bias) + code * scale
                return fma32(x, sc[:, None], acc + bi[:, None])
        elif weighted:
            return fma32(x, w[:, None], acc)
        if is_max:
            return x if first else _fmax(acc, x)
        return acc + x

    def kern(table, row_stride, rows, dim, indices, offs, bags, weights, pad, out):
        n = indices.size
        bounds = _bounds(by_lengths, offs, bags, n)
        if len(bounds) == 3:
            return bounds
        starts, ends = bounds
        if prevalidate or by_lengths or offs.size > 0:  # (inline checks cover every index)
            err = _first_bad(indices, rows)
            if err:
                return err
        read = _row_reader(kind, table, row_stride, rows, dim)
        step = max(1, _CHUNK // max(dim, 1))
        with np.errstate(all="ignore"):  # non-finite rows propagate as in the kernels
            for b0 in range(0, bags, step):
                b1 = min(bags, b0 + step)
                _pool(b0, b1, starts, ends, indices, weights, pad, read, dim, out)
        return (OK, 0, 0)

    def _pool(b0, b1, starts, ends, indices, weights, pad, read, dim, out):
        s, e = starts[b0:b1], ends[b0:b1]
        nb = b1 - b0
        lo = int(s[0])
        hi = int(e[-1])
        keep = indices[lo:hi] != pad
        ck = np.zeros(hi - lo + 1, np.int64)
        np.cumsum(keep, out=ck[1:])
        kept = np.flatnonzero(keep) + lo  # positions pooled, in order
        first = ck[s - lo]
        cnt = ck[e - lo] - first
        order = np.argsort(-cnt, kind="stable")  # longest bags first: active ones are a prefix
        cnt_sorted = cnt[order]
        # Specialised dims: LLVM peels the bag's first position and folds ``0 + x`` to ``x``
        # (``nsz``): a sum whose first index is pooled starts at -0.0 (the sign of an
        # all-zero sum is kept), one whose first index is padding (or empty) at +0.0.
        # Run-time dims accumulate in memory from +0.0.
        peeled = cnt > 0
        peeled[peeled] = indices[s[peeled]] != pad
        z = np.where(peeled, _Z0, _F0) if vec and not is_max else np.zeros(nb, np.float32)
        acc = np.repeat(z[:, None], dim, axis=1)
        bsum = z.copy()
        longest = int(cnt_sorted[0]) if nb else 0
        for t in range(longest):
            na = int(np.searchsorted(-cnt_sorted, -t, side="left"))  # bags with cnt > t
            act = order[:na]
            pos = kept[first[act] + t]
            x, sc, bi = read(indices[pos])
            w = weights[pos] if weighted else None
            if quant and vec and not is_max:
                if weighted:
                    bsum[act] = fma32(bi, w, bsum[act])
                else:
                    bsum[act] = bsum[act] + bi
            acc[act] = update(acc[act], x, sc, bi, w, t == 0)
        if quant and vec and not is_max:
            acc = acc + bsum[:, None]
        if is_mean:
            many = cnt > 1
            scale = np.where(many, _F1 / np.maximum(cnt, 1).astype(np.float32), _F1)
            acc = np.where(many[:, None], acc * scale[:, None].astype(np.float32), acc)
        out[b0:b1] = acc

    return kern


def _generic_key(key: Hashable) -> Hashable:
    """The numpy kernel ignores the ISA, index dtypes and threading of the key."""
    _isa, kind, _i, _o, bags_by, mode, weighted, dim_c, par, prevalidate = cast(
        "tuple[Any, ...]", key
    )
    return (kind, bags_by, mode, bool(weighted), int(dim_c) > 0, bool(par), bool(prevalidate))


generic_embedding_bag_kernel.generic_key = _generic_key  # type: ignore[attr-defined]
