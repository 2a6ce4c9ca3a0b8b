"""Benchmark of :func:`qgemm.average` (``python -m qgemm bench --only averaging``; the asv suite
``asv_benchmarks/benchmarks/averaging.py`` uses the same helpers).

The case of the issue: 8 models of ~50M float32 parameters, streamed through a generator, vs
the plain numpy loop over dicts a user would write (float64 accumulation, the same accuracy),
and -- for information -- the numpy loop with a float32 accumulator (less accurate, less
memory traffic).  Throughput is reported against this machine's measured read bandwidth:

* *model GB/s* = bytes of the models read / time (what the issue's target refers to);
* *traffic GB/s* = all bytes the streaming algorithm must move / time: per parameter, 4 (read
  the model) + 8 + 8 (read and write the float64 accumulator) for every model after the
  first, 4 + 8 for the first, 8 + 4 for the final division.  A single-pass-per-model
  streaming average cannot avoid this traffic, so model GB/s is bounded by about
  read-bandwidth x 4 / 20.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numba
import numpy as np
from numba import prange

from ._timing import Table, compare

N_MODELS = 8
N_PARAMS = 50_000_000


def layout(n_params: int = N_PARAMS) -> dict[str, tuple[int, ...]]:
    """A DLRM-like parameter layout of about ``n_params`` float32 parameters: one large
    embedding table (80%), an MLP, biases."""
    dim = 40
    rows = max(1, int(n_params * 0.8) // dim)
    rest = max(0, n_params - rows * dim)
    h = max(1, int((rest / 3) ** 0.5))
    k2 = max(1, (rest - 2 * h * h - 2 * h) // h) if rest > 2 * h * h + 2 * h else 1
    return {
        "embedding.weight": (rows, dim),
        "mlp.0.weight": (2 * h, h),
        "mlp.0.bias": (2 * h,),
        "mlp.1.weight": (k2, h),
        "mlp.1.bias": (k2,),
    }


def n_params_of(lay: dict[str, tuple[int, ...]]) -> int:
    return int(sum(np.prod(s) for s in lay.values()))


def make_model(lay: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """One model: float32 arrays, values depending on ``seed`` (cheap to generate)."""
    return {
        k: np.full(s, np.float32(seed + 1) * np.float32(0.5), np.float32) for k, s in lay.items()
    }


def pooled_models(pool: list[dict[str, np.ndarray]], n: int) -> Iterator[dict[str, np.ndarray]]:
    """``n`` models taken in turn from ``pool``, through a generator (for timing without the
    cost of making models; with buffers far larger than the last-level cache, re-reading a
    pooled model costs the same memory traffic as reading a new one)."""
    for i in range(n):
        yield pool[i % len(pool)]


def fresh_models(lay: dict[str, tuple[int, ...]], n: int) -> Iterator[dict[str, np.ndarray]]:
    """``n`` freshly generated models, one at a time (for peak-memory measurements)."""
    for i in range(n):
        yield make_model(lay, i)


def numpy_average(models: Any, weights: Any = None) -> dict[str, np.ndarray]:
    """The plain numpy loop over dicts: float64 accumulator, ``acc[k] += w * v``."""
    acc: dict[str, np.ndarray] | None = None
    dtypes: dict[str, Any] = {}
    total = 0.0
    ws = iter(weights) if weights is not None else None
    for m in models:
        w = 1.0 if ws is None else float(next(ws))
        if acc is None:
            acc = {k: w * v.astype(np.float64) for k, v in m.items()}
            dtypes = {k: v.dtype for k, v in m.items()}
        else:
            for k, v in m.items():
                acc[k] += w * v
        total += w
    assert acc is not None
    return {k: (a / total).astype(dtypes[k]) for k, a in acc.items()}


def numpy_average_f32(models: Any) -> dict[str, np.ndarray]:
    """The numpy loop with a float32 accumulator (cheaper, less accurate)."""
    acc: dict[str, np.ndarray] | None = None
    n = 0
    for m in models:
        if acc is None:
            acc = {k: v.copy() for k, v in m.items()}
        else:
            for k, v in m.items():
                acc[k] += v
        n += 1
    assert acc is not None
    return {k: a / np.float32(n) for k, a in acc.items()}


def traffic_bytes(n_params: int, n_models: int, itemsize: int = 4) -> int:
    """Bytes a streaming float64-accumulating average must move (see the module docstring)."""
    first = itemsize + 8
    rest = (n_models - 1) * (itemsize + 16)
    final = 8 + itemsize
    return n_params * (first + rest + final)


@numba.njit(fastmath=True, nogil=True, cache=True)
def _sum_serial(a):
    # one thread, vectorised (fastmath lets LLVM reassociate the reduction)
    t = np.float32(0)
    for i in range(a.size):
        t += a[i]
    return t


@numba.njit(parallel=True, nogil=True)  # not cacheable: it calls another dispatcher
def _sum_parallel(a):
    nt = numba.get_num_threads()
    n = a.size
    part = np.zeros(nt)
    for c in prange(nt):
        part[c] = _sum_serial(a[c * n // nt : (c + 1) * n // nt])
    return part.sum()


def measure_read_bandwidth(nbytes: int = 1 << 30, repeat: int = 7) -> dict[str, float]:
    """Read bandwidth of this machine in GB/s: sums over a ``nbytes`` float32 array (much
    larger than the caches) -- numba parallel, numba one thread (vectorised, fastmath), numpy.
    ``"best"`` is the highest of the medians."""
    from .._config import sync_threads

    sync_threads()
    a = np.ones(nbytes // 4, np.float32)
    fns = {
        "numba_parallel": lambda: _sum_parallel(a),
        "numba_1thread": lambda: _sum_serial(a),
        "numpy": lambda: a.sum(),
    }
    out: dict[str, float] = {}
    for name, fn in fns.items():
        fn()
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        out[name] = a.nbytes / float(np.median(ts)) / 1e9
    out["best"] = max(out.values())
    return out


def _proc_status_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"{field_name} not in /proc/self/status")


def measure_peak_bytes(fn: Any) -> int | None:
    """Peak resident memory added while ``fn()`` runs, in bytes (Linux: resets the
    high-water mark through ``/proc/self/clear_refs``); ``None`` where unsupported."""
    import gc

    try:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _proc_status_kb("VmRSS")
        res = fn()
        peak = _proc_status_kb("VmHWM")
    except OSError:
        return None
    del res
    return (peak - base) * 1024


def run(quick: bool = False, progress: Any = None) -> list[Table]:
    """The averaging table for ``python -m qgemm bench``."""
    import qgemm.averaging as qa

    n_params = N_PARAMS // 10 if quick else N_PARAMS
    lay = layout(n_params)
    n_params = n_params_of(lay)
    pool = [make_model(lay, i) for i in range(N_MODELS)]
    weights = [float(i + 1) for i in range(N_MODELS)]
    contenders = {
        "qgemm, generator": lambda: qa.average(pooled_models(pool, N_MODELS), weights),
        "qgemm, list": lambda: qa.average(pool, weights),
        "numpy": lambda: numpy_average(pooled_models(pool, N_MODELS), weights),
        "numpy, f32 acc": lambda: numpy_average_f32(pooled_models(pool, N_MODELS)),
    }
    times = compare(contenders, rounds=2 if quick else 3, min_time=0.0, repeat=3)
    if progress is not None:
        progress.step("average")
    bw = measure_read_bandwidth(nbytes=(1 << 28) if quick else (1 << 30))
    if progress is not None:
        progress.step("read bandwidth")
    one_model = n_params * 4
    peaks = {
        "qgemm, generator": measure_peak_bytes(
            lambda: qa.average(fresh_models(lay, N_MODELS), weights)
        ),
        "numpy": measure_peak_bytes(lambda: numpy_average(fresh_models(lay, N_MODELS), weights)),
    }
    model_bytes = N_MODELS * n_params * 4
    traffic = {
        "qgemm, generator": traffic_bytes(n_params, N_MODELS),
        "qgemm, list": n_params * (N_MODELS * 4 + 4),
        "numpy": traffic_bytes(n_params, N_MODELS),
        "numpy, f32 acc": n_params * (8 + (N_MODELS - 1) * 12 + 8),
    }
    rows = []
    for name, t in times.items():
        rows.append(
            [
                name,
                t * 1e3,
                times["numpy"] / t,
                model_bytes / t / 1e9,
                traffic[name] / t / 1e9,
                model_bytes / t / 1e9 / bw["best"],
            ]
        )
    notes = [
        f"{N_MODELS} models x {n_params / 1e6:.1f}M float32 params, weights 1..{N_MODELS}; "
        "generator: streamed one model at a time (peak = float64 accumulator + one model); "
        "list: all models in memory, one pass (no accumulator)",
        f"read bandwidth (sum over a {(1 << 28 if quick else 1 << 30) >> 20} MiB array): "
        + ", ".join(f"{k} {v:.1f} GB/s" for k, v in bw.items()),
        "traffic: generator/numpy 4 B model read + 16 B float64 accumulator read/write per "
        "param per model, so model GB/s <= ~read BW x 4/20; list: 4 B per param per model + "
        "4 B result",
        "numpy, f32 acc accumulates in float32 (less accurate; shown for reference)",
        "peak memory over the baseline, models made one at a time by a generator, in units of "
        f"(float64 accumulator + one model = {3 * one_model / 1e6:.0f} MB): "
        + ", ".join(
            f"{k} {v / (3 * one_model):.2f}" if v is not None else f"{k} n/a"
            for k, v in peaks.items()
        ),
    ]
    return [
        Table(
            title="Model averaging (qgemm.average vs numpy loop over dicts)",
            columns=["impl", "ms", "× vs numpy", "model GB/s", "traffic GB/s", "model/read BW"],
            rows=rows,
            notes=notes,
        )
    ]
