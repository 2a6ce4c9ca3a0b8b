"""Fused scale-and-add kernels over flat float buffers (the arithmetic of :mod:`qgemm.averaging`).

Every kernel is an elementwise pass over 1-D C-contiguous buffers: the parameter buffer ``x``
(float32 or float64) and float64 state (the accumulator, a running mean, a second moment).
Averaging is memory-bound, so each operation is one fused pass that reads ``x`` once and the
state once and writes the state once; nothing is allocated.

Accumulation is in float64.  Measured on the development machine (Zen 4, 2 cores, 50M
float32 parameters): the float64 ``acc += w * x`` pass moves 20 bytes per parameter at
~42 GB/s, a float32 Kahan-compensated accumulator (also 8 bytes of state per parameter, but
4 more flops and a dependency chain) ran at about half that speed -- so float64 is both the
more accurate and the faster choice.

Parallel kernels split the buffer into chunks of ``CHUNK`` elements and ``prange`` over the
chunks, each chunk processed through 0-based views (``acc[lo:hi]``): indexing the whole buffer
with ``i`` in ``range(lo, hi)`` leaves Numba's negative-index wrap-around in the loop, which
blocked vectorisation (measured: the 50M-element ``add`` pass 25.8 ms -> 13.3 ms).  Small
buffers use the serial twin (a parallel launch costs microseconds, which
dominates for biases and other small tensors).  No fastmath: the operations are elementwise
(LLVM vectorises them without reassociation), and leaving them strict makes the result
bit-identical to the numpy reference, which performs the same float64 operations in the same
order.  There is no ISA-specific code (LLVM targets the host), so the ISA is not part of the
key.

One scaffold serves every elementwise operation: the chunked ``prange`` loop is written once
(:func:`averaging_kernel`), with the uniform signature ``kern(x, s1, s2, a, b)`` -- the input
buffer, two scalars, two float64 state (or output) buffers -- and the operation is a
compile-time constant code that selects its loop body in :func:`_block` (inlined into the
scaffold at Numba IR level, so each compiled kernel holds only its own loop, as before).
Arguments an operation does not use are empty buffers.  ``multi`` is a different algorithm
(all models per block) with a kernel of its own.

Keys are ``(op, in_dtype, out_dtype, parallel)`` (plus the model count for ``multi``):

``init``      ``acc[i] = w * x[i]``
``add``       ``acc[i] += w * x[i]``
``final``     ``out[i] = acc[i] / total``           (``out`` may be ``acc`` itself)
``welford``   weighted Welford step: ``d = x - mean; mean += (w / total) * d;
              m2 += w * d * (x - mean)`` (``total`` includes ``w``)
``ema``       ``e[i] += alpha * (x[i] - e[i])``
``ema_var``   ``d = x - e; e += alpha * d; v = (1 - alpha) * (v + alpha * d * d)``
``copy``      ``out[i] = acc[i]`` (cast; the variance read-out)
``multi``     ``out[i] = (w0 x0[i] + w1 x1[i] + ...) / total`` over a tuple of ``k`` models
              held in memory (key ``(..., k)``): reads each model once, no accumulator
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba import prange

from .._cache import kernel_family
from .._tuning import (
    AVERAGING_CHUNK,
    AVERAGING_MULTI_CHUNK,
    AVERAGING_MULTI_MAX,
    AVERAGING_MULTI_MIN,
    AVERAGING_PARALLEL_MIN,
)

# Module attributes (read at call time, so tests can lower them); values in qgemm/_tuning.py.
CHUNK = AVERAGING_CHUNK
PARALLEL_MIN = AVERAGING_PARALLEL_MIN
MULTI_CHUNK = AVERAGING_MULTI_CHUNK
MULTI_MIN = AVERAGING_MULTI_MIN
MULTI_MAX = AVERAGING_MULTI_MAX

OPS = ("init", "add", "final", "welford", "ema", "ema_var", "copy", "multi")
_CODES = {op: i for i, op in enumerate(OPS)}
INIT, ADD, FINAL, WELFORD, EMA, EMA_VAR, COPY = range(7)

_NB: dict[str, Any] = {"float32": numba.float32, "float64": numba.float64}
_NONE = np.empty(0, np.float64)  # the buffer argument an operation does not use


def _signature(op: str, in_dt: str, out_dt: str, k: int = 0):
    if op not in _CODES:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    f64 = numba.float64
    if op == "multi":
        xin = _NB[in_dt][::1]
        return numba.void(numba.types.UniTuple(xin, k), f64[::1], f64, _NB[out_dt][::1])
    # kern(x, s1, s2, a, b): ``final``/``copy`` read float64 ``x`` and write ``a`` in out_dt
    xin = f64[::1] if op in ("final", "copy") else _NB[in_dt][::1]
    a = _NB[out_dt][::1] if op in ("final", "copy") else f64[::1]
    return numba.void(xin, f64, f64, a, f64[::1])


@numba.njit(inline="always", nogil=True, error_model="numpy")
def _block(code, x, s1, s2, a, b):
    """One block of operation ``code`` over 0-based views (``x``, ``a``, ``b`` of one chunk;
    indexing views from 0 is what lets LLVM vectorise -- module doc).  ``code`` is a
    compile-time constant of the scaffold, so only its branch survives."""
    m = x.size
    if code == INIT:  # a = w x
        for i in range(m):
            a[i] = s1 * np.float64(x[i])
    elif code == ADD:  # a += w x
        for i in range(m):
            a[i] += s1 * np.float64(x[i])
    elif code == EMA:  # a += alpha (x - a)
        for i in range(m):
            a[i] += s1 * (np.float64(x[i]) - a[i])
    elif code == FINAL:  # a = x / total (cast to a's dtype)
        for i in range(m):
            a[i] = x[i] / s1
    elif code == COPY:  # a = x (cast)
        for i in range(m):
            a[i] = x[i]
    elif code == WELFORD:  # w = s1, total = s2, mean = a, m2 = b
        r = s1 / s2
        for i in range(m):
            xi = np.float64(x[i])
            d = xi - a[i]
            mi = a[i] + r * d
            a[i] = mi
            b[i] += s1 * d * (xi - mi)
    elif code == EMA_VAR:  # alpha = s1, e = a, v = b
        beta = 1.0 - s1
        for i in range(m):
            d = np.float64(x[i]) - a[i]
            a[i] += s1 * d
            b[i] = beta * (b[i] + s1 * d * d)


@kernel_family("averaging")
def averaging_kernel(key):
    """Build the fused averaging kernel for ``key = (op, in_dtype, out_dtype, parallel)``.

    The scaffold loops over blocks of ``CHUNK`` elements with ``prange`` (one block when not
    parallel) and runs :func:`_block` on each.  The closure captures only plain values
    (``code``, ``par``, ``chunk``), so Numba's on-disk cache, which keys closures on what they
    capture, stores every variant; ``par`` is read in the body so the serial and parallel
    twins never share a cache entry.
    """
    op, in_dt, out_dt, parallel = key[:4]
    sig = _signature(op, in_dt, out_dt, *key[4:])
    par = bool(parallel)
    opts = dict(cache=True, nogil=True, error_model="numpy", parallel=par)
    if op == "multi":
        return _multi_kernel(
            sig, par, MULTI_CHUNK, np.float32 if out_dt == "float32" else np.float64, opts
        )
    code = _CODES[op]
    chunk = CHUNK

    @numba.njit(sig, **opts)
    def kern(x, s1, s2, a, b):
        n = x.size
        blk = chunk if par else max(n, 1)
        for c in prange((n + blk - 1) // blk):
            lo = c * blk
            hi = min(lo + blk, n)
            _block(code, x[lo:hi], s1, s2, a[lo:hi], b[lo:hi])

    return kern


def _multi_kernel(sig, par: bool, mchunk: int, outcast, opts):
    @numba.njit(sig, **opts)
    def kern(xs, ws, total, out):
        # All models at once, one block of elements at a time: each model is read once,
        # the result written once; the float64 block stays in L2.  Models are folded in
        # pairs per pass over the block, in order, so the float64 operations are exactly
        # those of the streaming init/add/final kernels.  (Pairs, not larger groups: with
        # more input pointers LLVM's runtime alias checks exceed its budget and the loop
        # is not vectorised -- measured 2.5x slower in cache with groups of four.)
        n = out.size
        k = len(xs)
        blk = mchunk if par else max(n, 1)
        for c in prange((n + blk - 1) // blk):
            lo = c * blk
            hi = min(lo + blk, n)
            m = hi - lo
            buf = np.empty(m, np.float64)
            x0 = xs[0][lo:hi]
            w0 = ws[0]
            for i in range(m):
                buf[i] = w0 * np.float64(x0[i])
            j = 1
            while j + 2 <= k:
                xa = xs[j][lo:hi]
                xb = xs[j + 1][lo:hi]
                wa = ws[j]
                wb = ws[j + 1]
                for i in range(m):
                    buf[i] = (buf[i] + wa * np.float64(xa[i])) + wb * np.float64(xb[i])
                j += 2
            if j < k:
                xa = xs[j][lo:hi]
                wa = ws[j]
                for i in range(m):
                    buf[i] += wa * np.float64(xa[i])
            o = out[lo:hi]
            for i in range(m):
                o[i] = outcast(buf[i] / total)

    return kern


def run(op: str, *args, out_dtype: str = "float64") -> None:
    """Run kernel ``op`` on validated, C-contiguous 1-D buffers (the caller checks sizes and
    dtypes); parallel when the buffer has at least ``PARALLEL_MIN`` elements.  Arguments as
    in the module doc (``init(x, w, acc)``, ``final(acc, total, out)``, ...)."""
    if op == "multi":
        xs = args[0]
        n = args[3].size
        if n:
            averaging_kernel((op, xs[0].dtype.name, out_dtype, n >= PARALLEL_MIN, len(xs)))(*args)
        return
    if op in ("init", "add", "ema"):  # (x, s, a)
        x, s1, s2, a, b = args[0], args[1], 0.0, args[2], _NONE
    elif op == "final":  # (acc, total, out)
        x, s1, s2, a, b = args[0], args[1], 0.0, args[2], _NONE
    elif op == "copy":  # (acc, out)
        x, s1, s2, a, b = args[0], 0.0, 0.0, args[1], _NONE
    elif op == "welford":  # (x, w, total, mean, m2)
        x, s1, s2, a, b = args
    elif op == "ema_var":  # (x, alpha, e, v)
        x, s1, s2, a, b = args[0], args[1], 0.0, args[2], args[3]
    else:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    n = x.size
    if n == 0:
        return
    kern = averaging_kernel((op, x.dtype.name, out_dtype, n >= PARALLEL_MIN))
    kern(x, float(s1), float(s2), a, b)
