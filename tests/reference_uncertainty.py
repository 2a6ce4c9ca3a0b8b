"""Plain-numpy references for qgemm.laplace and qgemm.scoring (obviously correct, slow).

Nothing here calls qgemm's kernels: the scores materialise the ``[J, N/tau, tau, C]`` batches
and the drawn polyadic sequences; the Laplace references build full per-example Jacobians by
vectorised backpropagation and the GGN with an explicit ``Lambda``.
"""

from __future__ import annotations

import numpy as np

# ---------------------------------------------------------------------------- scoring


def logmeanexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.mean(np.exp(a - m), axis=axis, keepdims=True)) + m
    return np.squeeze(out, axis=axis)


def ref_joint_nll(probs: np.ndarray, labels: np.ndarray, tau: int) -> float:
    p = probs[None] if probs.ndim == 2 else probs
    J, N, C = p.shape
    nb = N // tau
    p = p[:, : nb * tau].reshape(J, nb, tau, C).astype(np.float64)
    y = labels[: nb * tau].reshape(nb, tau)
    picked = np.take_along_axis(p, y[None, :, :, None], axis=3)[..., 0]  # [J, nb, tau]
    with np.errstate(divide="ignore"):
        ll = np.log(picked).sum(axis=2)  # [J, nb]
    return float(-logmeanexp(ll, axis=0).mean())


def ref_polyadic_nll(probs: np.ndarray, labels: np.ndarray, counts: np.ndarray) -> float:
    """The polyadic NLL with the draws written out: batch ``b`` is the sequence of anchor
    ``k`` repeated ``counts[b, k]`` times."""
    p = probs[None] if probs.ndim == 2 else probs
    nb, kappa = counts.shape
    lls = []
    for b in range(nb):
        seq = np.repeat(np.arange(b * kappa, (b + 1) * kappa), counts[b])
        picked = p[:, seq, labels[seq]].astype(np.float64)  # [J, tau]
        with np.errstate(divide="ignore"):
            lls.append(np.log(picked).sum(axis=1))
    return float(-logmeanexp(np.stack(lls, axis=1), axis=0).mean())


def ref_polyadic_counts_nll(probs: np.ndarray, counts3: np.ndarray) -> float:
    """Polyadic NLL of draws with their own labels: batch ``b`` is the sequence of (anchor
    ``k``, label ``c``) pairs repeated ``counts3[b, k, c]`` times."""
    p = probs[None] if probs.ndim == 2 else probs
    nb, kappa, C = counts3.shape
    lls = []
    for b in range(nb):
        pairs = [(b * kappa + k, c) for k in range(kappa) for c in range(C)]
        rep = counts3[b].reshape(-1)
        inputs = np.repeat([i for i, _ in pairs], rep)
        labels = np.repeat([c for _, c in pairs], rep)
        with np.errstate(divide="ignore"):
            lls.append(np.log(p[:, inputs, labels].astype(np.float64)).sum(axis=1))
    return float(-logmeanexp(np.stack(lls, axis=1), axis=0).mean())


def ref_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    p = (probs[None] if probs.ndim == 2 else probs).mean(axis=0)
    conf = p.max(axis=1)
    hit = p.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    total = 0.0
    for k in range(n_bins):
        lo, hi = edges[k], edges[k + 1]
        m = (conf >= lo) & ((conf < hi) if k < n_bins - 1 else (conf <= hi))
        if m.any():
            total += m.sum() * abs(hit[m].mean() - conf[m].mean())
    return total / len(labels)


def ref_exact_dkl(true_p: np.ndarray, probs: np.ndarray, tau: int) -> float:
    """Exact joint KL by enumerating all ``C**tau`` label sequences of each batch (small
    cases only): the expectation that :func:`qgemm.scoring.dkl` estimates."""
    import itertools

    p = probs[None] if probs.ndim == 2 else probs
    N, C = true_p.shape
    nb = N // tau
    tot = 0.0
    for b in range(nb):
        rows = np.arange(b * tau, (b + 1) * tau)
        for ys in itertools.product(range(C), repeat=tau):
            ys = np.array(ys)
            pt = np.prod(true_p[rows, ys])
            pm = np.mean(np.prod(p[:, rows, ys], axis=1))
            if pt > 0:
                tot += pt * (np.log(pt) - np.log(pm))
    return tot / nb


# ---------------------------------------------------------------------------- laplace


def _act(z: np.ndarray, act: str) -> np.ndarray:
    if act == "relu":
        return np.maximum(z, 0.0)
    if act == "tanh":
        return np.tanh(z)
    if act == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    return z


def _dact(z: np.ndarray, act: str) -> np.ndarray:
    if act == "relu":
        return (z > 0).astype(np.float64)
    if act == "tanh":
        return 1.0 - np.tanh(z) ** 2
    if act == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-z))
        return s * (1 - s)
    return np.ones_like(z)


def ref_forward(layers, X: np.ndarray) -> np.ndarray:
    a = np.asarray(X, np.float64)
    for w, b, act in layers:
        z = a @ w.T + (0.0 if b is None else b)
        a = _act(z, act)
    return a


def ref_full_jacobian(layers, X: np.ndarray) -> np.ndarray:
    """``[N, C, n_total]``: d output / d every parameter, in the flat order (per layer weight
    row-major then bias)."""
    a = [np.asarray(X, np.float64)]
    zs = []
    for w, b, act in layers:
        z = a[-1] @ w.T + (0.0 if b is None else b)
        zs.append(z)
        a.append(_act(z, act))
    N = X.shape[0]
    C = layers[-1][0].shape[0]
    blocks = [None] * len(layers)
    # g: [N, C, width] = d f_c / d z_l
    g = np.eye(C)[None].repeat(N, 0) * _dact(zs[-1], layers[-1][2])[:, None, :]
    for li in range(len(layers) - 1, -1, -1):
        w, b, _ = layers[li]
        gw = np.einsum("nci,nk->ncik", g, a[li]).reshape(N, C, w.size)
        blocks[li] = gw if b is None else np.concatenate([gw, g], axis=2)
        if li:
            g = np.einsum("nci,ik->nck", g, w) * _dact(zs[li - 1], layers[li - 1][2])[:, None, :]
    return np.concatenate(blocks, axis=2)


def ref_lambda(f: np.ndarray, likelihood: str) -> np.ndarray:
    N, C = f.shape
    if likelihood == "binary":
        s = 1.0 / (1.0 + np.exp(-f[:, 0]))
        return (s * (1 - s))[:, None, None]
    if likelihood == "classification":
        e = np.exp(f - f.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
        return np.einsum("nc,ck->nck", p, np.eye(C)) - p[:, :, None] * p[:, None, :]
    return np.eye(C)[None].repeat(N, 0)


def ref_ggn(layers, X: np.ndarray, indices: np.ndarray, likelihood: str) -> np.ndarray:
    J = ref_full_jacobian(layers, X)[:, :, indices]
    lam = ref_lambda(ref_forward(layers, X), likelihood)
    return np.einsum("ncp,nck,nkq->pq", J, lam, J)
