"""qgemm.embedding_batched (the table-batched op) against the per-table numpy reference.

Compile-time budget: a kernel is one Numba compilation per (table groups, index dtypes, mode,
weighted, parallel).  The parametrised tests share one mixed table set (:func:`mixed`, every
kind at a specialised dim plus an empty table and a generic dim); the hypothesis test draws
only generic dims for a fixed kind order, so its kernels stay at one per mode.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qgemm.embedding_batched as eb
from qgemm import embedding_bag, quantize_rowwise
from qgemm.embedding_batched import TableBatchedEmbeddingBags, embedding_bags

from .reference import ref_embedding_bag, ref_embedding_bag_tolerance

KINDS = ("float32", "float16", 8, 4, 2)


def make_table(kind, rows, dim, rng):
    """(table argument, the dense float table it represents)."""
    base = rng.standard_normal((rows, dim)).astype(np.float32)
    if kind == "float32":
        return base, base
    if kind == "float16":
        t = base.astype(np.float16)
        return t, t.astype(np.float32)
    q = quantize_rowwise(base, bits=kind)
    # (RowwiseQuantizedTable.dequantize fails on a table of no rows: its dense form is empty)
    return q, (q.dequantize() if rows else np.zeros((0, dim), np.float32))


def ref_batched(dense_tables, idx_l, off_l, mode="sum", weights_l=None, pads=None):
    """Numpy reference: the per-table reference, concatenated; with its tolerance."""
    outs, tols = [], []
    for t, dense in enumerate(dense_tables):
        w = None if weights_l is None else weights_l[t]
        pad = None if pads is None else pads[t]
        if dense.shape[0] == 0:  # no rows: every bag is empty
            outs.append(np.zeros((len(off_l[t]), dense.shape[1])))
            tols.append(np.full((len(off_l[t]), dense.shape[1]), 1e-6))
            continue
        outs.append(ref_embedding_bag(dense, idx_l[t], off_l[t], None, mode, w, False, pad))
        tol = ref_embedding_bag_tolerance(dense, idx_l[t], off_l[t], None, w)
        if mode == "mean":
            tol = tol + 1e-6 * np.abs(outs[-1])
        tols.append(tol)
    return np.concatenate(outs, axis=1), np.concatenate(tols, axis=1)


def random_bags(rows_l, batch, rng, max_len=5, empty_every=3, dtype=np.int64):
    """Per-table (indices, torch offsets [B]) lists; every ``empty_every``-th bag is empty."""
    idx_l, off_l = [], []
    for rows in rows_l:
        lens = rng.integers(0, max_len + 1, batch) if rows else np.zeros(batch, np.int64)
        if empty_every:
            lens[::empty_every] = 0
        idx_l.append(rng.integers(0, max(rows, 1), int(lens.sum())).astype(dtype))
        off_l.append((np.cumsum(lens) - lens).astype(dtype))
    return idx_l, off_l


def flatten(idx_l, off_l, dtype=np.int64):
    """Per-table lists -> TBE's flat (indices, offsets [T*B + 1])."""
    base = np.cumsum([0] + [i.size for i in idx_l])
    idx = np.concatenate(idx_l).astype(dtype)
    offs = np.concatenate([o + b for o, b in zip(off_l, base, strict=False)] + [[base[-1]]])
    return idx, offs.astype(dtype)


def check(got, want, tol):
    assert got.dtype == np.float32 and got.shape == want.shape
    err = np.abs(got.astype(np.float64) - want)
    assert np.all(err <= tol), f"max error {err.max()} (tolerance {tol.max()})"


# Shared table set: every kind at a specialised dim, an empty table, a generic dim and a
# float32 table that is a column slice of a wider one (rows spaced, read in place).
SPEC = (("float32", 40, 16), (8, 50, 64), ("float16", 30, 8), (4, 20, 32), (2, 25, 12),
        ("float32", 0, 8), (8, 17, 6), ("float32", 13, 3))  # fmt: skip


@pytest.fixture(scope="module")
def mixed():
    rng = np.random.default_rng(7)
    tables, dense = [], []
    for kind, rows, dim in SPEC:
        t, d = make_table(kind, rows, dim, rng)
        tables.append(t)
        dense.append(d)
    wide = rng.standard_normal((23, 20)).astype(np.float32)
    tables.append(wide[:, 4:12])  # spaced rows
    dense.append(wide[:, 4:12])
    return TableBatchedEmbeddingBags(tables), dense


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("batch", [1, 7])
def test_mixed_tables_match_reference(mixed, mode, batch):
    tbe, dense = mixed
    rng = np.random.default_rng(batch)
    idx_l, off_l = random_bags(tbe.rows, batch, rng)
    want, tol = ref_batched(dense, idx_l, off_l, mode)
    idx, offs = flatten(idx_l, off_l)
    check(tbe(idx, offs, mode=mode), want, tol)
    check(tbe(idx_l, off_l, mode=mode), want, tol)  # per-table lists, same result
    assert tbe.total_dim == sum(d.shape[1] for d in dense)
    assert np.array_equal(tbe.cols, np.cumsum([0] + [d.shape[1] for d in dense]))


def test_equals_per_table_loop(mixed):
    tbe, _ = mixed
    rng = np.random.default_rng(3)
    idx_l, off_l = random_bags(tbe.rows, 9, rng)
    got = tbe(idx_l, off_l)
    for t, table in enumerate(tbe.tables):
        if tbe.rows[t] == 0:
            assert not got[:, tbe.cols[t] : tbe.cols[t + 1]].any()
            continue
        one = embedding_bag(table, idx_l[t], off_l[t])
        np.testing.assert_allclose(got[:, tbe.cols[t] : tbe.cols[t + 1]], one, rtol=1e-6,
                                   atol=1e-6)  # fmt: skip


def test_weights_and_padding(mixed):
    tbe, dense = mixed
    rng = np.random.default_rng(11)
    idx_l, off_l = random_bags(tbe.rows, 6, rng, empty_every=0)
    w_l = [rng.standard_normal(i.size).astype(np.float32) for i in idx_l]
    pads = [1, None, -1, 0, 3, None, 2, None, 5]
    want, tol = ref_batched(dense, idx_l, off_l, "sum", w_l, pads)
    idx, offs = flatten(idx_l, off_l)
    got = tbe(idx, offs, per_sample_weights=np.concatenate(w_l), padding_idx=pads)
    check(got, want, tol)
    check(tbe(idx_l, off_l, per_sample_weights=w_l, padding_idx=pads), want, tol)
    # padding with the mean: padded rows are not counted
    want, tol = ref_batched(dense, idx_l, off_l, "mean", None, pads)
    check(tbe(idx, offs, mode="mean", padding_idx=pads), want, tol)


def test_lengths_int32_and_fixed_bags(mixed):
    tbe, dense = mixed
    rng = np.random.default_rng(5)
    idx_l, off_l = random_bags(tbe.rows, 4, rng)
    want, tol = ref_batched(dense, idx_l, off_l)
    idx, offs = flatten(idx_l, off_l, dtype=np.int32)
    check(tbe(idx, offs), want, tol)
    check(tbe(idx, lengths=np.diff(offs).astype(np.int32)), want, tol)
    # 2-D fixed-size bags (no empty table then: every bag has L rows)
    fixed = TableBatchedEmbeddingBags([t for t, r in zip(tbe.tables, tbe.rows, strict=True) if r])
    dfix = [d for d in dense if d.shape[0]]
    idx2 = [rng.integers(0, r, (4, 3)) for r in fixed.rows]
    want2, tol2 = ref_batched(dfix, [i.reshape(-1) for i in idx2], [np.arange(4) * 3] * len(dfix))
    check(fixed(idx2), want2, tol2)


def test_out_in_place_and_float16(mixed):
    tbe, dense = mixed
    rng = np.random.default_rng(8)
    idx_l, off_l = random_bags(tbe.rows, 5, rng)
    want, tol = ref_batched(dense, idx_l, off_l)
    idx, offs = flatten(idx_l, off_l)
    out = np.full((5, tbe.total_dim), np.nan, np.float32)
    assert tbe(idx, offs, out=out) is out
    check(out, want, tol)
    h = np.empty((5, tbe.total_dim), np.float16)
    assert tbe(idx, offs, out=h) is h
    np.testing.assert_array_equal(h, out.astype(np.float16))
    np.testing.assert_array_equal(tbe(idx, offs, out_dtype=np.float16), h)


def test_parallel_equals_serial(mixed, monkeypatch):
    tbe, _ = mixed
    rng = np.random.default_rng(9)
    idx_l, off_l = random_bags(tbe.rows, 33, rng, max_len=9)
    idx, offs = flatten(idx_l, off_l)
    serial = tbe(idx, offs)
    monkeypatch.setattr(eb, "PARALLEL_MIN_WORK", 0)
    np.testing.assert_array_equal(tbe(idx, offs), serial)


@pytest.mark.parametrize("tasks", [1, 3, 64])
def test_parallel_task_counts_equal_serial(mixed, monkeypatch, tasks):
    # the threads take tasks from a shared counter: any number of tasks, the same bits
    tbe, _ = mixed
    rng = np.random.default_rng(11)
    idx_l, off_l = random_bags(tbe.rows, 41, rng, max_len=9)
    idx, offs = flatten(idx_l, off_l)
    serial = tbe(idx, offs, mode="mean")
    monkeypatch.setattr(eb, "PARALLEL_MIN_WORK", 0)
    monkeypatch.setattr(eb, "TASKS_PER_THREAD", tasks)
    np.testing.assert_array_equal(tbe(idx, offs, mode="mean"), serial)


def _float32_at(dense, offset_bytes, row_stride=None):
    """``dense`` in a buffer whose first element sits ``offset_bytes`` past a 64-byte boundary,
    NaN around the rows (rows ``row_stride`` floats apart)."""
    rows, dim = dense.shape
    stride = dim if row_stride is None else row_stride
    buf = np.full(rows * stride + 64, np.nan, np.float32)
    start = (-(buf.ctypes.data % 64) % 64 + offset_bytes) // 4
    view = buf[start : start + rows * stride].reshape(rows, stride)[:, :dim]
    view[...] = dense
    assert view.ctypes.data % 64 == offset_bytes
    return view


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_float32_alignments_match_single_table(mode, monkeypatch):
    # float32 rows 16 bytes past a vector boundary (numpy's large arrays) take aligned loads
    # from before the row; other offsets and spaced rows the plain loads: same results
    rng = np.random.default_rng(5)
    tables, dense = [], []
    for dim, offset, stride in [(16, 16, None), (64, 16, None), (128, 16, None), (32, 0, None),
                                (64, 48, None), (16, 16, 24), (32, 16, 40)]:  # fmt: skip
        d = rng.standard_normal((19, dim)).astype(np.float32)
        tables.append(_float32_at(d, offset, stride))
        dense.append(d)
    tbe = TableBatchedEmbeddingBags(tables)
    idx_l, off_l = random_bags(tbe.rows, 6, rng, max_len=7)
    idx_l[0][:2] = [0, 18]  # first and last row of a table (the loads around the table)
    want, tol = ref_batched(dense, idx_l, off_l, mode)
    got = tbe(idx_l, off_l, mode=mode)
    check(got, want, tol)
    for t, table in enumerate(tables):
        one = embedding_bag(table, idx_l[t], off_l[t], mode=mode)
        np.testing.assert_array_equal(got[:, tbe.cols[t] : tbe.cols[t + 1]], one)
    monkeypatch.setattr(eb, "PARALLEL_MIN_WORK", 0)
    np.testing.assert_array_equal(tbe(idx_l, off_l, mode=mode), got)


def test_bad_index_names_table_bag_value(mixed):
    tbe, _ = mixed
    rng = np.random.default_rng(2)
    idx_l, off_l = random_bags(tbe.rows, 6, rng, empty_every=0)
    t, b = 3, 4
    idx_l[t][off_l[t][b] + 1] = tbe.rows[t]  # one past the end, second row of bag b
    idx, offs = flatten(idx_l, off_l)
    out = np.full((6, tbe.total_dim), 7.0, np.float32)
    with pytest.raises(IndexError, match=rf"index {tbe.rows[t]} of table {t} at bag {b} "):
        tbe(idx, offs, out=out)
    assert np.all(out == 7.0)
    with pytest.raises(IndexError, match=rf"table {t} at bag {b} \(indices\[{t}\]\["):
        tbe(idx_l, off_l, out=out)
    assert np.all(out == 7.0)
    idx_l[t][off_l[t][b] + 1] = -1
    with pytest.raises(IndexError, match=rf"index -1 of table {t} at bag {b} "):
        tbe(idx_l, off_l, out=out)
    # any index into the empty table is out of range
    idx_l, off_l = random_bags(tbe.rows, 2, rng, empty_every=0)
    idx_l[5] = np.array([0], np.int64)
    off_l[5] = np.array([0, 0], np.int64)
    with pytest.raises(IndexError, match="index 0 of table 5 at bag 1 "):
        tbe(idx_l, off_l)


def test_bad_offsets_and_arguments(mixed):
    tbe, _ = mixed
    T = tbe.num_tables
    idx = np.zeros(2 * T, np.int64)
    offs = np.arange(2 * T + 1, dtype=np.int64)
    with pytest.raises(ValueError, match="T \\* B \\+ 1"):
        tbe(idx, offs[:-1])
    bad = offs.copy()
    bad[0] = 1
    with pytest.raises(ValueError, match=r"offsets\[0\] must be 0"):
        tbe(idx, bad)
    bad = offs.copy()
    bad[5] = 2
    with pytest.raises(ValueError, match=r"non-decreasing.*offsets\[5\] = 2"):
        tbe(idx, bad)
    bad = offs.copy()
    bad[-1] = 2 * T - 1
    with pytest.raises(ValueError, match=r"offsets\[-1\] == len\(indices\)"):
        tbe(idx, bad)
    with pytest.raises(ValueError, match="non-negative"):
        tbe(idx, lengths=np.array([-1, 2] + [0] * (2 * T - 2)))
    with pytest.raises(ValueError, match="adding up"):
        tbe(idx, lengths=np.ones(2 * T - 2, np.int64).tolist() + [0, 0])
    with pytest.raises(TypeError, match="indices"):
        tbe(idx.astype(np.float32), offs)
    with pytest.raises(ValueError, match="mode"):
        tbe(idx, offs, mode="prod")
    with pytest.raises(ValueError, match="per_sample_weights: only supported with mode='sum'"):
        tbe(idx, offs, mode="max", per_sample_weights=np.ones(2 * T, np.float32))
    with pytest.raises(ValueError, match="per_sample_weights: expected one weight per index"):
        tbe(idx, offs, per_sample_weights=np.ones(3, np.float32))
    with pytest.raises(ValueError, match=r"out: expected shape \(2, "):
        tbe(idx, offs, out=np.empty((3, tbe.total_dim), np.float32))
    with pytest.raises(TypeError, match="out: expected dtype"):
        tbe(idx, offs, out=np.empty((2, tbe.total_dim), np.float64))
    with pytest.raises(ValueError, match="padding_idx: expected a row in"):
        tbe(idx, offs, padding_idx=40)
    with pytest.raises(ValueError, match="padding_idx: expected one per table"):
        tbe(idx, offs, padding_idx=[0, 1])
    with pytest.raises(ValueError, match=r"indices: expected \d+ arrays"):
        tbe([idx], [offs])
    with pytest.raises(TypeError, match=r"tables\[1\]:"):
        TableBatchedEmbeddingBags([np.zeros((2, 4), np.float32), np.zeros((2, 4), np.int8)])
    with pytest.raises(TypeError, match="tables: expected a sequence"):
        TableBatchedEmbeddingBags(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="at least one table"):
        TableBatchedEmbeddingBags([])


def test_many_groups_fold_into_generic():
    """More distinct (kind, dim) signatures than one kernel specialises: the extras are pooled
    by their kind's run-time-dim code, with the same results."""
    rng = np.random.default_rng(4)
    dims = [4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
    pairs = [make_table("float32", 9, d, rng) for d in dims]
    tbe = TableBatchedEmbeddingBags([p[0] for p in pairs])
    assert len(tbe._groups) <= eb.MAX_GROUPS
    idx_l, off_l = random_bags(tbe.rows, 3, rng)
    want, tol = ref_batched([p[1] for p in pairs], idx_l, off_l)
    check(embedding_bags(tbe, idx_l, off_l), want, tol)


@given(
    data=st.data(),
    batch=st.sampled_from([0, 1, 2, 5]),
    mode=st.sampled_from(["sum", "mean", "max"]),
)
def test_property_generic_dims(data, batch, mode):
    """Fixed kind order, generic dims (one compiled kernel per mode), any rows/bags."""
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    tables, dense = [], []
    for kind in KINDS:
        rows = data.draw(st.sampled_from([0, 1, 3, 10]))
        dim = data.draw(st.sampled_from([1, 3, 5, 6, 10]))
        t, d = make_table(kind, rows, dim, rng)
        tables.append(t)
        dense.append(d)
    idx_l, off_l = random_bags([d.shape[0] for d in dense], batch, rng, empty_every=4)
    want, tol = ref_batched(dense, idx_l, off_l, mode)
    idx, offs = flatten(idx_l, off_l)
    check(embedding_bags(tables, idx, offs, mode=mode), want, tol)


# -- FBGEMM's TBE modules (fbgemm-gpu-cpu, optional) ------------------------------------------
def _tbe_inputs(rows_l, batch, rng, torch):
    idx_l, off_l = random_bags(rows_l, batch, rng, empty_every=4)
    idx, offs = flatten(idx_l, off_l)
    return idx, offs, torch.from_numpy(idx), torch.from_numpy(offs)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_from_torch_intnbit_tbe_matches_fbgemm(mode):
    torch = pytest.importorskip("torch")
    pytest.importorskip("fbgemm_gpu")
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
        IntNBitTableBatchedEmbeddingBagsCodegen,
    )
    from fbgemm_gpu.tbe.config.embedding_config import EmbeddingLocation, PoolingMode

    import qgemm

    host = EmbeddingLocation.HOST
    specs = [("a", 50, 16, SparseType.INT8, host), ("b", 30, 8, SparseType.INT4, host),
             ("c", 20, 12, SparseType.INT2, host), ("d", 40, 8, SparseType.FP16, host),
             ("e", 25, 4, SparseType.FP32, host), ("f", 10, 6, SparseType.INT8, host)]  # fmt: skip
    pm = PoolingMode.SUM if mode == "sum" else PoolingMode.MEAN
    tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
        specs, device="cpu", pooling_mode=pm, output_dtype=SparseType.FP32
    )
    tbe.fill_random_weights()
    # fill_random_weights draws raw bytes: give every quantized row a sane scale and bias
    rng = np.random.default_rng(0)
    for (w, sb), spec in zip(tbe.split_embedding_weights(), specs, strict=True):
        if sb is not None:
            qp = np.stack(
                [rng.uniform(0.01, 0.1, spec[1]), rng.uniform(-1, 1, spec[1])], axis=1
            ).astype(np.float16)
            sb.copy_(torch.from_numpy(qp.view(np.uint8)))
        else:
            dt = np.float16 if spec[3] == SparseType.FP16 else np.float32
            vals = rng.standard_normal((spec[1], w.shape[1] // np.dtype(dt).itemsize))
            w.copy_(torch.from_numpy(vals.astype(dt).view(np.uint8)))
    ours = qgemm.from_torch(tbe)
    assert isinstance(ours, TableBatchedEmbeddingBags) and ours.mode == mode
    assert ours.dims == tuple(s[2] for s in specs)
    for batch in (1, 6):
        idx, offs, ti, to = _tbe_inputs(ours.rows, batch, rng, torch)
        want = tbe(ti.int(), to.int()).numpy()
        got = ours(idx, offs)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_from_torch_split_tbe_matches_fbgemm():
    torch = pytest.importorskip("torch")
    pytest.importorskip("fbgemm_gpu")
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )
    from fbgemm_gpu.tbe.config.embedding_config import EmbeddingLocation, PoolingMode

    import qgemm

    host, cpu = EmbeddingLocation.HOST, ComputeDevice.CPU
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(40, 8, host, cpu), (25, 16, host, cpu), (9, 4, host, cpu)],
        pooling_mode=PoolingMode.SUM,
        feature_table_map=[0, 1, 2, 1],
    )
    ours = qgemm.from_torch(tbe)
    assert ours.num_tables == 4 and ours.dims == (8, 16, 4, 16)
    rng = np.random.default_rng(1)
    idx, offs, ti, to = _tbe_inputs(ours.rows, 5, rng, torch)
    want = tbe(ti, to).detach().numpy()
    np.testing.assert_allclose(ours(idx, offs), want, rtol=1e-5, atol=1e-5)


# -- rowwise AdaGrad (qgemm.training.sparse) ------------------------------------------------------
def ref_rowwise_adagrad(tables, moms, idx_l, off_l, grad, lr, eps, wd=0.0, mode="sum", w_l=None):
    """Numpy (float64) rowwise AdaGrad; torch-convention per-table offsets ``[B]``.  Returns
    the updated (tables, momenta) as new arrays."""
    new_t, new_m = [], []
    col = 0
    for t, (tab, mom) in enumerate(zip(tables, moms, strict=True)):
        tab = tab.astype(np.float64)
        mom = mom.astype(np.float64)
        rows, dim = tab.shape
        idx = np.asarray(idx_l[t])
        offs = list(off_l[t]) + [idx.size]
        g = {}
        for b in range(len(offs) - 1):
            n = offs[b + 1] - offs[b]
            for k in range(offs[b], offs[b + 1]):
                w = 1.0 if w_l is None else float(w_l[t][k])
                if mode == "mean":
                    w /= n
                r = int(idx[k])
                g[r] = g.get(r, 0.0) + w * grad[b, col : col + dim].astype(np.float64)
        for r, gr in g.items():
            gr = gr + wd * tab[r]
            mom[r] += np.mean(gr * gr)
            tab[r] -= lr / (np.sqrt(mom[r]) + eps) * gr
        new_t.append(tab)
        new_m.append(mom)
        col += dim
    return new_t, new_m


@pytest.mark.parametrize(
    ("mode", "weighted", "wd"), [("sum", False, 0.0), ("mean", False, 0.01), ("sum", True, 0.0)]
)
def test_rowwise_adagrad_matches_reference(mode, weighted, wd):
    from qgemm.training.sparse import rowwise_adagrad, rowwise_adagrad_state

    rng = np.random.default_rng(21)
    shapes = [(30, 8), (12, 5), (1, 4), (0, 3)]  # incl. one row (all bags hit it) and no rows
    tables = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    moms = [m + rng.uniform(0, 1, m.shape).astype(np.float32) for m in
            rowwise_adagrad_state(tables)]  # fmt: skip
    batch = 7
    idx_l, off_l = random_bags([s[0] for s in shapes], batch, rng, max_len=6)
    idx_l[0][: min(4, idx_l[0].size)] = 3  # duplicates, across bags
    w_l = [rng.standard_normal(i.size).astype(np.float32) for i in idx_l] if weighted else None
    grad = rng.standard_normal((batch, sum(s[1] for s in shapes))).astype(np.float32)
    want_t, want_m = ref_rowwise_adagrad(tables, moms, idx_l, off_l, grad, 0.05, 1e-6, wd, mode,
                                         w_l)  # fmt: skip
    idx, offs = flatten(idx_l, off_l)
    rowwise_adagrad(tables, moms, idx, offs, grad, lr=0.05, eps=1e-6, weight_decay=wd, mode=mode,
                    per_sample_weights=None if w_l is None else np.concatenate(w_l))  # fmt: skip
    for t in range(len(shapes)):
        np.testing.assert_allclose(moms[t], want_m[t], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(tables[t], want_t[t], rtol=1e-5, atol=1e-6)


def test_rowwise_adagrad_bad_index_changes_nothing():
    from qgemm.training.sparse import rowwise_adagrad, rowwise_adagrad_state

    rng = np.random.default_rng(2)
    tables = [rng.standard_normal((10, 4)).astype(np.float32) for _ in range(2)]
    before = [t.copy() for t in tables]
    moms = rowwise_adagrad_state(tables)
    idx_l = [np.array([1, 2, 3]), np.array([4, 10])]
    off_l = [np.array([0, 2]), np.array([0, 1])]
    grad = np.ones((2, 8), np.float32)
    with pytest.raises(IndexError, match="index 10 of table 1 at bag 1 "):
        rowwise_adagrad(tables, moms, idx_l, off_l, grad, lr=0.1)
    for t in range(2):
        np.testing.assert_array_equal(tables[t], before[t])
        assert not moms[t].any()
    with pytest.raises(ValueError, match=r"grad_output: expected shape \(2, 8\)"):
        rowwise_adagrad(tables, moms, [np.array([1]), np.array([2])],
                        [np.array([0, 1]), np.array([0, 1])], np.ones((2, 7), np.float32),
                        lr=0.1)  # fmt: skip
    with pytest.raises(ValueError, match=r"momentum\[0\]"):
        rowwise_adagrad(tables, [np.zeros(3, np.float32)] * 2, idx_l, off_l, grad, lr=0.1)
    with pytest.raises(TypeError, match=r"tables\[0\]"):
        rowwise_adagrad([tables[0].astype(np.float64), tables[1]], moms, idx_l, off_l, grad,
                        lr=0.1)  # fmt: skip
    with pytest.raises(ValueError, match="mode"):
        rowwise_adagrad(tables, moms, idx_l, off_l, grad, lr=0.1, mode="max")


def test_rowwise_adagrad_matches_fbgemm():
    torch = pytest.importorskip("torch")
    pytest.importorskip("fbgemm_gpu")
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )
    from fbgemm_gpu.tbe.config.embedding_config import EmbeddingLocation, PoolingMode

    import qgemm
    from qgemm.training.sparse import rowwise_adagrad, rowwise_adagrad_state

    host, cpu = EmbeddingLocation.HOST, ComputeDevice.CPU
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(20, 8, host, cpu), (15, 4, host, cpu)],
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=0.05,
        eps=1e-6,
        pooling_mode=PoolingMode.SUM,
    )
    tables = [w.detach().numpy().copy() for w in tbe.split_embedding_weights()]
    moms = rowwise_adagrad_state(tables)
    rng = np.random.default_rng(3)
    idx, offs, ti, to = _tbe_inputs([20, 15], 6, rng, torch)
    grad = rng.standard_normal((6, 12)).astype(np.float32)
    tbe(ti, to).backward(torch.from_numpy(grad))
    rowwise_adagrad(tables, moms, idx, offs, grad, lr=0.05, eps=1e-6)
    for t, w in enumerate(tbe.split_embedding_weights()):
        np.testing.assert_allclose(tables[t], w.detach().numpy(), rtol=1e-5, atol=1e-6)
        mom = tbe.split_optimizer_states()[t][0].numpy()
        np.testing.assert_allclose(moms[t], mom, rtol=1e-5, atol=1e-7)
    assert qgemm.from_torch(tbe).num_tables == 2


@given(
    data=st.data(),
    batch=st.sampled_from([0, 1, 3, 8]),
    mode=st.sampled_from(["sum", "mean"]),
)
def test_property_rowwise_adagrad(data, batch, mode):
    """Any rows (0, 1, odd), dims and bags: equal to the numpy reference."""
    from qgemm.training.sparse import rowwise_adagrad, rowwise_adagrad_state

    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    shapes = [
        (data.draw(st.sampled_from([0, 1, 5, 17])), data.draw(st.sampled_from([1, 3, 8])))
        for _ in range(data.draw(st.integers(1, 3)))
    ]
    tables = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    moms = rowwise_adagrad_state(tables)
    idx_l, off_l = random_bags([s[0] for s in shapes], batch, rng, max_len=4, empty_every=3)
    grad = rng.standard_normal((batch, sum(s[1] for s in shapes))).astype(np.float32)
    want_t, want_m = ref_rowwise_adagrad(tables, moms, idx_l, off_l, grad, 0.1, 1e-5, 0.0, mode)
    rowwise_adagrad(tables, moms, idx_l, off_l, grad, lr=0.1, eps=1e-5, mode=mode)
    for t in range(len(shapes)):
        np.testing.assert_allclose(moms[t], want_m[t], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(tables[t], want_t[t], rtol=1e-5, atol=1e-6)
