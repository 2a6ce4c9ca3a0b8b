"""Kernels of :mod:`qgemm.laplace`: per-example MLP Jacobians and GGN factors.

The MLP is described by flat arrays (so one compiled kernel serves every architecture):

* ``theta`` float64 ``[n_total]`` -- all parameters in torch's ``parameters_to_vector`` order
  over an ``nn.Sequential`` of ``Linear`` layers: per layer the weight ``[out, in]`` row-major,
  then the bias (when the layer has one);
* ``sizes`` int64 ``[L + 1]`` -- layer widths, ``sizes[0]`` the input width;
* ``acts`` int64 ``[L]`` -- activation after each layer (:data:`ACTIVATIONS` codes);
* ``woff``, ``boff`` int64 ``[L]`` -- offset of each layer's weight / bias in ``theta``
  (``boff = -1``: no bias);
* the chosen subnetwork as ``sel_layer``, ``sel_row``, ``sel_col`` int64 ``[P]`` (``sel_col =
  -1``: the bias of row ``sel_row``), and ``lowest`` = the smallest chosen layer (the backward
  pass stops there).

``mlp_jacobian_kernel(())``
    ``kern(x, theta, sizes, acts, woff, boff, sel_layer, sel_row, sel_col, lowest, mode, f,
    out)``: for every row ``n`` of ``x`` (float64 ``[B, sizes[0]]``) the forward pass writes
    the network output ``f[n]`` (float64 ``[B, C]``, before the likelihood's link), then one
    backward pass per output ``c`` gives ``J[c, p] = d f_c / d theta_{sel[p]}`` and
    ``out[n]`` (float64 ``[B, C, P]``) receives, by ``mode``:

    * ``MODE_JACOBIAN`` (0): ``J`` itself;
    * ``MODE_GGN_IDENTITY`` (1): ``J`` (regression, ``Lambda = I``);
    * ``MODE_GGN_SIGMOID`` (2): ``sqrt(s (1 - s)) J`` with ``s = sigmoid(f)`` (binary);
    * ``MODE_GGN_SOFTMAX`` (3): row ``c`` = ``sqrt(p_c) (J_c - sum_k p_k J_k)`` with ``p =
      softmax(f)`` -- a square root of ``Lambda = diag(p) - p p^T = B^T B`` with ``B =
      diag(sqrt p)(I - 1 p^T)``, so ``J^T Lambda J = G^T G`` exactly, with no difference of
      Gram matrices.

    The modes 1-3 give ``G`` with ``sum_n G_n^T G_n = sum_n J_n^T Lambda_n J_n`` (the GGN);
    the caller forms that P x P rank-``B C`` update with one BLAS call per batch (a Numba
    triple loop is ~10x slower than dgemm/dsyrk for P ~ 1000).  ``P = 0`` is a plain forward
    pass.  Parallel over blocks of :data:`BLOCK` examples (scratch allocated once per block).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba
import numpy as np
from numba import prange, types

from .._cache import kernel_family
from .._tuning import LAPLACE_BLOCK as BLOCK

__all__ = [
    "ACTIVATIONS",
    "BLOCK",
    "MODE_JACOBIAN",
    "MODE_GGN_IDENTITY",
    "MODE_GGN_SIGMOID",
    "MODE_GGN_SOFTMAX",
    "mlp_jacobian_kernel",
    "Layout",
    "flatten_mlp",
    "selection",
    "run_mlp",
]

ACTIVATIONS = {"identity": 0, "relu": 1, "tanh": 2, "sigmoid": 3}
MODE_JACOBIAN = 0
MODE_GGN_IDENTITY = 1
MODE_GGN_SIGMOID = 2
MODE_GGN_SOFTMAX = 3


@kernel_family("laplace_mlp_jacobian")
def mlp_jacobian_kernel(key):
    """Forward pass, per-output backward pass and subnetwork Jacobian/GGN factor; key ``()``."""
    del key
    i64 = types.int64[::1]
    sig = types.void(
        types.float64[:, ::1],
        types.float64[::1],
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
        types.int64,
        types.int64,
        types.float64[:, ::1],
        types.float64[:, :, ::1],
    )
    block = BLOCK

    @numba.njit(sig, parallel=True, cache=True, nogil=True, error_model="numpy")
    def kern(
        x, theta, sizes, acts, woff, boff, sel_layer, sel_row, sel_col, lowest, mode, f, out
    ):  # pragma: no cover - compiled
        n_rows = x.shape[0]
        n_layers = acts.shape[0]
        n_out = sizes[n_layers]
        n_sel = sel_layer.shape[0]
        # activation offsets: a_l lives at aoff[l] .. aoff[l] + sizes[l]
        aoff = np.zeros(n_layers + 2, np.int64)
        for l in range(n_layers + 1):
            aoff[l + 1] = aoff[l] + sizes[l]
        total = aoff[n_layers + 1]
        n_blocks = (n_rows + block - 1) // block
        for blk in prange(n_blocks):
            a = np.empty(total, np.float64)  # activations a_0 .. a_L
            d = np.empty(total, np.float64)  # d f_c / d z_l (z = pre-activation), same layout
            jac = np.empty((n_out, n_sel), np.float64)
            pr = np.empty(n_out, np.float64)
            lo = blk * block
            hi = min(lo + block, n_rows)
            for n in range(lo, hi):
                for k in range(sizes[0]):
                    a[k] = x[n, k]
                # forward
                for l in range(n_layers):
                    n_in = sizes[l]
                    n_o = sizes[l + 1]
                    ai = aoff[l]
                    ao = aoff[l + 1]
                    w0 = woff[l]
                    act = acts[l]
                    for i in range(n_o):
                        z = theta[boff[l] + i] if boff[l] >= 0 else 0.0
                        wr = w0 + i * n_in
                        for k in range(n_in):
                            z += theta[wr + k] * a[ai + k]
                        if act == 1:
                            z = z if z > 0.0 else 0.0
                        elif act == 2:
                            z = math.tanh(z)
                        elif act == 3:
                            z = 1.0 / (1.0 + math.exp(-z))
                        a[ao + i] = z
                fo = aoff[n_layers]
                for c in range(n_out):
                    f[n, c] = a[fo + c]
                if n_sel == 0:
                    continue
                # backward, once per output
                for c in range(n_out):
                    for l in range(n_layers - 1, lowest - 1, -1):
                        n_in = sizes[l]
                        n_o = sizes[l + 1]
                        ao = aoff[l + 1]
                        act = acts[l]
                        for i in range(n_o):
                            if l == n_layers - 1:
                                g = 1.0 if i == c else 0.0
                            else:  # d[ao + i] holds d f_c / d a_{l+1}[i] from the layer above
                                g = d[ao + i]
                            av = a[ao + i]
                            if act == 1:
                                g = g if av > 0.0 else 0.0
                            elif act == 2:
                                g = g * (1.0 - av * av)
                            elif act == 3:
                                g = g * av * (1.0 - av)
                            d[ao + i] = g  # now d f_c / d z_{l+1}[i]
                        if l > lowest:  # d f_c / d a_l = W_l^T (d f_c / d z)
                            ai = aoff[l]
                            w0 = woff[l]
                            for k in range(n_in):
                                d[ai + k] = 0.0
                            for i in range(n_o):
                                g = d[ao + i]
                                if g != 0.0:
                                    wr = w0 + i * n_in
                                    for k in range(n_in):
                                        d[ai + k] += theta[wr + k] * g
                    for p in range(n_sel):
                        l = sel_layer[p]
                        g = d[aoff[l + 1] + sel_row[p]]
                        col = sel_col[p]
                        jac[c, p] = g if col < 0 else g * a[aoff[l] + col]
                if mode == 2:
                    z = f[n, 0]
                    s = 1.0 / (1.0 + math.exp(-z))
                    r = math.sqrt(s * (1.0 - s))
                    for p in range(n_sel):
                        out[n, 0, p] = r * jac[0, p]
                elif mode == 3:
                    mx = -np.inf
                    for c in range(n_out):
                        mx = max(mx, f[n, c])
                    tot = 0.0
                    for c in range(n_out):
                        pr[c] = math.exp(f[n, c] - mx)
                        tot += pr[c]
                    for c in range(n_out):
                        pr[c] /= tot
                    for p in range(n_sel):
                        m = 0.0
                        for c in range(n_out):
                            m += pr[c] * jac[c, p]
                        for c in range(n_out):
                            out[n, c, p] = math.sqrt(pr[c]) * (jac[c, p] - m)
                else:
                    for c in range(n_out):
                        for p in range(n_sel):
                            out[n, c, p] = jac[c, p]

    return kern


class Layout(NamedTuple):
    """The flat description of an MLP the kernel reads (module docstring)."""

    theta: np.ndarray
    sizes: np.ndarray
    acts: np.ndarray
    woff: np.ndarray
    boff: np.ndarray


def flatten_mlp(layers) -> Layout:
    """:class:`Layout` of float64 ``[(weight [out, in], bias or None, activation name)]``."""
    woff, boff, parts, pos = [], [], [], 0
    for w, b, _ in layers:
        woff.append(pos)
        parts.append(w.ravel())
        pos += w.size
        boff.append(pos if b is not None else -1)
        if b is not None:
            parts.append(b)
            pos += b.size
    sizes = [layers[0][0].shape[1]] + [w.shape[0] for w, _, _ in layers]
    return Layout(
        np.ascontiguousarray(np.concatenate(parts), dtype=np.float64),
        np.asarray(sizes, np.int64),
        np.asarray([ACTIVATIONS[a] for _, _, a in layers], np.int64),
        np.asarray(woff, np.int64),
        np.asarray(boff, np.int64),
    )


def selection(lay: Layout, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``(sel_layer, sel_row, sel_col, lowest)`` of flat indices ``idx`` (int64)."""
    n_layers = lay.acts.size
    if idx.size == 0:
        z = np.zeros(0, np.int64)
        return z, z, z, n_layers - 1
    ends = np.append(lay.woff[1:], lay.theta.size)
    layer = np.searchsorted(ends, idx, side="right").astype(np.int64)
    rel = idx - lay.woff[layer]
    n_in = lay.sizes[layer]
    n_w = n_in * lay.sizes[layer + 1]
    is_w = rel < n_w
    row = np.where(is_w, rel // n_in, rel - n_w).astype(np.int64)
    col = np.where(is_w, rel % n_in, -1).astype(np.int64)
    return layer, row, col, int(layer.min())


def run_mlp(lay: Layout, x: np.ndarray, sel, mode: int, theta: np.ndarray | None = None):
    """``(f [B, C], out [B, C, P])`` of the kernel on rows ``x`` (cast to float64)."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    layer, row, col, lowest = sel
    n_out = int(lay.sizes[-1])
    f = np.empty((x.shape[0], n_out))
    out = np.empty((x.shape[0], n_out, layer.size))
    th = lay.theta if theta is None else theta
    args = (lay.sizes, lay.acts, lay.woff, lay.boff, layer, row, col, lowest, mode, f, out)
    mlp_jacobian_kernel(())(x, th, *args)
    return f, out
