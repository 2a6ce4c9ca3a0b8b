"""The per-key memo of compiled entries in :func:`qgemm.embedding.embedding_bag`."""

from __future__ import annotations

import numpy as np
import pytest

import qgemm
import qgemm.embedding as emb_mod
from qgemm import _tiers
from qgemm.embedding import embedding_bag

from .reference import ref_embedding_bag, ref_embedding_bag_tolerance


def _case(rng, rows=50, dim=16, bags=6):
    table = rng.standard_normal((rows, dim)).astype(np.float32)
    lens = rng.integers(0, 5, bags)
    idx = rng.integers(0, rows, int(lens.sum()))
    offsets = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    return table, idx, offsets


def _check(got, table, idx, offsets):
    want = ref_embedding_bag(table, idx, offsets)
    tol = ref_embedding_bag_tolerance(table, idx, offsets)
    np.testing.assert_array_less(np.abs(got - want), tol + 1e-30)


def _memo_keys():
    return {k for k in emb_mod._BAG_ENTRIES}


def test_memo_hit_and_miss(rng):
    table, idx, offsets = _case(rng)
    emb_mod._BAG_ENTRIES.clear()
    first = embedding_bag(table, idx, offsets)
    keys = _memo_keys()
    assert len(keys) == 1
    (key,) = keys
    entry = emb_mod._BAG_ENTRIES[key]
    second = embedding_bag(table, idx, offsets)
    assert emb_mod._BAG_ENTRIES[key] is entry  # hit: the memo is not rebuilt
    np.testing.assert_array_equal(first, second)
    _check(second, table, idx, offsets)
    embedding_bag(table, idx, offsets, mode="max")  # another signature: a miss, a new entry
    assert len(_memo_keys()) == 2


def test_memo_invalidated_by_epoch(rng):
    table, idx, offsets = _case(rng)
    embedding_bag(table, idx, offsets)
    (key,) = [k for k in emb_mod._BAG_ENTRIES if k[5] == "sum" and k[7] == 16]
    _tiers.bump_epoch()
    stale = emb_mod._BAG_ENTRIES[key]
    assert stale[0] != _tiers.current_epoch()
    got = embedding_bag(table, idx, offsets)
    assert emb_mod._BAG_ENTRIES[key][0] == _tiers.current_epoch()
    _check(got, table, idx, offsets)
    qgemm.cache_clear()  # drops the kernels: the memo must not serve the old entry
    got = embedding_bag(table, idx, offsets)
    assert emb_mod._BAG_ENTRIES[key][0] == _tiers.current_epoch()
    _check(got, table, idx, offsets)


def test_bad_index_after_cached_call(rng):
    table, idx, offsets = _case(rng)
    out = np.full((offsets.size, table.shape[1]), 3.0, np.float32)
    embedding_bag(table, idx, offsets, out=out)
    _check(out, table, idx, offsets)
    out[...] = 3.0
    bad = idx.copy()
    bad[-1] = table.shape[0]
    with pytest.raises(IndexError, match=f"index {table.shape[0]} at position {idx.size - 1} "):
        embedding_bag(table, bad, offsets, out=out)
    assert np.all(out == 3.0)  # untouched by the failing call
    bad[0] = -1  # no out: checked inline, first bad position reported
    with pytest.raises(IndexError, match="index -1 at position 0 "):
        embedding_bag(table, bad, offsets)


def test_strided_inputs_after_cached_call(rng):
    table, idx, offsets = _case(rng)
    embedding_bag(table, idx, offsets)
    wide = np.zeros((table.shape[0], 2 * table.shape[1]), np.float32)
    wide[:, ::2] = table  # non-unit inner stride: copied, same signature
    idx2 = np.repeat(idx, 2)[::2]  # strided indices
    offs2 = np.repeat(offsets, 2)[::2]
    assert not idx2.flags.c_contiguous
    _check(embedding_bag(wide[:, ::2], idx2, offs2), table, idx, offsets)
    _check(embedding_bag(table, idx.astype(np.int32), offsets), table, idx, offsets)


def test_thread_count_change(rng, monkeypatch):
    monkeypatch.setattr(emb_mod, "PARALLEL_MIN_WORK", 0)
    table, idx, offsets = _case(rng, bags=20)
    old = qgemm.set_num_threads(1)
    try:
        serial = embedding_bag(table, idx, offsets)
        qgemm.set_num_threads(2)
        par = embedding_bag(table, idx, offsets)
        assert any(k[8] for k in emb_mod._BAG_ENTRIES)  # the parallel kernel was memoised
        assert any(not k[8] for k in emb_mod._BAG_ENTRIES)
        np.testing.assert_array_equal(serial, par)
        _check(par, table, idx, offsets)
    finally:
        qgemm.set_num_threads(old)
