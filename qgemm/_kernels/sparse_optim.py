"""Sparse optimizer kernels for embedding tables (FBGEMM's ``rowwise_adagrad``).

``rowwise_adagrad_kernel(key)`` with key ``(index dtype, offsets dtype, weighted, mean,
parallel)``:

``kern(table, momentum, indices, offsets, grad, col, weights, lr, eps, weight_decay)
-> (code, bag, position, value)``

for one float32 table ``[rows, dim]`` (C-contiguous), its float32 ``momentum [rows]``, the
table's bags (``indices`` with ``offsets [B + 1]`` into them, TBE's convention) and the
gradient of the pooled output ``grad [B, >= col + dim]`` (columns ``col:col + dim`` belong to
this table).  FBGEMM's exact rowwise AdaGrad (``EXACT_ROWWISE_ADAGRAD``):

1. the gradient of every row looked up is gathered: ``g_r = sum over the positions k with
   indices[k] == r of w_k * grad[bag(k), col:col + dim]`` (``w_k`` the per-sample weight, times
   ``1 / len(bag)`` for mean pooling); duplicates are summed first (rows sorted, stable), so a
   row is updated once;
2. ``g_r += weight_decay * table[r]`` (L2), then ``momentum[r] += mean(g_r ** 2)`` and
   ``table[r] -= lr / (sqrt(momentum[r]) + eps) * g_r``.

Validation first (offsets start at 0, never decrease, end at ``len(indices)``; every index in
``[0, rows)``): a failing call changes nothing.  Accumulation is in float32.  Parallel over
the distinct rows (each is written by one task).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange, types

from .._cache import kernel_family
from .embedding import BAD_FIRST_OFFSET, BAD_INDEX, DECREASING_OFFSET, OFFSET_PAST_END, OK

__all__ = ["rowwise_adagrad_kernel"]

_INT = {"int32": numba.int32, "int64": numba.int64}


@kernel_family("rowwise_adagrad")
def rowwise_adagrad_kernel(key):
    """Key ``(index dtype, offsets dtype, weighted, mean, parallel)``; see the module
    docstring."""
    idx_name, off_name, weighted, mean, parallel = key
    WEIGHTED = bool(weighted)
    MEAN = bool(mean)
    loop = prange if parallel else range
    f32 = types.float32
    sig = types.UniTuple(types.int64, 4)(
        f32[:, ::1],  # table
        f32[::1],  # momentum
        _INT[idx_name][::1],  # indices
        _INT[off_name][::1],  # offsets [B + 1]
        f32[:, ::1],  # grad [B, D]
        types.int64,  # col
        f32[::1],  # weights (empty when unweighted)
        f32,  # lr
        f32,  # eps
        f32,  # weight decay (L2)
    )

    @numba.njit(sig, parallel=bool(parallel), cache=True, nogil=True)
    def rowwise_adagrad(table, momentum, indices, offs, grad, col, wts, lr, eps, wd):
        rows, dim = table.shape
        n = indices.size
        nb = offs.size - 1
        if np.int64(offs[0]) != 0:
            return (BAD_FIRST_OFFSET, 0, 0, np.int64(offs[0]))
        for b in range(1, nb + 1):
            if offs[b] < offs[b - 1]:
                return (DECREASING_OFFSET, b, b, np.int64(offs[b]))
        if np.int64(offs[nb]) != n:
            return (OFFSET_PAST_END, nb, nb, np.int64(offs[nb]))
        bag = np.empty(n, np.int64)
        for b in range(nb):
            for k in range(np.int64(offs[b]), np.int64(offs[b + 1])):
                bag[k] = b
        for k in range(n):
            v = np.int64(indices[k])
            if v < 0 or v >= rows:
                return (BAD_INDEX, bag[k], k, v)
        if n == 0 or dim == 0:
            return (OK, 0, 0, 0)
        order = np.argsort(indices, kind="mergesort")  # stable: duplicates in position order
        # run starts of equal rows in the sorted order
        starts = np.empty(n + 1, np.int64)
        nu = 0
        for i in range(n):
            if i == 0 or indices[order[i]] != indices[order[i - 1]]:
                starts[nu] = i
                nu += 1
        starts[nu] = n
        inv_dim = np.float32(1.0) / np.float32(dim)
        for u in loop(nu):
            g = np.zeros(dim, np.float32)
            r = np.int64(indices[order[starts[u]]])
            for i in range(starts[u], starts[u + 1]):
                k = order[i]
                b = bag[k]
                w = np.float32(1.0)
                if WEIGHTED:
                    w = wts[k]
                if MEAN:
                    w = w / np.float32(offs[b + 1] - offs[b])
                for d in range(dim):
                    g[d] += w * grad[b, col + d]
            ss = np.float32(0.0)
            for d in range(dim):
                gd = g[d] + wd * table[r, d]
                g[d] = gd
                ss += gd * gd
            m = momentum[r] + ss * inv_dim
            momentum[r] = m
            mult = lr / (np.sqrt(m) + eps)
            for d in range(dim):
                table[r, d] -= mult * g[d]
        return (OK, 0, 0, 0)

    return rowwise_adagrad
