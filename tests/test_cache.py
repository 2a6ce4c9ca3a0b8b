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
from tests._jit import forced_jit_mode

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


def test_strict_float_kernels_have_their_own_folder(tmp_path):
    """``QGEMM_FASTMATH=0`` kernels go to a sub-folder: Numba keys a disk-cache entry on
    bytecode and closure, not on the fastmath option, so one folder would hand a relaxed-flag
    kernel to a strict process.  ``cache clear`` empties the sub-folder too."""
    import os

    from qgemm import _diskcache

    assert _diskcache.strict_float({"QGEMM_FASTMATH": "0"})
    assert _diskcache.strict_float({"QGEMM_FASTMATH": "False"})
    assert not _diskcache.strict_float({}) and not _diskcache.strict_float({"QGEMM_FASTMATH": "1"})
    code = (
        "import numba, numpy as np, qgemm\n"
        "from qgemm import _config, _diskcache\n"
        "qgemm.embedding_bag(np.ones((4, 8), np.float32), np.array([0, 1]), np.array([0]))\n"
        "print(numba.config.CACHE_DIR, _diskcache.location().path, _config.fastmath_flags())\n"
    )
    out = {}
    for fm in ("0", "1"):
        env = {**os.environ, "QGEMM_CACHE_DIR": str(tmp_path), "QGEMM_FASTMATH": fm,
               "QGEMM_JIT": "eager"}  # fmt: skip
        out[fm] = subprocess.check_output([sys.executable, "-c", code], env=env, text=True).split()
    assert out["0"][0] == os.path.join(str(tmp_path), "strict-float") and out["0"][2] == "False"
    assert out["1"][0] == out["1"][1] == out["0"][1] == str(tmp_path) and out["1"][2] != "False"
    strict = tmp_path / "strict-float"
    assert any(strict.rglob("*.nbi")), "no strict-float kernel written to its sub-folder"
    assert any(p for p in tmp_path.rglob("*.nbi") if strict not in p.parents)
    _diskcache.clear(str(tmp_path))
    assert not any(tmp_path.rglob("*.nbi"))


# --------------------------------------------------------------------------- tiers

_tier_builds: list = []


def _slow_specialised(key):
    (factor,) = key
    _tier_builds.append(("specialised", key))
    time.sleep(0.2)

    @numba.njit(numba.float64[::1](numba.float64[::1]), cache=False)
    def spec(x):
        return x * factor

    return spec


def _generic_for(key):
    _tier_builds.append(("generic", key))

    @numba.njit(numba.float64[::1](numba.float64[::1], numba.float64), cache=False)
    def gen(x, f):
        return x * f

    (factor,) = key
    return lambda x: gen(x, factor)  # same call signature as the specialised kernel


_tiered_family = kernel_family("test_tiered", generic=_generic_for)(_slow_specialised)


@pytest.fixture
def jit_mode(monkeypatch):
    """Set the JIT mode for one test; the toy families build in the worker thread (their
    kernels are not disk-cached, so a worker process would only add an interpreter start).
    The record of keys already built into the disk cache is ignored, so an earlier run on
    the same cache folder cannot turn a tiered first call into a quick eager load."""
    monkeypatch.setattr(_cache._tiers, "known_built", lambda *args: False)
    old = _cache.get_jit_mode()
    old_worker = _cache._tiers.set_worker("thread")
    yield _cache.set_jit_mode
    _cache.wait_ready(30)
    _cache.set_jit_mode(old)
    _cache._tiers.set_worker(old_worker)


def test_tiered_serves_generic_then_swaps(jit_mode):
    jit_mode("tiered")
    qgemm.cache_clear()
    _tier_builds.clear()
    k = _tiered_family((3.0,))
    assert isinstance(k, _cache._tiers.TieredKernel) and _cache.tier_of(k) == "generic"
    np.testing.assert_array_equal(k(np.ones(3)), [3.0, 3.0, 3.0])
    info = qgemm.cache_info()
    assert info.families["test_tiered"].tiers[(3.0,)] in ("generic", "specialised")
    assert info.jit_mode == "tiered"
    assert _cache.wait_ready(30)
    assert _cache.tier_of(k) == "specialised" and k.ready
    np.testing.assert_array_equal(k(np.ones(3)), [3.0, 3.0, 3.0])
    direct = _tiered_family((3.0,))
    assert direct is k.kernel and not isinstance(direct, _cache._tiers.TieredKernel)
    fam = qgemm.cache_info().families["test_tiered"]
    assert fam.tiers == {(3.0,): "specialised"} and fam.misses == 1
    assert qgemm.cache_info().queue == ()
    assert [b[0] for b in _tier_builds] == ["generic", "specialised"]


def test_queue_is_reported_while_building(jit_mode):
    jit_mode("tiered")
    qgemm.cache_clear()
    kernels = [_tiered_family((float(f),)) for f in (11, 12, 13)]
    queued = qgemm.cache_info().queue
    assert queued and all(f == "test_tiered" for f, _k in queued)
    assert "queue:" in str(qgemm.cache_info())
    assert _cache.wait_ready(30)
    assert all(k.ready for k in kernels)


def test_eager_and_generic_modes(jit_mode):
    qgemm.cache_clear()
    jit_mode("eager")
    k = _tiered_family((5.0,))
    assert _cache.tier_of(k) == "specialised" and not isinstance(k, _cache._tiers.TieredKernel)
    jit_mode("generic")
    g = _tiered_family((7.0,))
    assert _cache.tier_of(g) == "generic-only"
    np.testing.assert_array_equal(g(np.ones(2)), [7.0, 7.0])
    assert (7.0,) not in qgemm.cache_info().families["test_tiered"].keys
    with pytest.raises(ValueError, match="mode: expected one of"):
        _cache.set_jit_mode("fast")


def test_failed_background_build_keeps_generic(jit_mode):
    def bad_build(key):
        raise RuntimeError("no LLVM today")

    fam = kernel_family("test_tiered_fail", generic=_generic_for)(bad_build)
    jit_mode("tiered")
    with pytest.warns(RuntimeWarning, match="generic kernel keeps serving"):
        k = fam((2.0,))
        _cache.wait_ready(30)
    np.testing.assert_array_equal(k(np.ones(2)), [2.0, 2.0])
    assert qgemm.cache_info().families["test_tiered_fail"].tiers[(2.0,)] == "generic-only"
    assert fam((2.0,)) is k


def test_cache_clear_during_background_build(jit_mode):
    jit_mode("tiered")
    qgemm.cache_clear()
    k = _tiered_family((21.0,))
    qgemm.cache_clear()  # the running build finishes, is swapped in, but is not kept
    assert _cache.wait_ready(30)
    assert (21.0,) not in qgemm.cache_info().families["test_tiered"].keys
    assert k.ready and _cache.tier_of(k) == "specialised"
    np.testing.assert_array_equal(k(np.ones(1)), [21.0])


# ------------------------------------------------------- GEMM: bit-identical across tiers

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _gemm_all_kinds(rng, m, n, k, saturate, mode):
    """Every GEMM output kind through the public API with kernels of ``mode``."""
    with forced_jit_mode(mode):
        w = rng.standard_normal((n, k)).astype(np.float32) if n and k else np.zeros((n, k), "f4")
        w = np.ascontiguousarray(w)
        x = (rng.standard_normal((m, k)) * 3).astype(np.float32)
        b = rng.standard_normal(n).astype(np.float32)
        pw = qgemm.pack_weight(w)
        qp = qgemm.choose_qparams(x if x.size else np.zeros(1, np.float32))
        xq = qgemm.quantize(x, qp)
        return {
            "dynamic": qgemm.linear(x, pw, bias=b, relu=True, saturate=saturate),
            "float": qgemm.quantized_linear(xq, qp, pw, bias=b, saturate=saturate),
            "requant": qgemm.quantized_linear(
                xq, qp, pw, bias=b, out_qparams=QParams_like(qp), saturate=saturate
            ),
            "raw": qgemm.matmul_u8s8(xq, pw, saturate=saturate),
        }


def QParams_like(qp):
    return qgemm.QParams(float(qp.scale) * 4.0, 7)


def _reference_raw(xq, w_codes):
    return xq.astype(np.int64) @ w_codes.astype(np.int64).T


@given(
    m=st.sampled_from([0, 1, 3, 5, 17]),
    n=st.sampled_from([1, 2, 7, 16, 17, 33]),
    k=st.sampled_from([0, 1, 3, 4, 9, 70]),
    saturate=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gemm_generic_tier_is_bit_identical(m, n, k, saturate, seed):
    spec = _gemm_all_kinds(np.random.default_rng(seed), m, n, k, saturate, "eager")
    gen = _gemm_all_kinds(np.random.default_rng(seed), m, n, k, saturate, "generic")
    for kind in spec:
        assert spec[kind].dtype == gen[kind].dtype and spec[kind].shape == gen[kind].shape
        np.testing.assert_array_equal(gen[kind].view(np.uint8), spec[kind].view(np.uint8), kind)


def test_gemm_generic_raw_matches_numpy_reference():
    """The generic tier's int32 product is exact (plain numpy reference), saturating or not."""
    rng = np.random.default_rng(3)
    w = rng.integers(-128, 128, (9, 37)).astype(np.int8)
    a = rng.integers(0, 256, (4, 37)).astype(np.uint8)
    with forced_jit_mode("generic"):
        got = qgemm.matmul_u8s8(a, np.ascontiguousarray(w.T))
        got_sat = qgemm.matmul_u8s8(a, np.ascontiguousarray(w.T), saturate=True)
    np.testing.assert_array_equal(got, _reference_raw(a, w))
    # saturating: int16 pairs (a0*w0 + a1*w1) clamped, as FBGEMM's AVX2 vpmaddubsw
    pairs = a[:, None, :].astype(np.int64) * w[None, :, :].astype(np.int64)
    kp = 38
    pairs = np.concatenate([pairs, np.zeros((4, 9, kp - 37), np.int64)], axis=2)
    p = np.clip(pairs[..., 0::2] + pairs[..., 1::2], -32768, 32767).sum(-1)
    np.testing.assert_array_equal(got_sat, p)
    assert (got_sat != got).any() or np.abs(pairs).max() < 16384


def test_gemm_tiered_first_call_then_specialised(jit_mode):
    """Tiered: the first call is served (bit-identically) while the specialised kernel builds."""
    jit_mode("eager")
    rng = np.random.default_rng(9)
    w = rng.standard_normal((5, 11)).astype(np.float32)
    x = rng.standard_normal((3, 11)).astype(np.float32)
    want = qgemm.linear(x, qgemm.pack_weight(w))
    qgemm.cache_clear()
    jit_mode("tiered")
    _cache._tiers.set_worker("process")  # the default: compiled in a subprocess, then loaded
    _cache._tiers.forget_built()
    _cache._tiers._built = set()  # as on a machine where nothing was built before
    pw = qgemm.pack_weight(w)
    first = qgemm.linear(x, pw)
    np.testing.assert_array_equal(first, want)
    tiers = qgemm.cache_info().families["gemm"].tiers
    assert set(tiers.values()) <= {"generic", "specialised"} and tiers
    assert _cache.wait_ready(600)
    assert set(qgemm.cache_info().families["gemm"].tiers.values()) == {"specialised"}
    np.testing.assert_array_equal(qgemm.linear(x, pw), want)
    _cache._tiers.forget_built()


def test_broken_generic_tier_falls_back_to_eager(jit_mode):
    def broken_generic(key):
        raise TypeError("signature drifted")

    fam = kernel_family("test_broken_generic", generic=broken_generic)(_slow_specialised)
    jit_mode("tiered")
    with pytest.warns(RuntimeWarning, match="generic build of kernel test_broken_generic"):
        k = fam((4.0,))
    assert _cache.tier_of(k) == "specialised"
    np.testing.assert_array_equal(k(np.ones(2)), [4.0, 4.0])
    assert fam((4.0,)) is k
