"""Benchmark of DLRM inference end to end (``python -m qgemm bench --only models``; the asv
suite ``asv_benchmarks/benchmarks/models.py`` uses the same helpers).

One model -- the main job's default architecture: 8 tables x 1M rows x dim 64 (quick: 200k
rows), bottom MLP 13-512-256-64, top MLP 100-512-256-1, ~20 lookups per bag -- run by four
implementations on the same weights and the same requests:

* ``qgemm int8``: :meth:`qgemm.models.DLRM.quantize` (int8 linear layers through
  :func:`qgemm.linear`, 8-bit rowwise tables pooled in one table-batched call,
  :class:`qgemm.TableBatchedEmbeddingBags`, the fused interaction kernel);
* ``numpy fp32``: the float model's numpy forward (the main job's baseline);
* ``torch fp32``: facebookresearch/dlrm's forward in torch (``F.embedding_bag``, ``nn.Linear``,
  ``bmm`` interaction);
* ``torch int8``: the same forward with FBGEMM's int8 operators -- ``quantized::
  linear_dynamic`` / ``linear_relu_dynamic`` on per-channel int8 weights prepacked by
  ``linear_prepack`` (``reduce_range=True``, as ``torch.ao.nn.quantized.dynamic.Linear`` calls
  it) and ``quantized::embedding_bag_byte_rowwise_offsets`` on the *same* fused 8-bit table
  bytes qgemm uses.

Fresh indices per call (a cycle of 16 prepared batches; the tables are far larger than the
L3), same thread count for qgemm and torch, alternating rounds with pauses
(:func:`qgemm.bench._timing.compare`), medians per batch.  The accuracy columns give max
|Δ prediction| of each int8 implementation against the numpy float32 model on one batch.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any, cast

import numpy as np

from .. import _config
from ..models import DLRM, PARTS, add_part_times
from ..quantize import RowwiseQuantizedTable
from ._timing import PAUSE_SECONDS, Progress, Table, compare, geomean, peer_torch

BATCHES = [1, 16, 128, 512]
TARGETS = {1: 1.5, 16: 1.5, 128: 1.3, 512: 1.3}
"""Issue 16's end-to-end targets, × torch int8 per batch size."""
QUICK_BATCHES = [1, 128]
ROWS = 1_000_000
QUICK_ROWS = 200_000
NAN = float("nan")


_torch = peer_torch


def build(rows: int = ROWS, *, tables: int = 8, dim: int = 64, seed: int = 0) -> tuple[DLRM, DLRM]:
    """The float model and its int8 conversion (the main job's default architecture)."""
    model = DLRM.random(
        tables=tables, rows=rows, dim=dim, bottom=(13, 512, 256, dim), top=(512, 256, 1), seed=seed
    )
    return model, model.quantize(bits=8)


def requests(
    model: DLRM, batch: int, count: int = 16, pooling: int = 20, seed: int = 1
) -> list[tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]]:
    """``count`` synthetic batches ``(dense, indices, offsets)``."""
    return [model.random_inputs(batch, pooling=pooling, seed=seed + i) for i in range(count)]


class TorchDLRM:
    """facebookresearch/dlrm's forward on torch tensors, float32 or FBGEMM int8."""

    def __init__(self, torch: Any, model: DLRM, qmodel: DLRM | None = None):
        self.torch = torch
        self.int8 = qmodel is not None
        n = model.num_tables + 1
        self.li = torch.tensor([i for i in range(n) for _ in range(i)])
        self.lj = torch.tensor([j for i in range(n) for j in range(i)])
        ops = torch.ops.quantized

        def layers(src):
            out = []
            for w, b in src:
                wt = torch.from_numpy(np.ascontiguousarray(w))
                bt = torch.from_numpy(np.ascontiguousarray(b))
                if self.int8:
                    scale = torch.clamp(wt.abs().amax(dim=1) / 127.0, min=1e-12).double()
                    zp = torch.zeros(wt.shape[0], dtype=torch.long)
                    with warnings.catch_warnings():  # torch 2.13: quantized dtypes deprecated
                        warnings.simplefilter("ignore")
                        qw = torch.quantize_per_channel(wt, scale, zp, 0, torch.qint8)
                    out.append(ops.linear_prepack(qw, bt))
                else:
                    out.append((wt, bt))
            return out

        self.bottom = layers(model.bottom)
        self.top = layers(model.top)
        if qmodel is not None:
            qtables = cast("list[RowwiseQuantizedTable]", qmodel.tables)  # an int8 model's
            self.tables = [torch.from_numpy(t.fused) for t in qtables]
        else:
            self.tables = [torch.from_numpy(t) for t in model.tables]

    def _mlp(self, layers, x, last_relu: bool):
        torch = self.torch
        ops = torch.ops.quantized
        for i, layer in enumerate(layers):
            relu = last_relu or i < len(layers) - 1
            if self.int8:
                fn = ops.linear_relu_dynamic if relu else ops.linear_dynamic
                x = fn(x, layer, True)
            else:
                x = torch.nn.functional.linear(x, *layer)
                if relu:
                    x = torch.relu(x)
        return x

    def prepare(self, batch: tuple[Any, Any, Any]) -> tuple[Any, list[Any], list[Any]]:
        """Torch tensors of a numpy request (done once, outside the timed region)."""
        torch = self.torch
        dense, indices, offsets = batch
        return (
            torch.from_numpy(dense),
            [torch.from_numpy(i) for i in indices],
            [torch.from_numpy(o) for o in offsets],
        )

    def predict(
        self, dense: Any, indices: Any, offsets: Any, *, timings: dict[str, float] | None = None
    ) -> Any:
        torch = self.torch
        clock = time.perf_counter
        with torch.no_grad():
            t0 = clock()
            x = self._mlp(self.bottom, dense, True)
            t1 = clock()
            if self.int8:
                ly = [
                    torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
                        t, i, o, False, 0, False, None, None, False
                    )
                    for t, i, o in zip(self.tables, indices, offsets, strict=True)
                ]
            else:
                ly = [
                    torch.nn.functional.embedding_bag(i, t, o, mode="sum")
                    for t, i, o in zip(self.tables, indices, offsets, strict=True)
                ]
            t2 = clock()
            b, d = x.shape
            t = torch.cat([x] + ly, dim=1).view((b, -1, d))
            z = torch.bmm(t, torch.transpose(t, 1, 2))
            r = torch.cat([x, z[:, self.li, self.lj]], dim=1)
            t3 = clock()
            p = torch.sigmoid(self._mlp(self.top, r, False))
            t4 = clock()
        add_part_times(timings, t0, t1, t2, t3, t4)
        return p


def contenders(
    model: DLRM, qmodel: DLRM, log: list, torch: Any, tf: TorchDLRM | None, tq: TorchDLRM | None
) -> dict[str, Any]:
    """Callables running one request each, cycling through ``log``."""

    def cycler(fn: Callable[..., Any], batches: list[Any]) -> Callable[[], Any]:
        state = {"i": 0}

        def call():
            b = batches[state["i"] % len(batches)]
            state["i"] += 1
            return fn(*b)

        return call

    fns = {"qgemm int8": cycler(qmodel.predict, log), "numpy fp32": cycler(model.predict, log)}
    if torch is not None and tf is not None and tq is not None:
        tlog = [tf.prepare(b) for b in log]
        fns["torch fp32"] = cycler(tf.predict, tlog)
        fns["torch int8"] = cycler(tq.predict, tlog)
    return fns


def _step(progress, what: str) -> None:
    if progress is not None:
        progress.step(what)


def run(*, quick: bool = False, progress: Progress | None = None) -> list[Table]:
    torch = _torch()
    rows = QUICK_ROWS if quick else ROWS
    model, qmodel = build(rows)
    tf = TorchDLRM(torch, model) if torch is not None else None
    tq = TorchDLRM(torch, model, qmodel) if torch is not None else None
    _step(progress, "DLRM models built")
    cols = [
        "batch",
        "qgemm int8 ms",
        "numpy fp32 ms",
        "torch fp32 ms",
        "torch int8 ms",
        "× numpy fp32",
        "× torch fp32",
        "× torch int8",
        "qgemm |Δp|",
        "torch int8 |Δp|",
    ]
    out_rows = []
    ratios: dict[str, list[float]] = {"numpy fp32": [], "torch fp32": [], "torch int8": []}
    short: list[str] = []
    for batch in QUICK_BATCHES if quick else BATCHES:
        log = requests(model, batch)
        ref = model.predict(*log[0]).reshape(-1)
        err_q = float(np.abs(qmodel.predict(*log[0]).reshape(-1) - ref).max())
        err_t = NAN
        if tq is not None:
            err_t = float(np.abs(tq.predict(*tq.prepare(log[0])).numpy().reshape(-1) - ref).max())
        res = compare(
            contenders(model, qmodel, log, torch, tf, tq),
            rounds=2 if quick else 3,
            min_time=0.02 if quick else 0.05,
        )
        t = {k: res.get(k, NAN) for k in ("qgemm int8", "numpy fp32", "torch fp32", "torch int8")}
        row = [batch] + [t[k] * 1e3 for k in t]
        for k in ratios:
            ratios[k].append(t[k] / t["qgemm int8"])
            row.append(t[k] / t["qgemm int8"])
        out_rows.append(row + [err_q, err_t])
        ratio = t["torch int8"] / t["qgemm int8"]
        if ratio == ratio and ratio < TARGETS.get(batch, 1.3):
            short.append(f"batch {batch}: {ratio:.2f}× torch int8 (target {TARGETS[batch]:g}×)")
        _step(progress, f"DLRM batch {batch}")
    threads = _config.get_num_threads()
    notes = [
        f"{model.num_tables} tables x {rows:,} rows x dim {model.dim} (8-bit rows for int8), "
        f"bottom {'-'.join(map(str, model.bottom_sizes))}, top "
        f"{'-'.join(map(str, model.top_sizes))}, ~20 lookups per bag, fresh indices per call",
        f"{threads} threads for qgemm and torch; × X = X time / qgemm int8 time (> 1: qgemm "
        f"faster); same-run medians, alternating rounds",
        "geomean: " + ", ".join(f"× {k} {geomean(v):.2f}" for k, v in ratios.items()),
        "|Δp| = max |prediction - numpy fp32 prediction| on one batch",
        "targets: ≥ 1.5× torch int8 at batch 1 and 16, ≥ 1.3× at 128 and 512; short of "
        "target: " + ("; ".join(short) if short else "none"),
    ]
    if torch is None:
        notes.append("torch not installed: torch columns empty")
    split = split_table(model, qmodel, torch, tf, tq, 128, quick, progress)
    return [split_first_table(out_rows, cols, notes), split]


def split_first_table(out_rows: list[list[Any]], cols: list[str], notes: list[str]) -> Table:
    return Table(
        title="DLRM inference per batch (qgemm int8 vs numpy / torch fp32 and torch int8 = FBGEMM)",
        columns=cols,
        rows=out_rows,
        notes=notes,
    )


def split_table(
    model: DLRM,
    qmodel: DLRM,
    torch: Any,
    tf: TorchDLRM | None,
    tq: TorchDLRM | None,
    batch: int,
    quick: bool,
    progress: Progress | None,
) -> Table:
    """Median ms per part (``predict(..., timings=...)``) of each implementation at one batch
    size: blocks of calls, implementations alternating, a pause between blocks."""
    log = requests(model, batch)
    impls: dict[str, tuple[Any, list]] = {
        "qgemm int8": (qmodel.predict, log),
        "numpy fp32": (model.predict, log),
    }
    if torch is not None and tf is not None and tq is not None:
        tlog = [tf.prepare(b) for b in log]
        impls["torch fp32"] = (tf.predict, tlog)
        impls["torch int8"] = (tq.predict, tlog)
    samples: dict[str, list[tuple[float, dict]]] = {k: [] for k in impls}
    block = 0.15 if quick else 0.4
    for _ in range(2 if quick else 3):
        for name, (fn, batches) in impls.items():
            time.sleep(PAUSE_SECONDS)
            fn(*batches[0])
            end = time.perf_counter() + block
            i = 0
            while i < 3 or time.perf_counter() < end:
                t: dict[str, float] = {}
                t0 = time.perf_counter()
                fn(*batches[i % len(batches)], timings=t)
                samples[name].append((time.perf_counter() - t0, t))
                i += 1
    rows = []
    for name, got in samples.items():
        total = statistics.median(lat for lat, _ in got)
        parts = [statistics.median(t[p] for _, t in got) for p in PARTS]
        rows.append(
            [name, total * 1e3] + [p * 1e3 for p in parts] + [f"{parts[0] / sum(parts):.0%}"]
        )
    _step(progress, f"DLRM time split batch {batch}")
    return Table(
        title=f"DLRM time split per batch of {batch} (median ms per part)",
        columns=["impl", "total ms", "embedding ms", "mlp ms", "interaction ms", "embedding share"],
        rows=rows,
        notes=["parts timed inside predict (torch: the same points in DLRM_Net's forward)"],
    )
