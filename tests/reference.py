"""Plain numpy reference implementations: the test oracle for every qgemm kernel.

Obviously-correct, slow code.  Integer results are computed in int64; float results in float64
unless a section says otherwise.  Each topic has its own section; keep them independent.
"""

from __future__ import annotations

import numpy as np

# ============================================================================================
# Quantization primitives


def ref_qrange(dtype: str, reduce_range: bool = False) -> tuple[int, int]:
    if dtype == "uint8":
        return (0, 127) if reduce_range else (0, 255)
    return (-64, 63) if reduce_range else (-128, 127)


def ref_choose_qparams_fbgemm(xmin: float, xmax: float, qmin: int, qmax: int):
    """FBGEMM's ChooseQuantizationParams, scalar, written from its definition."""
    xmin = min(float(np.float32(xmin)), 0.0)
    xmax = max(float(np.float32(xmax)), 0.0)
    scale = float(np.float32((xmax - xmin) / (qmax - qmin)))
    if scale == 0.0 or np.isinf(np.float32(1.0) / np.float32(scale)):
        scale = float(np.float32(0.1))
    thr = float(np.float32(6.1e-5))
    if scale < thr:
        org = scale
        scale = thr
        if xmin == 0.0:
            xmax = float(np.float32(thr * (qmax - qmin)))
        elif xmax == 0.0:
            xmin = float(np.float32(-thr * (qmax - qmin)))
        else:
            amp = float(np.float32(thr / org))
            xmin = float(np.float32(xmin * amp))
            xmax = float(np.float32(xmax * amp))
    zmin = qmin - xmin / scale
    zmax = qmax - xmax / scale
    emin = abs(qmin) + abs(xmin / scale)
    emax = abs(qmax) + abs(xmax / scale)
    z0 = zmin if emin < emax else zmax
    if z0 < qmin:
        zp = qmin
    elif z0 > qmax:
        zp = qmax
    else:
        zp = int(np.rint(z0))
    return np.float32(scale), zp


def ref_quantize(x, scale, zero_point, qmin, qmax, dtype):
    """clamp(rint(x / scale) + zp) in float32; scale/zero_point broadcast against x."""
    x = np.asarray(x, np.float32)
    q = np.rint(x / np.asarray(scale, np.float32)) + np.asarray(zero_point, np.float32)
    return np.clip(q, qmin, qmax).astype(dtype)


def ref_dequantize(q, scale, zero_point):
    return (np.asarray(q, np.int32) - np.asarray(zero_point, np.int32)).astype(
        np.float32
    ) * np.asarray(scale, np.float32)


def ref_quantize_rowwise_fused(table, bits):
    """FBGEMM's rowwise quantizers (8-bit SBFloat, 4/2-bit SBHalf), one row at a time."""
    table = np.asarray(table, np.float32)
    rows, dim = table.shape
    per_byte = 8 // bits
    cb = -(-dim // per_byte)
    out = np.zeros((rows, cb + (8 if bits == 8 else 4)), np.uint8)
    for r in range(rows):
        row = table[r]
        # std::min_element / max_element: the *first* extreme element (matters for -0.0)
        mn = np.float32(row[np.argmin(row)]) if dim else np.float32(0)
        mx = np.float32(row[np.argmax(row)]) if dim else np.float32(0)
        if bits == 8:
            rng = np.float32(mx - mn)
            scale = np.float32(rng / np.float32(255))
            inv = np.float32(np.float32(255) / np.float32(rng + np.float32(1e-8)))
            for j in range(dim):
                out[r, j] = int(np.clip(np.rint(np.float32((row[j] - mn) * inv)), 0, 255))
            out[r, cb:] = np.array([scale, mn], np.float32).view(np.uint8)
            continue
        mn16 = np.float16(mn)
        mn = np.float32(mn16)
        rng = np.float32(mx - mn)
        scale = np.float32(1.0) if rng == 0 else np.float32(rng / np.float32((1 << bits) - 1))
        with np.errstate(over="ignore"):
            scale = np.float32(np.float16(scale))
        if scale == 0:
            scale = np.float32(1.0)
        with np.errstate(divide="ignore", over="ignore"):
            inv = np.float32(np.float32(1.0) / scale)
        if np.isinf(inv):
            scale = inv = np.float32(1.0)
        for j in range(dim):
            code = int(np.clip(np.rint(np.float32((row[j] - mn) * inv)), 0, (1 << bits) - 1))
            out[r, j // per_byte] |= code << ((j % per_byte) * bits)
        with np.errstate(over="ignore"):
            out[r, cb:] = np.array([np.float16(scale), mn16], np.float16).view(np.uint8)
    return out


# ============================================================================================
# GEMM (qgemm.gemm): raw u8 x s8 product, zero-point correction, output stages


def ref_matmul_u8s8(a, w, saturate=False):
    """``a [M, K] (uint8) @ w[N, K].T (int8)`` in int64.

    ``saturate``: FBGEMM's AVX2 arithmetic -- each pair of products ``(k, k+1)`` for even ``k``
    (``vpmaddubsw``) is clamped to int16 before the int32 sum.
    """
    a = np.asarray(a, np.int64)
    w = np.asarray(w, np.int64)
    if not saturate:
        return a @ w.T
    m, k = a.shape
    n = w.shape[0]
    kp = k + (k & 1)
    ap = np.zeros((m, kp), np.int64)
    wp = np.zeros((n, kp), np.int64)
    ap[:, :k] = a
    wp[:, :k] = w
    pairs = (ap[:, None, :] * wp[None, :, :]).reshape(m, n, kp // 2, 2).sum(axis=-1)
    return np.clip(pairs, -32768, 32767).sum(axis=-1)


def ref_gemm_corrected(a, a_zp, w, w_zp, saturate=False):
    """``sum_k (a - a_zp)(w - w_zp)`` through FBGEMM's row/column-offset formula (int64)."""
    a = np.asarray(a, np.int64)
    w = np.asarray(w, np.int64)
    w_zp = np.broadcast_to(np.asarray(w_zp, np.int64), (w.shape[0],))
    k = a.shape[1]
    raw = ref_matmul_u8s8(a, w, saturate)
    return (
        raw
        - int(a_zp) * w.sum(axis=1)[None, :]
        - a.sum(axis=1)[:, None] * w_zp[None, :]
        + k * int(a_zp) * w_zp[None, :]
    )


def _split_bias(bias, n):
    if bias is None:
        return np.zeros(n, np.int64), np.zeros(n, np.float32)
    bias = np.asarray(bias)
    if bias.dtype == np.int32:
        return bias.astype(np.int64), np.zeros(n, np.float32)
    return np.zeros(n, np.int64), bias.astype(np.float32)


def ref_output_float(raw, a_scale, w_scale, bias=None, relu=False):
    """FBGEMM ``ReQuantizeForFloat`` in float32: ``raw * a_scale * w_scale[j] + bias[j]``.
    An int32 bias is added to ``raw`` (accumulator units) instead."""
    raw = np.asarray(raw, np.int64)
    ib, fb = _split_bias(bias, raw.shape[1])
    w_scale = np.broadcast_to(np.asarray(w_scale, np.float32), (raw.shape[1],))
    f = (raw + ib[None, :]).astype(np.float32) * np.float32(a_scale) * w_scale[None, :]
    f = f + fb[None, :]
    return np.maximum(f, np.float32(0)) if relu else f


def ref_output_requant(raw, a_scale, w_scale, c_scale, c_zp, bias=None, relu=False, qmax=255):
    """FBGEMM ``ReQuantizeOutput`` in float32, round half to even:
    ``clamp(rint((raw + bias / (a_s * w_s)) * (a_s * w_s / c_s)) + c_zp, relu ? c_zp : 0, qmax)``
    (an int32 bias is added to ``raw`` instead)."""
    raw = np.asarray(raw, np.int64)
    n = raw.shape[1]
    ib, fb = _split_bias(bias, n)
    w_scale = np.broadcast_to(np.asarray(w_scale, np.float32), (n,))
    ab = np.float32(a_scale) * w_scale
    mult = ab / np.float32(c_scale)
    raw_f = (raw + ib[None, :]).astype(np.float32) + (fb / ab)[None, :]
    q = np.rint(raw_f * mult[None, :]) + np.float32(c_zp)
    return np.clip(q, c_zp if relu else 0, qmax).astype(np.uint8)


def ref_linear_dynamic(
    x, w, w_scale, w_zp, bias=None, relu=False, reduce_range=False, saturate=False
):
    """Dynamic quantized linear: per-tensor uint8 activations from ``x``'s range (FBGEMM's
    ChooseQuantizationParams), int GEMM, float output stage.  ``w`` int8 codes ``[N, K]``."""
    x = np.asarray(x, np.float32)
    x = x.reshape(int(np.prod(x.shape[:-1])), np.shape(w)[1])
    qmax = 127 if reduce_range else 255
    lo = float(x.min()) if x.size else 0.0
    hi = float(x.max()) if x.size else 0.0
    scale, zp = ref_choose_qparams_fbgemm(lo, hi, 0, qmax)
    xq = ref_quantize(x, scale, zp, 0, qmax, np.uint8)
    raw = ref_gemm_corrected(xq, zp, w, w_zp, saturate)
    return ref_output_float(raw, scale, w_scale, bias, relu)


# ============================================================================================
# Model averaging (qgemm.averaging)


def ref_flatten(tree, prefix=()):
    """Nested mapping -> {path tuple: leaf}, in traversal order."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(ref_flatten(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def ref_unflatten(flat):
    out = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def ref_average_leaf(values, weights, int_policy="max"):
    """Weighted average of one leaf over models, as qgemm.average defines it: models with zero
    weight are ignored; floats as float64 ``(w0 x0 + w1 x1 + ...) / sum(w)`` left to right,
    rounded once to the dtype; integers by ``int_policy``."""
    pairs = [
        (np.asarray(v), float(w)) for v, w in zip(values, weights, strict=True) if float(w) > 0
    ]
    dt = pairs[0][0].dtype
    total = sum(w for _, w in pairs)
    if dt.kind == "f":
        acc = None
        for v, w in pairs:
            term = w * v.astype(np.float64)
            acc = term if acc is None else acc + term
        return (acc / total).astype(dt)
    if int_policy == "first":
        return pairs[0][0].copy()
    if int_policy == "max":
        out = pairs[0][0]
        for v, _ in pairs[1:]:
            out = np.maximum(out, v)
        return out.astype(dt)
    if int_policy == "sum":
        exact = sum(v.astype(object) for v, _ in pairs)  # Python ints: the caller checks range
        return np.asarray(exact, dtype=object).astype(dt)
    acc = sum(w * v.astype(np.float64) for v, w in pairs)
    return np.rint(acc / total).astype(dt)


def ref_average(models, weights=None, int_policy="max"):
    models = list(models)
    weights = [1.0] * len(models) if weights is None else list(weights)
    flats = [ref_flatten(m) for m in models]
    return ref_unflatten(
        {p: ref_average_leaf([f[p] for f in flats], weights, int_policy) for p in flats[0]}
    )


def ref_weighted_variance(values, weights):
    """Weighted population variance ``sum w (x - mean)^2 / sum w`` in float64."""
    x = np.stack([np.asarray(v, np.float64) for v in values])
    w = np.asarray(weights, np.float64).reshape((-1,) + (1,) * (x.ndim - 1))
    mean = (w * x).sum(0) / w.sum()
    return (w * (x - mean) ** 2).sum(0) / w.sum()


def ref_ema(values, decay):
    """Closed form of the EMA started at the first value:
    ``e_n = d^(n-1) x_1 + sum_{k>=2} (1 - d) d^(n-k) x_k`` (float64)."""
    n = len(values)
    x = [np.asarray(v, np.float64) for v in values]
    out = decay ** (n - 1) * x[0]
    for k in range(1, n):
        out = out + (1 - decay) * decay ** (n - 1 - k) * x[k]
    return out


def ref_cyclical_lr(step, base_lr, max_lr, step_size, mode="triangular", gamma=1.0):
    """Smith (2017), Algorithm 1, as written in the paper (symmetric cycle)."""
    cycle = np.floor(1 + step / (2 * step_size))
    x = abs(step / step_size - 2 * cycle + 1)
    if mode == "triangular":
        scale = 1.0
    elif mode == "triangular2":
        with np.errstate(over="ignore", under="ignore"):
            scale = float(np.power(0.5, cycle - 1))
    else:
        scale = gamma**step
    return base_lr + (max_lr - base_lr) * max(0.0, 1 - x) * scale


# ============================================================================================
# DLRM forward (issue 6): written independently of qgemm.models -- float64, explicit loops
# over bags and feature pairs, facebookresearch/dlrm's semantics.


def ref_dlrm_forward(bottom, top, tables, dense, indices, offsets, self_interaction=False):
    """Click probabilities ``[B, top_out]`` (float64) of a DLRM: bottom MLP (ReLU after every
    layer), sum-pooled bags (``offsets`` torch-style, or None with 2-D fixed-size ``indices``),
    dot interaction over ``[x, e_0, ..., e_{T-1}]`` taking pairs ``(i, j)``, ``j < i`` (``j <= i``
    with ``self_interaction``) in row-major order, concatenated after ``x``; top MLP (ReLU after
    every layer but the last), sigmoid.  ``bottom``/``top``: lists of (W [out, in], b)."""

    def mlp(layers, h, relu_last):
        for n, (w, b) in enumerate(layers):
            h = h @ np.asarray(w, np.float64).T
            if b is not None:
                h = h + np.asarray(b, np.float64)
            if relu_last or n < len(layers) - 1:
                h = np.maximum(h, 0.0)
        return h

    dense = np.asarray(dense, np.float64)
    batch = dense.shape[0]
    x = mlp(bottom, dense, True)
    feats = [x]
    for k, table in enumerate(tables):
        tab = np.asarray(table, np.float64)
        idx = np.asarray(indices[k])
        pooled = np.zeros((batch, tab.shape[1]))
        for b in range(batch):
            if offsets is None:
                bag = idx[b]
            else:
                start = int(offsets[k][b])
                stop = int(offsets[k][b + 1]) if b + 1 < batch else len(idx)
                bag = idx[start:stop]
            for r in bag:
                pooled[b] += tab[int(r)]
        feats.append(pooled)
    cols = [x]
    for i in range(len(feats)):
        for j in range(i + 1 if self_interaction else i):
            cols.append(np.sum(feats[i] * feats[j], axis=1, keepdims=True))
    z = np.concatenate(cols, axis=1)
    logits = mlp(top, z, False)
    return 1.0 / (1.0 + np.exp(-logits))


# ============================================================================================
# Embedding bags (qgemm.embedding): float64, one Python loop per bag, torch's semantics.


def ref_embedding_bag(
    table,
    indices,
    offsets=None,
    lengths=None,
    mode="sum",
    weights=None,
    include_last_offset=False,
    padding_idx=None,
):
    """Pool rows of a dense float ``table`` (dequantize a quantized one first) over bags.

    Bags: 2-D ``indices`` = fixed-size bags; else ``offsets`` (torch, with
    ``include_last_offset``) or ``lengths`` (Caffe2).  Rows equal to ``padding_idx``
    (negative counts from the end) are skipped and not counted by the mean; empty bags are 0.
    Returns float64 ``[bags, dim]``.
    """
    tab = np.asarray(table, np.float64)
    rows, dim = tab.shape
    idx = np.asarray(indices)
    w = None if weights is None else np.asarray(weights, np.float64).reshape(-1)
    if idx.ndim == 2:
        bounds = [(b * idx.shape[1], (b + 1) * idx.shape[1]) for b in range(idx.shape[0])]
        idx = idx.reshape(-1)
    elif lengths is not None:
        ends = np.cumsum(np.asarray(lengths, np.int64))
        bounds = [(int(e - n), int(e)) for e, n in zip(ends, lengths, strict=True)]
    else:
        offs = [int(o) for o in offsets]
        if include_last_offset:
            bounds = [(offs[b], offs[b + 1]) for b in range(len(offs) - 1)]
        else:
            bounds = [
                (o, offs[b + 1] if b + 1 < len(offs) else len(idx)) for b, o in enumerate(offs)
            ]
    pad = None if padding_idx is None else padding_idx % rows
    out = np.zeros((len(bounds), dim))
    for b, (start, stop) in enumerate(bounds):
        picked = [(k, int(idx[k])) for k in range(start, stop) if int(idx[k]) != pad]
        if not picked:
            continue
        vals = np.stack([tab[r] * (1.0 if w is None else w[k]) for k, r in picked])
        if mode == "sum":
            out[b] = vals.sum(axis=0)
        elif mode == "mean":
            out[b] = vals.sum(axis=0) / len(picked)
        else:
            out[b] = vals.max(axis=0)
    return out


def ref_embedding_bag_tolerance(
    table, indices, offsets=None, lengths=None, weights=None, include_last_offset=False
):
    """Absolute error bound per output element of a float32 sum: 2e-6 times the sum of the
    magnitudes it adds (float32 accumulation in any order), plus a tiny floor."""
    mag = ref_embedding_bag(
        np.abs(np.asarray(table, np.float64)),
        indices,
        offsets,
        lengths,
        "sum",
        None if weights is None else np.abs(weights),
        include_last_offset,
    )
    return 2e-6 * mag + 1e-6
