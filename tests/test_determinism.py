"""Determinism (issue 17): same inputs -> same bits for every op of the shared workload
(``tests/_workload.py``: linear, quantized_linear, matmul_u8s8, embedding_bag on every table
type, average from lists and generators, quantize, quantize_rowwise), for every thread count
(1, 2, ..., all Numba threads) and across fresh processes.

The ops' shapes straddle the parallel thresholds of ``qgemm._tuning``, so the parallel kernels
run at thread counts above 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numba
import pytest

import qgemm

from . import _workload

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ops():
    return _workload.build_ops(seed=0)


@pytest.fixture(scope="module")
def serial_digests(ops):
    old = qgemm.set_num_threads(1)
    try:
        return {name: _workload.digest(op()) for name, op in ops.items()}
    finally:
        qgemm.set_num_threads(old)


def _thread_counts() -> list[int]:
    n = numba.config.NUMBA_NUM_THREADS
    return sorted({1, min(2, n), n})


@pytest.mark.parametrize("threads", _thread_counts())
def test_same_bits_for_every_thread_count(ops, serial_digests, threads):
    old = qgemm.set_num_threads(threads)
    try:
        for repeat in range(2):
            got = {name: _workload.digest(op()) for name, op in ops.items()}
            diff = sorted(n for n in got if got[n] != serial_digests[n])
            assert diff == [], f"threads={threads}, repeat {repeat}: bits differ for {diff}"
    finally:
        qgemm.set_num_threads(old)


def test_workload_inputs_are_reproducible():
    """The workload itself is a pure function of its seed (else the tests below prove
    nothing), and different seeds give different results (the digest sees the data)."""
    a = _workload.build_ops(seed=0)
    b = _workload.build_ops(seed=1)
    assert _workload.digest(a["linear_small"]()) != _workload.digest(b["linear_small"]())
    assert _workload.digest(a["bag_q4_mean"]()) != _workload.digest(b["bag_q4_mean"]())


def _digests_in_fresh_process(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["QGEMM_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "tests._workload", "digest"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_same_bits_across_fresh_processes(serial_digests):
    n = numba.config.NUMBA_NUM_THREADS
    first = _digests_in_fresh_process(n)
    second = _digests_in_fresh_process(min(2, n))
    assert first.keys() == serial_digests.keys()
    assert first == second
    diff = sorted(k for k in first if first[k] != serial_digests[k])
    assert diff == [], f"bits differ between this process and a fresh one for {diff}"
