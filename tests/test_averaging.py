"""Tests of qgemm.averaging against the numpy references in tests/reference.py.

Tolerances: float averages are bit-identical to the reference (the kernels do the same float64
operations in the same order, without fastmath); running means with variance and EMAs use
different (incremental) arithmetic and are compared at rtol 1e-12 in float64 (one float32 /
float16 rounding of the result otherwise).
"""

from __future__ import annotations

import gc
import math
import weakref
from collections import OrderedDict
from itertools import islice

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qgemm import averaging as A
from qgemm._kernels import averaging as K
from qgemm.averaging import (
    CyclicalLR,
    RunningAverage,
    average,
    cyclical_lr,
    train_decentralized,
)
from qgemm.quantize import quantize_rowwise

from .reference import (
    ref_average,
    ref_average_leaf,
    ref_cyclical_lr,
    ref_ema,
    ref_weighted_variance,
)

FLOATS = [np.float16, np.float32, np.float64]
INTS = [np.int8, np.int32, np.int64, np.uint8, np.uint64]
SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 0, 3), (17, 33)]
RTOL = 1e-12

HSET = settings(deadline=None, max_examples=40)


def _rand(rng, shape, dtype):
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return (rng.standard_normal(shape) * 3).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    ii = np.iinfo(dtype)
    lo, hi = max(ii.min, -1000), min(ii.max, 1000)
    return rng.integers(lo, hi, shape, endpoint=True).astype(dtype)


def _model(rng, layout):
    """A nested parameter set: layout = {name: (shape, dtype) or sub-layout}."""
    return {
        k: _model(rng, v) if isinstance(v, dict) else _rand(rng, v[0], v[1])
        for k, v in layout.items()
    }


def assert_tree_equal(got, want):
    assert isinstance(got, dict)
    assert list(got) == list(want)
    for k in want:
        if isinstance(want[k], dict):
            assert_tree_equal(got[k], want[k])
        else:
            g, w = got[k], np.asarray(want[k])
            assert np.asarray(g).dtype == w.dtype, k
            assert np.shape(g) == w.shape, k
            np.testing.assert_array_equal(g, w, err_msg=str(k))


LAYOUT = {
    "embedding": {"weight": ((5, 4), np.float32)},
    "mlp": {
        "0": {"weight": ((3, 4), np.float32), "bias": ((3,), np.float64)},
        "half": ((6,), np.float16),
    },
    "bn": {"num_batches_tracked": ((), np.int64)},
    "scalar": ((), np.float32),
}


# ============================================================================================
# average: against the reference


@HSET
@given(
    n=st.integers(1, 5),
    shape=st.sampled_from(SHAPES),
    dtype=st.sampled_from(FLOATS + INTS),
    policy=st.sampled_from(A.INT_POLICIES),
    weights=st.lists(
        st.one_of(st.just(0.0), st.floats(0.0, 100.0, allow_subnormal=False)), min_size=5
    ),
    seed=st.integers(0, 2**16),
    as_gen=st.booleans(),
)
def test_average_matches_reference(n, shape, dtype, policy, weights, seed, as_gen):
    rng = np.random.default_rng(seed)
    weights = weights[:n]
    if not any(weights):
        weights[rng.integers(n)] = 1.0
    models = [
        {"p": _rand(rng, shape, dtype), "q": {"r": _rand(rng, (3,), np.float32)}} for _ in range(n)
    ]
    if np.dtype(dtype).kind in "iu" and policy == "sum":
        # keep sums in range: |x| // (n + 1) times n models fits every dtype drawn
        models = [{"p": np.asarray(m["p"] // (n + 1), dtype), "q": m["q"]} for m in models]
    want = ref_average(models, weights, policy)
    src = (m for m in models) if as_gen else models
    ws = (w for w in weights) if as_gen else weights
    got = average(src, ws, int_policy=policy)
    assert_tree_equal(got, want)


def test_average_nested_mixed_layout_and_uniform_weights():
    rng = np.random.default_rng(1)
    models = [_model(rng, LAYOUT) for _ in range(4)]
    got = average(models)
    assert_tree_equal(got, ref_average(models))
    assert isinstance(got["scalar"], np.float32)  # numpy scalars come back as scalars
    assert isinstance(got["bn"]["num_batches_tracked"], np.ndarray)


def test_average_single_model_and_zero_weighted_models():
    rng = np.random.default_rng(2)
    m = _model(rng, LAYOUT)
    assert_tree_equal(average([m]), m)
    others = [_model(rng, LAYOUT) for _ in range(2)]
    # zero-weight models are excluded (structure still checked)
    assert_tree_equal(average([others[0], m, others[1]], [0, 2.5, 0]), m)


def test_average_strided_and_transposed_inputs():
    rng = np.random.default_rng(3)
    base = [rng.standard_normal((9, 12)).astype(np.float32) for _ in range(3)]
    models = [{"t": b.T, "s": b[::2, 1::3]} for b in base]
    want = ref_average(models, [1, 2, 3])
    got = average(models, [1, 2, 3])
    assert_tree_equal(got, want)
    assert got["t"].flags.c_contiguous


def test_average_non_native_byte_order():
    a = np.arange(5, dtype=">f4")
    b = np.arange(5, dtype="<f4") * 3
    got = average([{"x": a}, {"x": b.astype(">f4")}])
    np.testing.assert_array_equal(got["x"], np.arange(5, dtype=np.float32) * 2)


def test_average_parallel_path_matches_reference(monkeypatch):
    monkeypatch.setattr(K, "PARALLEL_MIN", 1024)
    rng = np.random.default_rng(4)
    n = 2 * K.CHUNK + 12345  # several chunks, a ragged last one
    models = [
        {"w": rng.standard_normal(n).astype(np.float32), "d": rng.standard_normal(n // 3)}
        for _ in range(3)
    ]
    want = ref_average(models, [0.5, 2.0, 1.0])
    assert_tree_equal(average(iter(models), [0.5, 2.0, 1.0]), want)


@pytest.mark.parametrize("parallel", [False, True])
def test_average_in_memory_all_models_kernel(monkeypatch, parallel):
    # lists take the one-pass all-models kernel for large float leaves; same bits as streaming
    monkeypatch.setattr(K, "MULTI_MIN", 1)
    if parallel:
        monkeypatch.setattr(K, "PARALLEL_MIN", 1024)
    rng = np.random.default_rng(5)
    n = 3 * K.MULTI_CHUNK + 77 if parallel else 301
    models = [
        {
            "a": rng.standard_normal(n).astype(np.float32),
            "b": {"c": rng.standard_normal((2, n // 2))},
            "h": rng.standard_normal(5).astype(np.float16),
            "k": np.array([j], np.int64),
        }
        for j in range(7)
    ]
    # six positive weights: the first, two pairs and one more
    ws = [0.5, 1.0, 0.0, 2.0, 3.0, 0.25, 1.5]
    want = ref_average(models, ws)
    assert_tree_equal(average(models, ws), want)
    assert_tree_equal(average(tuple(models), iter(ws)), want)
    assert_tree_equal(average(iter(models), ws), want)


def test_average_in_memory_many_models_falls_back(monkeypatch):
    monkeypatch.setattr(K, "MULTI_MIN", 1)
    rng = np.random.default_rng(6)
    models = [{"a": rng.standard_normal(10).astype(np.float32)} for _ in range(K.MULTI_MAX + 1)]
    assert_tree_equal(average(models), ref_average(models))


def test_average_keeps_mapping_type():
    m = OrderedDict(a=np.ones(2, np.float32), b=OrderedDict(c=np.zeros(1)))
    got = average([m, m])
    assert type(got) is OrderedDict and type(got["b"]) is OrderedDict
    assert list(got) == ["a", "b"]


def test_average_streams_one_model_at_a_time():
    refs = []
    seen_alive = []

    def make(i):
        # models still referenced (by average) while the generator makes the next one;
        # the collector is off, so a reference cycle holding a model would count too
        seen_alive.append(sum(r() is not None for r in refs))
        arr = np.full(1000, float(i), np.float32)
        refs.append(weakref.ref(arr))
        return {"w": arr}

    def gen():
        for i in range(6):
            yield make(i)

    gc.collect()
    gc.disable()
    try:
        got = average(gen())
    finally:
        gc.enable()
    assert max(seen_alive) == 0
    np.testing.assert_array_equal(got["w"], np.full(1000, 2.5, np.float32))


def test_average_float_accuracy_is_float64():
    # 1 + 1e-8 is not representable in float32 partial sums of many models; float64 is exact
    models = [{"w": np.array([1.0], np.float32)}] * 999 + [{"w": np.array([1001.0], np.float32)}]
    got = average(models)["w"]
    assert got[0] == np.float32(2.0)
    # rounding is once, to nearest: average of 0.1-ish float32 values
    vals = np.float32([0.1, 0.2, 0.3])
    got = average([{"w": v.reshape(1)} for v in vals])["w"][0]
    assert got == np.float32(np.mean(vals.astype(np.float64)))


def test_average_nonfinite_propagates():
    got = average([{"w": np.array([np.nan, 1.0])}, {"w": np.array([1.0, np.inf])}])["w"]
    assert np.isnan(got[0]) and np.isinf(got[1])


# ============================================================================================
# Integer policies


def test_int_policies_explicit():
    a = {"n": np.array([1, 10, -3], np.int32)}
    b = {"n": np.array([2, 4, -6], np.int32)}
    c = {"n": np.array([4, 7, 5], np.int32)}
    ms, ws = [a, b, c], [1.0, 1.0, 2.0]
    np.testing.assert_array_equal(average(ms, ws, int_policy="first")["n"], [1, 10, -3])
    np.testing.assert_array_equal(average(ms, ws, int_policy="max")["n"], [4, 10, 5])
    np.testing.assert_array_equal(average(ms, ws, int_policy="sum")["n"], [7, 21, -4])
    # weighted means (1+2+8)/4=2.75 -> 3, (10+4+14)/4=7, (-3-6+10)/4=0.25 -> 0
    np.testing.assert_array_equal(average(ms, ws, int_policy="round")["n"], [3, 7, 0])
    # the default is "max"
    np.testing.assert_array_equal(average(ms, ws)["n"], [4, 10, 5])
    # "first" is the first model with positive weight
    np.testing.assert_array_equal(average(ms, [0, 1, 1], int_policy="first")["n"], [2, 4, -6])


def test_int_policy_round_half_to_even():
    ms = [{"n": np.array([1, 2, -1, -2], np.int64)}, {"n": np.array([2, 3, -2, -3], np.int64)}]
    # means 1.5, 2.5, -1.5, -2.5 -> 2, 2, -2, -2
    np.testing.assert_array_equal(average(ms, int_policy="round")["n"], [2, 2, -2, -2])


def test_int_policy_sum_overflow_names_key():
    ms = [{"bn": {"n": np.array([100], np.int8)}}, {"bn": {"n": np.array([100], np.int8)}}]
    with pytest.raises(OverflowError, match="key 'bn.n'.*int8"):
        average(ms, int_policy="sum")
    big = np.iinfo(np.int64).max
    with pytest.raises(OverflowError, match="key 'c'"):
        average([{"c": np.array([big])}, {"c": np.array([1])}], int_policy="sum")
    with pytest.raises(OverflowError, match="key 'u'"):
        average([{"u": np.array([2**63], np.uint64)}] * 2, int_policy="sum")
    np.testing.assert_array_equal(
        average([{"c": np.array([-big])}, {"c": np.array([-1])}], int_policy="sum")["c"],
        [-big - 1],
    )


def test_bool_buffers():
    ms = [{"m": np.array([True, False, False])}, {"m": np.array([False, False, True])}]
    np.testing.assert_array_equal(average(ms)["m"], [True, False, True])
    np.testing.assert_array_equal(average(ms, int_policy="first")["m"], [True, False, False])
    for pol in ("sum", "round"):
        with pytest.raises(TypeError, match="key 'm'.*bool"):
            average(ms, int_policy=pol)


# ============================================================================================
# Errors


def _pair():
    return {"a": {"b": {"c": np.zeros(3, np.float32)}}, "d": np.zeros(2)}


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda m: m["a"]["b"].pop("c"), ValueError, r"models\[1\]: key 'a.b.c' is missing"),
        (lambda m: m["a"]["b"].update(e=np.zeros(1)), ValueError, r"key 'a.b.e' is unexpected"),
        (
            lambda m: m["a"]["b"].update(c=np.zeros(4, np.float32)),
            ValueError,
            r"key 'a.b.c': expected float32 array of shape \(3,\).*got float32 array of shape",
        ),
        (
            lambda m: m["a"]["b"].update(c=np.zeros(3, np.float64)),
            TypeError,
            r"key 'a.b.c': expected float32 .*got float64",
        ),
        (lambda m: m["a"]["b"].update(c=np.zeros(3, np.int32)), TypeError, r"key 'a.b.c'"),
        (lambda m: m["a"].update(b=np.zeros(1)), TypeError, r"key 'a.b': expected a mapping"),
        (lambda m: m.update(d={"x": np.zeros(2)}), TypeError, r"key 'd': expected a leaf"),
        (lambda m: m.update(d=[0.0, 0.0]), TypeError, r"key 'd': expected a numpy array"),
        (lambda m: m.update(d=1.5), TypeError, r"key 'd'.*np.asarray"),
    ],
)
def test_structure_errors_name_the_key(mutate, exc, match):
    m0, m1 = _pair(), _pair()
    mutate(m1)
    with pytest.raises(exc, match=match):
        average([m0, m1])


@pytest.mark.parametrize("dtype", [np.complex64, object, "U3", np.longdouble])
def test_unsupported_dtypes(dtype):
    if np.dtype(dtype) == np.float64:
        pytest.skip("longdouble is float64 here")
    with pytest.raises(TypeError, match="key 'x'"):
        average([{"x": np.zeros(2, dtype)}])


@pytest.mark.parametrize(
    "models, weights, exc, match",
    [
        ([], None, ValueError, "models: expected at least one"),
        ({"a": np.zeros(1)}, None, TypeError, "models: .*single mapping"),
        ([np.zeros(1)], None, TypeError, r"models\[0\]: expected a mapping"),
        ([{"a": np.zeros(1)}] * 2, [1, -1], ValueError, r"weights\[1\]: .*non-negative"),
        ([{"a": np.zeros(1)}] * 2, [1, np.nan], ValueError, r"weights\[1\]: .*finite"),
        ([{"a": np.zeros(1)}] * 2, [np.inf, 1], ValueError, r"weights\[0\]: .*finite"),
        ([{"a": np.zeros(1)}] * 2, [0, 0], ValueError, "weights: .*positive"),
        ([{"a": np.zeros(1)}] * 2, [True, 1], TypeError, r"weights\[0\]: expected a real"),
        ([{"a": np.zeros(1)}] * 2, ["1", 1], TypeError, r"weights\[0\]"),
        ([{"a": np.zeros(1)}] * 2, [1], ValueError, "weights: expected one weight per model"),
        ([{"a": np.zeros(1)}] * 2, [[1, 1]], ValueError, "weights: expected a 1-D"),
        ([{"a": np.zeros(1)}] * 2, "ab", TypeError, "weights: expected an iterable"),
        ((m for m in [{"a": np.zeros(1)}] * 2), iter([1]), ValueError, "weights: fewer"),
        ((m for m in [{"a": np.zeros(1)}] * 2), iter([1, 1, 1]), ValueError, "weights: more"),
        ((m for m in [{"a": np.zeros(1)}] * 2), iter([0, 0]), ValueError, "weights: .*positive"),
        ((m for m in [{"a": np.zeros(1)}] * 2), iter([1, -2]), ValueError, r"weights\[1\]"),
    ],
)
def test_argument_errors(models, weights, exc, match):
    with pytest.raises(exc, match=match):
        average(models, weights)


def test_int_policy_is_checked():
    with pytest.raises(ValueError, match="int_policy"):
        average([{"a": np.zeros(1)}], int_policy="mean")
    with pytest.raises(ValueError, match="int_policy"):
        RunningAverage(int_policy="avg")


# ============================================================================================
# Quantized parameters


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_average_rowwise_quantized_tables(bits):
    rng = np.random.default_rng(bits)
    floats = [rng.standard_normal((6, 5)).astype(np.float32) for _ in range(3)]
    tables = [quantize_rowwise(f, bits=bits) for f in floats]
    got = average(
        [{"emb": t, "b": f[0]} for t, f in zip(tables, floats, strict=True)], [1.0, 2.0, 0.5]
    )
    deq = ref_average_leaf([t.dequantize() for t in tables], [1.0, 2.0, 0.5])
    want = quantize_rowwise(deq, bits=bits)
    assert got["emb"].bits == bits and got["emb"].shape == (6, 5)
    np.testing.assert_array_equal(got["emb"].fused, want.fused)


def test_rowwise_mismatch_errors():
    t8 = quantize_rowwise(np.zeros((2, 4), np.float32), bits=8)
    t4 = quantize_rowwise(np.zeros((2, 4), np.float32), bits=4)
    t8b = quantize_rowwise(np.zeros((3, 4), np.float32), bits=8)
    with pytest.raises(ValueError, match="key 'e'.*bits=8"):
        average([{"e": t8}, {"e": t4}])
    with pytest.raises(ValueError, match=r"key 'e'.*shape=\(2, 4\)"):
        average([{"e": t8}, {"e": t8b}])
    with pytest.raises(TypeError, match="key 'e'"):
        average([{"e": t8}, {"e": np.zeros((2, 4), np.float32)}])


class _FakePacked:
    """A quantized weight following the averaging protocol (dequantize / requantize_like):
    per-tensor symmetric int8."""

    def __init__(self, codes, scale):
        self.codes, self.scale = codes, scale

    @classmethod
    def pack(cls, w):
        scale = float(np.abs(w).max() / 127) or 1.0
        return cls(np.clip(np.rint(w / scale), -127, 127).astype(np.int8), scale)

    def dequantize(self):
        return self.codes.astype(np.float32) * np.float32(self.scale)

    def requantize_like(self, x):
        return type(self).pack(x)


def test_average_packed_weight_protocol():
    rng = np.random.default_rng(7)
    ws = [rng.standard_normal((4, 3)).astype(np.float32) for _ in range(3)]
    got = average([{"fc": _FakePacked.pack(w)} for w in ws])["fc"]
    want = _FakePacked.pack(
        ref_average_leaf([_FakePacked.pack(w).dequantize() for w in ws], [1, 1, 1])
    )
    assert isinstance(got, _FakePacked)
    np.testing.assert_array_equal(got.codes, want.codes)
    assert got.scale == want.scale


# ============================================================================================
# RunningAverage


def test_running_mean_equals_average_bit_for_bit():
    rng = np.random.default_rng(11)
    models = [_model(rng, LAYOUT) for _ in range(5)]
    ws = [1.0, 0.0, 3.0, 0.25, 2.0]
    ra = RunningAverage()
    for m, w in zip(models, ws, strict=True):
        assert ra.update(m, weight=w) is ra
    assert ra.count == 4 and ra.total_weight == sum(ws)
    assert_tree_equal(ra.value, average(models, ws))
    assert_tree_equal(ra.value, ra.value)  # reading does not consume


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 0.999])
def test_ema_against_closed_form(decay):
    rng = np.random.default_rng(12)
    xs = [rng.standard_normal(7) for _ in range(6)]
    ema = RunningAverage(decay=decay)
    for x in xs:
        ema.update({"x": x})
    np.testing.assert_allclose(ema.value["x"], ref_ema(xs, decay), rtol=RTOL, atol=1e-15)
    assert ema.count == 6 and ema.decay == decay


def test_ema_weight_counts_as_repeated_updates():
    rng = np.random.default_rng(13)
    xs = [rng.standard_normal(4) for _ in range(3)]
    a, b = RunningAverage(decay=0.8), RunningAverage(decay=0.8)
    a.update({"x": xs[0]}).update({"x": xs[1]}, weight=3).update({"x": xs[2]}, weight=0)
    b.update({"x": xs[0]})
    for _ in range(3):
        b.update({"x": xs[1]})
    np.testing.assert_allclose(a.value["x"], b.value["x"], rtol=RTOL)


def test_running_variance_welford_and_ema():
    rng = np.random.default_rng(14)
    xs = [(rng.standard_normal((3, 4)) * 10 + 1e4).astype(np.float32) for _ in range(8)]
    ws = [1.0, 2.0, 0.5, 0.0, 1.0, 3.0, 1.0, 1.0]
    ra = RunningAverage(track_variance=True)
    for x, w in zip(xs, ws, strict=True):
        ra.update({"x": x, "n": {"k": np.array(3)}}, weight=w)
    var = ra.variance
    assert list(var) == ["x"]  # integer leaves have no variance
    assert var["x"].dtype == np.float32
    pos = [(x, w) for x, w in zip(xs, ws, strict=True) if w > 0]
    want = ref_weighted_variance([x for x, _ in pos], [w for _, w in pos])
    np.testing.assert_allclose(var["x"], want, rtol=1e-6)
    mean_want = ref_average_leaf(xs, ws)
    np.testing.assert_allclose(ra.value["x"], mean_want, rtol=1e-7)

    d = 0.6
    em = RunningAverage(decay=d, track_variance=True)
    ys = [rng.standard_normal(5) for _ in range(5)]
    for y in ys:
        em.update({"y": y})
    n = len(ys)
    wts = [d ** (n - 1)] + [(1 - d) * d ** (n - 1 - k) for k in range(1, n)]
    np.testing.assert_allclose(em.variance["y"], ref_weighted_variance(ys, wts), rtol=1e-10)
    np.testing.assert_allclose(em.value["y"], ref_ema(ys, d), rtol=RTOL)


def test_running_average_int_policies_and_rowwise():
    # EMA of integers, rounded at read-out: 0 -> 2 -> 5 (decay 0.5), then 5 + .5 * (2 - 5) = 3.5
    ra = RunningAverage(int_policy="round", decay=0.5)
    for k, want in ((0, 0), (4, 2), (8, 5), (2, 4)):  # rint(3.5) = 4 (half to even)
        ra.update({"n": np.array([k], np.int32)})
        np.testing.assert_array_equal(ra.value["n"], [want])
    rm = RunningAverage(int_policy="sum")
    for k in (1, 2, 3):
        rm.update({"n": np.array([k], np.uint8)})
    np.testing.assert_array_equal(rm.value["n"], [6])
    assert rm.value["n"].dtype == np.uint8
    # rowwise tables: the running mean of the dequantized tables, re-quantized
    rng = np.random.default_rng(15)
    tabs = [
        quantize_rowwise(rng.standard_normal((3, 8)).astype(np.float32), bits=4) for _ in range(3)
    ]
    rt = RunningAverage(track_variance=True)
    for t in tabs:
        rt.update({"emb": t})
    deq = [t.dequantize() for t in tabs]
    np.testing.assert_array_equal(
        rt.value["emb"].fused,
        quantize_rowwise(ref_average_leaf(deq, [1, 1, 1]).astype(np.float32), bits=4).fused,
    )
    np.testing.assert_allclose(
        rt.variance["emb"], ref_weighted_variance(deq, [1, 1, 1]), rtol=1e-5, atol=1e-7
    )


def test_running_average_errors_and_state_safety():
    ra = RunningAverage()
    with pytest.raises(ValueError, match="call update"):
        _ = ra.value
    with pytest.raises(ValueError, match="track_variance"):
        _ = ra.variance
    ra.update({"a": np.ones(2)}, weight=0)
    with pytest.raises(ValueError, match="every weight so far was zero"):
        _ = ra.value
    ra.update({"a": np.ones(2)})
    with pytest.raises(ValueError, match="params: key 'a'"):
        ra.update({"a": np.ones(3)})
    with pytest.raises(ValueError, match="weight: .*non-negative"):
        ra.update({"a": np.ones(2)}, weight=-1)
    with pytest.raises(TypeError, match="weight"):
        ra.update({"a": np.ones(2)}, weight=None)
    np.testing.assert_array_equal(ra.value["a"], [1.0, 1.0])
    assert ra.count == 1
    # an overflowing integer update leaves the float state untouched
    rs = RunningAverage(int_policy="sum")
    rs.update({"f": np.zeros(2), "n": np.array([100], np.int8)})
    with pytest.raises(OverflowError, match="key 'n'"):
        rs.update({"f": np.ones(2), "n": np.array([100], np.int8)})
    np.testing.assert_array_equal(rs.value["f"], [0.0, 0.0])
    assert rs.count == 1
    rs.reset()
    assert rs.count == 0
    for bad, exc in [(1.0, ValueError), (-0.1, ValueError), ("x", TypeError), (True, TypeError)]:
        with pytest.raises(exc, match="decay"):
            RunningAverage(decay=bad)
    with pytest.raises(TypeError, match="track_variance"):
        RunningAverage(track_variance="yes")
    assert "mean" in repr(RunningAverage()) and "ema" in repr(RunningAverage(decay=0.9))


def test_swa_utils_parity():
    torch = pytest.importorskip("torch")
    from torch.optim import swa_utils

    torch.manual_seed(0)
    net = torch.nn.Linear(5, 3)
    for decay in (None, 0.9):
        if decay is None:
            avg_model = swa_utils.AveragedModel(net)
            ours = RunningAverage()
        else:
            avg_model = swa_utils.AveragedModel(
                net, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(decay)
            )
            ours = RunningAverage(decay=decay)
        for _ in range(5):
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(torch.randn_like(p))
            avg_model.update_parameters(net)
            ours.update({k: v.detach().numpy().copy() for k, v in net.state_dict().items()})
        for k, v in avg_model.module.state_dict().items():
            np.testing.assert_allclose(ours.value[k], v.numpy(), rtol=1e-5, atol=1e-6)


# ============================================================================================
# Cyclical learning rate


def test_cyclical_lr_hand_computed():
    # base 0.1, max 1.0, step_size 2: 0.1, 0.55, 1.0, 0.55, 0.1, 0.55, ...
    got = [cyclical_lr(s, base_lr=0.1, max_lr=1.0, step_size=2) for s in range(9)]
    np.testing.assert_allclose(got, [0.1, 0.55, 1.0, 0.55, 0.1, 0.55, 1.0, 0.55, 0.1], rtol=1e-15)
    # triangular2: amplitude halves each cycle (cycle = 4 steps)
    t2 = [
        cyclical_lr(s, base_lr=0.0, max_lr=1.0, step_size=2, mode="triangular2")
        for s in (2, 6, 10, 12)
    ]
    np.testing.assert_allclose(t2, [1.0, 0.5, 0.25, 0.0])
    # exp_range: amplitude gamma**step
    e = cyclical_lr(2, base_lr=0.0, max_lr=1.0, step_size=2, mode="exp_range", gamma=0.5)
    assert e == pytest.approx(0.25)
    # asymmetric: up 1, down 3 -> 0, 1, 2/3, 1/3, 0
    asym = cyclical_lr(np.arange(5), base_lr=0.0, max_lr=1.0, step_size=1, step_size_down=3)
    np.testing.assert_allclose(asym, [0, 1, 2 / 3, 1 / 3, 0], atol=1e-15)
    # fractional steps (progress in epochs)
    assert cyclical_lr(0.5, base_lr=0.0, max_lr=2.0, step_size=1) == pytest.approx(1.0)


@HSET
@given(
    step=st.integers(0, 10_000) | st.floats(0, 1e4),
    base=st.floats(0, 1),
    amp=st.floats(0, 1),
    size=st.integers(1, 500) | st.floats(0.5, 500),
    mode=st.sampled_from(A.CLR_MODES),
    gamma=st.floats(0.9, 1.0),
)
def test_cyclical_lr_matches_smith(step, base, amp, size, mode, gamma):
    kw = dict(base_lr=base, max_lr=base + amp, step_size=size, mode=mode, gamma=gamma)
    got = cyclical_lr(step, **kw)
    want = ref_cyclical_lr(step, base, base + amp, size, mode, gamma)
    assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12)
    arr = cyclical_lr(np.array([step, step]), **kw)
    assert arr.shape == (2,) and arr[0] == got


@pytest.mark.parametrize("mode", A.CLR_MODES)
@pytest.mark.parametrize("down", [None, 7])
def test_cyclical_lr_matches_torch(mode, down):
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.CyclicLR(
        opt,
        base_lr=0.01,
        max_lr=0.2,
        step_size_up=5,
        step_size_down=down,
        mode=mode,
        gamma=0.97,
        cycle_momentum=False,
    )
    clr = CyclicalLR(
        base_lr=0.01, max_lr=0.2, step_size=5, mode=mode, gamma=0.97, step_size_down=down
    )
    ours = list(islice(clr, 60))
    theirs = []
    for _ in range(60):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)


def test_cyclical_lr_errors():
    kw = dict(base_lr=0.1, max_lr=1.0, step_size=2)
    with pytest.raises(ValueError, match="step"):
        cyclical_lr(-1, **kw)
    with pytest.raises(ValueError, match="step"):
        cyclical_lr(np.array([0, np.nan]), **kw)
    with pytest.raises(TypeError, match="step"):
        cyclical_lr("3", **kw)
    with pytest.raises(ValueError, match="step_size"):
        cyclical_lr(1, base_lr=0.1, max_lr=1.0, step_size=0)
    with pytest.raises(ValueError, match="step_size_down"):
        cyclical_lr(1, **kw, step_size_down=-2)
    with pytest.raises(ValueError, match="mode"):
        cyclical_lr(1, **kw, mode="cosine")
    with pytest.raises(ValueError, match="gamma"):
        cyclical_lr(1, **kw, mode="exp_range", gamma=0)
    with pytest.raises(ValueError, match="base_lr"):
        cyclical_lr(1, base_lr=-1, max_lr=1.0, step_size=2)
    with pytest.raises(ValueError, match="max_lr"):
        cyclical_lr(1, base_lr=0.1, max_lr=np.inf, step_size=2)
    with pytest.raises(TypeError, match="base_lr"):
        CyclicalLR(base_lr=None, max_lr=1.0, step_size=2)
    clr = CyclicalLR(base_lr=0.0, max_lr=1.0, step_size=2, step_size_down=6)
    assert clr.cycle_length == 8.0
    assert list(islice(clr, 3)) == [0.0, 0.5, 1.0]


# ============================================================================================
# The recipe driver


def _quadratic_sites(targets):
    """Site i minimises |w - targets[i]|^2 / 2 with gradient steps, one per 'epoch'."""
    calls = []

    def make(t):
        def site(p, *, epochs, lr):
            calls.append([lr(e) for e in range(epochs)])
            p["w"] -= 0.0  # in-place use of the private copy is allowed
            for e in range(epochs):
                p["w"] = p["w"] - lr(e) * (p["w"] - t)
            p["steps"] = p["steps"] + epochs
            return p

        return site

    return [make(t) for t in targets], calls


def test_train_decentralized_against_manual_loop():
    targets = [np.array([1.0, -2.0]), np.array([5.0, 0.0]), np.array([0.0, 3.0])]
    sizes = [10, 30, 60]
    sites, calls = _quadratic_sites(targets)
    clr = CyclicalLR(base_lr=0.05, max_lr=0.5, step_size=1.5)
    init = {"w": np.zeros(2), "steps": np.array(0)}
    res = train_decentralized(
        init,
        sites,
        rounds=4,
        local_epochs=3,
        lr=clr,
        site_weights=sizes,
        evaluate=lambda p: {"dist": float(np.abs(p["w"]).sum())},
    )
    # manual reference
    w, steps = np.zeros(2), 0
    for r in range(4):
        outs = []
        for t in targets:
            v = w.copy()
            for e in range(3):
                v = v - clr(r * 3 + e) * (v - t)
            outs.append(v)
        w = ref_average_leaf(outs, sizes)
        steps += 3
    np.testing.assert_allclose(res.params["w"], w, rtol=1e-14)
    assert res.params["steps"] == steps  # int_policy "max"
    assert init["w"].tolist() == [0.0, 0.0]  # not modified
    assert [h["round"] for h in res.history] == [0, 1, 2, 3, 4]
    assert res.metric("epoch").tolist() == [0, 3, 6, 9, 12]
    assert res.metric("dist")[0] == 0.0
    assert res.history[1]["lr_start"] == clr(0) and res.history[2]["lr_start"] == clr(3)
    assert calls[0] == [clr(0), clr(1), clr(2)] and calls[3] == [clr(3), clr(4), clr(5)]
    with pytest.raises(KeyError, match="no metric 'acc'"):
        res.metric("acc")


def test_train_decentralized_constant_lr_and_errors():
    sites, _ = _quadratic_sites([np.array([2.0])])
    res = train_decentralized(
        {"w": np.zeros(1), "steps": np.array(0)},
        sites,
        rounds=2,
        lr=0.5,
        evaluate=lambda p: float(p["w"][0]),
    )
    np.testing.assert_allclose(res.metric("metric"), [0.0, 1.0, 1.5])
    init = {"w": np.zeros(1), "steps": np.array(0)}
    with pytest.raises(ValueError, match="sites"):
        train_decentralized(init, [], rounds=1, lr=0.1)
    with pytest.raises(TypeError, match=r"sites\[0\]"):
        train_decentralized(init, [3], rounds=1, lr=0.1)
    with pytest.raises(ValueError, match="rounds"):
        train_decentralized(init, sites, rounds=-1, lr=0.1)
    with pytest.raises(ValueError, match="local_epochs"):
        train_decentralized(init, sites, rounds=1, local_epochs=0, lr=0.1)
    with pytest.raises(ValueError, match="site_weights"):
        train_decentralized(init, sites, rounds=1, lr=0.1, site_weights=[1, 2])
    with pytest.raises(ValueError, match="lr"):
        train_decentralized(init, sites, rounds=1, lr=-0.1)
    with pytest.raises(TypeError, match="evaluate"):
        train_decentralized(init, sites, rounds=1, lr=0.1, evaluate=lambda p: "good")
    with pytest.raises(TypeError, match="init_params"):
        train_decentralized([1], sites, rounds=1, lr=0.1)


@pytest.mark.parametrize(
    "granularity, reduce_range",
    [("channel", False), ("tensor", False), ("group", False), ("channel", True)],
)
def test_average_packed_weights(granularity, reduce_range):
    gemm = pytest.importorskip("qgemm.gemm")
    rng = np.random.default_rng(8)
    kw = dict(
        granularity=granularity,
        reduce_range=reduce_range,
        group_size=2 if granularity == "group" else None,
    )
    floats = [rng.standard_normal((6, 5)).astype(np.float32) for _ in range(3)]
    packed = [gemm.pack_weight(f, **kw) for f in floats]
    got = average([{"fc": {"weight": p}} for p in packed], [1.0, 0.5, 2.0])["fc"]["weight"]
    deq = ref_average_leaf([p.dequantize() for p in packed], [1.0, 0.5, 2.0])
    want = gemm.pack_weight(deq, **kw)
    assert isinstance(got, gemm.PackedWeight)
    assert got.shape == (6, 5) and got.granularity == granularity
    np.testing.assert_array_equal(got.unpack(), want.unpack())
    np.testing.assert_array_equal(got.scale, want.scale)
    other = gemm.pack_weight(rng.standard_normal((5, 5)).astype(np.float32))
    with pytest.raises(ValueError, match="key 'fc'"):
        average([{"fc": packed[0]}, {"fc": other}])
