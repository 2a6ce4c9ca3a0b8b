from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import pytest

import qgemm
from qgemm import _cache
from qgemm._cache import get_kernel, kernel_family

_builds: list = []


@kernel_family("test_scale")
def _scale_kernel(key):
    """A tiny specialised kernel: multiply by a compile-time constant."""
    (factor,) = key
    _builds.append(key)
    time.sleep(0.05)  # widen the race window for the concurrency test

    @numba.njit(numba.float64[::1](numba.float64[::1]), cache=False)
    def scale(x):
        return x * factor

    return scale


def _family_info(name):
    return qgemm.cache_info().families[name]


def test_hits_misses_and_keys():
    qgemm.cache_clear()
    _builds.clear()
    k2 = _scale_kernel((2.0,))
    assert _family_info("test_scale").misses == 1 and _family_info("test_scale").hits == 0
    assert _scale_kernel((2.0,)) is k2
    k3 = get_kernel("test_scale", (3.0,))
    info = _family_info("test_scale")
    assert (info.hits, info.misses) == (1, 2)
    assert set(info.keys) == {(2.0,), (3.0,)}
    assert info.compile_seconds > 0.09
    np.testing.assert_array_equal(k3(np.ones(2)), [3.0, 3.0])
    total = qgemm.cache_info()
    assert total.currsize >= 2 and total.misses >= 2 and "test_scale" in str(total)


def test_concurrent_requests_build_once():
    qgemm.cache_clear()
    _builds.clear()
    barrier = threading.Barrier(8)

    def ask(i):
        barrier.wait()
        return _scale_kernel((5.0,) if i % 2 else (7.0,))

    with ThreadPoolExecutor(8) as pool:
        kernels = list(pool.map(ask, range(8)))
    assert sorted(_builds) == [(5.0,), (7.0,)]  # each new key built exactly once
    assert len({id(k) for k in kernels}) == 2
    info = _family_info("test_scale")
    assert (info.misses, info.hits) == (2, 6)


def test_clear_resets_and_rebuilds():
    _scale_kernel((9.0,))
    qgemm.cache_clear()
    info = _family_info("test_scale")
    assert (info.hits, info.misses, info.keys) == (0, 0, ())
    _builds.clear()
    _scale_kernel((9.0,))
    assert _builds == [(9.0,)]


def test_errors():
    with pytest.raises(KeyError, match="no kernel family named 'nope'"):
        get_kernel("nope", ())
    with pytest.raises(ValueError, match="already registered"):
        kernel_family("test_scale")(lambda key: None)


def test_build_failure_is_not_cached():
    calls = []

    @kernel_family("test_failing")
    def failing(key):
        calls.append(key)
        raise RuntimeError("boom")

    for _ in range(2):
        with pytest.raises(RuntimeError, match="boom"):
            failing((1,))
    assert len(calls) == 2 and _family_info("test_failing").misses == 0
    assert _cache._families["test_failing"].key_locks == {}


def test_disk_cache_makes_second_process_fast(tmp_path):
    """A fresh process with a warm on-disk cache loads kernels instead of compiling them."""
    code = (
        "import time, numpy as np\n"
        "t=time.perf_counter()\n"
        "import qgemm\n"
        "x=np.linspace(-1,1,1000,dtype=np.float32)\n"
        "qgemm.quantize(x, qgemm.choose_qparams(x))\n"
        "print(qgemm.cache_info().compile_seconds)\n"
    )
    env = {"QGEMM_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    import os

    env = {**os.environ, **env}
    cold = float(subprocess.check_output([sys.executable, "-c", code], env=env, text=True))
    warm = float(subprocess.check_output([sys.executable, "-c", code], env=env, text=True))
    assert any(tmp_path.rglob("*.nbi")), "no Numba index file written to QGEMM_CACHE_DIR"
    assert warm < cold
