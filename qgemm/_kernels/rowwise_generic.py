"""One-pass 8-bit row-wise quantization (FBGEMM's ``FloatToFused8BitRowwiseQuantized``).

The two-pass path (a min/max kernel, parameters in numpy, a codes kernel, the parameters
scattered into the fused rows by numpy) read a 1M x 64 table twice and spent most of its time
in a min/max loop that could not vectorise (a branch per element for the finiteness test).
Here each row is read once while it sits in L1: the finiteness test is an integer OR over the
float bits (vectorises exactly), min/max are plain float reductions, the parameters are the
same float32 operations the numpy path did, in the same order (so the bytes are identical),
and they are written straight into the row's last 8 bytes.  Rows run in a ``prange``.

One kernel for every shape: the family key is ``()`` (it is "generic" in that sense; this file
sits with the generic-tier kernels of :mod:`qgemm._cache`).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from .._cache import kernel_family

__all__ = ["rowwise8_fused_kernel"]


@kernel_family("rowwise8_fused")
def rowwise8_fused_kernel(key):
    """Key ``()``: quantize float32 rows ``x [rows, dim]`` into ``fused [rows, dim + 8]``
    (codes, then float32 scale and bias); returns the flat index of the first non-finite
    element (nothing meaningful written then), or -1."""
    sig = numba.int64(numba.float32[:, ::1], numba.uint8[:, ::1])

    @numba.njit(sig, parallel=True, cache=True, nogil=True, error_model="numpy")
    def rowwise8_fused(x, fused):
        rows, dim = x.shape
        bad = np.zeros(max(rows, 1), np.bool_)
        for r in prange(rows):
            xr = x[r]
            xi = xr.view(np.int32)
            nonfinite = np.int32(0)
            for j in range(dim):
                nonfinite |= np.int32((xi[j] & 0x7F800000) == 0x7F800000)
            if nonfinite != 0:
                bad[r] = True
                continue
            lo = np.float32(0.0)
            hi = np.float32(0.0)
            if dim > 0:
                lo = np.float32(np.inf)
                hi = np.float32(-np.inf)
                for j in range(dim):
                    v = xr[j]
                    lo = min(lo, v)
                    hi = max(hi, v)
            rng = np.float32(hi - lo)
            scale = np.float32(rng / np.float32(255.0))
            inv = np.float32(np.float32(255.0) / np.float32(rng + np.float32(1e-8)))
            fr = fused[r]
            for j in range(dim):
                q = np.rint((xr[j] - lo) * inv)
                fr[j] = np.uint8(min(max(q, np.float32(0.0)), np.float32(255.0)))
            params = fr[dim : dim + 8].view(np.float32)
            params[0] = scale
            params[1] = lo
        for r in range(rows):
            if bad[r]:
                xr = x[r]
                for j in range(dim):
                    v = xr[j]
                    if not (v - v == np.float32(0.0)):
                        return r * dim + j
        return -1

    return rowwise8_fused
