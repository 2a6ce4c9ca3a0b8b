"""Benchmark of the int8 GEMM (``python -m qgemm bench --only gemm``; the asv suite
``asv_benchmarks/benchmarks/gemm.py`` uses the same helpers).

FBGEMM's own benchmark shapes (M, N, K), timed in one process with 2 threads, alternating
rounds with a pause between runtimes (:func:`qgemm.bench._timing.compare`), medians:

* static: :func:`qgemm.gemm.quantized_linear` (uint8 output, float bias, ReLU) vs torch's
  ``quantized::linear_relu`` (engine fbgemm) and ONNX Runtime's ``QLinearMatMul`` (MLAS; no
  bias/ReLU in that op, so it does less work);
* dynamic: :func:`qgemm.gemm.linear` (float in/out, bias) vs ``quantized::linear_dynamic`` and
  ORT's ``com.microsoft.DynamicQuantizeMatMul`` (with bias), and numpy float32 ``x @ w.T + b``;
* the int8 ceiling of this machine: the VNNI (or AVX2) register tile on L1-resident data, all
  threads -- large shapes are reported as a fraction of it;
* packing time vs torch's ``linear_prepack``, and kernel compile/load times;
* static with 7-bit activations (``choose_qparams(x, reduce_range=True)``: ``vpmaddubsw``
  cannot saturate, every runtime is exact);
* the fixed per-call cost at small batch (:func:`call_overhead`) and the fraction of weight
  pairs that could saturate ``vpmaddubsw`` (:func:`saturating_pairs`).

Activations are full-range uint8 (0..255) in the main static table: exact on every qgemm path
(on AVX2, qgemm's exact ``vpmaddwd`` path when the weights could saturate); torch's FBGEMM
and ORT's MLAS are exact only on VNNI CPUs -- on AVX2-only CPUs their ``vpmaddubsw``
saturates (up to 255 LSB off).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .. import _config
from ..gemm import linear, pack_weight, quantized_linear
from ..quantize import choose_qparams, quantize
from ._timing import Table, compare, geomean, peer_torch

SHAPES = [
    (1, 128, 512),
    (1, 1024, 256),
    (1, 4096, 1024),
    (6, 256, 1024),
    (6, 4096, 2048),
    (10, 2048, 256),
    (20, 4096, 1024),
    (102, 1024, 512),
    (102, 2323, 256),
    (1, 800, 3200),
    (16, 256, 1500),
    (64, 800, 320),
    (64, 768, 512),
    (128, 128, 128),
    (256, 512, 256),
    (1024, 1024, 1024),
]
QUICK_SHAPES = [(1, 128, 512), (6, 256, 1024), (64, 768, 512), (256, 512, 256)]
NAN = float("nan")


_torch = peer_torch


def _ort():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    return True


class Case:
    """Inputs of one shape, quantized for every runtime (same data everywhere)."""

    def __init__(self, m: int, n: int, k: int, seed: int = 0, reduce_range: bool = False):
        rng = np.random.default_rng(seed)
        self.shape = (m, n, k)
        self.w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
        self.bias = (rng.standard_normal(n) * 0.1).astype(np.float32)
        self.x = rng.standard_normal((m, k)).astype(np.float32)
        self.pw = pack_weight(self.w)
        # full-range uint8 activations (7-bit with reduce_range)
        self.xqp = choose_qparams(self.x, reduce_range=reduce_range)
        self.xq = quantize(self.x, self.xqp)
        y = np.maximum(self.x @ self.w.T + self.bias, 0)
        self.oqp = choose_qparams(y)
        self.out_u8 = np.empty((m, n), np.uint8)
        self.out_f32 = np.empty((m, n), np.float32)

    # qgemm -----------------------------------------------------------------------------
    def qgemm_static(self) -> Callable[[], Any]:
        pw, xq, xqp, b, oqp, out = self.pw, self.xq, self.xqp, self.bias, self.oqp, self.out_u8
        return lambda: quantized_linear(xq, xqp, pw, b, relu=True, out_qparams=oqp, out=out)

    def qgemm_dynamic(self) -> Callable[[], Any]:
        pw, x, b, out = self.pw, self.x, self.bias, self.out_f32
        return lambda: linear(x, pw, b, out=out)

    def numpy_f32(self) -> Callable[[], Any]:
        x, wt, b = self.x, np.ascontiguousarray(self.w.T), self.bias
        out = self.out_f32
        return lambda: np.add(np.matmul(x, wt, out=out), b, out=out)

    # torch -----------------------------------------------------------------------------
    def torch_packed(self, torch: Any) -> Any:
        if not hasattr(self, "_tpacked"):
            with warnings.catch_warnings():  # torch 2.13: quantized dtypes are deprecated
                warnings.simplefilter("ignore")
                qw = torch.quantize_per_channel(
                    torch.from_numpy(self.w),
                    torch.from_numpy(self.pw.scale.astype(np.float64)),
                    torch.zeros(self.shape[1], dtype=torch.int64),
                    0,
                    torch.qint8,
                )
            self._tqw = qw
            self._tpacked = torch.ops.quantized.linear_prepack(qw, torch.from_numpy(self.bias))
        return self._tpacked

    def torch_static(self, torch: Any) -> Callable[[], Any]:
        packed = self.torch_packed(torch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tx = torch._make_per_tensor_quantized_tensor(
                torch.from_numpy(self.xq), float(self.xqp.scale), int(self.xqp.zero_point)
            )
        s, z = float(self.oqp.scale), int(self.oqp.zero_point)
        op = torch.ops.quantized.linear_relu
        return lambda: op(tx, packed, s, z)

    def torch_dynamic(self, torch: Any) -> Callable[[], Any]:
        packed = self.torch_packed(torch)
        tx = torch.from_numpy(self.x)
        op = torch.ops.quantized.linear_dynamic
        return lambda: op(tx, packed, False)

    # ONNX Runtime ----------------------------------------------------------------------
    def _ort_node(self, op, feed_name, feed, out_type, inits, domain=""):
        """A one-node ONNX graph ``op(feed_name, *inits) -> y`` in an ORT session with qgemm's
        thread count; returns the timed call."""
        import onnxruntime as ort
        from onnx import TensorProto, helper

        m, n, _ = self.shape
        in_type = TensorProto.FLOAT if feed.dtype == np.float32 else TensorProto.UINT8
        node = helper.make_node(op, [feed_name, *(i.name for i in inits)], ["y"], domain=domain)
        graph = helper.make_graph(
            [node],
            op,
            [helper.make_tensor_value_info(feed_name, in_type, list(feed.shape))],
            [helper.make_tensor_value_info("y", out_type, [m, n])],
            inits,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
        )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = _config.get_num_threads()
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(
            model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
        inputs = {feed_name: feed}
        return lambda: sess.run(None, inputs)

    def ort_static(self) -> Callable[[], Any]:
        from onnx import TensorProto, numpy_helper

        n = self.shape[1]
        codes = self.pw.unpack()
        inits = [
            numpy_helper.from_array(np.asarray(self.xqp.scale, np.float32), "a_scale"),
            numpy_helper.from_array(np.asarray(self.xqp.zero_point, np.uint8), "a_zp"),
            numpy_helper.from_array(np.ascontiguousarray(codes.T), "b"),
            numpy_helper.from_array(self.pw.scale.astype(np.float32), "b_scale"),
            numpy_helper.from_array(np.zeros(n, np.int8), "b_zp"),
            numpy_helper.from_array(np.asarray(self.oqp.scale, np.float32), "y_scale"),
            numpy_helper.from_array(np.asarray(self.oqp.zero_point, np.uint8), "y_zp"),
        ]
        return self._ort_node("QLinearMatMul", "a", self.xq, TensorProto.UINT8, inits)

    def ort_dynamic(self) -> Callable[[], Any]:
        from onnx import TensorProto, numpy_helper

        n = self.shape[1]
        codes = self.pw.unpack()
        inits = [
            numpy_helper.from_array(np.ascontiguousarray(codes.T), "b"),
            numpy_helper.from_array(self.pw.scale.astype(np.float32), "b_scale"),
            numpy_helper.from_array(np.zeros(n, np.int8), "b_zp"),
            numpy_helper.from_array(self.bias, "bias"),
        ]
        return self._ort_node(
            "DynamicQuantizeMatMul", "x", self.x, TensorProto.FLOAT, inits, "com.microsoft"
        )


def int8_ceiling(seconds: float = 0.3) -> float:
    """GOPS (2 ops per multiply-add) of this machine's int8 register tile on L1-resident data,
    all qgemm threads: the VNNI 6x64 tile, or the AVX2 4x16 tile (``vpmaddubsw``)."""
    from .._kernels.gemm import ceiling_kernel

    variant, tile = _config.isa_path().ceiling
    mr, nv, nr = tile.mr, tile.nv, tile.nr
    kern = ceiling_kernel((variant, mr, nv, nr))
    threads = _config.sync_threads()
    kg = 64
    a = np.ones((mr, 4 * kg), np.uint8)
    b = np.ones(kg * nr * 4, np.int8)
    kern(a, b, kg, 10, threads)
    reps = 200
    while True:
        t0 = time.perf_counter()
        kern(a, b, kg, reps, threads)
        dt = time.perf_counter() - t0
        if dt > seconds:
            break
        reps *= 4
    best = dt
    for _ in range(2):
        t0 = time.perf_counter()
        kern(a, b, kg, reps, threads)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * threads * reps * mr * nr * 4 * kg / best / 1e9


def pack_times(shapes: Sequence[tuple[int, int, int]], torch: Any) -> Table:
    """Pack time of qgemm vs torch's ``linear_prepack`` (quantized weight given)."""
    rows = []
    for m, n, k in shapes:
        c = Case(m, n, k)
        codes = c.pw.unpack()
        qp = c.pw.qparams
        t_q = _median(lambda codes=codes, qp=qp: pack_weight(codes, qparams=qp))
        t_f = _median(lambda c=c: pack_weight(c.w))
        if torch is not None:
            c.torch_packed(torch)
            qw = c._tqw
            b = torch.from_numpy(c.bias)
            t_t = _median(lambda qw=qw, b=b: torch.ops.quantized.linear_prepack(qw, b))
        else:
            t_t = NAN
        rows.append([f"{n}x{k}", t_q * 1e3, t_f * 1e3, t_t * 1e3, t_t / t_q])
    return Table(
        "GEMM weight packing (ms)",
        ["N x K", "qgemm int8", "qgemm float32 (+quantize)", "torch prepack", "vs torch"],
        rows,
        ["torch prepack is given an already quantized qint8 tensor, like 'qgemm int8'"],
    )


def _best(fn: Callable[[], Any], reps: int = 2000, repeat: int = 5) -> float:
    """Best-of-``repeat`` seconds per call over ``reps`` back-to-back calls."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def call_overhead(
    shapes: Sequence[tuple[int, int, int]] = ((1, 128, 512), (16, 128, 512)),
) -> Table:
    """Where the time of a small-batch call goes: the public call, the compiled kernel called
    directly (no validation, plan or stage look-up), and the kernel with ``M = 0`` (dispatch
    of its arguments + its fixed set-up: bias check, operand lowering, scratch).  The
    difference kernel - kernel(M=0) is the arithmetic (incl. activation quantization)."""
    from .. import gemm as _g

    rows = []
    for m, n, k in shapes:
        c = Case(m, n, k)
        pw = c.pw
        a: np.ndarray
        out: np.ndarray
        for kind in ("dynamic", "requant"):
            if kind == "dynamic":
                call = c.qgemm_dynamic()
                seven = _g._plan(kind, m, pw, False).seven  # linear(reduce_range=None)'s choice
                stage = _g._stage(pw, kind, bias=c.bias, x_qmax=127 if seven else 255)
                a, out = c.x, c.out_f32
            else:
                call = c.qgemm_static()
                stage = _g._stage(pw, kind, c.xqp, c.oqp, c.bias, True)
                a, out = c.xq, c.out_u8
            call()
            plan = _g._plan(kind, m, pw, False)
            head = (*plan.head, *stage, plan.nchunks)
            args = (a, m, k, *head, 1, out)
            args0 = (a[:0], 0, k, *head, 1, out[:0])
            t_call = _best(call)
            kern = plan.ser if plan.ser is not None else _g.gemm_kernel(plan.ser_key)

            def full(kern: Any = kern, args: tuple = args) -> Any:
                return kern(*args)

            def empty(kern: Any = kern, args: tuple = args0) -> Any:
                return kern(*args)

            t_kern = _best(full)
            t_zero = _best(empty)
            us = [t_call * 1e6, t_kern * 1e6, t_zero * 1e6]
            rows.append([f"{m}x{n}x{k}", kind, *us, us[0] - us[1], us[1] - us[2]])
    return Table(
        "GEMM per-call cost at small batch (us, serial kernel, best of 5)",
        ["M x N x K", "kind", "call", "kernel", "kernel M=0", "wrapper", "arithmetic"],
        rows,
        ["wrapper = validation + plan/stage look-up; kernel M=0 = argument dispatch + set-up"],
    )


def saturating_pairs() -> Table:
    """Fraction of int8 weight pairs ``(k, k + 1)`` with ``255 * (|w0| + |w1|) > 32767`` (those
    that could saturate ``vpmaddubsw``), and of 16-column tiles holding at least one, for
    per-channel symmetric weights (:func:`qgemm.pack_weight`) of a few distributions."""
    from ..models import DLRM

    rng = np.random.default_rng(0)
    mats = [
        ("gaussian 256x512", rng.standard_normal((256, 512))),
        ("gaussian 1024x1024", rng.standard_normal((1024, 1024))),
        ("uniform (nn.Linear init) 256x512", rng.uniform(-1, 1, (256, 512))),
    ]
    dlrm = DLRM.random(tables=1, rows=8, dim=64, bottom=(13, 512, 256, 64), top=(512, 256, 1))
    for w, _ in dlrm.bottom + dlrm.top:
        w = np.asarray(w)
        mats.append((f"DLRM.random layer {w.shape[0]}x{w.shape[1]}", w))
    rows = []
    for label, w in mats:
        codes = pack_weight(np.asarray(w, np.float32)).unpack().astype(np.int64)
        n, k = codes.shape
        pairs = np.abs(codes[:, : k - k % 2]).reshape(n, -1, 2).sum(axis=-1)
        sat = 255 * pairs > 32767
        tiles = sat[: n - n % 16].reshape(-1, 16, sat.shape[1]).any(axis=1)
        rows.append([label, 100 * sat.mean(), 100 * tiles.mean() if tiles.size else NAN])
    return Table(
        "int8 weight pairs that could saturate vpmaddubsw (per-channel symmetric), %",
        ["weights", "pairs", "16-column tiles with one"],
        rows,
    )


def _median(fn, n: int = 5) -> float:
    fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def compile_times() -> Table:
    """Import + first ``pack_weight`` + ``quantized_linear`` + ``linear`` call in a fresh
    process: cold (empty Numba cache directory: compiles the packing, quantize and two GEMM
    kernels) and warm (loads them from the on-disk cache), measured in subprocesses."""
    import os
    import subprocess
    import sys
    import tempfile

    code = (
        "import time, numpy as np; t0 = time.perf_counter();"
        "from qgemm.gemm import pack_weight, linear, quantized_linear;"
        "from qgemm.quantize import QParams;"
        "pw = pack_weight(np.ones((64, 64), np.float32));"
        "quantized_linear(np.ones((1, 64), np.uint8), QParams(0.1, 3), pw, "
        "out_qparams=QParams(0.1, 3)); linear(np.ones((1, 64), np.float32), pw);"
        "print(time.perf_counter() - t0)"
    )
    rows = []
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, QGEMM_CACHE_DIR=d, NUMBA_CACHE_DIR=d)
        for label in ("cold (empty cache)", "warm disk cache"):
            r = subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
            )
            try:
                rows.append([label, float(r.stdout.strip().splitlines()[-1])])
            except (ValueError, IndexError):
                rows.append([label, NAN])
    return Table(
        "GEMM first-call time in a fresh process (s, incl. import: pack + requant + dynamic)",
        ["case", "seconds"],
        rows,
    )


def run(*, quick: bool = False, progress: Any = None) -> list[Table]:
    shapes = QUICK_SHAPES if quick else SHAPES
    rounds = 2 if quick else 3
    torch = _torch()
    ort = _ort()
    if progress is not None and hasattr(progress, "total"):
        progress.total = len(shapes) + 3
    ceiling = int8_ceiling()
    if progress is not None:
        progress.step("int8 ceiling")
    static_rows, dyn_rows, s7_rows = [], [], []
    r_fb_s, r_ort_s, r_fb_d, r_ort_d, small_fb, small_ort = [], [], [], [], [], []
    r_fb_7, r_ort_7 = [], []
    for m, n, k in shapes:
        c = Case(m, n, k)
        ops = 2.0 * m * n * k
        cont = {"qgemm": c.qgemm_static()}
        if torch is not None:
            cont["fbgemm"] = c.torch_static(torch)
        if ort:
            cont["ort"] = c.ort_static()
        ts = compare(cont, rounds=rounds)
        tq = ts["qgemm"]
        tf = ts.get("fbgemm", NAN)
        to = ts.get("ort", NAN)
        static_rows.append(
            [
                f"{m}x{n}x{k}",
                tq * 1e6,
                tf * 1e6,
                to * 1e6,
                tf / tq,
                to / tq,
                ops / tq / 1e9,
                ops / tq / 1e9 / ceiling,
            ]
        )
        r_fb_s.append(tf / tq)
        r_ort_s.append(to / tq)
        if m <= 6:
            small_fb.append(tf / tq)
            small_ort.append(to / tq)
        cont = {"qgemm": c.qgemm_dynamic(), "numpy f32": c.numpy_f32()}
        if torch is not None:
            cont["fbgemm"] = c.torch_dynamic(torch)
        if ort:
            cont["ort"] = c.ort_dynamic()
        ts = compare(cont, rounds=rounds)
        tq = ts["qgemm"]
        tf = ts.get("fbgemm", NAN)
        to = ts.get("ort", NAN)
        tn = ts["numpy f32"]
        dyn_rows.append(
            [f"{m}x{n}x{k}", tq * 1e6, tf * 1e6, to * 1e6, tn * 1e6, tf / tq, to / tq, tn / tq]
        )
        r_fb_d.append(tf / tq)
        r_ort_d.append(to / tq)
        c7 = Case(m, n, k, reduce_range=True)
        cont = {"qgemm": c7.qgemm_static()}
        if torch is not None:
            cont["fbgemm"] = c7.torch_static(torch)
        if ort:
            cont["ort"] = c7.ort_static()
        ts = compare(cont, rounds=rounds)
        tq, tf, to = ts["qgemm"], ts.get("fbgemm", NAN), ts.get("ort", NAN)
        s7_rows.append([f"{m}x{n}x{k}", tq * 1e6, tf * 1e6, to * 1e6, tf / tq, to / tq])
        r_fb_7.append(tf / tq)
        r_ort_7.append(to / tq)
        if progress is not None:
            progress.step(f"{m}x{n}x{k}")
    isa = _config.get_isa()
    threads = _config.get_num_threads()
    static = Table(
        f"GEMM static: quantized_linear (u8 out, bias, ReLU) vs FBGEMM linear_relu / ORT "
        f"QLinearMatMul, us ({isa}, {threads} threads)",
        ["M x N x K", "qgemm", "fbgemm", "ort", "vs fbgemm", "vs ort", "GOPS", "of ceiling"],
        static_rows,
        [
            f"int8 ceiling of this machine ({isa} register tile, L1-resident, {threads} "
            f"threads): {ceiling:.0f} GOPS",
            f"geomean vs fbgemm {geomean(r_fb_s):.2f}x, vs ort {geomean(r_ort_s):.2f}x; "
            f"M <= 6: min vs fbgemm {min(small_fb, default=NAN):.2f}x, "
            f"min vs ort {min(small_ort, default=NAN):.2f}x",
            "ratios > 1: qgemm faster (peer time / qgemm time, same run, medians)",
        ],
    )
    dynamic = Table(
        "GEMM dynamic: linear (float in/out, bias) vs FBGEMM linear_dynamic / ORT "
        "DynamicQuantizeMatMul / numpy float32, us",
        ["M x N x K", "qgemm", "fbgemm", "ort", "numpy f32", "vs fbgemm", "vs ort", "vs numpy"],
        dyn_rows,
        [f"geomean vs fbgemm {geomean(r_fb_d):.2f}x, vs ort {geomean(r_ort_d):.2f}x"],
    )
    static7 = Table(
        f"GEMM static, 7-bit activations (reduce_range): quantized_linear vs FBGEMM linear_relu "
        f"/ ORT QLinearMatMul, us ({isa}, {threads} threads)",
        ["M x N x K", "qgemm", "fbgemm", "ort", "vs fbgemm", "vs ort"],
        s7_rows,
        [f"geomean vs fbgemm {geomean(r_fb_7):.2f}x, vs ort {geomean(r_ort_7):.2f}x"],
    )
    tables = [static, dynamic, static7, call_overhead(), saturating_pairs()]
    pack_shapes = [(1, 128, 128), (1, 1024, 1024)]
    if not quick:
        pack_shapes += [(1, 4096, 1024), (1, 4096, 2048)]
    tables.append(pack_times(pack_shapes, torch))
    if progress is not None:
        progress.step("pack")
    tables.append(compile_times())
    if progress is not None:
        progress.step("compile")
    return tables
