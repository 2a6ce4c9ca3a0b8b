"""Benchmark of :mod:`qgemm.laplace` (``python -m qgemm bench --only uncertainty``).

The case of issue 14: a 1,000-weight subnetwork (random flat indices spread over every layer)
of an MLP 64-128-64-1 (16,641 weights, binary likelihood), fitted on 200k examples, and the GLM
probit predictive on 100k examples -- qgemm vs laplace-torch (``Laplace(...,
subset_of_weights="subnetwork", hessian_structure="full")``) in the same run.  qgemm computes
in float64; laplace-torch runs in float32, its usual (and faster) setting, with 2-logit
``[0, f]`` padding (its binary convention, see :mod:`qgemm.laplace`) and batches of 1,000.
``quick``: 20k / 10k examples.  Timed once after a warm-up on a small slice (fits take seconds);
laplace-torch on at most :data:`PEER_MAX` examples, scaled linearly (it is ~100x slower).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ._timing import Table

SIZES = (64, 128, 64, 1)
N_SUBNET = 1000
N_FIT = 200_000
N_PRED = 100_000
PEER_BATCH = 1000
PEER_MAX = 10_000
"""laplace-torch computes every example's Jacobian over all 16,641 weights (torch.func) and
runs at ~60 examples/s here, so it is timed on at most this many examples and its time scaled
linearly to the full count (both fit and predictive are linear in the examples)."""


def _case(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    layers = []
    for i in range(len(SIZES) - 1):
        w = rng.standard_normal((SIZES[i + 1], SIZES[i])) / np.sqrt(SIZES[i])
        act = "relu" if i < len(SIZES) - 2 else "identity"
        layers.append(
            (
                w.astype(np.float32),
                (0.1 * rng.standard_normal(SIZES[i + 1])).astype(np.float32),
                act,
            )
        )
    X = rng.standard_normal((n, SIZES[0])).astype(np.float32)
    y = rng.integers(0, 2, n)
    n_total = sum(w.size + b.size for w, b, _ in layers)
    idx = np.sort(rng.choice(n_total, N_SUBNET, replace=False))
    return layers, X, y, idx


def _once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _peer(layers, idx):
    try:
        import torch
        from laplace import Laplace
    except ImportError:
        return None
    from .. import _config

    torch.set_num_threads(_config.get_num_threads())
    mods: list[Any] = []
    for w, b, act in layers:
        lin = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w))
            lin.bias.copy_(torch.from_numpy(b))
        mods.append(lin)
        if act == "relu":
            mods.append(torch.nn.ReLU())

    class Pad(torch.nn.Module):
        def forward(self, f):
            return torch.cat([torch.zeros_like(f), f], dim=1)

    model = torch.nn.Sequential(torch.nn.Sequential(*mods), Pad())

    def make():
        return Laplace(
            model,
            "classification",
            subset_of_weights="subnetwork",
            hessian_structure="full",
            subnetwork_indices=torch.from_numpy(idx),
        )

    def fit(X, y):
        ds = torch.utils.data.TensorDataset(torch.from_numpy(X), torch.from_numpy(y))
        la = make()
        la.fit(torch.utils.data.DataLoader(ds, batch_size=PEER_BATCH))
        return la

    def predict(la, X):
        xt = torch.from_numpy(X)
        with torch.no_grad():
            return [
                la(xt[i : i + PEER_BATCH], pred_type="glm", link_approx="probit")
                for i in range(0, len(X), PEER_BATCH)
            ]

    return fit, predict


def run(*, quick: bool = False, progress: Any = None) -> list[Table]:
    """The subnetwork-Laplace table for ``python -m qgemm bench``."""
    from ..laplace import SubnetLaplace

    n_fit = N_FIT // 10 if quick else N_FIT
    n_pred = N_PRED // 10 if quick else N_PRED
    layers, X, y, idx = _case(n_fit)
    Xp = X[:n_pred]
    warm = slice(0, 2048)

    la = SubnetLaplace(layers, "binary", subnetwork=idx)
    la.fit(X[warm], y[warm]).predictive(Xp[:64])  # compile / load the kernel
    t_fit = _once(lambda: la.fit(X, y))
    t_pred = _once(lambda: la.predictive(Xp))
    if progress is not None:
        progress.step("qgemm laplace")
    peer = _peer(layers, idx)
    p_fit = p_pred = float("nan")
    if peer is not None:
        fit, predict = peer
        predict(fit(X[warm], y[warm]), Xp[:64])
        box: dict[str, Any] = {}
        m_fit = min(n_fit, PEER_MAX // (10 if quick else 1))
        m_pred = min(n_pred, PEER_MAX // (10 if quick else 1))
        p_fit = _once(lambda: box.setdefault("la", fit(X[:m_fit], y[:m_fit]))) * n_fit / m_fit
        p_pred = _once(lambda: predict(box["la"], Xp[:m_pred])) * n_pred / m_pred
    if progress is not None:
        progress.step("laplace-torch")
    rows = [
        [f"fit, {n_fit // 1000}k examples", t_fit, p_fit, p_fit / t_fit],
        [f"probit predictive, {n_pred // 1000}k", t_pred, p_pred, p_pred / t_pred],
    ]
    return [
        Table(
            title=f"subnetwork Laplace: {N_SUBNET} of {la.n_total} weights, MLP "
            f"{'-'.join(map(str, SIZES))}, binary (seconds)",
            columns=["case", "qgemm s", "laplace-torch s", "speed-up"],
            rows=rows,
            notes=[
                "qgemm float64; laplace-torch float32, batches of 1000, '-' when not installed",
                f"laplace-torch timed on <= {PEER_MAX} examples and scaled linearly",
                "target (issue 14): fit >= 3x faster than laplace-torch",
            ],
        )
    ]
