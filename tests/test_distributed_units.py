"""Parts of qgemm.distributed that need no cluster: the worker-side fold (against the
reduction core's ``partial`` + ``fold``, bit for bit), the reduction tree's wire plan and the
inference partitioning.  The cluster tests are in ``tests/test_distributed.py``."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("distributed", reason="qgemm.distributed needs dask")

from qgemm._kernels import averaging as _kavg  # noqa: E402
from qgemm.distributed._average import _fold_local, _receivers  # noqa: E402
from qgemm.distributed._predict import partition_ranges  # noqa: E402
from qgemm.training import reduction as _red  # noqa: E402


def tree_models(n, size, seed):
    """``n`` models: a float32 leaf of ``size`` (magnitudes 1e-3..1e3), a float64 leaf and
    an int64 counter."""
    rng = np.random.default_rng(seed)
    return [
        {
            "w": (rng.standard_normal(size) * 10.0 ** rng.integers(-3, 4)).astype(np.float32),
            "d": rng.standard_normal(3),  # float64: never rounded for the wire
            "steps": np.array(rng.integers(0, 50), np.int64),
        }
        for _ in range(n)
    ]


def assert_same_tree(got, want):
    assert got.keys() == want.keys()
    for k in want:
        g, w = np.asarray(got[k]), np.asarray(want[k])
        assert g.dtype == w.dtype and g.shape == w.shape, k
        np.testing.assert_array_equal(g, w)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 4),
    size=st.sampled_from([0, 1, 2, 7, 33]),
    zeros=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_fold_local_equals_partial_fold(n, size, zeros, seed):
    """The worker-side fold (``multi`` kernel over all models, forced here on tiny leaves)
    gives the bits of ``partial`` + ``fold``; compacted, the float32 rounding of them."""
    models = tree_models(n, size, seed)
    ws = np.random.default_rng(seed).integers(1, 5, n).astype(float).tolist()
    for j in range(min(zeros, n - 1)):
        ws[j] = 0.0  # zero weights (not all): skipped by both paths
    wheres = [f"models[{j}]" for j in range(n)]
    want = _red.partial(models[0], ws[0], where=wheres[0])
    for m, w, where in zip(models[1:], ws[1:], wheres[1:], strict=True):
        want.fold(m, w, where=where)
    orig = _kavg.MULTI_MIN
    _kavg.MULTI_MIN = 1
    try:
        got = _fold_local(ws, wheres, "max", False, *models)
        low = _fold_local(ws, wheres, "max", True, *models)
    finally:
        _kavg.MULTI_MIN = orig
    assert (got.count, got.total_weight) == (want.count, want.total_weight)
    for g, w in zip(got.acc, want.acc, strict=True):
        np.testing.assert_array_equal(g, w)
        assert g.dtype == w.dtype
    w_leaf = want.spec.paths.index(("w",))
    assert low.acc[w_leaf].dtype == np.float32
    np.testing.assert_array_equal(low.acc[w_leaf], want.acc[w_leaf].astype(np.float32))
    for i, st_ in enumerate(low.acc):  # float64 and integer leaves untouched
        if i != w_leaf:
            np.testing.assert_array_equal(st_, want.acc[i])
            assert st_.dtype == want.acc[i].dtype
    assert_same_tree(_red.finish(got), _red.finish(want))


@pytest.mark.parametrize("n", range(1, 10))
def test_receivers_plan(n):
    addrs = [f"w{j}" for j in range(n)]
    recv = _receivers(addrs)
    # n folds + n - 1 combines; every combine ships exactly its right input, to the worker
    # of its left input (where the combine runs); the root stays
    assert len(recv) == 2 * n - 1 and sum(r is not None for r in recv) == n - 1
    assert recv[-1] is None
    where = list(addrs)  # replay the pairing: node -> its worker
    ids = list(range(n))
    while len(ids) > 1:
        nxt = []
        for j in range(0, len(ids) - 1, 2):
            left, right = ids[j], ids[j + 1]
            assert recv[right] == where[left] and where[right] != where[left]
            where.append(where[left])
            nxt.append(len(where) - 1)
        if len(ids) % 2:
            nxt.append(ids[-1])
        ids = nxt


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 40), parts=st.integers(1, 9))
def test_partition_ranges(n, parts):
    r = partition_ranges(n, parts)
    assert len(r) == parts and r[0][0] == 0 and r[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(r[:-1], r[1:], strict=True))
    sizes = [hi - lo for lo, hi in r]
    assert max(sizes) - min(sizes) <= 1 and sorted(sizes, reverse=True) == sizes


def test_partition_ranges_bad():
    with pytest.raises(ValueError, match="parts: expected an int >= 1, got 0"):
        partition_ranges(3, 0)
