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

import numba
import numpy as np
from numba import prange

from .._cache import kernel_family

CHUNK = 1 << 16
"""Elements per parallel work item (256 KiB of float32)."""

PARALLEL_MIN = 1 << 17
"""Buffers with fewer elements use the serial kernels."""

MULTI_CHUNK = 1 << 16
"""Elements per block of the all-models kernel: its float64 block buffer (512 KiB) stays in
L2 and each model is read in 256 KiB runs, long enough for the hardware prefetchers (measured
~15% faster than 4096-element blocks on 50M parameters)."""

MULTI_MIN = 1 << 15
"""Leaves with fewer elements take the per-model kernels (no per-count compilation)."""

MULTI_MAX = 16
"""Most models the all-models kernel takes (one compiled kernel per count, cached on disk)."""

OPS = ("init", "add", "final", "welford", "ema", "ema_var", "copy", "multi")

_NB = {"float32": numba.float32, "float64": numba.float64}


def _signature(op: str, in_dt: str, out_dt: str, k: int = 0):
    xin = _NB[in_dt][::1]
    if op == "multi":
        return numba.void(
            numba.types.UniTuple(xin, k), numba.float64[::1], numba.float64, _NB[out_dt][::1]
        )
    f64 = numba.float64
    acc = numba.float64[::1]
    if op in ("init", "add", "ema"):
        return numba.void(xin, f64, acc)
    if op == "final":
        return numba.void(acc, f64, _NB[out_dt][::1])
    if op == "copy":
        return numba.void(acc, _NB[out_dt][::1])
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
    op, in_dt, out_dt, parallel = key[:4]
    sig = _signature(op, in_dt, out_dt, *key[4:])
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
                hi = min(lo + blk, n)
                acc_b = acc[lo:hi]
                x_b = x[lo:hi]
                for i in range(hi - lo):  # 0-based views vectorise (module doc)
                    acc_b[i] = w * np.float64(x_b[i])

    elif op == "add":

        @numba.njit(sig, **opts)
        def kern(x, w, acc):
            n = x.size
            blk = chunk if par else max(n, 1)
            for c in prange((n + blk - 1) // blk):
                lo = c * blk
                hi = min(lo + blk, n)
                acc_b = acc[lo:hi]
                x_b = x[lo:hi]
                for i in range(hi - lo):  # 0-based views vectorise (module doc)
                    acc_b[i] += w * np.float64(x_b[i])

    elif op == "ema":

        @numba.njit(sig, **opts)
        def kern(x, alpha, e):
            n = x.size
            blk = chunk if par else max(n, 1)
            for c in prange((n + blk - 1) // blk):
                lo = c * blk
                hi = min(lo + blk, n)
                e_b = e[lo:hi]
                x_b = x[lo:hi]
                for i in range(hi - lo):  # 0-based views vectorise (module doc)
                    e_b[i] += alpha * (np.float64(x_b[i]) - e_b[i])

    elif op == "final":

        @numba.njit(sig, **opts)
        def kern(acc, total, out):
            n = acc.size
            blk = chunk if par else max(n, 1)
            for c in prange((n + blk - 1) // blk):
                lo = c * blk
                hi = min(lo + blk, n)
                acc_b = acc[lo:hi]
                out_b = out[lo:hi]
                for i in range(hi - lo):  # 0-based views vectorise (module doc)
                    out_b[i] = outcast(acc_b[i] / total)

    elif op == "copy":

        @numba.njit(sig, **opts)
        def kern(acc, out):
            n = acc.size
            blk = chunk if par else max(n, 1)
            for c in prange((n + blk - 1) // blk):
                lo = c * blk
                hi = min(lo + blk, n)
                acc_b = acc[lo:hi]
                out_b = out[lo:hi]
                for i in range(hi - lo):  # 0-based views vectorise (module doc)
                    out_b[i] = outcast(acc_b[i])

    elif op == "welford":

        @numba.njit(sig, **opts)
        def kern(x, w, total, mean, m2):
            n = x.size
            r = w / total
            blk = chunk if par else max(n, 1)
            for c in prange((n + blk - 1) // blk):
                lo = c * blk
                hi = min(lo + blk, n)
                m2_b = m2[lo:hi]
                mean_b = mean[lo:hi]
                x_b = x[lo:hi]
                for i in range(hi - lo):  # 0-based views vectorise (module doc)
                    xi = np.float64(x_b[i])
                    d = xi - mean_b[i]
                    mi = mean_b[i] + r * d
                    mean_b[i] = mi
                    m2_b[i] += w * d * (xi - mi)

    elif op == "multi":
        mchunk = MULTI_CHUNK

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

    else:  # ema_var

        @numba.njit(sig, **opts)
        def kern(x, alpha, e, v):
            n = x.size
            beta = 1.0 - alpha
            blk = chunk if par else max(n, 1)
            for c in prange((n + blk - 1) // blk):
                lo = c * blk
                hi = min(lo + blk, n)
                e_b = e[lo:hi]
                v_b = v[lo:hi]
                x_b = x[lo:hi]
                for i in range(hi - lo):  # 0-based views vectorise (module doc)
                    d = np.float64(x_b[i]) - e_b[i]
                    e_b[i] += alpha * d
                    v_b[i] = beta * (v_b[i] + alpha * d * d)

    return kern


def run(op: str, *args, out_dtype: str = "float64") -> None:
    """Run kernel ``op`` on validated, C-contiguous 1-D buffers (the caller checks sizes and
    dtypes); parallel when the buffer has at least ``PARALLEL_MIN`` elements."""
    if op in ("final", "copy"):
        in_dt, n, extra = "float64", args[0].size, ()
    elif op == "multi":
        xs = args[0]
        in_dt, n, extra = xs[0].dtype.name, args[3].size, (len(xs),)
    else:
        in_dt, n, extra = args[0].dtype.name, args[0].size, ()
    if n == 0:
        return
    kern = averaging_kernel((op, in_dt, out_dtype, n >= PARALLEL_MIN, *extra))
    kern(*args)
