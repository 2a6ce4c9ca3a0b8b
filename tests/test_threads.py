"""Thread stress (issue 17): 8 Python threads x mixed ops on every Numba threading layer this
machine has, while another thread calls ``qgemm.cache_clear()``; every result must equal the
serial answer bit for bit and the process must not abort.

Each layer runs in its own subprocess (``NUMBA_THREADING_LAYER`` is fixed at the first parallel
launch, and the workqueue layer's failure mode is to abort the process).  The time per layer
is ``QGEMM_STRESS_SECONDS`` (default 10).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECONDS = float(os.environ.get("QGEMM_STRESS_SECONDS", "10"))
LAYERS = ("omp", "workqueue", "tbb")
_POOL_MODULE = {"omp": "omppool", "workqueue": "workqueue", "tbb": "tbbpool"}


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NUMBA_THREADING_LAYER", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("QGEMM_NUM_THREADS", "2")
    env.update(extra)
    return env


def _layer_available(layer: str) -> bool:
    """Whether Numba can load ``layer`` here (checked in a subprocess: loading a pool library
    into this process could change the layer the rest of the suite uses)."""
    code = f"import numba.np.ufunc.{_POOL_MODULE[layer]}"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, timeout=120
    )
    return proc.returncode == 0


@pytest.mark.parametrize("layer", LAYERS)
def test_stress_mixed_ops_on_layer(layer):
    if not _layer_available(layer):
        pytest.skip(f"Numba threading layer {layer!r} is not available on this machine")
    proc = subprocess.run(
        [sys.executable, "-m", "tests._workload", "stress", str(SECONDS)],
        cwd=ROOT,
        env=_env(NUMBA_THREADING_LAYER=layer),
        capture_output=True,
        text=True,
        timeout=SECONDS + 900,
    )
    assert proc.returncode == 0, (
        f"layer {layer}: the stress process exited with {proc.returncode}\n"
        f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-4000:]}"
    )
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\nstress[{layer}]: {json.dumps(report)}")
    assert report["layer"] == layer
    assert report["errors"] == []
    assert report["mismatches"] == []
    # Every op ran concurrently at least once, and the cache was cleared under the load.
    assert min(report["calls"].values()) >= 1, report["calls"]
    assert report["cache_clears"] >= 1


def test_stress_in_process_short():
    """A short in-process run on whatever layer this process has (catches a data race in the
    Python-side cache/config code without the subprocess start-up)."""
    from tests._workload import stress

    report = stress(1.0, n_threads=4)
    assert report["errors"] == []
    assert report["mismatches"] == []
    assert report["total_calls"] >= len(report["calls"])
