"""Benchmark of the float16 / bfloat16-weight GEMM (``python -m qgemm bench --only gemm_half``).

FBGEMM's benchmark shapes (M, N, K), timed in one process, alternating rounds with a pause
between runtimes (:func:`qgemm.bench._timing.compare`), medians, float32 activations with a
float32 bias:

* qgemm: :func:`qgemm._half.linear_half` with float16 and with bfloat16 weights;
* torch: ``quantized::linear_dynamic_fp16`` on engine fbgemm (FBGEMM's ``FbgemmFP16``,
  the op behind ``torch.ao.nn.quantized.dynamic.Linear`` with ``dtype=torch.float16``);
* numpy float32 ``x @ w.T + b`` (BLAS sgemm/sgemv on float32 weights: twice the bytes).

Targets (issue 15): >= 1.2x torch's fp16 linear (geomean), >= 1.5x numpy float32 at M <= 16.
A second table runs the forced-portable path on the quick shapes.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .. import _config
from .._half import linear_half, pack_weight_half
from ._timing import Table, compare, geomean, peer_torch
from .gemm import SHAPES as FBGEMM_SHAPES

SHAPES = FBGEMM_SHAPES  # FBGEMM's 16 benchmark shapes, one list for every GEMM suite
QUICK_SHAPES = [(1, 128, 512), (6, 256, 1024), (16, 256, 1500), (64, 768, 512)]
NAN = float("nan")
TARGET_TORCH = 1.2
TARGET_NUMPY_SMALL = 1.5


class Case:
    """Inputs of one shape (the same data for every runtime) and its contenders."""

    def __init__(self, m: int, n: int, k: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.shape = (m, n, k)
        self.w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
        self.wt = np.ascontiguousarray(self.w.T)
        self.b = (rng.standard_normal(n) * 0.1).astype(np.float32)
        self.x = rng.standard_normal((m, k)).astype(np.float32)
        self.out = np.empty((m, n), np.float32)
        self.p16 = pack_weight_half(self.w, "float16")
        self.pbf = pack_weight_half(self.w, "bfloat16")

    def qgemm(self, packed) -> Any:
        x, b, out = self.x, self.b, self.out
        return lambda: linear_half(x, packed, bias=b, out=out)

    def numpy_f32(self) -> Any:
        x, wt, b = self.x, self.wt, self.b
        return lambda: np.add(x @ wt, b)

    def torch_fp16(self, torch) -> Any:
        packed = torch.ops.quantized.linear_prepack_fp16(
            torch.from_numpy(self.w), torch.from_numpy(self.b)
        )
        xt = torch.from_numpy(self.x)
        op = torch.ops.quantized.linear_dynamic_fp16

        def call():
            with torch.no_grad():
                return op(xt, packed)

        return call


def _row(case: Case, torch, rounds: int) -> tuple[list[Any], float, float, float]:
    m, n, k = case.shape
    cont = {
        "fp16": case.qgemm(case.p16),
        "bf16": case.qgemm(case.pbf),
        "numpy": case.numpy_f32(),
    }
    if torch is not None:
        cont["torch"] = case.torch_fp16(torch)
    ts = compare(cont, rounds=rounds)
    tq, tb, tn = ts["fp16"], ts["bf16"], ts["numpy"]
    tt = ts.get("torch", NAN)
    gflops = 2.0 * m * n * k / tq / 1e9
    row = [f"{m}x{n}x{k}", tq * 1e6, tb * 1e6, tt * 1e6, tn * 1e6, tt / tq, tn / tq, gflops]
    return row, tt / tq, tn / tq, tn / tb


def run(*, quick: bool = False, progress: Any = None) -> list[Table]:
    """The half-weight GEMM tables: native path on every shape, forced portable on a few."""
    shapes = QUICK_SHAPES if quick else SHAPES
    rounds = 2 if quick else 3
    torch = peer_torch()
    if progress is not None and hasattr(progress, "total"):
        progress.total = len(shapes) + len(QUICK_SHAPES[:2]) + 1
    t0 = time.perf_counter()
    for wt in ("float16", "bfloat16"):  # compile (or load) outside the timings
        c = Case(2, 20, 8)
        c.qgemm(c.p16 if wt == "float16" else c.pbf)()
    compile_s = time.perf_counter() - t0
    if progress is not None:
        progress.step("compile")
    isa = _config.get_isa()
    threads = _config.get_num_threads()
    rows, vs_torch, vs_np_small, short = [], [], [], []
    for m, n, k in shapes:
        row, r_t, r_n, r_nb = _row(Case(m, n, k), torch, rounds)
        rows.append(row)
        vs_torch.append(r_t)
        if m <= 16:
            vs_np_small.append(r_n)
            if r_n < TARGET_NUMPY_SMALL:
                short.append(f"{row[0]} vs numpy {r_n:.2f}x")
        if r_t == r_t and r_t < TARGET_TORCH:
            short.append(f"{row[0]} vs torch {r_t:.2f}x")
        if progress is not None:
            progress.step(row[0])
    cols = ["M x N x K", "qgemm fp16", "qgemm bf16", "torch fp16", "numpy f32", "vs torch",
            "vs numpy", "GFLOPS"]  # fmt: skip
    notes = [
        f"geomean vs torch fp16 {geomean(vs_torch):.2f}x (target {TARGET_TORCH}x); "
        f"M <= 16 vs numpy f32: geomean {geomean(vs_np_small):.2f}x, "
        f"min {min(vs_np_small, default=NAN):.2f}x (target {TARGET_NUMPY_SMALL}x)",
        "ratios > 1: qgemm fp16 faster (peer time / qgemm time, same run, medians)",
        f"kernel compile/load before timing: {compile_s:.2f} s",
        "short of target: " + (", ".join(short) if short else "none"),
    ]
    if torch is None:
        notes.append("torch not installed: no fbgemm column")
    tables = [
        Table(
            f"GEMM float16/bfloat16 weights: linear_half (float in/out, bias) vs torch "
            f"linear_dynamic_fp16 / numpy float32, us ({isa}, {threads} threads)",
            cols,
            rows,
            notes,
        )
    ]
    if isa != "portable":
        prow = []
        old = _config.set_isa("portable")
        try:
            for m, n, k in QUICK_SHAPES[:2]:
                row, *_ = _row(Case(m, n, k), torch, 2 if quick else rounds)
                prow.append(row)
                if progress is not None:
                    progress.step(f"portable {row[0]}")
        finally:
            _config.set_isa(old)
        tables.append(
            Table(
                "GEMM float16/bfloat16 weights, forced portable path (QGEMM_ISA=portable), us",
                cols,
                prow,
                ["portable: scalar half->float widening into an L1 block, plain Numba loops"],
            )
        )
    return tables
