"""Benchmark of the embedding bags (``python -m qgemm bench --only embedding``; the asv suite
``asv_benchmarks/benchmarks/embedding.py`` uses the same helpers).

Configs (rows, dim, bags, pooling) from the issue -- (1M, 64, 512, 40), (1M, 128, 2048, 20),
(4M, 64, 1024, 30), (100k, 32, 128, 100) -- with fp32, 8-bit and 4-bit tables, mode "sum",
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
KINDS = ("fp32", "8-bit", "4-bit")
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
    return -(-dim // 2) + 4


class Tables:
    """One random fp32 table and its 8-bit and 4-bit quantizations (qgemm's bytes, which are
    torch's prepack bytes), plus torch views of the same memory."""

    def __init__(self, rows: int, dim: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.rows, self.dim = rows, dim
        self.fp32 = rng.standard_normal((rows, dim), dtype=np.float32)
        self.q8 = quantize_rowwise(self.fp32, bits=8)
        self.q4 = quantize_rowwise(self.fp32, bits=4)

    def qgemm_table(self, kind: str) -> Any:
        return {"fp32": self.fp32, "8-bit": self.q8, "4-bit": self.q4}[kind]


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
            fused = torch.from_numpy((tables.q8 if kind == "8-bit" else tables.q4).fused)
            op = (
                torch.ops.quantized.embedding_bag_byte_rowwise_offsets
                if kind == "8-bit"
                else torch.ops.quantized.embedding_bag_4bit_rowwise_offsets
            )

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
        q = tables.q8 if kind == "8-bit" else tables.q4
        op = (
            torch.ops.quantized.embedding_bag_byte_rowwise_offsets
            if kind == "8-bit"
            else torch.ops.quantized.embedding_bag_4bit_rowwise_offsets
        )
        want = op(torch.from_numpy(q.fused), ti, to, False, 0, False, None, None, False)
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
                target = 1.5 if kind == "4-bit" else 1.0
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
    return [main, _latency_table(torch, quick, progress)]


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
