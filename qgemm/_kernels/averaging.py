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
chunks; small buffers use the serial twin (a parallel launch costs microseconds, which
dominates for biases and other small tensors).  No fastmath: the operations are elementwise
(LLVM vectorises them without reassociation), and leaving them strict makes the result
bit-identical to the numpy reference, which performs the same float64 operations in the same
order.  There is no ISA-specific code (LLVM targets the host), so the ISA is not part of the
key.

Keys are ``(op, in_dtype, out_dtype, parallel)``:

``init``      ``acc[i] = w * x[i]``
``add``       ``acc[i] += w * x[i]``
``final``     ``out[i] = acc[i] / total``           (``out`` may be ``acc`` itself)
``add_final`` ``out[i] = (acc[i] + w * x[i]) / total``
``welford``   weighted Welford step: ``d = x - mean; mean += (w / total) * d;
              m2 += w * d * (x - mean)`` (``total`` includes ``w``)
``ema``       ``e[i] += alpha * (x[i] - e[i])``
``ema_var``   ``d = x - e; e += alpha * d; v = (1 - alpha) * (v + alpha * d * d)``
``copy``      ``out[i] = acc[i]`` (cast; the variance read-out)
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from .._cache import kernel_family

CHUNK = 1 << 16
"""Elements per parallel work item (256 KiB of float32)."""

PARALLEL_MIN = 1 << 17
"""Buffers with fewer elements use the serial kernels."""

OPS = ("init", "add", "final", "add_final", "welford", "ema", "ema_var", "copy")

_NB = {"float32": numba.float32, "float64": numba.float64}


def _signature(op: str, in_dt: str, out_dt: str):
    xin = _NB[in_dt][::1]
    f64 = numba.float64
    acc = numba.float64[::1]
    if op in ("init", "add", "ema"):
        return numba.void(xin, f64, acc)
    if op == "final":
        return numba.void(acc, f64, _NB[out_dt][::1])
    if op == "copy":
        return numba.void(acc, _NB[out_dt][::1])
    if op == "add_final":
        return numba.void(acc, xin, f64, f64, _NB[out_dt][::1])
    if op == "welford":
        return numba.void(xin, f64, f64, acc, acc)
    if op == "ema_var":
        return numba.void(xin, f64, acc, acc)
    raise ValueError(f"op: expected one of {OPS}, got {op!r}")


@kernel_family("averaging")
def averaging_kernel(key):
    """Build the fused averaging kernel for ``key = (op, in_dtype, out_dtype, parallel)``.

    Each kernel loops over blocks of ``CHUNK`` elements with ``prange`` (a plain loop over one
    block when not parallel).  The closures capture only plain values (``par``, ``chunk``, the
    output scalar type), so Numba's on-disk cache, which keys closures on what they capture,
    can store every variant; ``par`` is read in the body so the serial and parallel twins never
    share a cache entry.
    """
    op, in_dt, out_dt, parallel = key
    sig = _signature(op, in_dt, out_dt)
    par = bool(parallel)
    chunk = CHUNK
    outcast = np.float32 if out_dt == "float32" else np.float64
    opts = dict(cache=True, nogil=True, error_model="numpy", parallel=par)

    if op == "init":

        @numba.njit(sig, **opts)
        def kern(x, w, acc):
            n = x.size
            blk = chunk if par else max(n, 1)
            for c in prange((n + blk - 1) // blk):
                lo = c * blk
                for i in range(lo, min(lo + blk, n)):
                    acc[i] = w * np.float64(x[i])

    elif op == "add":

        @numba.njit(sig, **opts)
        def kern(x, w, acc):
            n = x.size
            blk = chunk if par else max(n, 1)
            for c in prange((n + blk - 1) // blk):
                lo = c * blk
                for i in range(lo, min(lo + blk, n)):
                    acc[i] += w * np.float64(x[i])

    elif op == "ema":

        @numba.njit(sig, **opts)
        def kern(x, alpha, e):
            n = x.size
            blk = chunk if par else max(n, 1)
            for c in prange((n + blk - 1) // blk):
                lo = c * blk
                for i in range(lo, min(lo + blk, n)):
                    e[i] += alpha * (np.float64(x[i]) - e[i])

    elif op == "final":

        @numba.njit(sig, **opts)
        def kern(acc, total, out):
            n = acc.size
            blk = chunk if par else max(n, 1)
            for c in prange((n + blk - 1) // blk):
                lo = c * blk
                for i in range(lo, min(lo + blk, n)):
                    out[i] = outcast(acc[i] / total)

    elif op == "copy":

        @numba.njit(sig, **opts)
        def kern(acc, out):
            n = acc.size
            blk = chunk if par else max(n, 1)
            for c in prange((n + blk - 1) // blk):
                lo = c * blk
                for i in range(lo, min(lo + blk, n)):
                    out[i] = outcast(acc[i])

    elif op == "add_final":

        @numba.njit(sig, **opts)
        def kern(acc, x, w, total, out):
            n = acc.size
            blk = chunk if par else max(n, 1)
            for c in prange((n + blk - 1) // blk):
                lo = c * blk
                for i in range(lo, min(lo + blk, n)):
                    out[i] = outcast((acc[i] + w * np.float64(x[i])) / total)

    elif op == "welford":

        @numba.njit(sig, **opts)
        def kern(x, w, total, mean, m2):
            n = x.size
            r = w / total
            blk = chunk if par else max(n, 1)
            for c in prange((n + blk - 1) // blk):
                lo = c * blk
                for i in range(lo, min(lo + blk, n)):
                    xi = np.float64(x[i])
                    d = xi - mean[i]
                    mi = mean[i] + r * d
                    mean[i] = mi
                    m2[i] += w * d * (xi - mi)

    else:  # ema_var

        @numba.njit(sig, **opts)
        def kern(x, alpha, e, v):
            n = x.size
            beta = 1.0 - alpha
            blk = chunk if par else max(n, 1)
            for c in prange((n + blk - 1) // blk):
                lo = c * blk
                for i in range(lo, min(lo + blk, n)):
                    d = np.float64(x[i]) - e[i]
                    e[i] += alpha * d
                    v[i] = beta * (v[i] + alpha * d * d)

    return kern


def run(op: str, *args, out_dtype: str = "float64") -> None:
    """Run kernel ``op`` on validated, C-contiguous 1-D buffers (the caller checks sizes).

    The input dtype is that of the first argument for the ops that take ``x`` first, else of
    ``x`` in ``add_final``; parallel when the buffer has at least ``PARALLEL_MIN`` elements.
    """
    if op == "add_final":
        in_dt = args[1].dtype.name
    elif op in ("final", "copy"):
        in_dt = "float64"
    else:
        in_dt = args[0].dtype.name
    n = args[0].size
    if n == 0:
        return
    kern = averaging_kernel((op, in_dt, out_dtype, n >= PARALLEL_MIN))
    kern(*args)
