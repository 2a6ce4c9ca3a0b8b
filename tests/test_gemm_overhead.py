"""The per-call fast path of the GEMM wrappers (``qgemm.gemm._Fast``, ``qgemm._half._Fast``).

A call whose inputs need no conversion leaves an entry on the weight; later calls with the same
option objects and arrays of the same shape replay it (compiled entry point, prebuilt
weight-side arguments).  These tests check that a replayed call gives exactly the numbers of
the checked call and of the numpy reference (ints and requantized uint8 exact, floats within
FLOAT32_RTOL/ATOL; half weights within the documented FMA bound), that it is taken when it
should be (counted by patching the checked path's plan / kernel look-up) and not otherwise,
that every check of the checked path still fires after a replayed call, and that ISA, thread
count and cache changes invalidate entries.  No timings.
"""

from __future__ import annotations

import contextlib
import pickle

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qgemm
from qgemm import _cache, _config, _half, _tiers
from qgemm import gemm as G
from qgemm._validate import compiled_entry
from qgemm.quantize import QParams

from .conftest import FLOAT32_ATOL, FLOAT32_RTOL
from .reference import (
    ref_gemm_corrected,
    ref_linear_dynamic,
    ref_output_float,
    ref_output_requant,
)


def ref_linear_half(x, w16, bias=None, relu=False):
    """Float64 product of float32 ``x [M, K]`` and the rounded weights ``w16 [N, K]``, plus
    the bound ``(K + 1) 2^-24 (sum |x w| + |bias|)`` the half GEMM is documented to meet."""
    x64 = np.asarray(x, np.float64)
    w64 = np.asarray(w16, np.float64)
    y = x64 @ w64.T
    mag = np.abs(x64) @ np.abs(w64).T
    if bias is not None:
        y = y + np.asarray(bias, np.float64)[None, :]
        mag = mag + np.abs(np.asarray(bias, np.float64))[None, :]
    tol = (x64.shape[1] + 1) * 2.0**-24 * mag
    if relu:
        y = np.maximum(y, 0.0)
    return y, tol


@pytest.fixture
def plan_calls(monkeypatch):
    """Counts the checked path's plan look-ups (a replayed call makes none)."""
    calls = []
    real = G._plan

    def counting(*args):
        calls.append(args[:2])
        return real(*args)

    monkeypatch.setattr(G, "_plan", counting)
    return calls


@pytest.fixture
def half_kernel_calls(monkeypatch):
    calls = []
    real = _half.gemm_half_kernel

    def counting(key):
        calls.append(key)
        return real(key)

    monkeypatch.setattr(_half, "gemm_half_kernel", counting)
    return calls


@pytest.fixture(scope="module")
def layer():
    rng = np.random.default_rng(15)
    n, k = 40, 36
    w = rng.standard_normal((n, k)).astype(np.float32)
    return {
        "w": w,
        "pw": qgemm.pack_weight(w),
        "ph": qgemm.pack_weight(w, dtype="float16"),
        "bias": rng.standard_normal(n).astype(np.float32),
        "x": (rng.standard_normal((3, k)) * 2).astype(np.float32),
    }


def _check_dynamic(y, x, pw, bias, relu, rr=False):
    ref = ref_linear_dynamic(x, pw.unpack(), pw.scale, pw.zero_point, bias, relu, rr)
    np.testing.assert_allclose(y.reshape(ref.shape), ref, rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL)


# ---------------------------------------------------------------- replay equals checked path


@pytest.mark.parametrize("shape", [(1, 36), (5, 36), (36,), (2, 3, 36)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_dynamic_replay_matches_checked_and_reference(layer, plan_calls, shape, with_bias):
    rng = np.random.default_rng(1)
    pw = qgemm.pack_weight(layer["w"])
    bias = layer["bias"] if with_bias else None
    x = rng.standard_normal(shape).astype(np.float32)
    qgemm.linear(x, pw, bias, relu=True, reduce_range=False)
    assert type(pw._fast_dyn[shape]) is G._Seen  # first sighting: no entry yet
    first = qgemm.linear(x, pw, bias, relu=True, reduce_range=False)
    assert len(plan_calls) == 2 and type(pw._fast_dyn[shape]) is G._Fast
    x[...] = rng.standard_normal(shape).astype(np.float32)  # new values, same array
    second = qgemm.linear(x, pw, bias, relu=True, reduce_range=False)
    assert len(plan_calls) == 2  # replayed
    assert second.shape == shape[:-1] + (40,) and second is not first
    _check_dynamic(second, x, pw, bias, True)
    again = qgemm.linear(x.copy(), qgemm.pack_weight(layer["w"]), bias, relu=True,
                         reduce_range=False)  # fmt: skip
    np.testing.assert_array_equal(second, again)  # bit for bit with a checked call


def test_dynamic_replay_into_out_and_default_reduce_range(layer, plan_calls):
    pw = qgemm.pack_weight(layer["w"])
    x = layer["x"]
    out = np.full((3, 40), np.nan, np.float32)
    qgemm.linear(x, pw, layer["bias"], out=out)
    a = qgemm.linear(x, pw, layer["bias"], out=out)
    out[...] = np.nan
    b = qgemm.linear(x, pw, layer["bias"], out=out)
    assert a is out and b is out and len(plan_calls) == 2
    rr = G._plan("dynamic", 3, pw, False).seven  # what reduce_range=None chose
    _check_dynamic(out, x, pw, layer["bias"], False, rr)


@pytest.mark.parametrize("k", [36, 37])  # 37: activation rows padded to whole k-groups
@pytest.mark.parametrize("requant", [False, True])
@pytest.mark.parametrize("bias_kind", [None, "float32", "int32"])
def test_static_replay_exact(plan_calls, k, requant, bias_kind):
    rng = np.random.default_rng(2)
    n, m = 24, 5
    codes = rng.integers(-127, 128, (n, k), dtype=np.int8)
    wqp = QParams(rng.uniform(0.005, 0.05, n).astype(np.float32), 0, dtype="int8", axis=0)
    pw = qgemm.pack_weight(codes, qparams=wqp)
    xqp = QParams(0.05, 120)
    oqp = QParams(0.2, 7) if requant else None
    bias = None
    if bias_kind == "float32":
        bias = rng.standard_normal(n).astype(np.float32)
    elif bias_kind == "int32":
        bias = rng.integers(-500, 500, n).astype(np.int32)
    xq = rng.integers(0, 256, (m, k), dtype=np.uint8)
    for _ in range(2):
        qgemm.quantized_linear(xq, xqp, pw, bias, relu=True, out_qparams=oqp)
    xq[...] = rng.integers(0, 256, (m, k), dtype=np.uint8)
    got = qgemm.quantized_linear(xq, xqp, pw, bias, relu=True, out_qparams=oqp)
    assert len(plan_calls) == 2 and type(pw._fast_static[(m, k)]) is G._Fast
    raw = ref_gemm_corrected(xq, 120, codes, 0)
    if requant:
        ref = ref_output_requant(raw, xqp.scale, pw.scale, 0.2, 7, bias, relu=True)
        np.testing.assert_array_equal(got, ref)
    else:
        ref = ref_output_float(raw, xqp.scale, pw.scale, bias, relu=True)
        np.testing.assert_allclose(got, ref, rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL)
    # a strided view (rows not contiguous) is taken through the padded copy, same numbers
    big = np.zeros((m, k + 8), np.uint8)
    big[:, 3 : 3 + k] = xq
    np.testing.assert_array_equal(
        qgemm.quantized_linear(big[:, 3 : 3 + k], xqp, pw, bias, relu=True, out_qparams=oqp), got
    )


@pytest.mark.parametrize("shape", [(1, 36), (7, 36), (2, 2, 36)])
def test_half_replay_matches_reference(layer, half_kernel_calls, shape):
    rng = np.random.default_rng(3)
    ph = qgemm.pack_weight(layer["w"], dtype="bfloat16")
    x = rng.standard_normal(shape).astype(np.float32)
    for _ in range(2):
        qgemm.linear_half(x, ph, bias=layer["bias"], relu=True)
    x[...] = rng.standard_normal(shape).astype(np.float32)
    y = qgemm.linear(x, ph, layer["bias"], relu=True)  # linear dispatches to linear_half
    assert len(half_kernel_calls) == 2 and type(ph._fast[shape]) is _half._Fast
    ref, tol = ref_linear_half(x.reshape(-1, 36), ph.unpack(), layer["bias"], relu=True)
    assert np.all(np.abs(y.reshape(ref.shape) - ref) <= tol)
    # out overlapping a C-contiguous x, an entry live for the shape: computed aside and copied
    buf = np.zeros(80, np.float32)
    xo = buf[:72].reshape(2, 36)
    xo[...] = rng.standard_normal((2, 36))
    want = qgemm.linear_half(xo.copy(), ph, bias=layer["bias"], relu=True)
    for _ in range(2):
        qgemm.linear_half(xo.copy(), ph, bias=layer["bias"], relu=True)
    assert type(ph._fast[(2, 36)]) is _half._Fast
    got = qgemm.linear_half(xo, ph, bias=layer["bias"], relu=True, out=buf.reshape(2, 40))
    np.testing.assert_array_equal(got, want)


@given(
    m=st.sampled_from([0, 1, 2, 3, 5, 16, 17]),
    n=st.sampled_from([0, 1, 7, 33]),
    k=st.sampled_from([0, 1, 5, 8, 13]),
    relu=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_replay_hypothesis(m, n, k, relu, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    pw = qgemm.pack_weight(w)
    ph = qgemm.pack_weight(w, dtype="float16")
    bias = rng.standard_normal(n).astype(np.float32)
    xs = [rng.standard_normal((m, k)).astype(np.float32) for _ in range(3)]
    for x in xs:  # the third call replays (when m, n > 0)
        y = qgemm.linear(x, pw, bias, relu=relu, reduce_range=True)
        _check_dynamic(y, x, pw, bias, relu, True)
        ref, tol = ref_linear_half(x, ph.unpack(), bias, relu)
        assert np.all(np.abs(qgemm.linear_half(x, ph, bias=bias, relu=relu) - ref) <= tol)
        xqp = QParams(0.03, 100)
        xq = rng.integers(0, 256, (m, k), dtype=np.uint8)
        got = qgemm.quantized_linear(xq, xqp, pw, bias, relu=relu, out_qparams=QParams(0.1, 3))
        raw = ref_gemm_corrected(xq, 100, pw.unpack(), 0)
        ref_q = ref_output_requant(raw, xqp.scale, pw.scale, 0.1, 3, bias, relu)
        np.testing.assert_array_equal(got, ref_q)
    assert (m * n == 0) == (len(pw._fast_dyn) == 0)


# ------------------------------------------------------------ the checks still fire


def _warm(pw, x, bias, **kw):
    for _ in range(3):
        qgemm.linear(x, pw, bias, **kw)
    assert type(pw._fast_dyn[x.shape]) is G._Fast


_F64_OUT = np.empty((3, 40), np.float64)
_BAD_CALLS = {
    "x float64": (lambda x, pw, b: qgemm.linear(x.astype(np.float64), pw, b), TypeError,
                  "x: expected dtype float32, got float64"),
    "x wrong K": (lambda x, pw, b: qgemm.linear(x[:, :-1], pw, b), ValueError,
                  "x: expected last dimension K = 36"),
    "relu int": (lambda x, pw, b: qgemm.linear(x, pw, b, relu=1), TypeError,
                 "relu: expected a bool, got int"),
    "saturate int": (lambda x, pw, b: qgemm.linear(x, pw, b, saturate=0), TypeError,
                     "saturate: expected a bool"),
    "reduce_range int": (lambda x, pw, b: qgemm.linear(x, pw, b, reduce_range=1), TypeError,
                         "reduce_range: expected a bool"),
    "bias short": (lambda x, pw, b: qgemm.linear(x, pw, b[:-1]), ValueError,
                   "bias: expected length 40"),
    "bias int32": (lambda x, pw, b: qgemm.linear(x, pw, b.astype(np.int32)), TypeError,
                   "bias: expected dtype float32"),
    "out float64": (lambda x, pw, b: qgemm.linear(x, pw, b, out=_F64_OUT), TypeError,
                    "out: expected dtype float32"),
    "out shape": (lambda x, pw, b: qgemm.linear(x, pw, b, out=np.empty((3, 41), np.float32)),
                  ValueError, "out: expected shape"),
    "out strided": (lambda x, pw, b: qgemm.linear(x, pw, b, out=np.empty((40, 3), np.float32).T),
                    ValueError, "out: expected a C-contiguous"),
    "weight": (lambda x, pw, b: qgemm.linear(x, object(), b), TypeError,
               "weight: expected a PackedWeight"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(_BAD_CALLS))
def test_checks_fire_after_replay(layer, case):
    call, exc, match = _BAD_CALLS[case]
    pw = qgemm.pack_weight(layer["w"])
    x, b = layer["x"], layer["bias"]
    _warm(pw, x, b)
    with pytest.raises(exc, match=match):
        call(x, pw, b)


def test_bias_changed_in_place_is_rechecked(layer):
    pw = qgemm.pack_weight(layer["w"])
    x = layer["x"]
    b = layer["bias"].copy()
    _warm(pw, x, b)
    b[3] = 100.0  # values are read on every call
    _check_dynamic(qgemm.linear(x, pw, b), x, pw, b, False, G._plan("dynamic", 3, pw, False).seven)
    b[5] = np.nan
    with pytest.raises(ValueError, match="bias: expected finite values, got non-finite at index 5"):
        qgemm.linear(x, pw, b)
    b[5] = 0.0
    b.dtype = np.int32  # the same object, re-typed in place
    with pytest.raises(TypeError, match="bias: expected dtype float32, got int32"):
        qgemm.linear(x, pw, b)
    b.dtype = np.float32
    b.shape = (2, 20)  # ... and re-shaped in place
    with pytest.raises(ValueError, match="bias: expected a 1-D array"):
        qgemm.linear(x, pw, b)


def test_read_only_bias_and_x_take_the_checked_path(layer, plan_calls):
    pw = qgemm.pack_weight(layer["w"])
    x = layer["x"].copy()
    b = layer["bias"].copy()
    b.setflags(write=False)  # copied by the checked path: never replayed
    y0 = qgemm.linear(x, pw, b, reduce_range=True)
    y1 = qgemm.linear(x, pw, b, reduce_range=True)
    assert len(plan_calls) == 2 and not pw._fast_dyn
    np.testing.assert_array_equal(y0, y1)
    b2 = layer["bias"].copy()
    qgemm.linear(x, pw, b2, reduce_range=True)
    x.setflags(write=False)
    y2 = qgemm.linear(x, pw, b2, reduce_range=True)
    assert len(plan_calls) == 4  # read-only x: checked (copy), same numbers
    _check_dynamic(y2, x, pw, b2, False, True)


def test_no_entry_per_call_for_callers_that_never_repeat(layer, plan_calls):
    pw = qgemm.pack_weight(layer["w"])
    x = layer["x"]
    for i in range(5):  # a new bias object every call: sightings only, never an entry
        b = layer["bias"] * np.float32(i + 1)
        _check_dynamic(qgemm.linear(x, pw, b, reduce_range=True), x, pw, b, False, True)
        assert type(pw._fast_dyn[x.shape]) is G._Seen
    b = layer["bias"]
    _warm(pw, x, b, reduce_range=True)
    live = pw._fast_dyn[x.shape]
    xs = np.repeat(x, 2, axis=1)[:, ::2]  # strided: checked every time, entry kept as is
    calls = len(plan_calls)
    for _ in range(2):
        y = qgemm.linear(xs, pw, b, reduce_range=True)
    assert len(plan_calls) == calls + 2 and pw._fast_dyn[x.shape] is live
    np.testing.assert_array_equal(y, qgemm.linear(x, pw, b, reduce_range=True))


def test_non_finite_x_after_replay(layer):
    pw = qgemm.pack_weight(layer["w"])
    x = layer["x"].copy()
    _warm(pw, x, None)
    x[2, 7] = np.inf
    with pytest.raises(ValueError, match=r"x: expected finite values, got inf at index \(2, 7\)"):
        qgemm.linear(x, pw)


def test_static_checks_fire_after_replay(layer):
    pw = qgemm.pack_weight(layer["w"])
    xq = np.full((3, 36), 130, np.uint8)
    qp = QParams(0.1, 128)
    for _ in range(3):
        qgemm.quantized_linear(xq, qp, pw, layer["bias"])
    assert type(pw._fast_static[xq.shape]) is G._Fast
    with pytest.raises(ValueError, match="x_qparams: expected per-tensor uint8"):
        qgemm.quantized_linear(xq, QParams(0.1, 0, dtype="int8"), pw, layer["bias"])
    with pytest.raises(TypeError, match="x_q: expected dtype uint8"):
        qgemm.quantized_linear(xq.astype(np.int8), qp, pw, layer["bias"])
    with pytest.raises(TypeError, match="relu: expected a bool"):
        qgemm.quantized_linear(xq, qp, pw, layer["bias"], relu=1)
    with pytest.raises(TypeError, match="out_qparams: expected QParams or None"):
        qgemm.quantized_linear(xq, qp, pw, layer["bias"], out_qparams=0.5)
    # other qparams object: new numbers, not the memoised ones
    got = qgemm.quantized_linear(xq, QParams(0.2, 128), pw, layer["bias"])
    raw = ref_gemm_corrected(xq, 128, pw.unpack(), 0)
    ref = ref_output_float(raw, 0.2, pw.scale, layer["bias"])
    np.testing.assert_allclose(got, ref, rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL)


def test_half_checks_fire_after_replay(layer):
    ph = qgemm.pack_weight(layer["w"], dtype="float16")
    x, b = layer["x"], layer["bias"]
    for _ in range(3):
        qgemm.linear_half(x, ph, bias=b)
    assert type(ph._fast[x.shape]) is _half._Fast
    with pytest.raises(TypeError, match="relu: expected a bool"):
        qgemm.linear_half(x, ph, bias=b, relu=1)
    with pytest.raises(TypeError, match="x: expected dtype float32"):
        qgemm.linear_half(x.astype(np.float64), ph, bias=b)
    with pytest.raises(ValueError, match="bias: expected length 40"):
        qgemm.linear_half(x, ph, bias=b[:-1])
    with pytest.raises(ValueError, match="out: expected a writeable"):
        out = np.empty((3, 40), np.float32)
        out.setflags(write=False)
        qgemm.linear_half(x, ph, bias=b, out=out)


# ---------------------------------------------------------------------- invalidation


def test_entries_follow_threads_isa_and_cache(layer, plan_calls):
    pw = qgemm.pack_weight(layer["w"])
    x, b = layer["x"], layer["bias"]
    _warm(pw, x, b, reduce_range=True)
    base = len(plan_calls)
    ref = qgemm.linear(x, pw, b, reduce_range=True)
    assert len(plan_calls) == base
    _cache.cache_clear()  # bumps the epoch
    np.testing.assert_array_equal(qgemm.linear(x, pw, b, reduce_range=True), ref)
    assert len(plan_calls) == base + 1
    old = _config.set_isa("portable")
    try:
        np.testing.assert_array_equal(qgemm.linear(x, pw, b, reduce_range=True), ref)
        assert len(plan_calls) == base + 2
        assert pw._fast_dyn[x.shape].isa == "portable"
    finally:
        _config.set_isa(old)
    qgemm.linear(x, pw, b, reduce_range=True)
    assert len(plan_calls) == base + 3
    _tiers.bump_epoch()  # what a tiered kernel's swap (or a JIT-mode change) does
    qgemm.linear(x, pw, b, reduce_range=True)
    assert len(plan_calls) == base + 4
    if _config._numba_threads() > 1:
        now = _config.get_num_threads()
        old_t = _config.set_num_threads(1 if now > 1 else 2)
        try:
            np.testing.assert_array_equal(qgemm.linear(x, pw, b, reduce_range=True), ref)
            assert len(plan_calls) == base + 5
        finally:
            _config.set_num_threads(old_t)


def test_memo_is_bounded_and_not_pickled(layer):
    pw = qgemm.pack_weight(layer["w"])
    ph = qgemm.pack_weight(layer["w"], dtype="float16")
    for m in range(1, 2 * G._FAST_MAX + 2):
        x = np.ones((m, 36), np.float32)
        qgemm.linear(x, pw)
        qgemm.linear_half(x, ph)
        assert len(pw._fast_dyn) <= G._FAST_MAX and len(ph._fast) <= _half._FAST_MAX
    assert pw._fast_dyn and ph._fast
    back, back_h = pickle.loads(pickle.dumps((pw, ph)))
    assert back._fast_dyn == {} and back._fast_static == {} and back_h._fast == {}
    x = layer["x"]
    np.testing.assert_array_equal(qgemm.linear(x, back), qgemm.linear(x, pw))
    np.testing.assert_array_equal(qgemm.linear_half(x, back_h), qgemm.linear_half(x, ph))


# ---------------------------------------------------------------------- compiled_entry


def test_compiled_entry_only_unwraps_plain_dispatchers():
    sig = numba.int64(numba.int64)

    @numba.njit(sig)
    def f(a):
        return a + 1

    ep = compiled_entry(f, sig.args)
    assert ep is not f and ep(41) == 42
    assert compiled_entry(f, (numba.float64,)) is f  # other signature: the dispatcher

    @numba.njit
    def lazy(a):
        return a * 2

    assert compiled_entry(lazy, sig.args) is lazy  # nothing compiled yet
    tk = _tiers.TieredKernel(f, "test", ("k",))
    assert compiled_entry(tk, sig.args) is tk  # generic tier: forwarded as is
    tk.swap(f)
    assert compiled_entry(tk, sig.args) is ep

    def wrapper(a):
        return f(a)

    assert compiled_entry(wrapper, sig.args) is wrapper


# ---------------------------------------------------------------------- threads


@pytest.mark.parametrize("n, k", [(128, 512), (512, 512), (1024, 1024)])
def test_one_row_gemm_opens_no_parallel_region(n, k):
    pw = qgemm.pack_weight(np.ones((n, k), np.float32))
    old = _config.set_num_threads(_config._numba_threads())
    try:
        for kind in ("dynamic", "float", "requant"):
            plan = G._plan(kind, 1, pw, False)
            assert plan.par is None and plan.threads == 1
    finally:
        _config.set_num_threads(old)


@contextlib.contextmanager
def _two_threads_on(isa):
    """The ISA path ``isa`` with 2 threads, as its table row; both restored afterwards."""
    old_isa = _config.set_isa(isa)
    old = _config.set_num_threads(2)
    try:
        yield _config.isa_path()
    finally:
        _config.set_num_threads(old)
        _config.set_isa(old_isa)


@pytest.mark.skipif(_config._numba_threads() < 2, reason="needs 2 Numba threads")
@pytest.mark.parametrize("isa", _config.supported_isas())
def test_parallel_from_the_paths_own_break_even(isa):
    with _two_threads_on(isa) as row:
        n, k = 128, 256  # two 64-wide panels
        pw = qgemm.pack_weight(np.ones((n, k), np.float32))
        m = row.parallel_min_macs // (n * k)
        assert m * n * k == row.parallel_min_macs
        assert G._plan("dynamic", m, pw, False).threads == 2
        below = G._plan("dynamic", m - 1, pw, False)
        assert below.par is None and below.threads == 1


@pytest.mark.skipif(_config._numba_threads() < 2, reason="needs 2 Numba threads")
@pytest.mark.parametrize("isa", _config.supported_isas())
def test_one_row_gemm_over_big_weights_goes_parallel(isa):
    # the weight-bytes rule: a one-row call over weights of parallel_min_weight_bytes (int8)
    # streams them on both cores even below parallel_min_macs; one byte less and below the
    # MACs too: serial
    with _two_threads_on(isa) as row:
        assert row.parallel(0, row.parallel_min_weight_bytes)
        assert row.parallel(row.parallel_min_macs, 0)
        assert not row.parallel(row.parallel_min_macs - 1, row.parallel_min_weight_bytes - 1)
        k = 512
        n = row.parallel_min_weight_bytes // k
        pw = qgemm.pack_weight(np.ones((n, k), np.float32))
        assert G._plan("dynamic", 1, pw, False).threads == 2
        if row.parallel_min_macs > (n - 64) * k:  # a narrower weight falls below both
            narrow = qgemm.pack_weight(np.ones((n - 64, k), np.float32))
            assert G._plan("dynamic", 1, narrow, False).threads == 1


@pytest.mark.skipif(_config._numba_threads() < 2, reason="needs 2 Numba threads")
def test_parallel_replay_and_adaptive_threads(plan_calls):
    rng = np.random.default_rng(4)
    m, n, k = 64, 256, 256  # m * n * k = 2^22 >= every path's parallel_min_macs: parallel
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    pw = qgemm.pack_weight(w)
    old = _config.set_num_threads(2)
    try:
        qgemm.linear(x, pw, reduce_range=True)
        first = qgemm.linear(x, pw, reduce_range=True)
        assert G._plan("dynamic", m, pw, False).par is not None
        calls = len(plan_calls)
        np.testing.assert_array_equal(qgemm.linear(x, pw, reduce_range=True), first)
        assert len(plan_calls) == calls  # replayed on the parallel kernel
        _check_dynamic(first, x, pw, None, False, True)
        was = _config.set_adaptive_threads(True)
        try:  # adaptive threads time each parallel call: never replayed
            np.testing.assert_array_equal(qgemm.linear(x, pw, reduce_range=True), first)
            assert len(plan_calls) == calls + 1
        finally:
            _config.set_adaptive_threads(was)
    finally:
        _config.set_num_threads(old)
    np.testing.assert_array_equal(qgemm.linear(x, pw, reduce_range=True), first)  # 1 thread
