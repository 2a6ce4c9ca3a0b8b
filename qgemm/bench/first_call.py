"""The "first call" table of ``python -m qgemm bench``: how long a fresh process waits.

For every op family, each measurement is a fresh interpreter with its *own* cache folder
(``QGEMM_CACHE_DIR``), timing ``import qgemm`` plus the first call of the op:

* **empty** -- empty disk cache, ``QGEMM_JIT=eager`` (the specialised kernels compile first);
* **warm** -- a second process on the folder the *empty* run filled (a disk load);
* **tiered** -- empty disk cache, ``QGEMM_JIT=tiered``: the first call is served by the generic
  tier where the family has one; *ready* is when the specialised build has been swapped in.

The *compile s* column is the specialised compile seconds the empty run's ``cache_info()``
counted for the families that op touches (the "less to compile" table).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from ._timing import Progress, Table

__all__ = ["OPS", "run", "measure"]

_SETUP = {
    "linear": (
        "w = rng.standard_normal((256, 512)).astype(np.float32)\n"
        "x = rng.standard_normal((64, 512)).astype(np.float32)\n"
        "pw = qgemm.pack_weight(w)\n",
        "qgemm.linear(x, pw)",
    ),
    "quantized_linear": (
        "w = rng.standard_normal((256, 512)).astype(np.float32)\n"
        "x = rng.standard_normal((64, 512)).astype(np.float32)\n"
        "qp = qgemm.choose_qparams(x); xq = qgemm.quantize(x, qp)\n"
        "pw = qgemm.pack_weight(w)\n",
        "qgemm.quantized_linear(xq, qp, pw, out_qparams=qp)",
    ),
    "embedding_bag": (
        "t = qgemm.quantize_rowwise(rng.standard_normal((10000, 64)).astype(np.float32))\n"
        "idx = rng.integers(0, 10000, 2560); off = np.arange(0, 2560, 20)\n",
        "qgemm.embedding_bag(t, idx, off)",
    ),
    "quantize_rowwise": (
        "t = rng.standard_normal((10000, 64)).astype(np.float32)\n",
        "qgemm.quantize_rowwise(t)",
    ),
    "average": (
        "ms = [{'w': rng.standard_normal(100000).astype(np.float32)} for _ in range(3)]\n",
        "qgemm.average(ms)",
    ),
}
OPS = tuple(_SETUP)
"""Op families of the table (each call is timed after its inputs are made)."""

_CODE = """\
import time
t0 = time.perf_counter()
import json, numpy as np, qgemm
from qgemm import _cache
t_import = time.perf_counter() - t0
rng = np.random.default_rng(0)
{setup}
t1 = time.perf_counter()
{call}
t_call = time.perf_counter() - t1
_cache.wait_ready()
t_ready = time.perf_counter() - t1
ci = qgemm.cache_info()
print(json.dumps({{"import": t_import, "call": t_call, "ready": t_ready,
    "compile": {{n: f.compile_seconds for n, f in ci.families.items() if f.compile_seconds}},
    "generic": ci.generic_seconds}}))
"""


def measure(op: str, mode: str, cache_dir: str) -> dict[str, Any]:
    """One fresh process: ``import qgemm`` and the first call of ``op`` under ``QGEMM_JIT=mode``
    with ``cache_dir`` as the disk cache; returns its timings (seconds)."""
    setup, call = _SETUP[op]
    env = {**os.environ, "QGEMM_CACHE_DIR": cache_dir, "QGEMM_JIT": mode}
    env.pop("NUMBA_CACHE_DIR", None)
    code = _CODE.format(setup=setup, call=call)
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800
    )
    if r.returncode != 0:
        raise RuntimeError(f"first-call bench of {op} ({mode}) failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run(*, quick: bool = False, progress: Progress | None = None) -> list[Table]:
    """The first-call table (``quick``: the linear and embedding-bag rows only)."""
    ops = ("linear", "embedding_bag") if quick else OPS
    if progress is not None:
        progress.total = 3 * len(ops)
    rows = []
    root = tempfile.mkdtemp(prefix="qgemm-first-call-")
    try:
        for op in ops:
            eager_dir = os.path.join(root, f"{op}-eager")
            tier_dir = os.path.join(root, f"{op}-tiered")
            empty = measure(op, "eager", eager_dir)
            if progress is not None:
                progress.step(f"{op} empty")
            warm = measure(op, "eager", eager_dir)
            if progress is not None:
                progress.step(f"{op} warm")
            tiered = measure(op, "tiered", tier_dir)
            if progress is not None:
                progress.step(f"{op} tiered")
            compiled = ", ".join(f"{k} {v:.1f}" for k, v in sorted(empty["compile"].items()))
            rows.append(
                [
                    op,
                    empty["import"] + empty["call"],
                    warm["import"] + warm["call"],
                    tiered["import"] + tiered["call"],
                    tiered["import"] + tiered["ready"],
                    sum(empty["compile"].values()),
                    compiled or "-",
                ]
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    table = Table(
        "first call: import qgemm + first call, fresh process, own cache folder (s)",
        ["op", "empty", "warm", "tiered", "tiered ready", "compile s", "compiled families (s)"],
        rows,
        notes=[
            "empty/warm: QGEMM_JIT=eager on an empty / the filled cache folder; tiered: empty "
            "folder, first call served by the generic tier where the family has one, 'ready' "
            "when the specialised kernel is swapped in",
            f"load average at the end: {load:.1f} on {os.cpu_count()} cores",
        ],
    )
    return [table]
