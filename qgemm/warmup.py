"""Compile ahead of time: ``qgemm.warmup()`` and ``python -m qgemm warmup [--ops ...]``.

Each *op group* is a small recipe that calls the public ops at the shapes and options that
select every kernel a workload needs (serial and parallel twins, each output kind and panel
width, every table format).  The groups run in worker subprocesses -- Numba compiles one
function at a time per process and holds the GIL while it does, so processes are the way to
use several cores -- with ``QGEMM_JIT=eager`` and this process's disk cache folder; the
kernels land in the disk cache and any later process (or this one) loads them in milliseconds.
A deployment runs it once at image build time.

Groups: ``gemm``, ``embedding``, ``quantize``, ``averaging``, ``dlrm`` and ``main`` (the kernels
of ``python -m qgemm``).  ``warmup(model)`` warms the kernels of one :class:`~qgemm.DLRM`
(through a small stand-in with the same layer sizes and table format).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["OPS", "warmup", "run_group"]

OPS = ("gemm", "embedding", "quantize", "averaging", "dlrm", "main")
"""Op groups :func:`warmup` knows (``"main"``: everything ``python -m qgemm`` compiles)."""

_PAR_BATCH = 2048  # big enough that every layer of the default models takes its parallel twin


def _gemm() -> None:
    import numpy as np

    import qgemm

    rng = np.random.default_rng(0)
    for n in (8, 40):  # panel widths 16 and 64
        w = rng.standard_normal((n, 300)).astype(np.float32)
        pw = qgemm.pack_weight(w)
        b = rng.standard_normal(n).astype(np.float32)
        for m in (1, _PAR_BATCH):
            x = rng.standard_normal((m, 300)).astype(np.float32)
            qp = qgemm.choose_qparams(x)
            xq = qgemm.quantize(x, qp)
            for sat in (False, True):
                qgemm.linear(x, pw, bias=b, relu=True, saturate=sat)
                qgemm.quantized_linear(xq, qp, pw, bias=b, saturate=sat)
                qgemm.quantized_linear(xq, qp, pw, bias=b, out_qparams=qp, saturate=sat)
                qgemm.matmul_u8s8(xq, pw, saturate=sat)


def _quantize() -> None:
    import numpy as np

    import qgemm

    x = np.random.default_rng(0).standard_normal((300, 64)).astype(np.float32)
    for bits in (8, 4, 2):
        qgemm.quantize_rowwise(x, bits=bits)
        qgemm.quantize_rowwise(x.astype(np.float16), bits=bits)
    qp = qgemm.choose_qparams(x)
    qgemm.dequantize(qgemm.quantize(x, qp), qp)


def _embedding() -> None:
    import numpy as np

    import qgemm

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 64)).astype(np.float32)
    tables: list[Any] = [x, x.astype(np.float16)]
    tables += [qgemm.quantize_rowwise(x, bits=b) for b in (8, 4, 2)]
    for dt in (np.int64, np.int32):
        idx = rng.integers(0, 300, 4000).astype(dt)
        off = np.arange(0, 4000, 20).astype(dt)
        for t in tables:
            for mode in ("sum", "mean"):
                qgemm.embedding_bag(t, idx, off, mode=mode)
                qgemm.embedding_bag(t, idx[:40], off[:2], mode=mode)


def _averaging() -> None:
    import numpy as np

    import qgemm

    rng = np.random.default_rng(0)
    for n in (10, 300_000):
        models = [{"w": rng.standard_normal(n).astype(np.float32)} for _ in range(3)]
        qgemm.average(models)


def _dlrm_like(spec: dict[str, Any]) -> None:
    import qgemm

    model = qgemm.DLRM.random(
        tables=spec["tables"],
        rows=spec["rows"],
        dim=spec["dim"],
        bottom=spec["bottom"],
        top=spec["top"],
        self_interaction=spec.get("self_interaction", False),
        seed=0,
    )
    models = [model]
    if spec.get("bits"):
        models = [model.quantize(bits=spec["bits"])]
        if spec.get("float", True):
            models.append(model)
    for batch in (1, _PAR_BATCH):
        dense, idx, off = model.random_inputs(batch, pooling=spec.get("pooling", 20), seed=1)
        for m in models:
            m.predict(dense, idx, off)


_MAIN = {"tables": 8, "rows": 1000, "dim": 64, "bottom": [13, 512, 256, 64], "top": [512, 256, 1]}


def _main() -> None:
    _dlrm_like({**_MAIN, "bits": 8})


def _dlrm() -> None:
    small = {"tables": 3, "rows": 100, "dim": 16, "bottom": [5, 32, 16], "top": [32, 1]}
    for bits in (8, 4, 2):
        _dlrm_like({**small, "bits": bits, "float": bits == 8})


_GROUPS: dict[str, Callable[[], None]] = {
    "gemm": _gemm,
    "embedding": _embedding,
    "quantize": _quantize,
    "averaging": _averaging,
    "dlrm": _dlrm,
    "main": _main,
}


def run_group(name: str, spec: str | None = None) -> None:
    """Run one op group in this process (what each worker subprocess does)."""
    if name == "model":
        _dlrm_like(json.loads(spec or "{}"))
        return
    _GROUPS[name]()


def model_spec(model: Any) -> dict[str, Any]:
    """The stand-in of ``model``: same layer sizes, dim, table count and table format."""
    bits = model.table_bits
    return {
        "tables": model.num_tables,
        "rows": [min(r, 1000) for r in model.rows],
        "dim": model.dim,
        "bottom": list(model.bottom_sizes),
        "top": list(model.top_sizes[1:]),
        "self_interaction": bool(model.self_interaction),
        "bits": bits if bits != 32 else (8 if model.precision != "float32" else 0),
        "float": model.precision == "float32",
    }


class _Bar:
    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled, self.t0 = total, 0, enabled, time.perf_counter()

    def step(self, label: str) -> None:
        self.done += 1
        if self.enabled:
            width = 30
            fill = width * self.done // max(self.total, 1)
            dt = time.perf_counter() - self.t0
            sys.stderr.write(
                f"\r[warmup] [{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} "
                f"{label:<10} {dt:6.1f} s"
            )
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def _normalise_ops(ops: str | Iterable[str] | None) -> list[str]:
    if ops is None:
        return list(OPS)
    names = [o.strip() for o in (ops.split(",") if isinstance(ops, str) else ops) if o.strip()]
    unknown = [o for o in names if o not in OPS]
    if unknown:
        raise ValueError(f"ops: unknown op group(s) {unknown}; expected some of {list(OPS)}")
    return names


def warmup(
    model: Any = None,
    ops: str | Sequence[str] | None = None,
    *,
    jobs: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Compile the kernels a workload needs into the disk cache, in parallel worker processes.

    Parameters
    ----------
    model : DLRM, optional
        Warm the kernels of this model (instead of ``ops``' default of every group).
    ops : str or sequence of str, optional
        Op groups of :data:`OPS` (comma-separated string or list); default: all of them, or
        none when ``model`` is given.
    jobs : int, optional
        Worker processes at a time (default: the CPU count).
    progress : bool
        Draw a progress bar on stderr.

    Returns
    -------
    dict
        Seconds each group's worker took.

    Raises
    ------
    ValueError
        An unknown op group, or ``jobs < 1``.
    RuntimeError
        A worker failed (its stderr is quoted).
    """
    from . import _config

    work: list[tuple[str, str | None]] = []
    if model is not None:
        work.append(("model", json.dumps(model_spec(model))))
        names = _normalise_ops(ops) if ops is not None else []
    else:
        names = _normalise_ops(ops)
    work += [(n, None) for n in names]
    if jobs is None:
        jobs = os.cpu_count() or 1
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs: expected an int >= 1, got {jobs!r}")
    env = {**os.environ, "QGEMM_CACHE_DIR": _config.cache_dir(), "QGEMM_JIT": "eager"}
    bar = _Bar(len(work), progress)

    def one(item: tuple[str, str | None]) -> tuple[str, float]:
        name, spec = item
        code = f"from qgemm.warmup import run_group; run_group({name!r}, {spec!r})"
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if r.returncode != 0:
            tail = "\n".join(r.stderr.strip().splitlines()[-8:])
            raise RuntimeError(f"warmup: the {name!r} worker failed:\n{tail}")
        bar.step(name)
        return name, dt

    with ThreadPoolExecutor(max(1, min(jobs, len(work) or 1))) as pool:
        results = dict(pool.map(one, work))
    from . import _tiers

    _tiers.forget_built()  # the workers recorded new keys: re-read the record
    return results
