"""The same-host shared-memory hand-off of the distributed average (qgemm.distributed._handoff)
without a cluster: a producer's partial pickled as Dask would send it and opened as a
consumer would, bit for bit; the tag check against a recycled segment; the fallbacks (no
room in /dev/shm, no /dev/shm); the sweep of files left by dead processes.  The cluster
test (two worker processes) is ``test_average_shared_memory`` in tests/test_distributed.py.
"""

from __future__ import annotations

import mmap
import os
import pickle

import numpy as np
import pytest

pytest.importorskip("distributed", reason="qgemm.distributed needs dask")

from qgemm.distributed import _handoff  # noqa: E402
from qgemm.distributed._average import _combine_into, _fold_local  # noqa: E402
from qgemm.training import reduction as _red  # noqa: E402

needs_shm = pytest.mark.skipif(
    _handoff.host_token() is None, reason="no writable /dev/shm on this machine"
)

SIZE = 300_000  # float64 sums of 2.4 MB: above MIN_BYTES, so they go to shared memory


def models(n, seed):
    rng = np.random.default_rng(seed)
    return [
        {
            "w": rng.standard_normal(SIZE).astype(np.float32),
            "small": rng.standard_normal(7).astype(np.float32),  # stays inline
            "steps": np.array(int(rng.integers(0, 9)), np.int64),
        }
        for _ in range(n)
    ]


def in_mmap(a):
    """Whether array ``a`` is a view of a memory mapping (a shared-memory segment)."""
    b = a
    while isinstance(b, np.ndarray) and b.base is not None:
        b = b.base
    if isinstance(b, memoryview):
        b = b.obj
    return isinstance(b, mmap.mmap)


def files():
    return sorted(f for f in os.listdir(_handoff.SHM_DIR) if f.startswith(_handoff.PREFIX))


@pytest.fixture(autouse=True)
def _clean_pool():
    _handoff.release_pool()
    yield
    _handoff.release_pool()


def fold(ms, ws, handoff, compact=False):
    wheres = [f"models[{j}]" for j in range(len(ms))]
    return _fold_local(ws, wheres, "max", compact, *ms, handoff=handoff)


@needs_shm
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("compact", [False, True])
def test_pickled_partial_equals_plain(n, compact):
    ms = models(n, 5)
    ws = [1.0, 2.5, 0.5][:n]
    plain = fold(ms, ws, False, compact)
    shared = fold(ms, ws, True, compact)
    assert isinstance(shared, _handoff.SharedPartial)
    blob = pickle.dumps(shared, protocol=5)
    assert len(blob) < 64 * 1024  # the names travel, not the 2.4 MB of sums
    got, check = _handoff.open_partial(pickle.loads(blob))
    check("the partial")
    assert (got.count, got.total_weight) == (plain.count, plain.total_weight)
    for g, w in zip(got.acc, plain.acc, strict=True):
        assert type(g) is type(w)
        if isinstance(w, np.ndarray):
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_array_equal(g, w)
    with pytest.raises(RuntimeError, match="recycled before it was read"):
        _handoff.open_partial(pickle.loads(blob))  # a hand-off is read once
    # a combine on the consumer, as the tree does, with the next hand-off
    producer = fold(ms, ws, True, compact)  # alive until its consumer has read it (Dask's
    blob = pickle.dumps(producer)  # result, released once its dependents ran)
    a = fold(models(1, 9), [2.0], False)
    got_c = _red.finish(_combine_into("b", a, pickle.loads(blob)))
    want_c = _red.finish(_red.combine(fold(models(1, 9), [2.0], False), plain))
    assert got_c.keys() == want_c.keys()
    for k in want_c:
        np.testing.assert_array_equal(got_c[k], want_c[k])


@needs_shm
def test_empty_left_partial_takes_a_private_copy():
    ms = models(2, 3)
    shared = fold(ms, [1.0, 2.0], True)
    blob = pickle.dumps(shared)
    attached, _ = _handoff.open_partial(pickle.loads(blob))  # (not released: read again)
    leaf = attached.spec.paths.index(("w",))
    assert in_mmap(attached.acc[leaf])  # (the helper sees a mapping when there is one)
    empty = fold(models(1, 4), [0.0], False)  # count 0: it takes b's sums as its own
    out = _combine_into("b", empty, pickle.loads(blob))
    assert not in_mmap(out.acc[leaf]) and out.acc[leaf].flags.writeable
    np.testing.assert_array_equal(out.acc[leaf], fold(ms, [1.0, 2.0], False).acc[leaf])


@needs_shm
def test_recycled_segment_raises():
    ms = models(2, 1)
    shared = fold(ms, [1.0, 1.0], True)
    blob = pickle.dumps(shared)
    first = pickle.loads(blob)
    _, check = _handoff.open_partial(first)
    check("x")  # read and released: the producer may write its next partial there
    nxt = fold(ms, [3.0, 1.0], True)  # ... and does (same size: the same segment)
    assert nxt._segments and {s.path for s in nxt._segments.values()} == {
        s.path for s in shared._segments.values()
    }
    with pytest.raises(RuntimeError, match="recycled before it was read"):
        _handoff.open_partial(pickle.loads(blob))  # a stale copy of the first hand-off


@needs_shm
def test_segments_pooled_then_released():
    ms = models(2, 2)
    shared = fold(ms, [1.0, 1.0], True)
    path = next(iter(shared._segments.values())).path
    assert os.path.basename(path) in files()
    del shared  # Dask released the result: the segment is kept for the next reduction
    assert os.path.basename(path) in files()
    again = fold(ms, [1.0, 1.0], True)
    assert next(iter(again._segments.values())).path == path  # re-used, not re-made
    del again
    assert _handoff.release_pool() >= 8 * SIZE
    assert os.path.basename(path) not in files()


@needs_shm
def test_no_room_falls_back(monkeypatch):
    def full(self, nbytes):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_handoff._Segment, "__init__", full)
    p = fold(models(2, 0), [1.0, 1.0], True)
    assert isinstance(p, _red.Partial)  # the ordinary transfer, same sums
    np.testing.assert_array_equal(
        p.acc[p.spec.paths.index(("w",))],
        fold(models(2, 0), [1.0, 1.0], False).acc[p.spec.paths.index(("w",))],
    )


def test_no_shared_memory_keeps_the_plain_partial(monkeypatch):
    monkeypatch.setattr(_handoff, "_TOKEN", [None])
    p = fold(models(2, 0), [1.0, 1.0], True)
    assert isinstance(p, _red.Partial)


@needs_shm
def test_other_host_refuses(monkeypatch):
    shared = fold(models(2, 6), [1.0, 1.0], True)
    blob = pickle.dumps(shared)
    monkeypatch.setattr(_handoff, "_TOKEN", ["another-host"])
    with pytest.raises(RuntimeError, match="another host"):
        _handoff.open_partial(pickle.loads(blob))


@needs_shm
def test_sweep_removes_files_of_dead_processes(monkeypatch):
    ns = _handoff._pid_namespace()
    pid = os.getpid()
    dead = 2**22 + 12345  # above any pid_max here: no such process
    stale = os.path.join(_handoff.SHM_DIR, f"{_handoff.PREFIX}{dead}-{ns}-00000000000000aa")
    live = os.path.join(_handoff.SHM_DIR, f"{_handoff.PREFIX}{pid}-{ns}-00000000000000bb")
    for p in (stale, live):
        with open(p, "wb") as f:
            f.write(b"x")
    try:
        monkeypatch.setattr(_handoff, "_SWEPT", [])
        _handoff._sweep_stale()
        assert not os.path.exists(stale) and os.path.exists(live)
        with open(stale, "wb") as f:  # a worker killed later: release_pool sweeps again
            f.write(b"x")
        _handoff.release_pool()
        assert not os.path.exists(stale) and os.path.exists(live)
    finally:
        for p in (stale, live):
            if os.path.exists(p):
                os.unlink(p)


@needs_shm
def test_combined_partial_handed_on():
    """A combine whose result crosses to a third worker (trees over 3+ workers) hands it
    on through shared memory as well: the same sums as the plain combine."""
    from qgemm.distributed._average import _combine

    ms = models(4, 8)
    left = fold(ms[:2], [1.0, 2.0], False)
    right = fold(ms[2:], [3.0, 0.5], True)
    out = _combine("b", False, left, pickle.loads(pickle.dumps(right)), handoff=True)
    assert isinstance(out, _handoff.SharedPartial)
    got, check = _handoff.open_partial(pickle.loads(pickle.dumps(out)))
    check("the combined partial")
    want = _red.combine(fold(ms[:2], [1.0, 2.0], False), fold(ms[2:], [3.0, 0.5], False))
    for g, w in zip(got.acc, want.acc, strict=True):
        np.testing.assert_array_equal(g, w)
    assert (got.count, got.total_weight) == (want.count, want.total_weight)
