"""DLRM-style recommendation model: float32 (numpy) baseline and its int8 conversion.

The structure is that of facebookresearch/dlrm (``DLRM_Net`` with ``--arch-interaction-op
dot``):

1. a **bottom MLP** (Linear + ReLU per layer) maps the dense features ``[B, n_dense]`` to
   ``x`` ``[B, d]``;
2. one **embedding bag** (sum pooling) per sparse feature maps each sample's bag of row ids
   to a vector ``[B, d]``;
3. the **dot interaction** stacks ``F = [x, e_0, ..., e_{T-1}]`` (``n = T + 1`` vectors per
   sample), takes the strictly lower triangle of ``F F^T`` row by row (DLRM's
   ``li, lj`` order; the diagonal too with ``self_interaction``) and concatenates it after
   ``x``: ``z`` ``[B, d + n (n - 1) / 2]``;
4. a **top MLP** (Linear + ReLU, the last layer Linear + sigmoid) gives the click probability
   ``[B, top[-1]]``.

:meth:`DLRM.quantize` converts a float model to qgemm's int8 model: every linear layer packed
with :func:`qgemm.pack_weight` (int8 weights, per-output-channel scales; activations quantized
on the fly by :func:`qgemm.linear`) and every table quantized row-wise by
:func:`qgemm.quantize_rowwise` (8-bit default; 4- and 2-bit options) and pooled by
:func:`qgemm.embedding_bag`, with the interaction fused into one parallel kernel.  The float
model is left untouched and stays the baseline; its predict runs plain numpy (float32 BLAS
matmuls, fancy-index gathers with ``np.add.reduceat``, ``np.matmul`` interaction).

``predict(..., timings=d)`` adds the seconds spent in each part (``"embedding"``, ``"mlp"``,
``"interaction"``) to the dict ``d`` -- the characterisation of the DLRM inference paper
(Park et al., 2018: embeddings memory-bound, FC layers small-batch GEMMs).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import _config
from ._kernels.dlrm import PARALLEL_MIN_MACS, interaction_kernel
from ._model_build import (
    parse_state_dict,
    random_batch,
    random_parts,
    random_table,
    read_npz,
    to_state_dict,
    write_npz,
)
from ._validate import as_array, check_choice, check_finite, check_int
from .embedding import check_bags, embedding_bag, index_array
from .embedding_batched import TableBatchedEmbeddingBags, flatten_bags
from .gemm import PackedWeight, linear, pack_weight
from .quantize import RowwiseQuantizedTable, quantize_rowwise

__all__ = ["DLRM", "PARTS", "random_table"]

PARTS = ("embedding", "mlp", "interaction")
"""The parts ``predict(..., timings=...)`` reports."""

_ENGINES = ("numpy", "qgemm")


def add_part_times(
    timings: dict | None, t0: float, t1: float, t2: float, t3: float, t4: float
) -> None:
    """Add one forward's part times to ``timings`` from its five clock readings: bottom MLP
    ``t0..t1``, embedding ``t1..t2``, interaction ``t2..t3``, top MLP ``t3..t4``."""
    if timings is not None:
        for part, dt in (
            ("mlp", (t1 - t0) + (t4 - t3)),
            ("embedding", t2 - t1),
            ("interaction", t3 - t2),
        ):
            timings[part] = timings.get(part, 0.0) + dt


def _is_packed(w: Any) -> bool:
    return isinstance(w, PackedWeight)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """Float32 logistic function, computed in float64 with the argument clipped to +-700
    (no overflow; the clip only affects arguments whose float32 result is already 0 or 1)."""
    z64 = np.clip(z, -700.0, 700.0, dtype=np.float64)
    np.negative(z64, out=z64)
    np.exp(z64, out=z64)
    z64 += 1.0
    return np.reciprocal(z64, out=z64).astype(np.float32)


def _interaction_pairs(n: int, self_interaction: bool) -> tuple[np.ndarray, np.ndarray]:
    extra = 1 if self_interaction else 0
    li = np.array([i for i in range(n) for _ in range(i + extra)], dtype=np.intp)
    lj = np.array([j for i in range(n) for j in range(i + extra)], dtype=np.intp)
    return li, lj


def _numpy_bag_sum(table: Any, idx: np.ndarray, off: np.ndarray | None, out: np.ndarray) -> None:
    """Plain numpy sum-pooled embedding bag (the float32 baseline) of a float32 ``table``."""
    if off is None:  # fixed-size bags, idx [B, L]
        if idx.shape[1] == 0:
            out[...] = 0.0
        else:
            np.sum(table[idx], axis=1, out=out)
        return
    n = idx.shape[0]
    if n == 0 or out.shape[0] == 0:
        out[...] = 0.0
        return
    rows = table[idx]
    lengths = np.diff(off, append=n)
    nonempty = lengths > 0
    if nonempty.all():
        np.add.reduceat(rows, off, axis=0, out=out)
    else:  # reduceat returns rows[start] for an empty segment: skip those bags
        out[nonempty] = np.add.reduceat(rows, off[nonempty], axis=0)
        out[~nonempty] = 0.0


class DLRM:
    """A DLRM-style click-through-rate model (see the module docstring for the structure).

    Build one with :meth:`random`, :meth:`from_state_dict` (the layout of
    facebookresearch/dlrm's ``DLRM_Net.state_dict()``: ``bot_l.{2i}.weight/bias``,
    ``top_l.{2i}.weight/bias``, ``emb_l.{k}.weight``) or :meth:`load` (an ``.npz`` in that
    layout, written by :meth:`save`); convert it with :meth:`quantize`.

    Parameters
    ----------
    bottom, top : sequence of (weight, bias)
        Linear layers, ``weight`` float32 ``[out, in]`` (``nn.Linear``'s convention) or a
        :class:`qgemm.PackedWeight`; ``bias`` float32 ``[out]`` or None.  Bottom layers all
        have ReLU; top layers ReLU except the last, which has the sigmoid.
    tables : sequence of float32 ndarray ``[rows, d]`` or :class:`qgemm.RowwiseQuantizedTable`
    self_interaction : bool
        Include ``<f_i, f_i>`` in the interaction (DLRM's ``--arch-interaction-itself``).
    engine : {"numpy", "qgemm"}, optional
        Who runs the float parts: ``"numpy"`` (the baseline: BLAS matmuls, fancy-index gather +
        ``np.add.reduceat``, ``np.matmul`` interaction) or ``"qgemm"`` (float tables pooled by
        :func:`qgemm.embedding_bag`, the fused interaction kernel).  Packed layers and quantized
        tables always run on qgemm's kernels.  Default: ``"numpy"`` for an all-float model,
        ``"qgemm"`` otherwise.

    Examples
    --------
    >>> m = DLRM.random(tables=2, rows=100, dim=4, bottom=(3, 8, 4), top=(8, 1), seed=0)
    >>> dense, indices, offsets = m.random_inputs(5, pooling=3, seed=1)
    >>> m.predict(dense, indices, offsets).shape
    (5, 1)
    >>> m
    DLRM(precision=float32, tables=2x100x4, bottom=3-8-4, top=7-8-1, engine=numpy)
    """

    def __init__(
        self,
        bottom: Sequence[tuple[Any, Any]],
        top: Sequence[tuple[Any, Any]],
        tables: Sequence[Any],
        *,
        self_interaction: bool = False,
        engine: str | None = None,
    ):
        if not isinstance(self_interaction, (bool, np.bool_)):
            raise TypeError(
                f"self_interaction: expected a bool, got {type(self_interaction).__name__}"
            )
        self.self_interaction = bool(self_interaction)
        self.bottom = self._check_layers("bottom", bottom)
        self.top = self._check_layers("top", top)
        if isinstance(tables, (np.ndarray, RowwiseQuantizedTable)) or not isinstance(
            tables, Sequence
        ):
            raise TypeError(f"tables: expected a sequence of tables, got {type(tables).__name__}")
        checked: list[np.ndarray | RowwiseQuantizedTable] = []
        for k, t in enumerate(tables):
            if isinstance(t, RowwiseQuantizedTable):
                checked.append(t)
            else:
                t = as_array(f"tables[{k}]", t, dtypes=(np.float32,), ndim=2)
                checked.append(np.ascontiguousarray(t))
        self.tables = checked
        if not self.tables:
            raise ValueError("tables: expected at least one table, got none")
        dims = {t.shape[1] for t in self.tables}
        if len(dims) != 1:
            raise ValueError(f"tables: expected one embedding dimension, got dims {sorted(dims)}")
        d = dims.pop()
        if self.bottom_sizes[-1] != d:
            raise ValueError(
                f"bottom: the last layer must output the embedding dimension {d}, "
                f"got {self.bottom_sizes[-1]}"
            )
        want = d + self.num_interactions
        if self.top_sizes[0] != want:
            raise ValueError(
                f"top: the first layer must take d + n(n{'+' if self.self_interaction else '-'}"
                f"1)/2 = {want} inputs (n = {len(self.tables) + 1} features), "
                f"got {self.top_sizes[0]}"
            )
        if engine is None:
            engine = "numpy" if self.precision == "float32" else "qgemm"
        self.engine = check_choice("engine", engine, _ENGINES)
        self._li, self._lj = _interaction_pairs(len(self.tables) + 1, self.self_interaction)
        # hot-path constants
        self._rows = self.rows
        self._num_dense = self.num_dense
        self._dim = d
        self._num_interactions = self.num_interactions
        self._quantized_tables = [isinstance(t, RowwiseQuantizedTable) for t in self.tables]

    # -- construction ----------------------------------------------------------------------
    @staticmethod
    def _check_layers(name: str, layers: Any) -> list[tuple[Any, np.ndarray | None]]:
        if not isinstance(layers, Sequence) or isinstance(layers, (str, np.ndarray)):
            raise TypeError(
                f"{name}: expected a sequence of (weight, bias), got {type(layers).__name__}"
            )
        if not layers:
            raise ValueError(f"{name}: expected at least one layer, got none")
        out: list[tuple[Any, np.ndarray | None]] = []
        prev = None
        for i, layer in enumerate(layers):
            try:
                w, b = layer
            except (TypeError, ValueError):
                raise TypeError(
                    f"{name}[{i}]: expected a (weight, bias) pair, got {type(layer).__name__}"
                ) from None
            if not _is_packed(w):
                w = np.ascontiguousarray(
                    as_array(f"{name}[{i}].weight", w, dtypes=(np.float32,), ndim=2)
                )
            n_out, n_in = w.shape
            if b is not None:
                b = np.ascontiguousarray(
                    as_array(f"{name}[{i}].bias", b, dtypes=(np.float32,), ndim=1)
                )
                if b.shape[0] != n_out:
                    raise ValueError(f"{name}[{i}].bias: expected shape ({n_out},), got {b.shape}")
            if prev is not None and n_in != prev:
                raise ValueError(
                    f"{name}[{i}].weight: expected {prev} inputs (the previous "
                    f"layer's outputs), got {n_in}"
                )
            prev = n_out
            out.append((w, b))
        return out

    @classmethod
    def random(
        cls,
        *,
        tables: int = 8,
        rows: int | Sequence[int] = 1_000_000,
        dim: int = 64,
        bottom: Sequence[int] = (13, 512, 256, 64),
        top: Sequence[int] = (512, 256, 1),
        self_interaction: bool = False,
        emb_range: float | None = None,
        seed: int = 0,
    ) -> DLRM:
        """A float32 model with random weights, reproducible from ``seed``.

        ``bottom`` lists the layer sizes including the dense-feature count and ending with
        ``dim``; ``top`` lists the top MLP's output sizes (its input size follows from the
        interaction), as DLRM's ``--arch-mlp-bot`` / ``--arch-mlp-top``.  Linear layers use
        DLRM's initialisation (weights ``N(0, 2 / (in + out))``, biases ``N(0, 1 / out)``).
        Tables are uniform in ``[-emb_range, emb_range]``, default ``1 / sqrt(dim)``: DLRM's
        own ``sqrt(1 / rows)`` makes 1M-row embeddings ~1e-3, so small that the interaction
        (and any quantization error in it) would not move the predictions; with
        ``1 / sqrt(dim)`` a pooled dot product is O(1).  Tables are filled by a parallel
        counter-based generator (SplitMix64), ~0.1 s per 1M x 64 table.
        """
        bot_layers, top_layers, tabs = random_parts(
            tables=tables,
            rows=rows,
            dim=dim,
            bottom=bottom,
            top=top,
            self_interaction=self_interaction,
            emb_range=emb_range,
            seed=seed,
        )
        return cls(bot_layers, top_layers, tabs, self_interaction=self_interaction)

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, Any], *, self_interaction: bool | None = None
    ) -> DLRM:
        """A float32 model from a facebookresearch/dlrm ``state_dict`` (arrays, or torch
        tensors converted through ``.detach().cpu().numpy()``; torch itself is not imported).

        Keys: ``bot_l.{j}.weight`` / ``.bias`` and ``top_l.{j}.weight`` / ``.bias`` (``j`` the
        position of the Linear in the ``nn.Sequential``, activations in between),
        ``emb_l.{k}.weight``; a ``module.`` prefix (DataParallel) is accepted.  Any other key
        (QR/MD embeddings, per-sample weight vectors) raises ``ValueError``.
        ``self_interaction`` is inferred from the top MLP's input size when None.
        """
        bot, top, tabs, si = parse_state_dict(state_dict, self_interaction)
        return cls(bot, top, tabs, self_interaction=si)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The float weights in facebookresearch/dlrm's ``state_dict`` layout (no copies)."""
        if self.precision != "float32":
            raise TypeError(
                "state_dict: only a float32 model has a float state_dict; keep the "
                "float model you quantized"
            )
        return to_state_dict(self.bottom, self.top, self.tables)

    def save(self, path: str | os.PathLike) -> None:
        """Write the float weights to an ``.npz`` in the ``state_dict`` layout (atomically: an
        interrupted save leaves the previous file, or none, never half of one)."""
        arrays: dict[str, Any] = {**self.state_dict()}
        write_npz(path, {**arrays, "_self_interaction": np.array(self.self_interaction)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> DLRM:
        """A float32 model from an ``.npz`` written by :meth:`save` (or any ``.npz`` holding a
        DLRM ``state_dict``)."""
        sd, si = read_npz(path)  # never unpickles; bad bytes -> ValueError naming the file
        try:
            return cls.from_state_dict(sd, self_interaction=si)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{os.fspath(path)}: {exc}") from None

    def quantize(
        self,
        bits: int = 8,
        *,
        granularity: str = "channel",
        group_size: int | None = None,
        reduce_range: bool = False,
    ) -> DLRM:
        """The int8 model: every linear layer packed by :func:`qgemm.pack_weight` (int8,
        symmetric, per output channel by default; ``granularity``, ``group_size`` and
        ``reduce_range`` are passed on), every table quantized row-wise to ``bits`` (8, 4 or 2)
        by :func:`qgemm.quantize_rowwise`.  Biases stay float32 (fused into the GEMM's output
        stage).  ``self`` is unchanged and stays the float baseline.

        Examples
        --------
        >>> m = DLRM.random(tables=2, rows=100, dim=4, bottom=(3, 8, 4), top=(8, 1), seed=0)
        >>> q = m.quantize(bits=4)
        >>> q.precision, q.table_bits, m.precision
        ('int8', 4, 'float32')
        >>> q.memory()["embedding"] < m.memory()["embedding"]
        True
        """
        if self.precision != "float32":
            raise TypeError(f"quantize: expected a float32 model, got a {self.precision} one")
        bits = check_int("bits", bits)
        if bits not in (8, 4, 2):
            raise ValueError(f"bits: expected 8, 4 or 2, got {bits}")

        def pack(layers: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
            return [
                (
                    pack_weight(
                        w, granularity=granularity, group_size=group_size, reduce_range=reduce_range
                    ),
                    None if b is None else b.copy(),
                )
                for w, b in layers
            ]

        bottom = pack(self.bottom)
        top = pack(self.top)
        tables = [quantize_rowwise(t, bits=bits) for t in self.tables]
        return DLRM(bottom, top, tables, self_interaction=self.self_interaction, engine="qgemm")

    def with_engine(self, engine: str) -> DLRM:
        """The same weights (shared, not copied) run by ``engine`` ("numpy" or "qgemm")."""
        return DLRM(
            self.bottom,
            self.top,
            self.tables,
            self_interaction=self.self_interaction,
            engine=engine,
        )

    # -- beyond one model: serving on a cluster, uncertainty ---------------------------------
    def shard(self, client: Any, **kw: Any) -> Any:
        """This model served on a Dask cluster: :class:`qgemm.distributed.ShardedDLRM`."""
        from .distributed import ShardedDLRM

        return ShardedDLRM(self, client, **kw)

    def warmup(self, *, jobs: int | None = None, progress: bool = False) -> dict[str, float]:
        """Compile the kernels this model's inference needs (:func:`qgemm.warmup`)."""
        from .warmup import warmup

        return warmup(self, jobs=jobs, progress=progress)

    def laplace(self, dense: Any, indices: Any, offsets: Any, y: Any, **kw: Any) -> Any:
        """Subnetwork Laplace over the top MLP: :func:`qgemm.laplace.dlrm_laplace`."""
        from .laplace import dlrm_laplace

        return dlrm_laplace(self, dense, indices, offsets, y, **kw)

    # -- description -----------------------------------------------------------------------
    @property
    def num_tables(self) -> int:
        return len(self.tables)

    @property
    def dim(self) -> int:
        """Embedding dimension ``d``."""
        return int(self.tables[0].shape[1])

    @property
    def rows(self) -> tuple[int, ...]:
        """Row count of each table."""
        return tuple(int(t.shape[0]) for t in self.tables)

    @property
    def num_dense(self) -> int:
        """Dense features per sample (the bottom MLP's input size)."""
        return self.bottom_sizes[0]

    @property
    def num_interactions(self) -> int:
        n = len(self.tables) + 1
        return n * (n + 1) // 2 if self.self_interaction else n * (n - 1) // 2

    @property
    def bottom_sizes(self) -> tuple[int, ...]:
        return (int(self.bottom[0][0].shape[1]),) + tuple(int(w.shape[0]) for w, _ in self.bottom)

    @property
    def top_sizes(self) -> tuple[int, ...]:
        """Top MLP sizes including its input size."""
        return (int(self.top[0][0].shape[1]),) + tuple(int(w.shape[0]) for w, _ in self.top)

    @property
    def precision(self) -> str:
        """``"float32"`` (all float), ``"int8"`` (packed layers, quantized tables) or
        ``"mixed"``."""
        packed = [_is_packed(w) for w, _ in self.bottom + self.top]
        quant = [isinstance(t, RowwiseQuantizedTable) for t in self.tables]
        if not any(packed) and not any(quant):
            return "float32"
        if all(packed) and all(quant):
            return "int8"
        return "mixed"

    @property
    def table_bits(self) -> int:
        """Bits per table element (32 for float tables; 8, 4 or 2 when quantized)."""
        t = self.tables[0]
        return t.bits if isinstance(t, RowwiseQuantizedTable) else 32

    def memory(self) -> dict[str, int]:
        """Bytes of the model's parts: ``{"embedding", "mlp", "total"}``."""
        emb = sum(int(t.nbytes) for t in self.tables)
        mlp = 0
        for w, b in self.bottom + self.top:
            mlp += int(w.nbytes) + (0 if b is None else int(b.nbytes))
        return {"embedding": emb, "mlp": mlp, "total": emb + mlp}

    @property
    def nbytes(self) -> int:
        """Total bytes of weights and tables."""
        return self.memory()["total"]

    def __repr__(self) -> str:
        rows = set(self.rows)
        r = str(rows.pop()) if len(rows) == 1 else "var"
        prec = self.precision
        if prec != "float32":
            prec += f"/{self.table_bits}-bit tables"
        return (
            f"DLRM(precision={prec}, tables={self.num_tables}x{r}x{self.dim}, "
            f"bottom={'-'.join(map(str, self.bottom_sizes))}, "
            f"top={'-'.join(map(str, self.top_sizes))}, engine={self.engine})"
        )

    # -- inputs ------------------------------------------------------------------------------
    def random_inputs(
        self,
        batch: int,
        *,
        pooling: int = 20,
        seed: int | None = None,
        index_dtype: Any = np.int64,
    ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """A synthetic batch ``(dense, indices, offsets)`` as DLRM's random data generator
        makes it: dense features uniform in ``[0, 1)``, for each table ``batch`` bags whose
        lengths are uniform in ``[1, 2 * pooling - 1]`` (mean ``pooling``; 1 gives one-hot
        features as in Criteo) of row ids uniform over the table."""
        return random_batch(
            self.rows, self.num_dense, batch, pooling=pooling, seed=seed, index_dtype=index_dtype
        )

    def _check_inputs(
        self, dense: Any, indices: Any, offsets: Any
    ) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray | None]]]:
        if not (type(dense) is np.ndarray and dense.dtype == np.float32 and dense.ndim == 2):
            dense = as_array("dense", dense, dtypes=(np.float32,), ndim=2)
        if dense.shape[1] != self._num_dense:
            raise ValueError(
                f"dense: expected {self.num_dense} features per sample, got shape {dense.shape}"
            )
        check_finite("dense", dense)
        batch = dense.shape[0]
        nt = len(self.tables)

        def seq(name: str, v: Any) -> list[Any]:
            if isinstance(v, np.ndarray):
                if v.ndim < 2:
                    raise ValueError(
                        f"{name}: expected one array per table ({nt}), got a {v.ndim}-D array"
                    )
                return list(v)
            if not isinstance(v, Sequence) or isinstance(v, (str, bytes)):
                raise TypeError(
                    f"{name}: expected a sequence of {nt} arrays (one per table), "
                    f"got {type(v).__name__}"
                )
            return list(v)

        idx_l = seq("indices", indices)
        if len(idx_l) != nt:
            raise ValueError(f"indices: expected {nt} arrays (one per table), got {len(idx_l)}")
        off_l = [None] * nt if offsets is None else seq("offsets", offsets)
        if len(off_l) != nt:
            raise ValueError(f"offsets: expected {nt} arrays (one per table), got {len(off_l)}")
        bags = []
        for k in range(nt):
            fixed = off_l[k] is None
            idx = index_array(f"indices[{k}]", idx_l[k], ndim=2 if fixed else 1)
            off = None
            if fixed:
                if idx.shape[0] != batch:
                    raise ValueError(
                        f"indices[{k}]: expected {batch} fixed-size bags (the "
                        f"batch of dense), got shape {idx.shape}"
                    )
            else:
                off = index_array(f"offsets[{k}]", off_l[k])
                if off.shape[0] != batch:
                    raise ValueError(
                        f"offsets[{k}]: expected {batch} offsets (one per sample "
                        f"of dense), got {off.shape[0]}"
                    )
            check_bags(
                idx, off, self._rows[k], indices_name=f"indices[{k}]", offsets_name=f"offsets[{k}]"
            )
            bags.append((idx, off))
        return dense, bags

    # -- inference ---------------------------------------------------------------------------
    def _mlp(self, layers: list[tuple[Any, Any]], x: np.ndarray, last_relu: bool) -> np.ndarray:
        nl = len(layers)
        for i, (w, b) in enumerate(layers):
            relu = last_relu or i < nl - 1
            if _is_packed(w):
                x = linear(x, w, b, relu=relu)
            else:
                y = x @ w.T
                if b is not None:
                    y += b
                if relu:
                    np.maximum(y, 0.0, out=y)
                x = y
        return x

    def _interact(self, x: np.ndarray, emb: np.ndarray) -> np.ndarray:
        batch, d = x.shape
        if self.engine == "qgemm":
            out = np.empty((batch, d + self._num_interactions), dtype=np.float32)
            if batch:
                parallel = batch * self._num_interactions * d >= PARALLEL_MIN_MACS
                if parallel:
                    _config.sync_threads()
                interaction_kernel((self.self_interaction, _config.fastmath_flags(), parallel))(
                    np.ascontiguousarray(x), emb, out
                )
            return out
        feats = np.concatenate([x[:, None, :], emb.transpose(1, 0, 2)], axis=1)  # [B, n, d]
        z = np.matmul(feats, feats.transpose(0, 2, 1))
        return np.concatenate([x, z[:, self._li, self._lj]], axis=1)

    def _embed(self, bags: list[tuple[np.ndarray, np.ndarray | None]], batch: int) -> np.ndarray:
        """Pooled embeddings float32 ``[T, batch, dim]`` (table-major, what the interaction
        reads): one table-batched call (:class:`qgemm.TableBatchedEmbeddingBags`) when every
        table is pooled by qgemm, else one call per table (numpy for float tables)."""
        nt, d = len(self.tables), self._dim
        emb = np.empty((nt, batch, d), dtype=np.float32)
        if self.engine == "qgemm" or all(self._quantized_tables):
            tbe = getattr(self, "_tbe", None)
            if (
                tbe is None
                or len(tbe.tables) != nt
                or any(a is not b for a, b in zip(tbe.tables, self.tables, strict=False))
            ):
                tbe = self._tbe = TableBatchedEmbeddingBags(self.tables)
            idx, offs, starts = flatten_bags(bags, batch)  # bags checked by _check_inputs
            obase = np.arange(nt, dtype=np.int64) * (batch * d)
            tbe._pool(idx, offs, batch, None, "sum", tbe._no_pad, emb.reshape(-1), obase, d, starts)
            return emb
        for k, (table, (idx, off)) in enumerate(zip(self.tables, bags, strict=True)):
            if self._quantized_tables[k]:
                embedding_bag(table, idx, off, mode="sum", out=emb[k])
            else:
                _numpy_bag_sum(table, idx, off, emb[k])
        return emb

    def predict(
        self,
        dense: Any,
        indices: Any,
        offsets: Any = None,
        *,
        timings: dict[str, float] | None = None,
    ) -> np.ndarray:
        """Click probabilities float32 ``[batch, top[-1]]``.

        Parameters
        ----------
        dense : float32 ``[batch, num_dense]``
        indices : sequence of ``num_tables`` int32/int64 arrays
            Row ids of each table's bags, 1-D (bags delimited by ``offsets``) or 2-D
            ``[batch, L]`` (fixed-size bags, with ``offsets=None``).
        offsets : sequence of ``num_tables`` int32/int64 ``[batch]`` arrays, or None
            torch's convention: bag ``b`` of table ``k`` is
            ``indices[k][offsets[k][b]:offsets[k][b + 1]]``, the last bag runs to the end;
            ``offsets[k][0] == 0``; empty bags pool to zeros.
        timings : dict, optional
            Seconds spent in each part are *added* to ``timings["embedding"]``,
            ``timings["mlp"]`` (bottom + top) and ``timings["interaction"]``.

        Raises
        ------
        TypeError, ValueError, IndexError
            Wrong dtypes; wrong shapes, bad offsets or non-finite dense features; a row id
            outside its table (checked before anything runs).
        """
        dense, bags = self._check_inputs(dense, indices, offsets)
        clock = time.perf_counter
        batch = dense.shape[0]
        t0 = clock()
        x = self._mlp(self.bottom, dense, last_relu=True)
        t1 = clock()
        emb = self._embed(bags, batch)
        t2 = clock()
        z = self._interact(x, emb)
        t3 = clock()
        p = _sigmoid(self._mlp(self.top, z, last_relu=False))
        t4 = clock()
        add_part_times(timings, t0, t1, t2, t3, t4)
        return p

    __call__ = predict
