"""qgemm.embedding_bag against the numpy reference and torch.

Compile-time budget: every kernel signature (table kind, dtypes, bags by, mode, weighted, dim
specialised or not, parallel) is one Numba compilation, cached on disk.  The hypothesis tests
draw data freely but keep the signatures to a fixed set (generic dims, int64 indices/offsets);
the other signature axes are covered once each by parametrised tests.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qgemm
import qgemm.embedding as emb_mod
from qgemm import quantize_rowwise
from qgemm.embedding import embedding_bag
from qgemm.quantize import RowwiseQuantizedTable

from .conftest import torch_or_skip
from .reference import ref_embedding_bag, ref_embedding_bag_tolerance

KINDS = ("float32", "float16", 8, 4, 2)


def make_table(kind, rows, dim, rng):
    """(table argument, dense float table it represents)."""
    base = rng.standard_normal((rows, dim)).astype(np.float32)
    if kind == "float32":
        return base, base
    if kind == "float16":
        t = base.astype(np.float16)
        return t, t.astype(np.float32)
    q = quantize_rowwise(base, bits=kind)
    return q, q.dequantize()


def check(
    got,
    dense,
    indices,
    offsets=None,
    lengths=None,
    mode="sum",
    weights=None,
    include_last_offset=False,
    padding_idx=None,
):
    want = ref_embedding_bag(
        dense, indices, offsets, lengths, mode, weights, include_last_offset, padding_idx
    )
    tol = ref_embedding_bag_tolerance(
        dense, indices, offsets, lengths, weights, include_last_offset
    )
    assert got.dtype == np.float32
    assert got.shape == want.shape
    err = np.abs(got.astype(np.float64) - want)
    assert np.all(err <= tol), f"max error {err.max()} (tolerance {tol.max()})"


@st.composite
def bag_case(draw, *, allow_weights=True):
    rows = draw(st.integers(1, 12))
    dim = draw(st.sampled_from([1, 2, 3, 5, 7, 9, 13]))  # generic (non-specialised) dims
    lens = draw(st.lists(st.integers(0, 6), min_size=0, max_size=7))
    n = sum(lens)
    idx = np.array(draw(st.lists(st.integers(0, rows - 1), min_size=n, max_size=n)), np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    include_last = draw(st.booleans())
    if not include_last:
        offsets = offsets[:-1]
    pad = draw(st.one_of(st.none(), st.integers(-rows, rows - 1)))
    weights = None
    if allow_weights and draw(st.booleans()):
        weights = np.array(
            draw(st.lists(st.floats(-2, 2, width=32), min_size=n, max_size=n)), np.float32
        )
    return rows, dim, idx, offsets, include_last, pad, weights, np.array(lens, np.int64)


# ------------------------------------------------------------------------- against numpy


@given(
    case=bag_case(),
    kind=st.sampled_from(KINDS),
    mode=st.sampled_from(["sum", "mean", "max"]),
    seed=st.integers(0, 2**16),
    by_lengths=st.booleans(),
)
def test_matches_reference(case, kind, mode, seed, by_lengths):
    rows, dim, idx, offsets, include_last, pad, weights, lens = case
    if mode != "sum":
        weights = None
    if by_lengths and kind != "float32":
        by_lengths = False  # lengths kernels: one table kind is enough here
    table, dense = make_table(kind, rows, dim, np.random.default_rng(seed))
    if by_lengths:
        got = embedding_bag(
            table, idx, lengths=lens, mode=mode, per_sample_weights=weights, padding_idx=pad
        )
        check(got, dense, idx, lengths=lens, mode=mode, weights=weights, padding_idx=pad)
    else:
        got = embedding_bag(
            table,
            idx,
            offsets,
            mode=mode,
            per_sample_weights=weights,
            include_last_offset=include_last,
            padding_idx=pad,
        )
        check(
            got,
            dense,
            idx,
            offsets,
            mode=mode,
            weights=weights,
            include_last_offset=include_last,
            padding_idx=pad,
        )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_specialised_dim(kind, mode, rng):
    # dim 16 gets a kernel with the dim compiled in (register accumulators).
    table, dense = make_table(kind, 50, 16, rng)
    idx = rng.integers(0, 50, 40)
    offsets = np.array([0, 3, 3, 10, 25, 39])
    pad = 7 if mode != "max" else None
    got = embedding_bag(table, idx, offsets, mode=mode, padding_idx=pad)
    check(got, dense, idx, offsets, mode=mode, padding_idx=pad)


@pytest.mark.parametrize(
    ("kind", "mode"), [(k, "sum") for k in KINDS] + [(2, "max"), ("float16", "max")]
)
def test_specialised_dim_mixed_vector_chunks(kind, mode, rng):
    # dim 36: 8-bit rows are 32+4 codes, 4-bit planes 16+2 bytes, 2-bit planes 8+1 bytes
    table, dense = make_table(kind, 30, 36, rng)
    idx = rng.integers(0, 30, 50)
    offsets = np.array([0, 7, 7, 49])
    w = rng.standard_normal(50).astype(np.float32) if mode == "sum" else None
    got = embedding_bag(table, idx, offsets, mode=mode, per_sample_weights=w, padding_idx=4)
    check(got, dense, idx, offsets, mode=mode, weights=w, padding_idx=4)


@pytest.mark.parametrize("kind", KINDS)
def test_specialised_dim_weighted_and_odd_rows(kind, rng):
    table, dense = make_table(kind, 9, 24, rng)
    idx = rng.integers(0, 9, 30)
    w = rng.standard_normal(30).astype(np.float32)
    offsets = np.array([0, 1, 17, 30])
    got = embedding_bag(table, idx, offsets, per_sample_weights=w, include_last_offset=True)
    check(got, dense, idx, offsets, weights=w, include_last_offset=True)


@pytest.mark.parametrize(
    ("idx_dtype", "off_dtype"),
    [(np.int32, np.int32), (np.int32, np.int64), (np.int64, np.int32)],
)
@pytest.mark.parametrize("kind", ["float32", 4])
def test_index_and_offset_dtypes(idx_dtype, off_dtype, kind, rng):
    table, dense = make_table(kind, 20, 5, rng)
    idx = rng.integers(0, 20, 17).astype(idx_dtype)
    offsets = np.array([0, 4, 4, 11], off_dtype)
    check(embedding_bag(table, idx, offsets), dense, idx, offsets)
    lengths = np.array([4, 0, 7, 6], off_dtype)
    check(embedding_bag(table, idx, lengths=lengths), dense, idx, lengths=lengths)


@pytest.mark.parametrize("kind", ["float32", 8])
def test_fixed_size_bags_2d(kind, rng):
    table, dense = make_table(kind, 10, 3, rng)
    idx = rng.integers(0, 10, (4, 3))
    w = rng.standard_normal((4, 3)).astype(np.float32)
    got = embedding_bag(table, idx, per_sample_weights=w)
    want = ref_embedding_bag(dense, idx, weights=w)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # include_last_offset is ignored for 2-D indices, as in torch
    np.testing.assert_array_equal(
        embedding_bag(table, idx, include_last_offset=True, mode="max"),
        embedding_bag(table, idx, mode="max"),
    )
    # zero-width bags
    assert np.all(embedding_bag(table, np.zeros((3, 0), np.int64)) == 0)
    assert embedding_bag(table, np.zeros((3, 0), np.int64)).shape == (3, 3)


def test_empty_inputs(rng):
    table = rng.standard_normal((4, 3)).astype(np.float32)
    none = np.array([], np.int64)
    assert embedding_bag(table, none, none).shape == (0, 3)
    assert embedding_bag(table, none, np.array([0])).tolist() == [[0, 0, 0]]
    assert embedding_bag(table, none, np.array([0]), include_last_offset=True).shape == (0, 3)
    assert (
        embedding_bag(table, none, lengths=np.array([0, 0]), mode="max").tolist() == [[0, 0, 0]] * 2
    )
    empty_table = np.zeros((0, 3), np.float32)
    assert embedding_bag(empty_table, none, np.array([0, 0])).shape == (2, 3)
    assert embedding_bag(np.zeros((5, 0), np.float32), np.array([1, 2]), np.array([0])).shape == (
        1,
        0,
    )
    q = quantize_rowwise(np.zeros((0, 4), np.float32), bits=4)
    assert embedding_bag(q, none, np.array([0])).tolist() == [[0, 0, 0, 0]]


def test_all_padding_bag_and_mean_count(rng):
    table = rng.standard_normal((5, 4)).astype(np.float32)
    idx = np.array([2, 2, 1, 2, 3])
    offsets = np.array([0, 2])
    got = embedding_bag(table, idx, offsets, mode="mean", padding_idx=2)
    assert np.all(got[0] == 0)  # only padding: an empty bag
    np.testing.assert_allclose(got[1], (table[1] + table[3]) / 2, rtol=1e-6)
    got_neg = embedding_bag(table, idx, offsets, mode="max", padding_idx=-3)  # -3 -> row 2
    np.testing.assert_array_equal(got_neg[1], np.maximum(table[1], table[3]))


def test_parallel_path(rng, monkeypatch):
    monkeypatch.setattr(emb_mod, "PARALLEL_MIN_WORK", 0)
    old = qgemm.set_num_threads(2) if qgemm.get_num_threads() != 2 else 2
    try:
        for kind, dim in (("float32", 16), (4, 16), (8, 5)):
            table, dense = make_table(kind, 300, dim, rng)
            lens = rng.integers(0, 9, 64)
            idx = rng.integers(0, 300, int(lens.sum()))
            offsets = np.concatenate([[0], np.cumsum(lens)[:-1]])
            got = embedding_bag(table, idx, offsets)
            check(got, dense, idx, offsets)
            out = np.full((64, dim), 7.0, np.float32)
            bad = idx.copy()
            bad[-1] = 300
            with pytest.raises(IndexError, match="out of range"):
                embedding_bag(table, bad, offsets, out=out)
            assert np.all(out == 7.0)  # nothing written by the failed call
            bad[3] = -2  # checked inline (no out): still the first bad position is reported
            with pytest.raises(IndexError, match="index -2 at position 3 "):
                embedding_bag(table, bad, offsets)
    finally:
        qgemm.set_num_threads(old)


def _table_at(dense, offset_bytes, row_stride=None):
    """``dense`` copied into a buffer so that its first element sits ``offset_bytes`` past a
    64-byte boundary (rows ``row_stride`` floats apart: a column slice of a wider table)."""
    rows, dim = dense.shape
    stride = dim if row_stride is None else row_stride
    buf = np.full(rows * stride + 64, np.nan, np.float32)  # NaN around the rows: must not leak
    start = (-(buf.ctypes.data % 64) % 64 + offset_bytes) // 4
    view = buf[start : start + rows * stride].reshape(rows, stride)[:, :dim]
    view[...] = dense
    assert view.ctypes.data % 64 == offset_bytes
    return view


@pytest.mark.parametrize("offset", [0, 4, 16, 48])
@pytest.mark.parametrize("dim", [16, 32, 128])  # 128: the AVX2 aligned path spills a vector
def test_float32_table_alignment(offset, dim, rng):
    # float32 rows 16 bytes past a vector boundary (numpy's large arrays) take the aligned-load
    # path (accumulating the lanes before and after each row, dropped at the store); the other
    # offsets take the split loads.  The buffer's NaNs around the rows must never show up,
    # including for the first and the last row.
    dense = rng.standard_normal((40, dim)).astype(np.float32)
    idx = np.concatenate([[0, 39, 39, 0], rng.integers(0, 40, 60)])
    offsets = np.array([0, 1, 2, 2, 30, 63])
    w = rng.standard_normal(idx.size).astype(np.float32)
    for stride in (None, dim + 8, dim + 1):  # contiguous, spaced by a vector, by one float
        table = _table_at(dense, offset, stride)
        for mode in ("sum", "mean", "max"):
            got = embedding_bag(table, idx, offsets, mode=mode, padding_idx=5)
            check(got, dense, idx, offsets, mode=mode, padding_idx=5)
        got = embedding_bag(table, idx, offsets, per_sample_weights=w)
        check(got, dense, idx, offsets, weights=w)
        out = np.empty((offsets.size, dim), np.float32)
        embedding_bag(table, idx, offsets, mode="max", out=out)  # validated before the loop
        check(out, dense, idx, offsets, mode="max")


@given(
    rows=st.integers(1, 9),
    lens=st.lists(st.integers(0, 5), max_size=6),
    offset=st.sampled_from([0, 16]),
    seed=st.integers(0, 2**16),
)
def test_float32_alignment_property(rows, lens, offset, seed):
    rng = np.random.default_rng(seed)
    dense = rng.standard_normal((rows, 32)).astype(np.float32)
    table = _table_at(dense, offset)
    idx = rng.integers(0, rows, sum(lens))
    offsets = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64) if lens else idx[:0]
    check(embedding_bag(table, idx, offsets), dense, idx, offsets)


# ------------------------------------------------------------------------- layouts and out


def test_table_layouts(rng):
    wide = rng.standard_normal((30, 20)).astype(np.float32)
    idx = rng.integers(0, 30, 12)
    offsets = np.array([0, 5])
    view = wide[:, 3:10]  # rows contiguous, spaced: read in place
    check(embedding_bag(view, idx, offsets), view, idx, offsets)
    fort = np.asfortranarray(wide[:, :7])  # copied once
    check(embedding_bag(fort, idx, offsets), fort, idx, offsets)
    rev = wide[::-1, :7]  # negative row stride: copied
    check(embedding_bag(rev, idx, offsets), rev, idx, offsets)
    strided_idx = np.repeat(idx, 2)[::2]  # non-contiguous indices
    check(embedding_bag(view, strided_idx, offsets), view, idx, offsets)
    half = wide[:, :7].astype(np.float16)[:, 1:6]
    check(embedding_bag(half, idx, offsets), half.astype(np.float32), idx, offsets)


def test_out_and_out_dtype(rng):
    table = rng.standard_normal((10, 5)).astype(np.float32)
    idx = rng.integers(0, 10, 9)
    offsets = np.array([0, 2, 6])
    want = embedding_bag(table, idx, offsets)
    out = np.empty((3, 5), np.float32)
    assert embedding_bag(table, idx, offsets, out=out) is out
    np.testing.assert_array_equal(out, want)
    h = embedding_bag(table, idx, offsets, out_dtype=np.float16)
    assert h.dtype == np.float16
    np.testing.assert_array_equal(h, want.astype(np.float16))
    out16 = np.empty((3, 5), np.float16)
    assert embedding_bag(table, idx, offsets, out=out16, out_dtype="float16") is out16
    np.testing.assert_array_equal(out16, want.astype(np.float16))


def test_from_torch_prepacked_bytes_and_cache(rng):
    base = rng.standard_normal((6, 7)).astype(np.float32)
    q = quantize_rowwise(base, bits=4)
    again = RowwiseQuantizedTable.from_fused(q.to_fused(), bits=4, dim=7)
    idx = np.array([0, 5, 5, 1])
    first = embedding_bag(q, idx, np.array([0, 2]))
    built = qgemm.cache_info().families["embedding_bag"]
    np.testing.assert_array_equal(first, embedding_bag(again, idx, np.array([0, 2])))
    info = qgemm.cache_info().families["embedding_bag"]
    assert any(k[1] == "rowwise4" for k in info.keys)
    assert info.keys == built.keys and info.misses == built.misses  # same kernel, nothing built


# ------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def small():
    t = np.arange(12, dtype=np.float32).reshape(6, 2)
    return t, np.array([0, 1, 5, 2]), np.array([0, 2])


@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("bad", [6, -1, 2**31 - 1])
def test_bad_index(small, idx_dtype, bad):
    t, idx, offsets = small
    idx = idx.astype(idx_dtype)
    idx[2] = bad
    out = np.full((2, 2), 3.0, np.float32)
    with pytest.raises(IndexError, match=rf"indices: index {bad} at position 2 .* 6 rows"):
        embedding_bag(t, idx, offsets, out=out)
    assert np.all(out == 3.0)
    q = quantize_rowwise(t, bits=2)
    with pytest.raises(IndexError, match=f"index {bad} at position 2"):
        embedding_bag(q, idx, offsets)


def test_bad_index_2d_position_and_unused_index(small):
    t, _, _ = small
    with pytest.raises(IndexError, match=r"index 9 at position \(1, 0\)"):
        embedding_bag(t, np.array([[0, 1], [9, 2]]))
    # an index after the final offset belongs to no bag but is still checked (both paths)
    with pytest.raises(IndexError, match="index 7 at position 3"):
        embedding_bag(t, np.array([0, 1, 2, 7]), np.array([0, 3]), include_last_offset=True)
    out = np.zeros((1, 2), np.float32)
    with pytest.raises(IndexError, match="index 7 at position 3"):
        embedding_bag(
            t, np.array([0, 1, 2, 7]), np.array([0, 3]), include_last_offset=True, out=out
        )
    with pytest.raises(IndexError, match="index -1 at position 1"):  # 2nd bad one is later
        embedding_bag(t, np.array([0, -1, 2, 7]), np.array([0, 3]), include_last_offset=True)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"offsets": np.array([1, 2])}, ValueError, r"offsets\[0\] must be 0"),
        ({"offsets": np.array([0, 3, 2])}, ValueError, r"offsets\[2\] = 2"),
        ({"offsets": np.array([0, 5])}, ValueError, r"offsets\[1\] = 5 is past the end"),
        ({"offsets": np.array([], np.int64), "include_last_offset": True}, ValueError, "offsets"),
        ({"lengths": np.array([3, -1, 2])}, ValueError, r"lengths\[1\] = -1"),
        ({"lengths": np.array([3, 2])}, ValueError, "lengths: .*adding up"),
        ({"offsets": np.array([0]), "lengths": np.array([4])}, ValueError, "not both"),
        ({}, ValueError, "offsets"),
        (
            {"lengths": np.array([4]), "include_last_offset": True},
            ValueError,
            "include_last_offset",
        ),
        ({"offsets": np.array([0.0])}, TypeError, "offsets"),
        ({"lengths": np.array([4], np.uint32)}, TypeError, "lengths"),
        ({"offsets": np.array([[0]])}, ValueError, "offsets"),
        ({"offsets": np.array([0]), "mode": "median"}, ValueError, "mode"),
        (
            {
                "offsets": np.array([0]),
                "mode": "mean",
                "per_sample_weights": np.ones(4, np.float32),
            },
            ValueError,
            "per_sample_weights",
        ),
        (
            {"offsets": np.array([0]), "per_sample_weights": np.ones(3, np.float32)},
            ValueError,
            "per_sample_weights",
        ),
        (
            {"offsets": np.array([0]), "per_sample_weights": np.ones(4)},
            TypeError,
            "per_sample_weights",
        ),
        ({"offsets": np.array([0]), "padding_idx": 6}, ValueError, "padding_idx"),
        ({"offsets": np.array([0]), "padding_idx": -7}, ValueError, "padding_idx"),
        ({"offsets": np.array([0]), "padding_idx": 1.0}, TypeError, "padding_idx"),
        ({"offsets": np.array([0]), "padding_idx": True}, TypeError, "padding_idx"),
        ({"offsets": np.array([0]), "include_last_offset": 1}, TypeError, "include_last_offset"),
        ({"offsets": np.array([0]), "out": np.empty((1, 2), np.float64)}, TypeError, "out"),
        ({"offsets": np.array([0]), "out": np.empty((2, 2), np.float32)}, ValueError, "out"),
        (
            {"offsets": np.array([0]), "out": np.empty((2, 4), np.float32)[:1, ::2]},
            ValueError,
            "out",
        ),
        ({"offsets": np.array([0]), "out": [[0.0, 0.0]]}, TypeError, "out"),
        ({"offsets": np.array([0]), "out_dtype": np.float64}, TypeError, "out_dtype"),
        ({"offsets": np.array([0]), "out_dtype": "float17"}, TypeError, "out_dtype"),
        (
            {"offsets": np.array([0]), "out": np.empty((1, 2), np.float32), "out_dtype": "float16"},
            TypeError,
            "out_dtype",
        ),
    ],
)
def test_bad_arguments(small, kwargs, exc, match):
    t, _, _ = small
    idx = np.array([0, 1, 5, 2])
    with pytest.raises(exc, match=match):
        embedding_bag(t, idx, **kwargs)


def test_bad_table_and_indices(small):
    t, idx, offsets = small
    with pytest.raises(TypeError, match="table"):
        embedding_bag(t.astype(np.float64), idx, offsets)
    with pytest.raises(TypeError, match="table"):
        embedding_bag([[1, 2]], idx, offsets)
    with pytest.raises(ValueError, match="table"):
        embedding_bag(np.zeros(3, np.float32), idx, offsets)
    with pytest.raises(TypeError, match="table"):
        embedding_bag(None, idx, offsets)
    with pytest.raises(TypeError, match="indices"):
        embedding_bag(t, idx.astype(np.float32), offsets)
    with pytest.raises(TypeError, match="indices"):
        embedding_bag(t, idx.astype(np.uint64), offsets)
    with pytest.raises(ValueError, match="indices"):
        embedding_bag(t, idx.reshape(1, 2, 2), offsets)
    with pytest.raises(ValueError, match="offsets"):
        embedding_bag(t, idx.reshape(2, 2), offsets)
    bad_q = RowwiseQuantizedTable(np.zeros((3, 5), np.uint8), 8, 4)  # rows should be 12 bytes
    with pytest.raises(ValueError, match="table"):
        embedding_bag(bad_q, idx[:1], np.array([0]))
    read_only = np.empty((2, 2), np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="out"):
        embedding_bag(t, idx, offsets, out=read_only)


# ------------------------------------------------------------------------- against torch


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("dim", [5, 16])
def test_matches_torch_float(mode, dim, rng):
    torch = torch_or_skip()
    F = torch.nn.functional
    table = rng.standard_normal((40, dim)).astype(np.float32)
    idx = rng.integers(0, 40, 60)
    offsets = np.array([0, 0, 7, 20, 20, 59])
    for pad in (None, 3, -1):
        for last in (False, True):
            # torch 2.13 with padding_idx and include_last_offset adds the indices after
            # offsets[-1] to the last bag (sum/mean); qgemm does not (see the module notes),
            # so compare on offsets whose last entry is len(indices).
            offs = np.append(offsets, 60) if last else offsets
            want = F.embedding_bag(
                torch.from_numpy(idx),
                torch.from_numpy(table),
                torch.from_numpy(offs),
                mode=mode,
                padding_idx=pad,
                include_last_offset=last,
            ).numpy()
            got = embedding_bag(
                table, idx, offs, mode=mode, padding_idx=pad, include_last_offset=last
            )
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    w = rng.standard_normal(60).astype(np.float32)
    if mode == "sum":
        want = F.embedding_bag(
            torch.from_numpy(idx),
            torch.from_numpy(table),
            torch.from_numpy(offsets),
            mode="sum",
            per_sample_weights=torch.from_numpy(w),
        ).numpy()
        got = embedding_bag(table, idx, offsets, per_sample_weights=w)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def mean_of(q, idx, offsets):
    return embedding_bag(q, idx, offsets, mode="mean")


def test_torch_padding_with_include_last_offset_differs(rng):
    torch = torch_or_skip()
    t = np.arange(12, dtype=np.float32).reshape(6, 2)
    idx, offsets = np.array([1, 2, 5]), np.array([0, 2])
    want_torch = torch.nn.functional.embedding_bag(
        torch.from_numpy(idx),
        torch.from_numpy(t),
        torch.from_numpy(offsets),
        mode="sum",
        include_last_offset=True,
        padding_idx=0,
    ).numpy()
    got = embedding_bag(t, idx, offsets, include_last_offset=True, padding_idx=0)
    np.testing.assert_array_equal(got, [[6.0, 8.0]])  # rows 1 and 2: the bag [0, 2)
    if not np.array_equal(want_torch, got):  # torch 2.13 also adds row 5, after offsets[-1]
        np.testing.assert_array_equal(want_torch, [[16.0, 19.0]])


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dim", [12, 16])  # torch packs 4/2-bit rows of even/4k dims only
def test_matches_torch_quantized(bits, dim, rng):
    torch = torch_or_skip()
    table = rng.standard_normal((50, dim)).astype(np.float32)
    prepack = {
        8: torch.ops.quantized.embedding_bag_byte_prepack,
        4: torch.ops.quantized.embedding_bag_4bit_prepack,
        2: torch.ops.quantized.embedding_bag_2bit_prepack,
    }[bits]
    op = {
        8: torch.ops.quantized.embedding_bag_byte_rowwise_offsets,
        4: torch.ops.quantized.embedding_bag_4bit_rowwise_offsets,
        2: torch.ops.quantized.embedding_bag_2bit_rowwise_offsets,
    }[bits]
    fused = prepack(torch.from_numpy(table))
    q = RowwiseQuantizedTable.from_fused(fused.numpy(), bits=bits, dim=dim)
    np.testing.assert_array_equal(q.fused, quantize_rowwise(table, bits=bits).fused)
    idx = rng.integers(0, 50, 45)
    offsets = np.array([0, 4, 4, 30, 44])
    w = rng.standard_normal(45).astype(np.float32)
    for weights in (None, w):
        for last in (False, True):
            tw = None if weights is None else torch.from_numpy(weights)
            offs = np.append(offsets, 45) if last else offsets
            want = op(
                fused,
                torch.from_numpy(idx),
                torch.from_numpy(offs),
                False,
                0,
                False,
                tw,
                None,
                last,
            ).numpy()
            got = embedding_bag(q, idx, offs, per_sample_weights=weights, include_last_offset=last)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # torch's quantized ops ignore mode (always the sum); qgemm honours it
    assert np.any(
        op(
            fused,
            torch.from_numpy(idx),
            torch.from_numpy(offsets),
            False,
            1,
            False,
            None,
            None,
            False,
        ).numpy()
        != mean_of(q, idx, offsets)
    )
    mean = embedding_bag(q, idx, offsets, mode="mean")
    np.testing.assert_allclose(
        mean, ref_embedding_bag(q.dequantize(), idx, offsets, mode="mean"), rtol=1e-5, atol=1e-5
    )


# -- the one bag validator (embedding_bag's words, used by qgemm.models too) -------------------
def ref_check_bags(indices, offsets, rows):
    """Plain-numpy reference of ``check_bags``: the first failure as ``(exception type,
    message fragment)``, or None.  Offsets are checked before indices, in order."""
    flat = np.asarray(indices).reshape(-1)
    if offsets is not None and offsets.size:
        offs = offsets.astype(np.int64)
        if offs[0] != 0:
            return ValueError, f"offsets[0] must be 0 (bags start at index 0), got {offs[0]}"
        dec = np.flatnonzero(offs[1:] < offs[:-1])
        if dec.size:
            b = int(dec[0]) + 1
            return ValueError, f"offsets[{b}] = {offs[b]} is smaller"
        if offs[-1] > flat.size:
            return ValueError, f"offsets[{offs.size - 1}] = {offs[-1]} is past the end"
    bad = np.flatnonzero((flat < 0) | (flat >= rows))
    if bad.size:
        i = int(bad[0])
        where = (
            i
            if np.ndim(indices) == 1
            else tuple(int(j) for j in np.unravel_index(i, np.shape(indices)))
        )
        return IndexError, f"index {flat[i]} at position {where} is out of range"
    return None


@given(
    rows=st.integers(1, 9),
    n=st.sampled_from([0, 1, 2, 5, 7]),
    bags=st.sampled_from([0, 1, 3]),
    idx_dtype=st.sampled_from([np.int32, np.int64]),
    seed=st.integers(0, 2**16),
)
def test_check_bags_matches_reference(rows, n, bags, idx_dtype, seed):
    rng = np.random.default_rng(seed)
    idx = rng.integers(-1, rows + 1, size=n).astype(idx_dtype)  # some out of range
    offs = np.sort(rng.integers(0, n + 2, size=bags)).astype(np.int64)
    if bags and rng.random() < 0.6:
        offs[0] = 0  # mostly valid starts, so the later checks are reached
    if bags > 1 and rng.random() < 0.3:
        offs[1:] = offs[1:][::-1]  # sometimes decreasing
    want = ref_check_bags(idx, offs, rows)
    if want is None:
        emb_mod.check_bags(idx, offs, rows)
    else:
        with pytest.raises(want[0]) as info:
            emb_mod.check_bags(idx, offs, rows)
        assert want[1] in str(info.value)
        assert str(info.value).startswith(("indices: ", "offsets: "))


def test_check_bags_fixed_size_and_names():
    idx = np.array([[0, 1], [2, 9]], np.int64)
    emb_mod.check_bags(idx[:1], None, rows=3)
    with pytest.raises(IndexError, match=r"^indices\[3\]: index 9 at position \(1, 1\) .* 3 rows"):
        emb_mod.check_bags(idx, None, rows=3, indices_name="indices[3]")
    with pytest.raises(ValueError, match=r"^offsets\[2\]: offsets\[2\]\[1\] = 7 is past the end"):
        emb_mod.check_bags(
            idx[0], np.array([0, 7]), rows=3, indices_name="indices[2]", offsets_name="offsets[2]"
        )


def test_check_bags_words_as_embedding_bag(small):
    """Both validators (the kernel's inline checks, the standalone pass) give one message."""
    t, _, _ = small
    cases = [
        (np.array([0, 1, 9]), np.array([0, 1])),  # bad index
        (np.array([0, 1, 2]), np.array([1, 2])),  # bad first offset
        (np.array([0, 1, 2]), np.array([0, 2, 1])),  # decreasing
        (np.array([0, 1, 2]), np.array([0, 4])),  # past the end
    ]
    for idx, offs in cases:
        with pytest.raises((IndexError, ValueError)) as a:
            embedding_bag(t, idx, offs)
        with pytest.raises(type(a.value)) as b:
            emb_mod.check_bags(idx, offs, t.shape[0])
        assert str(a.value) == str(b.value)
