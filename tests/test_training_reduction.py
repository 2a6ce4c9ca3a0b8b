"""The reduction core (qgemm.training.reduction): partial -> combine -> finish equals
qgemm.average of the same models.

Tolerances: a left fold of partials does exactly the float64 operations of the streaming
average (bit-identical).  Other groupings reorder the float64 additions: float leaves are
compared with the exact float64 reference at ``RTOL * sum_i w_i |x_i| / sum_i w_i`` plus one
unit in the last place of the leaf's dtype (the final rounding may land on either side).
Integers are exact; ``"round"`` is tested with dyadic weights (exact float64 sums).
"""

from __future__ import annotations

import gc
import pickle
import weakref

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qgemm
from qgemm.averaging import INT_POLICIES, Partial, average, combine, finish, partial
from qgemm.quantize import quantize_rowwise

HSET = settings(deadline=None, max_examples=30)
RTOL = 1e-13


def _models(rng, n, size, dtype=np.float32):
    return [
        {
            "w": rng.standard_normal(size).astype(dtype),
            "enc": {"b": rng.standard_normal(3), "h": rng.standard_normal(2).astype(np.float16)},
            "steps": rng.integers(-50, 50, size=2).astype(np.int32),
            "u": rng.integers(0, 40, size=()).astype(np.uint8)[()],
            "flag": rng.random(3) < 0.5,
        }
        for _ in range(n)
    ]


def _reduce(parts, split):
    """Combine ``parts`` (in order) as a binary tree whose split points come from ``split``."""
    if len(parts) == 1:
        return parts[0]
    k = 1 + split.pop() % (len(parts) - 1) if split else len(parts) // 2
    return combine(_reduce(parts[:k], split), _reduce(parts[k:], split), where=f"group@{k}")


def _check_close(got, want, models, ws, key):
    """Float leaf ``key`` of ``got`` vs the float64 reference (module doc tolerance)."""
    xs = [np.asarray(_leaf(m, key), np.float64) for m in models]
    tot = sum(ws)
    exact = sum(w * x for w, x in zip(ws, xs, strict=True)) / tot
    mag = sum(w * np.abs(x) for w, x in zip(ws, xs, strict=True)) / tot
    g = np.asarray(_leaf(got, key))
    ulp = np.spacing(np.abs(exact).astype(g.dtype)).astype(np.float64)
    assert g.dtype == np.asarray(_leaf(want, key)).dtype
    np.testing.assert_array_less(np.abs(g - exact), RTOL * mag + ulp + 1e-300)


def _leaf(tree, key):
    for k in key.split("."):
        tree = tree[k]
    return tree


@HSET
@given(
    n=st.integers(1, 6),
    size=st.sampled_from([0, 1, 7, 33]),
    policy=st.sampled_from([p for p in INT_POLICIES if p != "round"]),
    wseed=st.lists(st.sampled_from([0.0, 0.25, 1.0, 2.5, 7.0, 0.1]), min_size=6, max_size=6),
    split=st.lists(st.integers(0, 100), max_size=8),
    seed=st.integers(0, 2**16),
)
def test_any_grouping_equals_average(n, size, policy, wseed, split, seed):
    rng = np.random.default_rng(seed)
    models = _models(rng, n, size)
    if policy == "sum":  # not defined for bool buffers
        models = [{k: v for k, v in m.items() if k != "flag"} for m in models]
    ws = wseed[:n]
    if not any(ws):
        ws[-1] = 1.0
    want = average(models, ws, int_policy=policy)
    parts = [
        partial(m, w, int_policy=policy, where=f"models[{j}]")
        for j, (m, w) in enumerate(zip(models, ws, strict=True))
    ]
    got = finish(_reduce(parts, list(split)))
    for key in ("w", "enc.b", "enc.h"):
        _check_close(got, want, models, ws, key)
    for key in ("steps", "u", "flag")[: 2 if policy == "sum" else 3]:
        g, w_ = _leaf(got, key), _leaf(want, key)
        assert type(g) is type(w_) and g.dtype == w_.dtype
        np.testing.assert_array_equal(g, w_)


@pytest.mark.parametrize("policy", INT_POLICIES)
def test_left_fold_is_bit_identical_to_average(policy):
    rng = np.random.default_rng(1)
    models = [{k: v for k, v in m.items() if k != "flag"} for m in _models(rng, 5, 101)]
    ws = [0.5, 0.0, 2.0, 1.25, 3.0]  # dyadic: "round" is exact in any grouping
    want = average(models, ws, int_policy=policy)
    p = partial(models[0], ws[0], int_policy=policy)
    for j in range(1, 5):
        p = combine(p, partial(models[j], ws[j], int_policy=policy))
    got = finish(p)
    for key in ("w", "enc.b", "enc.h", "steps", "u"):
        np.testing.assert_array_equal(_leaf(got, key), _leaf(want, key), err_msg=key)
        assert np.asarray(_leaf(got, key)).dtype == np.asarray(_leaf(want, key)).dtype
    # and a balanced tree gives the same integers, "round" included
    parts = [partial(m, w, int_policy=policy) for m, w in zip(models, ws, strict=True)]
    got2 = finish(combine(combine(parts[0], parts[1]), combine(parts[2], combine(*parts[3:]))))
    for key in ("steps", "u"):
        np.testing.assert_array_equal(_leaf(got2, key), _leaf(want, key))


def test_first_policy_skips_zero_weight_partials():
    a, b, c = ({"k": np.array([j], np.int64), "x": np.ones(2)} for j in range(3))
    p = combine(partial(a, 0.0, int_policy="first"), partial(b, 1.0, int_policy="first"))
    p = combine(p, partial(c, 2.0, int_policy="first"))
    assert finish(p)["k"][0] == 1 and p.count == 2 and p.total_weight == 3.0


def test_partial_attributes_nbytes_and_pickle():
    rng = np.random.default_rng(2)
    m1, m2 = _models(rng, 2, 10)
    p = partial(m1, 2.0, where="site a")
    assert isinstance(p, Partial) and p.count == 1 and p.total_weight == 2.0
    # float64 sums of 10 + 3 + 2 floats; "max" keeps int32[2], uint8 and bool[3] copies
    assert p.nbytes() == 8 * 15 + 4 * 2 + 1 + 3
    q = pickle.loads(pickle.dumps(p))
    r = pickle.loads(pickle.dumps(partial(m2, 1.0)))
    want = average([m1, m2], [2.0, 1.0])
    got = finish(combine(q, r))
    np.testing.assert_array_equal(got["w"], want["w"])
    np.testing.assert_array_equal(got["steps"], want["steps"])


def test_combine_inplace_flag_and_b_untouched():
    x = {"x": np.arange(4.0)}
    a, b = partial(x, 1.0), partial(x, 3.0)
    a_before, b_before = a.acc[0].copy(), b.acc[0].copy()
    c = combine(a, b, inplace=False)
    assert c is not a
    np.testing.assert_array_equal(a.acc[0], a_before)
    np.testing.assert_array_equal(b.acc[0], b_before)
    assert (a.count, a.total_weight, c.count, c.total_weight) == (1, 1.0, 2, 4.0)
    d = combine(a, b)
    assert d is a and a.count == 2
    np.testing.assert_array_equal(b.acc[0], b_before)
    # combining into an empty (zero-weight) partial copies b's buffers
    e = combine(partial(x, 0.0), b)
    e.acc[0] += 1.0
    np.testing.assert_array_equal(b.acc[0], b_before)


def test_partial_holds_no_reference_to_the_model():
    m = {"w": np.ones(1000, np.float32), "k": np.array([3])}
    ref = weakref.ref(m["w"])
    p = partial(m, 1.0)
    del m
    gc.collect()
    assert ref() is None and p.count == 1


@pytest.mark.parametrize(
    "other, match",
    [
        ({"enc": {"w": np.zeros(4, np.float32)}, "k": np.array([1])}, r"'enc\.w'.*shape \(3,\)"),
        ({"enc": {"w": np.zeros(3)}, "k": np.array([1])}, r"'enc\.w'.*float32.*float64"),
        ({"enc": {"w": np.zeros(3, np.float32)}}, r"'k' is missing \(present in site a\)"),
        (
            {"enc": {"w": np.zeros(3, np.float32), "z": np.ones(1)}, "k": np.array([1])},
            r"'enc\.z' is unexpected",
        ),
        ({"enc": np.zeros(3, np.float32), "k": np.array([1])}, r"'enc'.*expected a mapping"),
        ({"enc": {"w": {"deep": np.ones(1)}}, "k": np.array([1])}, r"'enc\.w'.*expected a leaf"),
    ],
)
def test_combine_mismatch_names_leaf_and_both_sites(other, match):
    a = partial({"enc": {"w": np.zeros(3, np.float32)}, "k": np.array([1])}, where="site a")
    b = partial(other, where="site b")
    with pytest.raises(ValueError, match=match) as ei:
        combine(a, b, where="site b")
    assert "site a" in str(ei.value) and "site b" in str(ei.value)


def test_combine_key_order_does_not_matter():
    a = partial({"x": np.ones(2), "y": np.full(3, 2.0)})
    b = partial({"y": np.full(3, 4.0), "x": np.full(2, 3.0)})
    got = finish(combine(a, b))
    assert list(got) == ["x", "y"]
    np.testing.assert_array_equal(got["x"], [2.0, 2.0])
    np.testing.assert_array_equal(got["y"], [3.0, 3.0, 3.0])


def test_errors():
    m = {"x": np.ones(2)}
    with pytest.raises(ValueError, match="int_policy"):
        combine(partial(m, int_policy="max"), partial(m, int_policy="sum"))
    with pytest.raises(TypeError, match="b: expected a Partial"):
        combine(partial(m), m)
    with pytest.raises(ValueError, match="int_policy"):
        partial(m, int_policy="mean")
    with pytest.raises(ValueError, match="non-negative"):
        partial(m, -1.0)
    with pytest.raises(TypeError, match="bool buffers"):
        partial({"f": np.ones(2, bool)}, int_policy="sum")
    with pytest.raises(ValueError, match="nothing to average"):
        finish(combine(partial(m, 0.0), partial(m, 0.0)))
    with pytest.raises(TypeError, match="expected a mapping"):
        partial([np.ones(2)])


def test_sum_overflow_checked_at_finish_and_64_bit_at_combine():
    a, b = {"k": np.array([100], np.int8)}, {"k": np.array([-100], np.int8)}
    c = {"k": np.array([100], np.int8)}
    ps = [partial(m, int_policy="sum") for m in (a, c, b)]
    # the partial sum 200 does not fit int8, but the total 100 does
    assert finish(combine(combine(ps[0], ps[1]), ps[2]))["k"][0] == 100
    with pytest.raises(OverflowError, match="'k'.*int8"):
        finish(combine(partial(a, int_policy="sum"), partial(c, int_policy="sum")))
    big = {"k": np.array([2**62], np.int64)}
    p = partial(big, int_policy="sum")
    with pytest.raises(OverflowError, match="site c: key 'k'.*int64"):
        combine(p, partial(big, int_policy="sum"), where="site c")
    assert p.acc[0][0] == 2**62  # a rejected combine leaves a unchanged


def test_quantized_leaves_requantised_like_the_first_model():
    rng = np.random.default_rng(3)
    tabs = [rng.standard_normal((6, 8)).astype(np.float32) for _ in range(3)]
    ws = [rng.standard_normal((4, 16)).astype(np.float32) for _ in range(3)]
    models = [
        {"t": quantize_rowwise(t, bits=4), "pw": qgemm.pack_weight(w)}
        for t, w in zip(tabs, ws, strict=True)
    ]
    want = average(models, [1.0, 2.0, 3.0])
    p = combine(partial(models[0], 1.0), combine(partial(models[1], 2.0), partial(models[2], 3.0)))
    got = finish(p)
    assert got["t"].bits == 4 and got["t"].shape == (6, 8)
    np.testing.assert_allclose(got["t"].dequantize(), want["t"].dequantize(), rtol=0, atol=1e-6)
    assert type(got["pw"]) is type(want["pw"])
    np.testing.assert_allclose(got["pw"].dequantize(), want["pw"].dequantize(), atol=1e-6)
    # the rowwise bits are part of the structure
    with pytest.raises(ValueError, match="bits=4.*bits=8"):
        combine(
            partial({"t": quantize_rowwise(tabs[0], bits=4)}),
            partial({"t": quantize_rowwise(tabs[0], bits=8)}),
        )
