"""Benchmark of the embedding bags (``python -m qgemm bench --only embedding``; the asv suite
``asv_benchmarks/benchmarks/embedding.py`` uses the same helpers).

Configs (rows, dim, bags, pooling) from the issue -- (1M, 64, 512, 40), (1M, 128, 2048, 20),
(4M, 64, 1024, 30), (100k, 32, 128, 100) -- with fp32, 8/4/2-bit tables, mode "sum",
bags of exactly ``pooling`` uniformly random rows, against torch in the same process
(``F.embedding_bag`` for fp32, ``quantized::embedding_bag_{byte,4bit}_rowwise_offsets`` on the
same fused bytes for the quantized tables), with the configured thread count for both,
alternating rounds and a pause between runtimes (:func:`qgemm.bench._timing.compare`), medians.

Two variants per config, as FBGEMM's benchmark does with and without its cache flush:

* ``same``: the same indices every call -- the rows they touch stay in the caches (L2/L3);
* ``fresh``: a new index set per call, cycling through enough sets that the rows touched
  since a set was last used exceed the L3 four times over -- the rows come from DRAM (except for
  tables that fit in the L3 entirely, e.g. 100k x 32 fp32 = 12.8 MB: noted in the table).

Effective bandwidth = bytes of the rows read (codes + scale/bias for quantized rows) per
second, against this machine's streaming read bandwidth measured here (all threads).  A
single-bag table reports call latency (bags = 1, pooling 40), where overhead dominates.

The table-batched op (:func:`batched_tables`, issue 16): T tables in one
:class:`qgemm.TableBatchedEmbeddingBags` call against the per-table loop of
:func:`qgemm.embedding_bag` (into a ``[T, B, d]`` buffer, what DLRM did), torch's per-table
quantized ops, and FBGEMM's TBE CPU op (``IntNBitTableBatchedEmbeddingBagsCodegen`` from
fbgemm-gpu-cpu, when installed; our tables are converted from it with ``from_torch``, so all
read the same rows), in both cache states, int32 indices for everyone (TBE's default).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import _config
from ..embedding import embedding_bag
from ..quantize import quantize_rowwise
from ._timing import Progress, Table, compare, geomean, peer_torch

CONFIGS = [
    (1_000_000, 64, 512, 40),
    (1_000_000, 128, 2048, 20),
    (4_000_000, 64, 1024, 30),
    (100_000, 32, 128, 100),
]
QUICK_CONFIGS = [(200_000, 64, 512, 40), (100_000, 32, 128, 100)]
KINDS = ("fp32", "8-bit", "4-bit", "2-bit")
TARGETS = {"fp32": 1.1, "8-bit": 1.1, "4-bit": 1.5, "2-bit": 1.5}
"""Issue 16's targets (× torch, every config and cache state)."""
L3_BYTES = 32 << 20
NAN = float("nan")


_torch = peer_torch


def memory_bandwidth(nbytes: int = 512 << 20) -> float:
    """Streaming read bandwidth of this machine, GB/s: a parallel float32 sum over ``nbytes``
    with all of qgemm's threads (median of 5)."""
    import numba

    @numba.njit(parallel=True, fastmath=True, cache=False)
    def _read(a):
        s = np.float32(0.0)
        for i in numba.prange(a.size):
            s += a[i]
        return s

    a = np.ones(nbytes // 4, np.float32)
    _config.sync_threads()
    _read(a)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        _read(a)
        times.append(time.perf_counter() - t0)
    return nbytes / float(np.median(times)) / 1e9


def row_bytes(kind: str, dim: int) -> int:
    """Bytes read per row: the float row, or the codes plus scale and bias."""
    if kind == "fp32":
        return 4 * dim
    if kind == "8-bit":
        return dim + 8
    if kind == "2-bit":
        return -(-dim // 4) + 4
    return -(-dim // 2) + 4


class Tables:
    """One random fp32 table and its 8/4/2-bit quantizations (qgemm's bytes, which are
    torch's prepack bytes), plus torch views of the same memory."""

    def __init__(self, rows: int, dim: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.rows, self.dim = rows, dim
        self.fp32 = rng.standard_normal((rows, dim), dtype=np.float32)
        self.q8 = quantize_rowwise(self.fp32, bits=8)
        self.q4 = quantize_rowwise(self.fp32, bits=4)
        self.q2 = quantize_rowwise(self.fp32, bits=2)

    def qgemm_table(self, kind: str) -> Any:
        if kind == "2-bit":
            return self.q2
        return {"fp32": self.fp32, "8-bit": self.q8, "4-bit": self.q4}[kind]


_TORCH_OPS = {
    "8-bit": "embedding_bag_byte_rowwise_offsets",
    "4-bit": "embedding_bag_4bit_rowwise_offsets",
    "2-bit": "embedding_bag_2bit_rowwise_offsets",
}


def torch_op(torch: Any, kind: str) -> Any:
    """torch's quantized embedding-bag op for a quantized ``kind``."""
    return getattr(torch.ops.quantized, _TORCH_OPS[kind])


def index_sets(rows: int, bags: int, pooling: int, count: int, seed: int = 1) -> list:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, rows, bags * pooling, dtype=np.int64) for _ in range(count)]


def fresh_count(kind: str, dim: int, bags: int, pooling: int) -> int:
    """Index sets to cycle through so that rows come from DRAM: the lines touched between two
    uses of a set exceed 4x the L3 (with 2x, measured, some rows still hit in the L3 and
    the ratios depended on the prefetch distance in ways DRAM-bound code does not)."""
    lines = -(-row_bytes(kind, dim) // 64) + 1
    per_call = bags * pooling * lines * 64
    return int(min(max(16, -(-4 * L3_BYTES // per_call)), 512))


def contenders(
    tables: Tables, kind: str, sets: list, bags: int, pooling: int, torch: Any
) -> dict[str, Callable[[], Any]]:
    """``{"qgemm": fn, "torch": fn}``; each call uses the next index set (one set = same)."""
    offsets = np.arange(bags, dtype=np.int64) * pooling
    table = tables.qgemm_table(kind)
    state = {"q": 0, "t": 0}
    n = len(sets)

    def q() -> None:  # allocates its output, as torch does
        i = state["q"] = (state["q"] + 1) % n
        embedding_bag(table, sets[i], offsets)

    fns: dict[str, Callable[[], Any]] = {"qgemm": q}
    if torch is not None:
        tsets = [torch.from_numpy(s) for s in sets]
        toffs = torch.from_numpy(offsets)
        if kind == "fp32":
            tw = torch.from_numpy(tables.fp32)

            def t() -> None:
                i = state["t"] = (state["t"] + 1) % n
                torch.nn.functional.embedding_bag(tsets[i], tw, toffs, mode="sum")
        else:
            fused = torch.from_numpy(tables.qgemm_table(kind).fused)
            op = torch_op(torch, kind)

            def t() -> None:
                i = state["t"] = (state["t"] + 1) % n
                op(fused, tsets[i], toffs, False, 0, False, None, None, False)

        fns["torch"] = t
    return fns


def check_agreement(
    tables: Tables, kind: str, idx: np.ndarray, bags: int, pooling: int, torch: Any
) -> float:
    """Max |qgemm - torch| on one call (sanity: the two compute the same thing)."""
    if torch is None:
        return NAN
    offsets = np.arange(bags, dtype=np.int64) * pooling
    got = embedding_bag(tables.qgemm_table(kind), idx, offsets)
    ti, to = torch.from_numpy(idx), torch.from_numpy(offsets)
    if kind == "fp32":
        want = torch.nn.functional.embedding_bag(ti, torch.from_numpy(tables.fp32), to, mode="sum")
    else:
        q = tables.qgemm_table(kind)
        want = torch_op(torch, kind)(
            torch.from_numpy(q.fused), ti, to, False, 0, False, None, None, False
        )
    return float(np.abs(got - want.numpy()).max())


def _step(progress, what: str) -> None:
    if progress is not None:
        progress.step(what)


def run(*, quick: bool = False, progress: Progress | None = None) -> list[Table]:
    torch = _torch()
    threads = _config.get_num_threads()
    configs = QUICK_CONFIGS if quick else CONFIGS
    rounds = 2 if quick else 3
    bw = memory_bandwidth(256 << 20 if quick else 1 << 30)
    _step(progress, "memory bandwidth")
    cols = [
        "rows",
        "dim",
        "bags",
        "pool",
        "table",
        "indices",
        "qgemm µs",
        "torch µs",
        "× torch",
        "target",
        "GB/s",
        "% of DRAM bw",
    ]
    rows_out: list[list[Any]] = []
    ratios: dict[str, list[float]] = {k: [] for k in KINDS}
    short: list[str] = []
    worst_err = 0.0
    for rows, dim, bags, pooling in configs:
        tables = Tables(rows, dim)
        for kind in KINDS:
            for variant in ("same", "fresh"):
                count = 1 if variant == "same" else fresh_count(kind, dim, bags, pooling)
                sets = index_sets(rows, bags, pooling, count)
                if variant == "same":
                    worst_err = max(
                        worst_err,
                        check_agreement(tables, kind, sets[0], bags, pooling, torch) / pooling,
                    )
                fns = contenders(tables, kind, sets, bags, pooling, torch)
                res = compare(fns, rounds=rounds, min_time=0.01 if quick else 0.02)
                tq = res["qgemm"]
                tt = res.get("torch", NAN)
                ratio = tt / tq
                target = TARGETS[kind]
                gbs = bags * pooling * row_bytes(kind, dim) / tq / 1e9
                label = variant
                if variant == "fresh" and rows * row_bytes(kind, dim) <= L3_BYTES:
                    label = "fresh*"
                rows_out.append(
                    [
                        rows,
                        dim,
                        bags,
                        pooling,
                        kind,
                        label,
                        tq * 1e6,
                        tt * 1e6,
                        ratio,
                        f"≥{target:g}",
                        gbs,
                        100 * gbs / bw,
                    ]
                )
                ratios[kind].append(ratio)
                if ratio == ratio and ratio < target:
                    short.append(
                        f"{rows // 1000}k×{dim} b{bags} p{pooling} {kind} {variant}: "
                        f"{ratio:.2f}× (target {target:g}×)"
                    )
                _step(progress, f"{rows}x{dim} {kind} {variant}")
        del tables
    notes = [
        f"{threads} threads for qgemm and torch; same-run medians, alternating rounds; "
        f"× torch = torch time / qgemm time (> 1: qgemm faster)",
        f"measured streaming read bandwidth: {bw:.1f} GB/s (parallel sum, {threads} threads); "
        "GB/s = bytes of the rows read per second (L2/L3-resident rows can exceed it)",
        "same = same indices every call (rows cache-resident); fresh = new indices per call "
        "(rows from DRAM); fresh* = the whole table fits in the 32 MB L3",
        "geomean × torch: " + ", ".join(f"{k} {geomean(v):.2f}" for k, v in ratios.items()),
        f"max |qgemm - torch| / pooling on the checked calls: {worst_err:.2e}",
    ]
    notes.append("short of target: " + ("; ".join(short) if short else "none"))
    notes.append(
        "on a busy machine a 2-thread call of either runtime can stall ~8 ms (an OpenMP "
        "worker waiting for a core): times near 8000 µs mean the run was disturbed"
    )
    main = Table(
        title="Embedding bag, mode=sum (qgemm.embedding_bag vs torch)",
        columns=cols,
        rows=rows_out,
        notes=notes,
    )
    return [main, _latency_table(torch, quick, progress), *batched_tables(torch, quick, progress)]


def _latency_table(torch, quick: bool, progress) -> Table:
    rows, dim, pooling = (200_000 if quick else 1_000_000), 64, 40
    tables = Tables(rows, dim, seed=2)
    sets = index_sets(rows, 1, pooling, 1, seed=3)
    out_rows = []
    for kind in KINDS:
        fns = contenders(tables, kind, sets, 1, pooling, torch)
        res = compare(fns, rounds=2 if quick else 3, min_time=0.01)
        tq, tt = res["qgemm"], res.get("torch", NAN)
        out_rows.append([kind, pooling, tq * 1e6, tt * 1e6, tt / tq])
        _step(progress, f"latency {kind}")
    return Table(
        title=f"Embedding bag single-bag latency (bags=1, {rows // 1000}k×{dim} table)",
        columns=["table", "pool", "qgemm µs", "torch µs", "× torch"],
        rows=out_rows,
        notes=["call overhead dominates: argument checks, kernel lookup and dispatch"],
    )


# -- table-batched op (issue 16) ------------------------------------------------------------------
BATCHED_CONFIGS = [(8, 500_000, 64, 20), (26, 100_000, 64, 20)]  # (T, rows, dim, pooling)
QUICK_BATCHED_CONFIGS = [(8, 50_000, 64, 20), (26, 20_000, 64, 20)]
BATCHES = (1, 16, 128, 512)
BATCHED_KINDS = ("8-bit", "4-bit")
BATCHED_TARGETS = {"loop_small": 1.5, "loop_512": 1.1, "tbe": 2.5}
"""Issue 16: ≥ 1.5× the per-table loop at batch 1-16, ≥ 1.1× at 512, ≥ 2.5× TBE."""


def _fbgemm_tbe(nt: int, rows: int, dim: int, kind: str) -> Any:
    """An fbgemm TBE inference module of ``nt`` tables with sane random weights, or None."""
    try:
        import torch
        from fbgemm_gpu.split_embedding_configs import SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
            IntNBitTableBatchedEmbeddingBagsCodegen,
        )
        from fbgemm_gpu.tbe.config.embedding_config import EmbeddingLocation
    except ImportError:
        return None
    ty = SparseType.INT8 if kind == "8-bit" else SparseType.INT4
    specs = [(f"t{t}", rows, dim, ty, EmbeddingLocation.HOST) for t in range(nt)]
    tbe = IntNBitTableBatchedEmbeddingBagsCodegen(specs, device="cpu", output_dtype=SparseType.FP32)
    tbe.fill_random_weights()
    rng = np.random.default_rng(0)
    for _, sb in tbe.split_embedding_weights():
        qp = np.stack([rng.uniform(0.01, 0.1, rows), rng.uniform(-1, 1, rows)], axis=1)
        sb.copy_(torch.from_numpy(qp.astype(np.float16).view(np.uint8)))
    return tbe


def _own_tables(nt: int, rows: int, dim: int, kind: str) -> list[Any]:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((rows, dim), dtype=np.float32)
    q = quantize_rowwise(base, bits=8 if kind == "8-bit" else 4)
    return [q] * nt  # the same memory T times: the same bytes per call as distinct tables


def batched_contenders(
    tables: list[Any], tbe: Any, sets: list, batch: int, pooling: int, kind: str, torch: Any
) -> dict[str, Callable[[], Any]]:
    """``{"batched", "loop", "tbe", "torch loop"}`` over index sets (flat int32 TBE inputs)."""
    from ..embedding_batched import TableBatchedEmbeddingBags

    nt, dim = len(tables), tables[0].dim
    ours = TableBatchedEmbeddingBags(tables)
    offs = np.arange(nt * batch + 1, dtype=np.int32) * pooling
    per_off = np.arange(batch, dtype=np.int32) * pooling
    n = len(sets)
    step = batch * pooling
    per_sets = [[s[t * step : (t + 1) * step] for t in range(nt)] for s in sets]
    state = {k: 0 for k in ("b", "l", "t", "tl")}

    def nxt(k: str) -> int:
        state[k] = (state[k] + 1) % n
        return state[k]

    def batched() -> None:
        ours(sets[nxt("b")], offs)

    def loop() -> None:
        ps = per_sets[nxt("l")]
        emb = np.empty((nt, batch, dim), np.float32)
        for t in range(nt):
            embedding_bag(tables[t], ps[t], per_off, out=emb[t])

    fns: dict[str, Callable[[], Any]] = {"batched": batched, "loop": loop}
    if tbe is not None:
        tsets = [torch.from_numpy(s) for s in sets]
        toffs = torch.from_numpy(offs)

        def fb() -> None:
            tbe(tsets[nxt("t")], toffs)

        fns["tbe"] = fb
    if torch is not None:
        op = torch_op(torch, kind)
        fused = [torch.from_numpy(t.fused) for t in tables]
        tper = [[torch.from_numpy(x) for x in ps] for ps in per_sets]
        tpo = torch.from_numpy(per_off)

        def tl() -> None:
            ps = tper[nxt("tl")]
            for t in range(nt):
                op(fused[t], ps[t], tpo, False, 0, False, None, None, False)

        fns["torch loop"] = tl
    return fns


def batched_tables(torch: Any, quick: bool, progress: Progress | None) -> list[Table]:
    """The batched op against the per-table loop, torch's per-table ops and TBE."""
    configs = QUICK_BATCHED_CONFIGS if quick else BATCHED_CONFIGS
    batches = (1, 16, 512) if quick else BATCHES
    rows_out: list[list[Any]] = []
    short: list[str] = []
    worst = 0.0
    for nt, rows, dim, pooling in configs:
        for kind in BATCHED_KINDS:
            tbe = _fbgemm_tbe(nt, rows, dim, kind) if torch is not None else None
            if tbe is not None:
                from ..interop import from_torch

                tables = list(from_torch(tbe).tables)
            else:
                tables = _own_tables(nt, rows, dim, kind)
            for batch in batches:
                for variant in ("same", "fresh"):
                    count = 1
                    if variant == "fresh":
                        count = fresh_count(kind, dim, nt * batch, pooling)
                    sets = [
                        s.astype(np.int32)
                        for s in index_sets(rows, nt * batch, pooling, count, seed=batch)
                    ]
                    if tbe is not None and variant == "same":
                        from ..embedding_batched import embedding_bags

                        offs = np.arange(nt * batch + 1, dtype=np.int32) * pooling
                        got = embedding_bags(tables, sets[0], offs)
                        want = tbe(torch.from_numpy(sets[0]), torch.from_numpy(offs)).numpy()
                        worst = max(worst, float(np.abs(got - want).max()) / pooling)
                    fns = batched_contenders(tables, tbe, sets, batch, pooling, kind, torch)
                    res = compare(fns, rounds=2 if quick else 3, min_time=0.01)
                    tb = res["batched"]
                    r_loop = res["loop"] / tb
                    r_tbe = res.get("tbe", NAN) / tb
                    r_torch = res.get("torch loop", NAN) / tb
                    want_loop = BATCHED_TARGETS["loop_512" if batch >= 512 else "loop_small"]
                    rows_out.append(
                        [nt, rows, dim, pooling, kind, batch, variant, tb * 1e6,
                         res["loop"] * 1e6, res.get("tbe", NAN) * 1e6,
                         res.get("torch loop", NAN) * 1e6, r_loop, r_tbe, r_torch]
                    )  # fmt: skip
                    cell = f"T{nt} {rows // 1000}k×{dim} {kind} b{batch} {variant}"
                    if r_loop < want_loop:
                        short.append(f"{cell}: {r_loop:.2f}× loop (target {want_loop:g}×)")
                    if r_tbe == r_tbe and batch in (16, 128, 512) and r_tbe < 2.5:
                        short.append(f"{cell}: {r_tbe:.2f}× TBE (target 2.5×)")
                    _step(progress, f"batched {cell}")
            del tbe, tables
    notes = [
        "batched = one qgemm.TableBatchedEmbeddingBags call (flat TBE inputs); loop = T calls "
        "of qgemm.embedding_bag into a [T, B, d] buffer; tbe = fbgemm-gpu-cpu's "
        "IntNBitTableBatchedEmbeddingBagsCodegen (fp32 out); torch loop = T calls of torch's "
        "quantized rowwise op; ratios = their time / batched time (> 1: batched faster)",
        "tables converted from the TBE module with qgemm.from_torch (same rows for all); "
        "without fbgemm_gpu: one quantized table repeated T times",
        f"max |batched - TBE| / pooling on the checked calls: {worst:.2e}",
        "targets: ≥ 1.5× loop at batch 1-16, ≥ 1.1× at 512; ≥ 2.5× TBE",
        "short of target: " + ("; ".join(short) if short else "none"),
    ]
    return [
        Table(
            title="Table-batched embedding bags, mode=sum (batched vs loop vs TBE vs torch)",
            columns=[
                "T",
                "rows",
                "dim",
                "pool",
                "table",
                "batch",
                "indices",
                "batched µs",
                "loop µs",
                "TBE µs",
                "torch loop µs",
                "× loop",
                "× TBE",
                "× torch loop",
            ],
            rows=rows_out,
            notes=notes,
        )  # fmt: skip
    ]
