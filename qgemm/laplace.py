"""Subnetwork linearized Laplace for MLPs (Daxberger et al., "Bayesian deep learning via
subnetwork inference", ICML 2021), on qgemm's own kernels.

Take the MAP weights of a trained MLP, choose a subset of ``P`` weights, and infer a
full-covariance Gaussian posterior over that subset with the generalized Gauss-Newton (GGN)
approximation of the Hessian; the other weights stay point estimates:

    posterior precision  ``Prec = H / sigma^2 + diag(prior_precision)``,
    ``H = sum_n J_n^T Lambda_n J_n``

``J_n`` the Jacobian of the network output (the logits) with respect to the chosen weights at
input ``n`` and ``Lambda_n`` the Hessian of the negative log-likelihood in the output
(``s (1 - s)`` binary, ``diag(p) - p p^T`` softmax, ``I`` regression; ``sigma`` only for
regression).  :meth:`SubnetLaplace.fit` streams over the data in batches -- memory
``O(batch x P + P^2)``: a Numba kernel (:mod:`qgemm._kernels.laplace`) computes each batch's
forward pass, per-example Jacobians and ``Lambda^(1/2) J``; one BLAS call adds the batch's
``G^T G`` to ``H``.

**Flat parameter order** (how explicit ``subnetwork`` indices are read): layer by layer, the
weight ``[out, in]`` row-major, then the bias -- exactly
``torch.nn.utils.parameters_to_vector(seq.parameters())`` for an ``nn.Sequential`` of
``nn.Linear`` layers, so the same indices select the same weights in laplace-torch.

**Conventions shared with laplace-torch** (``laplace.Laplace(..., hessian_structure="full")``,
checked in ``tests/test_laplace.py``): the prior is ``N(0, diag(prior_precision)^-1)`` over the
subnetwork with the precision *not* scaled by the data size (laplace-torch's scalar
``prior_precision``; its per-layer form is not offered here -- pass a per-weight array); the
log-likelihood is summed over the data; the log marginal likelihood is
``log p(D | theta_MAP) - (log det Prec - log det Prec_0 + theta^T Prec_0 theta) / 2``; the GLM
probit predictive uses ``kappa = 1 / sqrt(1 + pi/8 var)`` per output.  **Where they differ**:
laplace-torch has no binary likelihood.  Our ``"binary"`` model has *one* logit ``f`` and
``p(click) = sigmoid(f)``; laplace-torch's equivalent is ``"classification"`` over the two
logits ``[0, f]`` (``softmax([0, f])[1] = sigmoid(f)``; same GGN, likelihood and probit
predictive) -- *not* a 2-output last layer, whose extra row would add weights.

Examples
--------
>>> import numpy as np
>>> from qgemm.laplace import SubnetLaplace
>>> rng = np.random.default_rng(0)
>>> layers = [(rng.standard_normal((8, 3)), np.zeros(8), "relu"),
...           (rng.standard_normal((1, 8)), np.zeros(1), "identity")]
>>> X = rng.standard_normal((200, 3)); y = (X[:, 0] > 0).astype(int)
>>> la = SubnetLaplace(layers, "binary", subnetwork="last_layer").fit(X, y)
>>> la.n_params, la.posterior_precision.shape
(9, (9, 9))
>>> pred = la.predictive(X[:5])
>>> pred.mean.shape, bool((pred.f_var >= 0).all())
((5, 1), True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from . import _config
from ._kernels.laplace import (
    ACTIVATIONS,
    MODE_GGN_IDENTITY,
    MODE_GGN_SIGMOID,
    MODE_GGN_SOFTMAX,
    MODE_JACOBIAN,
    flatten_mlp,
    run_mlp,
    selection,
)
from ._tuning import LAPLACE_BATCH_ELEMS
from ._validate import as_array, check_choice, check_finite, check_int

__all__ = [
    "SubnetLaplace",
    "Predictive",
    "mlp_layers",
    "dlrm_features",
    "dlrm_laplace",
    "DLRMLaplace",
]

LIKELIHOODS = ("binary", "classification", "regression")
SUBNETWORKS = ("last_layer", "largest_variance")
_TORCH_ACTS = {"ReLU": "relu", "Tanh": "tanh", "Sigmoid": "sigmoid", "Identity": "identity"}
_PI8 = math.pi / 8.0


class Predictive(NamedTuple):
    """The predictive of :meth:`SubnetLaplace.predictive`.

    ``mean`` ``[N, C]``: predictive probabilities (binary: ``P(y = 1)``, ``C = 1``) or, for
    regression, the predictive mean.  ``var`` ``[N, C]``: their variance -- regression:
    ``f_var + sigma^2`` (of ``y``); ``"mc"``: the sample variance of the probabilities;
    ``"probit"``: the first-order (delta-method) variance ``diag(A f_var A^T)``, ``A`` the
    link's Jacobian at ``f_mean``.  ``f_mean`` ``[N, C]`` and ``f_var`` ``[N, C, C]``: the
    linearized (GLM) Gaussian over the logits -- laplace-torch's ``_glm_predictive_distribution``.
    """

    mean: np.ndarray
    var: np.ndarray
    f_mean: np.ndarray
    f_var: np.ndarray


def _weight(name: str, w: Any) -> np.ndarray:
    if hasattr(w, "dequantize") and hasattr(w, "granularity"):  # qgemm.PackedWeight
        w = w.dequantize()
    elif hasattr(w, "detach"):  # a torch tensor, read without importing torch
        w = w.detach().cpu().numpy()
    return as_array(name, w, dtypes=(np.float32, np.float64), ndim=2)


def mlp_layers(model: Any) -> list[tuple[np.ndarray, np.ndarray | None, str]]:
    """The float64 layers ``[(weight [out, in], bias [out] or None, activation)]`` of ``model``.

    ``model`` is a list of ``(weight, bias, activation)`` (activation one of
    ``"identity"``/None, ``"relu"``, ``"tanh"``, ``"sigmoid"``) or of ``(weight, bias)``
    (ReLU between layers, none after the last: a DLRM's top MLP), a list of
    :class:`qgemm.interop.Linear` (``from_torch`` layers, dequantized), a
    :class:`qgemm.models.DLRM` (its top MLP without the final sigmoid, which is the binary
    likelihood's link) or a torch ``nn.Sequential`` of ``Linear`` and ``ReLU``/``Tanh``/
    ``Sigmoid``/``Identity`` modules.  Weights may be :class:`qgemm.PackedWeight`
    (dequantized).
    """
    if hasattr(model, "top") and hasattr(model, "bottom") and hasattr(model, "tables"):
        model = list(model.top)
    if hasattr(model, "named_children") and hasattr(model, "parameters"):  # torch module
        raw, pending = [], None
        for mod in model.children():
            kind = type(mod).__name__
            if kind == "Linear":
                if pending is not None:
                    raw.append((*pending, "identity"))
                pending = (mod.weight, mod.bias)
            elif kind in _TORCH_ACTS and pending is not None:
                raw.append((*pending, _TORCH_ACTS[kind]))
                pending = None
            else:
                raise TypeError(
                    f"model: unsupported module {kind} in the Sequential "
                    f"(expected Linear, ReLU, Tanh, Sigmoid, Identity)"
                )
        if pending is not None:
            raw.append((*pending, "identity"))
        model = raw
    if not isinstance(model, Sequence) or isinstance(model, (str, np.ndarray)) or not model:
        raise TypeError(
            f"model: expected a non-empty list of layers, a DLRM or an "
            f"nn.Sequential, got {type(model).__name__}"
        )
    out: list[tuple[np.ndarray, np.ndarray | None, str]] = []
    prev = None
    nl = len(model)
    for i, layer in enumerate(model):
        if hasattr(layer, "weight") and hasattr(layer, "bias") and not isinstance(layer, tuple):
            layer = (layer.weight, layer.bias)
        if not isinstance(layer, (tuple, list)) or len(layer) not in (2, 3):
            raise TypeError(
                f"model[{i}]: expected (weight, bias[, activation]), got {type(layer).__name__}"
            )
        w = _weight(f"model[{i}].weight", layer[0]).astype(np.float64)
        b = layer[1]
        if b is not None:
            b = _weight(
                f"model[{i}].bias",
                np.atleast_2d(b.detach().cpu().numpy() if hasattr(b, "detach") else b),
            )[0]
            b = b.astype(np.float64)
            if b.shape != (w.shape[0],):
                raise ValueError(f"model[{i}].bias: expected shape ({w.shape[0]},), got {b.shape}")
        act = layer[2] if len(layer) == 3 else ("relu" if i < nl - 1 else "identity")
        act = "identity" if act is None else act
        check_choice(f"model[{i}].activation", act, tuple(ACTIVATIONS))
        if prev is not None and w.shape[1] != prev:
            raise ValueError(
                f"model[{i}].weight: expected {prev} inputs (the previous "
                f"layer's outputs), got {w.shape[1]}"
            )
        check_finite(f"model[{i}].weight", w)
        prev = w.shape[0]
        out.append((np.ascontiguousarray(w), b, act))
    return out


class SubnetLaplace:
    """Linearized Laplace over a subnetwork of an MLP (module docstring for the maths).

    Parameters
    ----------
    model
        The MLP at its MAP weights (any form :func:`mlp_layers` takes); the last layer's
        output is the logit (binary: one output), logits (classification) or mean
        (regression).
    likelihood : {"binary", "classification", "regression"}
    subnetwork : "last_layer", "largest_variance" or int array of flat indices
        ``"largest_variance"``: a diagonal Laplace over every weight first (one pass over the
        data in :meth:`fit`, memory ``O(batch x n_total)``), then the ``n_params`` weights of
        largest marginal variance (the paper's practical choice), in increasing index order.
        Explicit indices (unique, flat order of the module docstring) are kept in the given
        order.
    n_params : int
        Subnetwork size for ``"largest_variance"``.
    prior_precision : float >= 0 or float array ``[P]``
        Diagonal prior precision over the subnetwork (0 allowed if the GGN is regular).  The
        diagonal Laplace of ``"largest_variance"`` uses the scalar (or the array's mean).
    sigma_noise : float > 0
        Observation noise (regression only).
    batch_size : int, optional
        Examples per streamed batch (default: sized by ``qgemm._tuning.LAPLACE_BATCH_ELEMS``).
    """

    def __init__(
        self,
        model: Any,
        likelihood: str = "binary",
        *,
        subnetwork: Any = "last_layer",
        n_params: int | None = None,
        prior_precision: Any = 1.0,
        sigma_noise: float = 1.0,
        batch_size: int | None = None,
    ):
        self.likelihood = check_choice("likelihood", likelihood, LIKELIHOODS)
        self.layers = mlp_layers(model)
        sizes = [self.layers[0][0].shape[1]] + [w.shape[0] for w, _, _ in self.layers]
        self.n_outputs = sizes[-1]
        if likelihood == "binary" and self.n_outputs != 1:
            raise ValueError(
                f"model: the binary likelihood needs one output (the logit), got {self.n_outputs}"
            )
        if likelihood == "classification" and self.n_outputs < 2:
            raise ValueError(
                f"model: classification needs at least 2 outputs, got "
                f"{self.n_outputs} (use likelihood='binary' for one logit)"
            )
        self._lay = flatten_mlp(self.layers)
        self._sizes, self._woff = self._lay.sizes, self._lay.woff
        self.theta = self._lay.theta
        self.n_total = self.theta.size
        self.sigma_noise = float(sigma_noise)
        if not (self.sigma_noise > 0 and math.isfinite(self.sigma_noise)):
            raise ValueError(f"sigma_noise: expected a finite value > 0, got {sigma_noise}")
        if likelihood != "regression" and self.sigma_noise != 1.0:
            raise ValueError("sigma_noise: only the regression likelihood has a noise scale")
        self.batch_size = (
            None if batch_size is None else check_int("batch_size", batch_size, minimum=1)
        )
        self._strategy = None
        self.indices: np.ndarray | None = None
        if isinstance(subnetwork, str):
            self._strategy = check_choice("subnetwork", subnetwork, SUBNETWORKS)
            if subnetwork == "last_layer":
                last = len(self.layers) - 1
                end = self.n_total
                self._set_indices(np.arange(self._woff[last], end))
            else:
                if n_params is None:
                    raise ValueError("n_params: 'largest_variance' needs the subnetwork size")
                self.n_params = check_int("n_params", n_params, minimum=1)
                if self.n_params > self.n_total:
                    raise ValueError(
                        f"n_params: expected at most the {self.n_total} weights "
                        f"of the model, got {self.n_params}"
                    )
        else:
            idx = as_array("subnetwork", subnetwork, ndim=1)
            if idx.dtype.kind not in "iu":
                raise TypeError(f"subnetwork: expected integer indices, got {idx.dtype.name}")
            if idx.size == 0:
                raise ValueError("subnetwork: expected at least one index, got none")
            if idx.min() < 0 or idx.max() >= self.n_total:
                raise ValueError(
                    f"subnetwork: expected indices in [0, {self.n_total}), got "
                    f"min {idx.min()}, max {idx.max()}"
                )
            if np.unique(idx).size != idx.size:
                raise ValueError("subnetwork: expected unique indices, got duplicates")
            self._set_indices(idx.astype(np.int64))
        self._prior_arg = prior_precision
        self.H: np.ndarray | None = None
        self.loss = 0.0
        self.n_data = 0

    # -- structure ----------------------------------------------------------------------------
    def _set_indices(self, idx: np.ndarray) -> None:
        self.indices = np.ascontiguousarray(idx, dtype=np.int64)
        self.n_params = idx.size
        self._sel = self._selection(idx)

    def _selection(self, idx: np.ndarray):
        return selection(self._lay, idx)

    @property
    def prior_precision(self) -> np.ndarray:
        """The diagonal prior precision ``[P]`` (float64)."""
        return self._prior_vec(self._prior_arg)

    @prior_precision.setter
    def prior_precision(self, value: Any) -> None:
        self._prior_vec(value)
        self._prior_arg = value

    def _prior_vec(self, value: Any) -> np.ndarray:
        v = np.asarray(value, dtype=np.float64)
        if v.ndim == 0:
            v = np.full(self.n_params, float(v))
        elif v.shape != (self.n_params,):
            raise ValueError(
                f"prior_precision: expected a scalar or shape ({self.n_params},),"
                f" got shape {v.shape}"
            )
        if not (np.isfinite(v).all() and (v >= 0).all()):
            raise ValueError("prior_precision: expected finite values >= 0")
        return v

    # -- kernels ------------------------------------------------------------------------------
    def _check_x(self, X: Any) -> np.ndarray:
        X = as_array("X", X, dtypes=(np.float32, np.float64), ndim=2)
        if X.shape[1] != self._sizes[0]:
            raise ValueError(f"X: expected {self._sizes[0]} features per row, got shape {X.shape}")
        check_finite("X", X)
        return X

    def _batches(self, n: int, width: int):
        bs = self.batch_size or max(1, LAPLACE_BATCH_ELEMS // max(1, width * self.n_outputs))
        for lo in range(0, n, bs):
            yield lo, min(lo + bs, n)

    def _run(self, xb: np.ndarray, sel, mode: int, theta: np.ndarray | None = None):
        _config.sync_threads()
        return run_mlp(self._lay, xb, sel, mode, theta)

    def _no_sel(self):
        return selection(self._lay, np.zeros(0, np.int64))

    @property
    def _mode(self) -> int:
        return {
            "binary": MODE_GGN_SIGMOID,
            "classification": MODE_GGN_SOFTMAX,
            "regression": MODE_GGN_IDENTITY,
        }[self.likelihood]

    def forward(self, X: Any) -> np.ndarray:
        """The network output (logits / mean) ``[N, C]`` at the MAP weights."""
        X = self._check_x(X)
        return self._run(X, self._no_sel(), MODE_JACOBIAN)[0]

    def jacobians(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(J [N, C, P], f [N, C])``: Jacobians of the outputs w.r.t. the subnetwork."""
        X = self._check_x(X)
        self._need_indices()
        f, J = self._run(X, self._sel, MODE_JACOBIAN)
        return J, f

    def _need_indices(self) -> None:
        if self.indices is None:
            raise RuntimeError("subnetwork: 'largest_variance' is chosen in fit(); call fit first")

    # -- fitting ------------------------------------------------------------------------------
    def _check_y(self, y: Any, n: int) -> np.ndarray:
        y = as_array("y", y)
        if self.likelihood == "regression":
            if y.ndim == 1 and self.n_outputs == 1:
                y = y[:, None]
            if y.shape != (n, self.n_outputs) or y.dtype.kind not in "fiu":
                raise ValueError(
                    f"y: expected real targets of shape ({n}, {self.n_outputs}),"
                    f" got {y.dtype.name} {y.shape}"
                )
            y = y.astype(np.float64)
            check_finite("y", y)
            return y
        if y.ndim == 2 and y.shape[1:] == (1,):
            y = y[:, 0]
        if y.ndim != 1 or y.shape[0] != n:
            raise ValueError(f"y: expected {n} labels, got shape {y.shape}")
        k = 2 if self.likelihood == "binary" else self.n_outputs
        if y.dtype.kind == "f" and not np.array_equal(y, np.round(y)):
            raise ValueError("y: expected integer class labels, got fractional values")
        if y.dtype.kind not in "fiub":
            raise TypeError(f"y: expected integer labels, got {y.dtype.name}")
        y = y.astype(np.int64)
        if n and (y.min() < 0 or y.max() >= k):
            bad = int(np.flatnonzero((y < 0) | (y >= k))[0])
            raise ValueError(f"y: expected labels in [0, {k}), got {y[bad]} at position {bad}")
        return y

    def _nll(self, f: np.ndarray, y: np.ndarray) -> float:
        if self.likelihood == "binary":
            z = f[:, 0]
            return float(np.sum(np.logaddexp(0.0, z) - y * z))
        if self.likelihood == "classification":
            mx = f.max(axis=1)
            lse = mx + np.log(np.exp(f - mx[:, None]).sum(axis=1))
            return float(np.sum(lse - f[np.arange(f.shape[0]), y]))
        return float(0.5 * np.sum((f - y) ** 2))

    def fit(self, X: Any, y: Any) -> SubnetLaplace:
        """Accumulate the GGN ``H`` over the subnetwork and the training loss, streaming over
        ``X`` in batches; returns ``self``.

        ``y``: binary labels in {0, 1}; class ids; or regression targets ``[N, C]``.
        """
        X = self._check_x(X)
        y = self._check_y(y, X.shape[0])
        if self._strategy == "largest_variance":
            self._choose_largest_variance(X)
        P = self.n_params
        H = np.zeros((P, P))
        loss = 0.0
        for lo, hi in self._batches(X.shape[0], P):
            f, G = self._run(X[lo:hi], self._sel, self._mode)
            G2 = G.reshape(-1, P)
            H += G2.T @ G2
            loss += self._nll(f, y[lo:hi])
        self.H = 0.5 * (H + H.T)
        self.loss = loss
        self.n_data = X.shape[0]
        self._chol: tuple[Any, np.ndarray] | None = None
        return self

    def _choose_largest_variance(self, X: np.ndarray) -> None:
        every = np.arange(self.n_total, dtype=np.int64)
        sel = self._selection(every)
        diag = np.zeros(self.n_total)
        for lo, hi in self._batches(X.shape[0], self.n_total):
            _, G = self._run(X[lo:hi], sel, self._mode)
            G2 = G.reshape(-1, self.n_total)
            diag += np.einsum("ij,ij->j", G2, G2)
        p = np.asarray(self._prior_arg, dtype=np.float64)
        prior = float(p) if p.ndim == 0 else float(p.mean())
        prec = diag / self.sigma_noise**2 + prior
        if prior <= 0 and (prec <= 0).any():
            raise np.linalg.LinAlgError(
                "largest_variance: some weights have zero curvature and the prior precision "
                "is 0, so their diagonal-Laplace variance is infinite; set prior_precision > 0"
            )
        var = 1.0 / prec
        top = np.argsort(-var, kind="stable")[: self.n_params]
        self.diag_variance = var
        self._set_indices(np.sort(top).astype(np.int64))

    # -- posterior ----------------------------------------------------------------------------
    def _need_fit(self) -> np.ndarray:
        if self.H is None:
            raise RuntimeError("SubnetLaplace: not fitted; call fit(X, y) first")
        return self.H

    @property
    def _h_factor(self) -> float:
        return 1.0 / self.sigma_noise**2

    @property
    def posterior_precision(self) -> np.ndarray:
        """``H / sigma^2 + diag(prior_precision)``, ``[P, P]``."""
        return self._h_factor * self._need_fit() + np.diag(self.prior_precision)

    def _cholesky(self) -> np.ndarray:
        key = (self.sigma_noise, np.asarray(self._prior_arg).tobytes())
        cached = getattr(self, "_chol", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            L = np.linalg.cholesky(self.posterior_precision)
        except np.linalg.LinAlgError:
            raise np.linalg.LinAlgError(
                "posterior_precision: not positive definite -- the GGN over the subnetwork is "
                "singular (weights the data never move) and the prior precision does not make "
                "it regular; set prior_precision > 0 or choose another subnetwork"
            ) from None
        self._chol = (key, L)
        return L

    @property
    def posterior_covariance(self) -> np.ndarray:
        """``posterior_precision^-1`` ``[P, P]`` (through its Cholesky factor)."""
        Linv = np.linalg.inv(self._cholesky())
        return Linv.T @ Linv

    @property
    def log_likelihood(self) -> float:
        """``log p(D | theta_MAP)`` summed over the training data."""
        self._need_fit()
        if self.likelihood == "regression":
            c = self.n_data * self.n_outputs * math.log(self.sigma_noise * math.sqrt(2 * math.pi))
            return -self._h_factor * self.loss - c
        return -self.loss

    def log_marginal_likelihood(
        self, prior_precision: Any = None, sigma_noise: float | None = None
    ) -> float:
        """Laplace's log evidence (module docstring); optionally at another prior precision /
        noise (which then become the current ones)."""
        if prior_precision is not None:
            self.prior_precision = prior_precision
        if sigma_noise is not None:
            if self.likelihood != "regression":
                raise ValueError("sigma_noise: only the regression likelihood has a noise scale")
            if not sigma_noise > 0:
                raise ValueError(f"sigma_noise: expected a value > 0, got {sigma_noise}")
            self.sigma_noise = float(sigma_noise)
        L = self._cholesky()
        prior = self.prior_precision
        if (prior <= 0).any():
            raise ValueError(
                "prior_precision: the marginal likelihood needs a proper prior "
                "(every precision > 0)"
            )
        logdet_post = 2.0 * float(np.log(np.diag(L)).sum())
        mean = self.theta[self.indices]
        scatter = float(np.sum(prior * mean * mean))
        return self.log_likelihood - 0.5 * (logdet_post - float(np.log(prior).sum()) + scatter)

    def optimize_prior_precision(self, *, bounds: tuple[float, float] = (1e-6, 1e6)) -> float:
        """Set the scalar prior precision to the maximiser of the log marginal likelihood
        (within ``bounds``) and return it.

        With the eigenvalues ``e`` of ``H / sigma^2`` the negative log evidence in
        ``u = log delta`` is ``sum log(e + delta) - P u + delta |theta|^2`` up to constants: convex
        in ``u``, so bisection on its derivative finds the unique optimum (machine precision).
        """
        e = np.clip(np.linalg.eigvalsh(self._h_factor * self._need_fit()), 0.0, None)
        mean = self.theta[self.indices]
        s = float(mean @ mean)
        P = self.n_params

        def grad(u: float) -> float:
            d = math.exp(u)
            return float(np.sum(d / (e + d))) - P + d * s

        lo, hi = math.log(bounds[0]), math.log(bounds[1])
        if grad(hi) <= 0:
            u = hi
        elif grad(lo) >= 0:
            u = lo
        else:
            for _ in range(200):
                mid = 0.5 * (lo + hi)
                if grad(mid) > 0:
                    hi = mid
                else:
                    lo = mid
            u = 0.5 * (lo + hi)
        self.prior_precision = math.exp(u)
        return math.exp(u)

    # -- predictions --------------------------------------------------------------------------
    def _link(self, f: np.ndarray) -> np.ndarray:
        if self.likelihood == "binary":
            return 1.0 / (1.0 + np.exp(-f))
        if self.likelihood == "classification":
            z = np.exp(f - f.max(axis=-1, keepdims=True))
            return z / z.sum(axis=-1, keepdims=True)
        return f

    def _glm(self, xb: np.ndarray, Sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        f, J = self._run(xb, self._sel, MODE_JACOBIAN)
        JS = (J.reshape(-1, self.n_params) @ Sigma).reshape(J.shape)
        return f, np.einsum("ncp,nkp->nck", JS, J)

    def predictive(
        self, X: Any, *, method: str = "probit", n_samples: int = 100, seed: Any = None
    ) -> Predictive:
        """The linearized (GLM) predictive at ``X``: :class:`Predictive` ``(mean, var,
        f_mean, f_var)``.

        ``method="probit"``: ``link(kappa * f_mean)``, ``kappa = 1/sqrt(1 + pi/8 diag f_var)``
        (laplace-torch's ``link_approx="probit"``); ``"mc"``: the mean of the link over
        ``n_samples`` draws of ``f ~ N(f_mean, f_var)`` (``seed``).  Regression: Gaussian.
        """
        X = self._check_x(X)
        check_choice("method", method, ("probit", "mc"))
        n_samples = check_int("n_samples", n_samples, minimum=1)
        Sigma = self.posterior_covariance
        C = self.n_outputs
        f_mu = np.empty((X.shape[0], C))
        f_var = np.empty((X.shape[0], C, C))
        for lo, hi in self._batches(X.shape[0], self.n_params):
            f_mu[lo:hi], f_var[lo:hi] = self._glm(X[lo:hi], Sigma)
        dvar = np.clip(np.diagonal(f_var, axis1=1, axis2=2), 0.0, None)
        if self.likelihood == "regression":
            return Predictive(f_mu, dvar + self.sigma_noise**2, f_mu, f_var)
        if method == "probit":
            mean = self._link(f_mu / np.sqrt(1.0 + _PI8 * dvar))
            p = self._link(f_mu)
            if self.likelihood == "binary":
                var = (p * (1 - p)) ** 2 * dvar
            else:
                A = np.einsum("nc,ck->nck", p, np.eye(C)) - p[:, :, None] * p[:, None, :]
                var = np.einsum("nck,nkl,ncl->nc", A, f_var, A)
            return Predictive(mean, var, f_mu, f_var)
        rng = np.random.default_rng(seed)
        Lf = np.linalg.cholesky(f_var + 1e-12 * np.eye(C))
        z = rng.standard_normal((n_samples, X.shape[0], C))
        fs = f_mu[None] + np.einsum("nck,snk->snc", Lf, z)
        ps = self._link(fs)
        return Predictive(ps.mean(axis=0), ps.var(axis=0), f_mu, f_var)

    def sample(self, n: int, *, seed: Any = None) -> np.ndarray:
        """``n`` posterior weight samples as full flat vectors ``[n, n_total]`` (the
        subnetwork drawn from ``N(theta_MAP, posterior_covariance)``, the rest at the MAP)."""
        n = check_int("n", n, minimum=0)
        Linv = np.linalg.inv(self._cholesky())
        z = np.random.default_rng(seed).standard_normal((n, self.n_params))
        out = np.repeat(self.theta[None], n, axis=0)
        out[:, self.indices] += z @ Linv
        return out

    def sample_predictions(
        self, X: Any, n: int, *, seed: Any = None, pred_type: str = "glm"
    ) -> np.ndarray:
        """``[n, N, K]`` predictions under ``n`` posterior weight samples, for
        :mod:`qgemm.scoring`: class probabilities (binary: ``K = 2``, ``[1 - p, p]``) or, for
        regression, means.  ``pred_type="glm"``: the linearized network (the model the
        GGN-Laplace posterior belongs to); ``"nn"``: the network itself at the samples."""
        X = self._check_x(X)
        check_choice("pred_type", pred_type, ("glm", "nn"))
        thetas = self.sample(n, seed=seed)
        N, C = X.shape[0], self.n_outputs
        fs = np.empty((n, N, C))
        if pred_type == "glm":
            delta = thetas[:, self.indices] - self.theta[self.indices]
            for lo, hi in self._batches(N, self.n_params):
                f, J = self._run(X[lo:hi], self._sel, MODE_JACOBIAN)
                fs[:, lo:hi] = f[None] + np.einsum("ncp,sp->snc", J, delta)
        else:
            for s in range(n):
                fs[s] = self._run(X, self._no_sel(), MODE_JACOBIAN, theta=thetas[s])[0]
        p = self._link(fs)
        if self.likelihood == "binary":
            return np.concatenate([1.0 - p, p], axis=2)
        return p


# ----------------------------------------------------------------------------------- DLRM
def dlrm_features(model: Any, dense: Any, indices: Any, offsets: Any = None) -> np.ndarray:
    """The input of a DLRM's top MLP, float32 ``[batch, d + interactions]``: its bottom MLP,
    embedding bags (pooled by :func:`qgemm.embedding_bag`) and interaction, as
    ``DLRM.predict`` computes them."""
    from .embedding import embedding_bag

    dense, bags = model._check_inputs(dense, indices, offsets)
    x = model._mlp(model.bottom, dense, last_relu=True)
    emb = np.empty((len(model.tables), dense.shape[0], model.dim), dtype=np.float32)
    for k, (table, (idx, off)) in enumerate(zip(model.tables, bags, strict=True)):
        embedding_bag(table, idx, off, mode="sum", out=emb[k])
    return model._interact(x, emb)


class DLRMLaplace:
    """A :class:`SubnetLaplace` over a DLRM's top MLP (embeddings and bottom MLP fixed), taking
    the DLRM's own inputs; ``laplace`` is the underlying :class:`SubnetLaplace`."""

    def __init__(self, model: Any, laplace: SubnetLaplace):
        self.model = model
        self.laplace = laplace

    def predictive(self, dense: Any, indices: Any, offsets: Any = None, **kw: Any) -> Predictive:
        """:meth:`SubnetLaplace.predictive` at the DLRM inputs (click probabilities)."""
        return self.laplace.predictive(dlrm_features(self.model, dense, indices, offsets), **kw)

    def sample_predictions(
        self, dense: Any, indices: Any, offsets: Any = None, *, n: int = 32, **kw: Any
    ) -> np.ndarray:
        """:meth:`SubnetLaplace.sample_predictions` at the DLRM inputs, ``[n, batch, 2]``."""
        z = dlrm_features(self.model, dense, indices, offsets)
        return self.laplace.sample_predictions(z, n, **kw)


def dlrm_laplace(
    model: Any, dense: Any, indices: Any, offsets: Any, y: Any, **kw: Any
) -> DLRMLaplace:
    """Fit a binary :class:`SubnetLaplace` over ``model``'s top MLP on clicks ``y``
    (``kw`` -> :class:`SubnetLaplace`, e.g. ``subnetwork``, ``n_params``,
    ``prior_precision``); quantized top layers are dequantized.

    Examples
    --------
    >>> import numpy as np
    >>> from qgemm.models import DLRM
    >>> m = DLRM.random(tables=2, rows=50, dim=4, bottom=(3, 8, 4), top=(8, 1), seed=0)
    >>> dense, idx, off = m.random_inputs(64, pooling=2, seed=1)
    >>> y = (np.random.default_rng(2).random(64) < m.predict(dense, idx, off)[:, 0]).astype(int)
    >>> dl = dlrm_laplace(m, dense, idx, off, y, subnetwork="last_layer")
    >>> dl.predictive(dense[:3], [i[:0] for i in idx], [np.zeros(3, np.int64)] * 2).mean.shape
    (3, 1)
    """
    kw.setdefault("subnetwork", "last_layer")
    la = SubnetLaplace(model, "binary", **kw)
    la.fit(dlrm_features(model, dense, indices, offsets), y)
    return DLRMLaplace(model, la)
