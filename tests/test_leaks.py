"""Resource bounds (issue 17): 100k calls of each op leave resident memory flat.

``@pytest.mark.slow`` (opt-in: ``pytest -m slow``).  Each op runs ``LEAK_CALLS`` times (default
100 000, ``QGEMM_LEAK_CALLS`` overrides) on small inputs after a warm-up; the resident set
size may grow by at most ``RSS_BOUND_MB`` (a leak of 64 bytes per call would already exceed
it), and the growth per op is printed for the report.
"""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest

import qgemm

pytestmark = pytest.mark.slow

LEAK_CALLS = int(os.environ.get("QGEMM_LEAK_CALLS", "100000"))
WARMUP = 2000
#: Allowed RSS growth over LEAK_CALLS calls (allocator arenas and Numba's type caches settle
#: during the warm-up; 6 MB / 100k calls = 60 bytes per call).
RSS_BOUND_MB = 6.0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _ops():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((16, 24)).astype(np.float32)
    pw = qgemm.pack_weight(w)
    x = rng.standard_normal((3, 24)).astype(np.float32)
    qp = qgemm.choose_qparams(x)
    xq = qgemm.quantize(x, qp)
    oq = qgemm.QParams(0.05, 2)
    b8 = rng.integers(-128, 128, (24, 16)).astype(np.int8)
    table = rng.standard_normal((50, 8)).astype(np.float32)
    t4 = qgemm.quantize_rowwise(table, bits=4)
    idx = rng.integers(0, 50, 20).astype(np.int64)
    off = np.array([0, 5, 9, 15], np.int64)
    out = np.empty((4, 8), np.float32)
    models = [{"w": rng.standard_normal(10).astype(np.float32), "n": np.array(j)} for j in range(3)]
    return {
        "linear": lambda: qgemm.linear(x, pw, relu=True),
        "quantized_linear": lambda: qgemm.quantized_linear(xq, qp, pw, out_qparams=oq),
        "matmul_u8s8": lambda: qgemm.matmul_u8s8(xq, b8),
        "embedding_bag_f32": lambda: qgemm.embedding_bag(table, idx, off, out=out),
        "embedding_bag_q4": lambda: qgemm.embedding_bag(t4, idx, off, mode="mean"),
        "average_list": lambda: qgemm.average(models, [1.0, 2.0, 3.0]),
        "average_stream": lambda: qgemm.average(iter(models)),
        "quantize": lambda: qgemm.quantize(x, qp),
        "choose_qparams": lambda: qgemm.choose_qparams(x),
        "quantize_rowwise": lambda: qgemm.quantize_rowwise(table[:4], bits=8),
        "bad_index_error": lambda: _raises(
            IndexError, qgemm.embedding_bag, table, np.array([0, 99], np.int64), off[:1]
        ),
    }


def _raises(exc, fn, *args):
    try:
        fn(*args)
    except exc:
        return
    raise AssertionError(f"{fn.__name__} did not raise {exc.__name__}")


_OPS = _ops()


@pytest.mark.parametrize("name", sorted(_OPS))
def test_rss_flat_over_many_calls(name):
    op = _OPS[name]
    for _ in range(WARMUP):
        op()
    gc.collect()
    before = _rss_bytes()
    for _ in range(LEAK_CALLS):
        op()
    gc.collect()
    growth_mb = (_rss_bytes() - before) / 2**20
    print(f"\nleak[{name}]: {LEAK_CALLS} calls, RSS growth {growth_mb:+.2f} MB")
    assert growth_mb <= RSS_BOUND_MB, f"{name}: RSS grew {growth_mb:.2f} MB over {LEAK_CALLS} calls"


def test_the_rss_probe_sees_a_leak():
    """The measurement can fail: holding 100k small arrays is seen as growth."""
    before = _rss_bytes()
    hold = [np.ones(16) for _ in range(100_000)]
    growth_mb = (_rss_bytes() - before) / 2**20
    assert len(hold) == 100_000 and growth_mb > RSS_BOUND_MB
