"""qgemm.models.DLRM and qgemm.interop.from_torch against an independent numpy forward
(tests/reference.py::ref_dlrm_forward) and against torch.

Tolerances:
* float32 model (numpy or qgemm engine) vs the float64 reference: |Δp| <= 1e-5 (float32
  rounding of O(1) logits).
* a model with rowwise-quantized tables but float MLPs vs the reference run on the
  *dequantized* tables: |Δp| <= 1e-5 (the pooled dequantized rows are exact up to float32
  summation order).
* the int8 model (int8 MLPs with dynamically quantized activations, 8-bit tables) vs the float
  reference: |Δp| <= 0.03 on the small models here (measured: up to 0.015); 4-bit tables:
  |Δp| <= 0.05 (measured: up to 0.02).  The error is dominated by the 7/8-bit activation
  quantization of every layer and is bounded by a few activation steps propagated through the
  top MLP; predictions themselves are in (0, 1).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qgemm
from qgemm.interop import Linear, from_torch
from qgemm.models import DLRM, random_table
from qgemm.quantize import RowwiseQuantizedTable

from .reference import ref_dlrm_forward

FLOAT_TOL = 1e-5
INT8_TOL = 0.03
INT4_TOL = 0.05


def ref(model: DLRM, dense, indices, offsets, tables=None):
    return ref_dlrm_forward(
        model.bottom,
        model.top,
        model.tables if tables is None else tables,
        dense,
        indices,
        offsets,
        model.self_interaction,
    )


@pytest.fixture(scope="module")
def model():
    # Table sizes include a 1-row table; dim 8; non-power-of-two layer sizes.
    return DLRM.random(tables=3, rows=[50, 70, 1], dim=8, bottom=(5, 17, 8), top=(12, 1), seed=3)


@pytest.fixture(scope="module")
def model_self():
    return DLRM.random(
        tables=2, rows=40, dim=6, bottom=(3, 6), top=(9, 5, 2), seed=4, self_interaction=True
    )


@pytest.fixture(scope="module")
def qmodel(model):
    return model.quantize(bits=8)


def bags_with_empties(model, batch, rng, dtype=np.int64):
    """Random bags of lengths 0..5 (so empty bags occur) per table."""
    indices, offsets = [], []
    for rows in model.rows:
        lengths = rng.integers(0, 6, size=batch)
        off = np.zeros(batch, dtype=dtype)
        if batch > 1:
            off[1:] = np.cumsum(lengths[:-1])
        indices.append(rng.integers(0, rows, size=int(lengths.sum())).astype(dtype))
        offsets.append(off)
    return indices, offsets


# -- float model --------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 2, 7, 33])
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_float_forward_matches_reference(model, batch, dtype, rng):
    dense = rng.random((batch, model.num_dense), dtype=np.float32)
    indices, offsets = bags_with_empties(model, batch, rng, dtype)
    got = model.predict(dense, indices, offsets)
    assert got.shape == (batch, 1) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref(model, dense, indices, offsets), rtol=0, atol=FLOAT_TOL)


def test_float_forward_self_interaction_multi_output(model_self, rng):
    dense, indices, offsets = model_self.random_inputs(9, pooling=3, seed=5)
    got = model_self.predict(dense, indices, offsets)
    assert got.shape == (9, 2)
    assert model_self.top_sizes == (6 + 6, 9, 5, 2)  # d + n(n+1)/2 with n = 3
    np.testing.assert_allclose(got, ref(model_self, dense, indices, offsets), atol=FLOAT_TOL)


def test_fixed_size_bags(model, rng):
    batch = 6
    dense = rng.random((batch, model.num_dense), dtype=np.float32)
    indices = [rng.integers(0, r, size=(batch, 3)) for r in model.rows]
    got = model.predict(dense, indices, None)
    np.testing.assert_allclose(got, ref(model, dense, indices, None), atol=FLOAT_TOL)


@pytest.mark.parametrize("batch", [0, 1, 5])
def test_flatten_bags_equal_the_batched_ops_own(qmodel, batch, rng):
    # the flat batched-op input of already checked bags (offsets, fixed [batch, L] bags,
    # int32 and int64 mixed): the tables' indices end to end, each table's offsets moved by
    # its start, as the op's own (validating) flattening of the same per-table lists gives
    from qgemm.embedding_batched import flatten_bags

    dense = rng.random((batch, qmodel.num_dense), dtype=np.float32)
    for fixed in (False, True):
        if fixed:
            dts = (np.int32, np.int64, np.int32)
            idx = [
                rng.integers(0, r, (batch, 3)).astype(dt)
                for r, dt in zip(qmodel.rows, dts, strict=True)
            ]
            off = None
        else:
            idx, off = bags_with_empties(qmodel, batch, rng, np.int64)
            idx[0], off[1] = idx[0].astype(np.int32), off[1].astype(np.int32)
        _, bags = qmodel._check_inputs(dense, idx, off)
        got = flatten_bags(bags, batch)
        sizes = [i.size for i, _ in bags]
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        per = [np.arange(batch) * i.shape[1] if o is None else o for i, o in bags]
        offs = np.concatenate([p + s for p, s in zip(per, starts, strict=False)] + [starts[-1:]])
        flat = np.concatenate([i.reshape(-1) for i, _ in bags])
        tbe = qgemm.TableBatchedEmbeddingBags(qmodel.tables)
        own = tbe._flat_bags([i for i, _ in bags], [o for _, o in bags], None, None)
        for want in ((flat, offs.astype(np.int64), starts), (own[0], own[1], own[4])):
            for g, w in zip(got, want, strict=True):
                assert g.dtype == w.dtype
                np.testing.assert_array_equal(g, w)
        emb = qmodel._embed(bags, batch)
        for k, (i, o) in enumerate(bags):
            np.testing.assert_array_equal(emb[k], qgemm.embedding_bag(qmodel.tables[k], i, o))


def test_empty_batch(model):
    dense = np.zeros((0, model.num_dense), np.float32)
    empty = [np.zeros(0, np.int64)] * model.num_tables
    out = model.predict(dense, empty, empty)
    assert out.shape == (0, 1)


def test_offsets_as_2d_array(model, rng):
    dense, indices, offsets = model.random_inputs(4, pooling=2, seed=1)
    stacked = np.stack(offsets)  # [tables, batch], as DLRM's lS_o
    np.testing.assert_array_equal(
        model.predict(dense, indices, stacked), model.predict(dense, indices, offsets)
    )


@given(batch=st.integers(1, 12), pooling=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_float_forward_hypothesis(model, batch, pooling, seed):
    dense, indices, offsets = model.random_inputs(batch, pooling=pooling, seed=seed)
    np.testing.assert_allclose(
        model.predict(dense, indices, offsets), ref(model, dense, indices, offsets), atol=FLOAT_TOL
    )


@given(batch=st.integers(1, 12), pooling=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_qgemm_engine_hypothesis(model, batch, pooling, seed):
    fast = model.with_engine("qgemm")
    dense, indices, offsets = model.random_inputs(
        batch, pooling=pooling, seed=seed, index_dtype=np.int32
    )
    np.testing.assert_allclose(
        fast.predict(dense, indices, offsets), ref(model, dense, indices, offsets), atol=FLOAT_TOL
    )


def test_timings_hook(model):
    dense, indices, offsets = model.random_inputs(5, seed=0)
    t = {"embedding": 1.0}
    model.predict(dense, indices, offsets, timings=t)
    assert set(t) == {"embedding", "mlp", "interaction"}
    assert t["embedding"] > 1.0 and t["mlp"] > 0 and t["interaction"] > 0


def test_random_is_reproducible(model):
    again = DLRM.random(tables=3, rows=[50, 70, 1], dim=8, bottom=(5, 17, 8), top=(12, 1), seed=3)
    for a, b in zip(model.tables, again.tables, strict=True):
        np.testing.assert_array_equal(a, b)
    other = DLRM.random(tables=3, rows=[50, 70, 1], dim=8, bottom=(5, 17, 8), top=(12, 1), seed=4)
    assert not np.array_equal(model.tables[0], other.tables[0])
    assert not np.array_equal(model.bottom[0][0], other.bottom[0][0])
    bound = 1 / np.sqrt(8)
    assert np.abs(model.tables[1]).max() <= bound


def test_interaction_twins_have_their_own_disk_cache_entries(rng):
    """Numba's disk cache keys an entry on bytecode and closure values, not on the njit
    options: the serial, parallel and strict-float interaction kernels must differ in their
    closures (else the first compiled serves all), and give the same numbers."""
    from qgemm._kernels.dlrm import interaction_kernel

    flags = frozenset({"contract", "nsz"})
    keys = [(False, flags, False), (False, flags, True), (False, False, True)]
    kerns = [interaction_kernel(k) for k in keys]
    cells = [repr([c.cell_contents for c in k.py_func.__closure__]) for k in kerns]
    assert len(set(cells)) == len(keys), cells
    x = rng.standard_normal((5, 4)).astype(np.float32)
    emb = rng.standard_normal((3, 5, 4)).astype(np.float32)
    outs = []
    for k in kerns:
        out = np.zeros((5, 4 + 6), np.float32)
        k(x, emb, out)
        outs.append(out)
    feats = [x, *emb]  # pairs (i, j < i) in order, each a per-sample dot product
    dots = [np.einsum("bt,bt->b", feats[i], feats[j]) for i in range(4) for j in range(i)]
    ref = np.concatenate([x, np.stack(dots, 1)], 1)
    for out in outs:
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_random_table_independent_of_threads():
    old = qgemm.set_num_threads(1)
    try:
        one = random_table(257, 5, low=-2, high=3, seed=11)
    finally:
        qgemm.set_num_threads(old)
    many = random_table(257, 5, low=-2, high=3, seed=11)
    np.testing.assert_array_equal(one, many)
    assert one.min() >= -2 and one.max() <= 3
    assert abs(float(one.mean()) - 0.5) < 0.3  # uniform on [-2, 3]: mean 0.5
    assert random_table(0, 4).shape == (0, 4)
    with pytest.raises(ValueError, match="low, high"):
        random_table(3, 3, low=1, high=0)


def test_state_dict_and_npz_round_trip(model, model_self, tmp_path):
    again = DLRM.from_state_dict(model.state_dict())
    dense, indices, offsets = model.random_inputs(4, seed=2)
    np.testing.assert_array_equal(
        again.predict(dense, indices, offsets), model.predict(dense, indices, offsets)
    )
    path = tmp_path / "m.npz"
    model_self.save(path)
    loaded = DLRM.load(path)
    assert loaded.self_interaction and loaded.top_sizes == model_self.top_sizes
    dense, indices, offsets = model_self.random_inputs(3, seed=2)
    np.testing.assert_array_equal(
        loaded.predict(dense, indices, offsets), model_self.predict(dense, indices, offsets)
    )
    sd = {"module." + k: v for k, v in model_self.state_dict().items()}  # DataParallel names
    assert DLRM.from_state_dict(sd).self_interaction  # inferred from the top input size


def test_memory(model):
    mem = model.memory()
    assert mem["embedding"] == sum(t.nbytes for t in model.tables)
    assert mem["mlp"] == sum(w.nbytes + b.nbytes for w, b in model.bottom + model.top)
    assert model.nbytes == mem["total"] == mem["embedding"] + mem["mlp"]


# -- quantized paths ----------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 5, 40])
def test_qgemm_engine_float_tables(model, batch, rng):
    fast = model.with_engine("qgemm")
    assert fast.engine == "qgemm" and fast.precision == "float32"
    dense = rng.random((batch, model.num_dense), dtype=np.float32)
    indices, offsets = bags_with_empties(model, batch, rng)
    np.testing.assert_allclose(
        fast.predict(dense, indices, offsets), ref(model, dense, indices, offsets), atol=FLOAT_TOL
    )


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantized_tables_exact_to_dequantized_reference(model, bits, rng):
    tables = [qgemm.quantize_rowwise(t, bits=bits) for t in model.tables]
    mixed = DLRM(model.bottom, model.top, tables)
    assert mixed.precision == "mixed" and mixed.engine == "qgemm"
    dense = rng.random((11, model.num_dense), dtype=np.float32)
    indices, offsets = bags_with_empties(model, 11, rng)
    deq = [t.dequantize() for t in tables]
    np.testing.assert_allclose(
        mixed.predict(dense, indices, offsets),
        ref(model, dense, indices, offsets, tables=deq),
        atol=FLOAT_TOL,
    )


def test_embeddings_table_batched_over_mixed_bits(model, rng):
    """The qgemm engine pools every table in one table-batched call (issue 16), tables of
    different bits included, with the per-table loop's result."""
    tables = [qgemm.quantize_rowwise(t, bits=(8, 4, 2)[k % 3]) for k, t in enumerate(model.tables)]
    mixed = DLRM(model.bottom, model.top, tables)
    dense = rng.random((9, model.num_dense), dtype=np.float32)
    indices, offsets = bags_with_empties(model, 9, rng)
    before = qgemm.cache_info().families["embedding_bags"]
    got = mixed.predict(dense, indices, offsets)
    after = qgemm.cache_info().families["embedding_bags"]
    assert after.hits + after.misses == before.hits + before.misses + 1  # one call, all tables
    deq = [t.dequantize() for t in tables]
    np.testing.assert_allclose(got, ref(model, dense, indices, offsets, tables=deq), atol=FLOAT_TOL)
    emb = mixed._embed(mixed._check_inputs(dense, indices, offsets)[1], 9)
    for k, t in enumerate(tables):
        one = qgemm.embedding_bag(t, indices[k], offsets[k])
        np.testing.assert_allclose(emb[k], one, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_int8_forward_close_to_reference(model, qmodel, batch):
    assert qmodel.precision == "int8" and qmodel.table_bits == 8
    dense, indices, offsets = model.random_inputs(batch, pooling=4, seed=batch)
    got = qmodel.predict(dense, indices, offsets)
    assert got.shape == (batch, 1) and got.dtype == np.float32
    err = np.abs(got - ref(model, dense, indices, offsets))
    assert err.max() <= INT8_TOL, err.max()


def test_int8_self_interaction_and_4bit(model_self):
    dense, indices, offsets = model_self.random_inputs(30, pooling=3, seed=8)
    expect = ref(model_self, dense, indices, offsets)
    for bits, tol in ((8, INT8_TOL), (4, INT4_TOL)):
        q = model_self.quantize(bits=bits)
        assert q.table_bits == bits
        assert np.abs(q.predict(dense, indices, offsets) - expect).max() <= tol


def test_int8_model_memory_and_timings(model, qmodel):
    mem_f, mem_q = model.memory(), qmodel.memory()
    assert mem_q["embedding"] == sum(t.nbytes for t in qmodel.tables)
    assert mem_q["embedding"] < mem_f["embedding"]
    assert mem_q["mlp"] == sum(w.nbytes + b.nbytes for w, b in qmodel.bottom + qmodel.top)
    assert all(isinstance(t, RowwiseQuantizedTable) for t in qmodel.tables)
    t = {}
    dense, indices, offsets = model.random_inputs(3, seed=0)
    qmodel.predict(dense, indices, offsets, timings=t)
    assert all(t[p] > 0 for p in ("embedding", "mlp", "interaction"))
    assert "int8" in repr(qmodel)
    # the float model is untouched and stays the baseline
    assert model.precision == "float32" and model.engine == "numpy"


def test_quantize_errors(model, qmodel):
    with pytest.raises(ValueError, match="bits"):
        model.quantize(bits=3)
    with pytest.raises(TypeError, match="float32 model"):
        qmodel.quantize()
    with pytest.raises(TypeError, match="state_dict"):
        qmodel.state_dict()


# -- input validation ---------------------------------------------------------------------------


def test_predict_errors(model):
    dense, indices, offsets = model.random_inputs(4, pooling=2, seed=0)
    with pytest.raises(TypeError, match="dense"):
        model.predict(dense.astype(np.float64), indices, offsets)
    with pytest.raises(ValueError, match="dense"):
        model.predict(dense[:, :3], indices, offsets)
    bad = dense.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="dense"):
        model.predict(bad, indices, offsets)
    with pytest.raises(ValueError, match="indices"):
        model.predict(dense, indices[:2], offsets)
    with pytest.raises(ValueError, match="offsets"):
        model.predict(dense, indices, offsets[:2])
    with pytest.raises(TypeError, match="indices"):
        model.predict(dense, 5, offsets)
    with pytest.raises(TypeError, match=r"indices\[0\]"):
        model.predict(dense, [indices[0].astype(np.float32)] + indices[1:], offsets)
    oob = [i.copy() for i in indices]
    oob[1][-1] = model.rows[1]
    with pytest.raises(IndexError, match=r"indices\[1\]"):
        model.predict(dense, oob, offsets)
    neg = [i.copy() for i in indices]
    neg[2][0] = -1
    with pytest.raises(IndexError, match=r"indices\[2\]"):
        model.predict(dense, neg, offsets)
    dec = [o.copy() for o in offsets]
    dec[0][2] = dec[0][1] - 1 if dec[0][1] > 0 else 5
    dec[0][3] = 0
    with pytest.raises(ValueError, match=r"offsets\[0\]"):
        model.predict(dense, indices, dec)
    first = [o.copy() for o in offsets]
    first[1][0] = 1
    with pytest.raises(ValueError, match=r"offsets\[1\]"):
        model.predict(dense, indices, first)
    past = [o.copy() for o in offsets]
    past[0][-1] = indices[0].size + 1
    with pytest.raises(ValueError, match=r"offsets\[0\]"):
        model.predict(dense, indices, past)
    with pytest.raises(ValueError, match=r"offsets\[0\]"):
        model.predict(dense, indices, [offsets[0][:3]] + offsets[1:])
    with pytest.raises(ValueError, match=r"indices\[0\]"):  # 1-D indices need offsets
        model.predict(dense, indices, None)


def test_predict_bag_errors_use_the_embedding_validator(model, qmodel, rng):
    """A model's bags are checked by ``qgemm.embedding.check_bags``: embedding_bag's wording,
    with the table's number in the argument names, before anything runs (both engines)."""
    batch = 3
    dense = rng.random((batch, model.num_dense), dtype=np.float32)
    fixed = [rng.integers(0, r, size=(batch, 2)) for r in model.rows]
    fixed[1][2, 1] = model.rows[1]
    for m in (model, qmodel):
        with pytest.raises(IndexError, match=r"^indices\[1\]: index 70 at position \(2, 1\) "):
            m.predict(dense, fixed, None)
    _, indices, offsets = model.random_inputs(batch, pooling=2, seed=2)
    past = [o.copy() for o in offsets]
    past[2][-1] = indices[2].size + 1
    want = (
        rf"^offsets\[2\]: offsets\[2\]\[2\] = {indices[2].size + 1} is past the end of indices\[2\]"
    )
    for m in (model, qmodel):
        with pytest.raises(ValueError, match=want):
            m.predict(dense, indices, past)


def test_construction_errors(model):
    with pytest.raises(ValueError, match="bottom"):
        DLRM.random(tables=2, rows=10, dim=4, bottom=(3, 5), top=(1,))
    with pytest.raises(ValueError, match="rows"):
        DLRM.random(tables=2, rows=[10, 10, 10], dim=4, bottom=(3, 4), top=(1,))
    with pytest.raises(ValueError, match="tables"):
        DLRM.random(tables=0, rows=10, dim=4, bottom=(3, 4), top=(1,))
    with pytest.raises(TypeError, match="tables"):
        DLRM(model.bottom, model.top, model.tables[0])
    with pytest.raises(ValueError, match="tables"):
        DLRM(
            model.bottom,
            model.top,
            [model.tables[0], np.zeros((3, 5), np.float32), model.tables[2]],
        )
    with pytest.raises(ValueError, match="top"):
        DLRM(model.bottom, model.top, model.tables[:2])
    with pytest.raises(TypeError, match=r"tables\[0\]"):
        DLRM(model.bottom, model.top, [t.astype(np.float64) for t in model.tables])
    w, b = model.bottom[1]
    with pytest.raises(ValueError, match=r"bottom\[1\]"):
        DLRM([model.bottom[0], (w[:, :-1], b)], model.top, model.tables)
    with pytest.raises(ValueError, match=r"bottom\[1\].bias"):
        DLRM([model.bottom[0], (w, b[:-1])], model.top, model.tables)
    with pytest.raises(ValueError, match="engine"):
        model.with_engine("torch")
    with pytest.raises(TypeError, match="self_interaction"):
        DLRM(model.bottom, model.top, model.tables, self_interaction="yes")


def test_state_dict_errors(model):
    sd = dict(model.state_dict())
    with pytest.raises(ValueError, match="unsupported key"):
        DLRM.from_state_dict({**sd, "emb_l.0.weight_q": sd["emb_l.0.weight"]})
    with pytest.raises(ValueError, match="emb_l"):
        DLRM.from_state_dict({k: v for k, v in sd.items() if not k.startswith("emb_l")})
    gap = {k: v for k, v in sd.items() if k != "emb_l.1.weight"}
    with pytest.raises(ValueError, match="numbered"):
        DLRM.from_state_dict(gap)
    with pytest.raises(TypeError, match="state_dict"):
        DLRM.from_state_dict([1, 2])
    with pytest.raises(TypeError, match="floating"):
        DLRM.from_state_dict({**sd, "emb_l.0.weight": np.zeros((3, 8), np.int64)})
    f64 = DLRM.from_state_dict({k: v.astype(np.float64) for k, v in sd.items()})
    assert f64.tables[0].dtype == np.float32  # float64 state dicts are converted


# -- torch interop ------------------------------------------------------------------------------


# torch 2.13 deprecates torch.ao.quantization (eager-mode quantization), which the quantized
# module cross-checks below use on purpose: their warnings are silenced per test.


def _torch():
    torch = pytest.importorskip("torch")
    torch.backends.quantized.engine = "fbgemm"
    return torch


def test_from_torch_linear():
    torch = _torch()
    torch.manual_seed(0)
    lin = torch.nn.Linear(37, 19)
    layer = from_torch(lin)
    w, b = layer
    assert isinstance(layer, Linear) and layer.shape == (19, 37)
    wf = lin.weight.detach().numpy()
    step = np.abs(wf).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(w.dequantize() - wf) <= step / 2 + 1e-7)
    np.testing.assert_array_equal(b, lin.bias.detach().numpy())
    x = torch.randn(6, 37)
    got = layer(x.numpy(), relu=True)
    want = torch.relu(lin(x)).detach().numpy()
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()
    nobias = from_torch(torch.nn.Linear(8, 3, bias=False))
    assert nobias.bias is None


@pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max:UserWarning")
def test_from_torch_dynamic_quantized_linear():
    torch = _torch()
    torch.manual_seed(1)
    m = torch.nn.Sequential(torch.nn.Linear(40, 24))
    dq = torch.ao.quantization.quantize_dynamic(m, {torch.nn.Linear}, dtype=torch.qint8)[0]
    layer = from_torch(dq)
    np.testing.assert_array_equal(layer.weight.unpack(), dq.weight().int_repr().numpy())
    x = torch.randn(5, 40)
    got = layer(x.numpy())
    want = dq(x).numpy()
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()


@pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max:UserWarning")
def test_from_torch_static_quantized_linear():
    torch = _torch()
    from qgemm import QParams

    tq = torch.ao.quantization
    torch.manual_seed(5)
    net = torch.nn.Sequential(tq.QuantStub(), torch.nn.Linear(20, 7), tq.DeQuantStub())
    net.qconfig = tq.get_default_qconfig("fbgemm")
    prepared = tq.prepare(net)
    prepared(torch.randn(64, 20))
    qnet = tq.convert(prepared)
    qlin = qnet[1]
    layer = from_torch(qlin)
    assert layer.output_qparams is not None
    assert float(layer.output_qparams.scale) == pytest.approx(qlin.scale, rel=1e-6)
    np.testing.assert_array_equal(layer.weight.unpack(), qlin.weight().int_repr().numpy())
    xq = qnet[0](torch.randn(9, 20))
    x_qp = QParams(np.float32(xq.q_scale()), np.int32(xq.q_zero_point()))
    got = layer(xq.int_repr().numpy(), x_qp)
    want = qlin(xq).int_repr().numpy()
    assert got.dtype == np.uint8
    assert np.abs(got.astype(np.int32) - want.astype(np.int32)).max() <= 1  # 1 LSB


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_from_torch_embedding_bag(bits):
    torch = _torch()
    torch.manual_seed(2)
    eb = torch.nn.EmbeddingBag(30, 6, mode="mean")
    bag = from_torch(eb, bits=bits)
    assert bag.mode == "mean" and bag.shape == (30, 6)
    idx = torch.tensor([1, 2, 29, 4, 0, 7, 7])
    off = torch.tensor([0, 3, 3])
    want = eb(idx, off).detach().numpy()
    got = bag(idx.numpy(), off.numpy())
    if bits is None:
        np.testing.assert_allclose(got, want, atol=1e-6)
    else:
        prepack = (
            torch.ops.quantized.embedding_bag_byte_prepack
            if bits == 8
            else torch.ops.quantized.embedding_bag_4bit_prepack
        )
        np.testing.assert_array_equal(bag.table.fused, prepack(eb.weight.detach()).numpy())
        np.testing.assert_allclose(got, want, atol=0.6 if bits == 4 else 0.03)


def test_from_torch_embedding_bag_options():
    torch = _torch()
    torch.manual_seed(6)
    eb = torch.nn.EmbeddingBag(12, 5, mode="mean", padding_idx=2, include_last_offset=True)
    bag = from_torch(eb)
    assert bag.padding_idx == 2 and bag.include_last_offset
    idx = torch.tensor([2, 3, 2, 11, 0, 2])
    off = torch.tensor([0, 2, 2, 6])  # the last offset closes the last bag
    np.testing.assert_allclose(
        bag(idx.numpy(), off.numpy()), eb(idx, off).detach().numpy(), atol=1e-6
    )
    summed = torch.nn.EmbeddingBag(12, 5, mode="sum")
    w = torch.rand(6)
    np.testing.assert_allclose(
        from_torch(summed)(idx.numpy(), off[:-1].numpy(), w.numpy()),
        summed(idx, off[:-1], per_sample_weights=w).detach().numpy(),
        atol=1e-6,
    )


@pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max:UserWarning")
@pytest.mark.parametrize("bits", [8, 4])
def test_from_torch_quantized_embedding_bag(bits):
    torch = _torch()
    import torch.ao.nn.quantized as nnq

    torch.manual_seed(3)
    f = torch.nn.EmbeddingBag(25, 8, mode="sum")
    qc = torch.ao.quantization
    f.qconfig = (
        qc.float_qparams_weight_only_qconfig
        if bits == 8
        else qc.float_qparams_weight_only_qconfig_4bit
    )
    qm = nnq.EmbeddingBag.from_float(f)
    bag = from_torch(qm)
    assert bag.table.bits == bits
    idx = torch.tensor([3, 24, 0, 5, 5, 9, 1])
    off = torch.tensor([0, 2, 2, 6])
    np.testing.assert_allclose(bag(idx.numpy(), off.numpy()), qm(idx, off).numpy(), atol=1e-5)


def _torch_dlrm(torch, sizes_bot, sizes_top, tables, dim):
    """A module with facebookresearch/dlrm's DLRM_Net layout and forward (dot interaction)."""
    nn = torch.nn

    def mlp(sizes, sigmoid_last):
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            last = i == len(sizes) - 2
            layers.append(nn.Sigmoid() if sigmoid_last and last else nn.ReLU())
        return nn.Sequential(*layers)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb_l = nn.ModuleList([nn.EmbeddingBag(r, dim, mode="sum") for r in tables])
            self.bot_l = mlp(sizes_bot, False)
            self.top_l = mlp(sizes_top, True)

        def forward(self, dense, offsets, indices):
            x = self.bot_l(dense)
            ly = [e(i, o) for e, i, o in zip(self.emb_l, indices, offsets, strict=True)]
            b, d = x.shape
            t = torch.cat([x] + ly, dim=1).view((b, -1, d))
            z = torch.bmm(t, torch.transpose(t, 1, 2))
            n = z.shape[1]
            li = torch.tensor([i for i in range(n) for j in range(i)])
            lj = torch.tensor([j for i in range(n) for j in range(i)])
            return self.top_l(torch.cat([x, z[:, li, lj]], dim=1))

    return Net()


def test_from_torch_dlrm_net():
    torch = _torch()
    torch.manual_seed(4)
    net = _torch_dlrm(torch, [4, 10, 6], [6 + 6, 7, 1], [20, 30, 5], 6)
    m = from_torch(net)
    assert isinstance(m, DLRM) and m.rows == (20, 30, 5) and not m.self_interaction
    dense, indices, offsets = m.random_inputs(7, pooling=3, seed=0)
    with torch.no_grad():
        want = net(
            torch.from_numpy(dense),
            [torch.from_numpy(o) for o in offsets],
            [torch.from_numpy(i) for i in indices],
        ).numpy()
    np.testing.assert_allclose(m.predict(dense, indices, offsets), want, atol=FLOAT_TOL)
    # torch tensors (requires_grad parameters) are accepted by from_state_dict directly
    m2 = DLRM.from_state_dict(net.state_dict())
    np.testing.assert_array_equal(m2.tables[1], m.tables[1])


def test_from_torch_errors():
    torch = _torch()
    with pytest.raises(TypeError, match="module"):
        from_torch(np.zeros(3))
    with pytest.raises(TypeError, match="unsupported"):
        from_torch(torch.nn.ReLU())
    with pytest.raises(ValueError, match="bits"):
        from_torch(torch.nn.EmbeddingBag(4, 2), bits=3)
    with pytest.raises(ValueError, match="max_norm"):
        from_torch(torch.nn.EmbeddingBag(4, 2, max_norm=1.0))


def test_torch_not_imported_by_qgemm():
    import subprocess
    import sys

    code = "import sys, qgemm, qgemm.models, qgemm.interop; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
