"""A fixed mixed workload over qgemm's public ops, shared by the thread-stress, determinism and
leak tests.

Every op is a zero-argument callable over inputs built from a fixed seed, with shapes chosen so
that both the serial and the parallel kernels are exercised (the parallel thresholds come from
``qgemm._tuning``).  Run as a module it prints one SHA-256 per op of the result bytes
(``python -m tests._workload digest``) or runs the thread stress
(``python -m tests._workload stress SECONDS``) and prints a JSON summary.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from collections.abc import Callable

import numpy as np

import qgemm
from qgemm import _tuning

Op = Callable[[], object]


def _as_bytes(result: object) -> bytes:
    """Bytes of an op's result (arrays, or nested dicts of arrays / quantized tables)."""
    if isinstance(result, np.ndarray):
        return str(result.dtype).encode() + str(result.shape).encode() + result.tobytes()
    if isinstance(result, dict):
        return b"".join(k.encode() + _as_bytes(result[k]) for k in sorted(result))
    if isinstance(result, qgemm.RowwiseQuantizedTable):
        return _as_bytes(result.fused)
    if isinstance(result, qgemm.PackedWeight):
        return _as_bytes(result.dequantize())
    return np.asarray(result).tobytes()


def digest(result: object) -> str:
    return hashlib.sha256(_as_bytes(result)).hexdigest()


def build_ops(seed: int = 0) -> dict[str, Op]:
    """The workload: name -> zero-argument callable returning a fresh result."""
    rng = np.random.default_rng(seed)
    ops: dict[str, Op] = {}

    # GEMM: a small odd shape (serial) and one above every path's parallel_min_macs (parallel).
    k_big = 256
    m_big = max(1, _tuning.GEMM_PARALLEL_MIN_MACS // (k_big * k_big)) + 3
    w_small = rng.standard_normal((5, 33)).astype(np.float32)
    w_big = rng.standard_normal((k_big, k_big)).astype(np.float32)
    pw_small = qgemm.pack_weight(w_small)
    pw_big = qgemm.pack_weight(w_big)
    b_big = rng.standard_normal(k_big).astype(np.float32)
    x_small = rng.standard_normal((7, 33)).astype(np.float32)
    x_big = rng.standard_normal((m_big, k_big)).astype(np.float32)
    x_strided = rng.standard_normal((9, 66)).astype(np.float32)[:, ::2][:, :33]
    ops["linear_small"] = lambda: qgemm.linear(x_small, pw_small, relu=True)
    ops["linear_big"] = lambda: qgemm.linear(x_big, pw_big, b_big)
    ops["linear_strided"] = lambda: qgemm.linear(x_strided, pw_small)

    qp_big = qgemm.choose_qparams(x_big)
    xq_big = qgemm.quantize(x_big, qp_big)
    out_qp = qgemm.QParams(0.05, 3)
    ops["quantized_linear_f32"] = lambda: qgemm.quantized_linear(xq_big, qp_big, pw_big, b_big)
    ops["quantized_linear_u8"] = lambda: qgemm.quantized_linear(
        xq_big, qp_big, pw_big, b_big, relu=True, out_qparams=out_qp
    )
    ops["matmul_u8s8"] = lambda: qgemm.matmul_u8s8(xq_big, pw_big)

    # Embedding bags: float32 / float16 / 8- and 4-bit tables, above and below the threshold.
    rows, dim = 2000, 64
    table = rng.standard_normal((rows, dim)).astype(np.float32)
    t16 = table.astype(np.float16)
    t8 = qgemm.quantize_rowwise(table, bits=8)
    t4 = qgemm.quantize_rowwise(table[:, :37], bits=4)
    n_idx = max(4096, _tuning.EMBEDDING_PARALLEL_MIN_WORK // dim * 4)
    idx = rng.integers(0, rows, n_idx).astype(np.int64)
    offs = np.sort(rng.integers(0, n_idx, 127)).astype(np.int64)
    offs[0] = 0
    psw = rng.standard_normal(n_idx).astype(np.float32)
    idx_small = idx[:11].astype(np.int32)
    offs_small = np.array([0, 3, 3, 8], np.int32)
    ops["bag_f32_sum"] = lambda: qgemm.embedding_bag(table, idx, offs)
    ops["bag_f16_max"] = lambda: qgemm.embedding_bag(t16, idx, offs, mode="max")
    ops["bag_q8_weighted"] = lambda: qgemm.embedding_bag(t8, idx, offs, per_sample_weights=psw)
    ops["bag_q4_mean"] = lambda: qgemm.embedding_bag(t4, idx, offs, mode="mean")
    ops["bag_small"] = lambda: qgemm.embedding_bag(t8, idx_small, offs_small, mode="mean")

    # Averaging: in-memory list (multi kernel) and a generator (streaming), with int buffers.
    n_par = _tuning.AVERAGING_PARALLEL_MIN + 17
    models = [
        {
            "w": rng.standard_normal(n_par).astype(np.float32),
            "b": {"x": rng.standard_normal((3, 5)), "steps": np.array(10 + j)},
        }
        for j in range(3)
    ]
    weights = [1.0, 2.5, 0.5]
    ops["average_list"] = lambda: qgemm.average(models, weights)
    ops["average_stream"] = lambda: qgemm.average((m for m in models), iter(weights))
    small_models = [{"t": t8, "v": np.float32(j) + table[0]} for j in range(2)]
    ops["average_quantized"] = lambda: qgemm.average(small_models)

    # Quantize: above and below QUANTIZE_PARALLEL_MIN_ELEMS, per tensor and per channel.
    xq_src = rng.standard_normal((_tuning.QUANTIZE_PARALLEL_MIN_ELEMS // 64 + 5, 64))
    xq_src = xq_src.astype(np.float32)
    qp_t = qgemm.choose_qparams(xq_src)
    qp_c = qgemm.choose_qparams(xq_src, dtype="int8", symmetric=True, axis=1)
    ops["quantize_tensor"] = lambda: qgemm.quantize(xq_src, qp_t)
    ops["quantize_channel"] = lambda: qgemm.quantize(xq_src, qp_c)
    ops["quantize_small"] = lambda: qgemm.quantize(x_small, qgemm.choose_qparams(x_small))
    ops["quantize_rowwise"] = lambda: qgemm.quantize_rowwise(table[:300], bits=4)
    return ops


def digests(seed: int = 0) -> dict[str, str]:
    return {name: digest(op()) for name, op in build_ops(seed).items()}


def stress(seconds: float, n_threads: int = 8, seed: int = 0) -> dict:
    """``n_threads`` Python threads run the ops round-robin (each starting at a different op)
    for ``seconds`` while one more thread calls ``qgemm.cache_clear()``; every result is
    compared bit for bit with the answer computed first, serially, in this thread."""
    ops = build_ops(seed)
    names = sorted(ops)
    expected = {name: digest(ops[name]()) for name in names}
    calls = dict.fromkeys(names, 0)
    mismatches: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    clears = [0]
    start = threading.Barrier(n_threads + 1)

    def worker(t: int) -> None:
        start.wait()
        i = t
        while not stop.is_set():
            name = names[i % len(names)]
            i += 1
            try:
                got = digest(ops[name]())
            except Exception as exc:  # reported, then the test fails
                with lock:
                    errors.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            with lock:
                calls[name] += 1
                if got != expected[name]:
                    mismatches.append(name)

    def clearer() -> None:
        start.wait()
        while not stop.wait(0.05):
            qgemm.cache_clear()
            clears[0] += 1

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    threads.append(threading.Thread(target=clearer))
    for th in threads:
        th.start()
    time.sleep(seconds)
    stop.set()
    for th in threads:
        th.join()
    import numba

    return {
        "layer": numba.threading_layer(),
        "threads": qgemm.get_num_threads(),
        "calls": calls,
        "total_calls": sum(calls.values()),
        "cache_clears": clears[0],
        "mismatches": mismatches,
        "errors": errors[:20],
    }


if __name__ == "__main__":
    if sys.argv[1] == "digest":
        print(json.dumps(digests()))
    elif sys.argv[1] == "stress":
        print(json.dumps(stress(float(sys.argv[2]))))
    else:
        raise SystemExit(f"unknown command {sys.argv[1]!r}")
