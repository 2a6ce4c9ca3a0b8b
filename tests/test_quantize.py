from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import qgemm
from qgemm import QParams, choose_qparams, dequantize, quantize, quantize_rowwise
from qgemm.quantize import RowwiseQuantizedTable

from .conftest import torch_or_skip
from .reference import (
    ref_choose_qparams_fbgemm,
    ref_dequantize,
    ref_qrange,
    ref_quantize,
    ref_quantize_rowwise_fused,
)

finite_f32 = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


def float_arrays(min_dims=1, max_dims=3, max_side=9, elements=finite_f32):
    return hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=0, max_side=max_side),
        elements=elements,
    )


# --------------------------------------------------------------------------- QParams


def test_qparams_keywords_and_normalisation():
    qp = QParams(scale=0.25, zero_point=3, dtype="uint8")
    assert qp.scale.dtype == np.float32 and qp.zero_point.dtype == np.int32
    assert qp.granularity == "tensor" and (qp.qmin, qp.qmax) == (0, 255)
    qc = QParams(scale=[0.1, 0.2], zero_point=0, dtype="int8", axis=0)
    assert qc.granularity == "channel"
    np.testing.assert_array_equal(qc.zero_point, [0, 0])
    qg = QParams(scale=[0.1, 0.2], zero_point=[0, 1], dtype="int8", axis=1, group_size=4)
    assert qg.granularity == "group"
    s, z = qg.channel_params(8)
    np.testing.assert_array_equal(s, np.repeat(np.float32([0.1, 0.2]), 4))
    np.testing.assert_array_equal(z, [0, 0, 0, 0, 1, 1, 1, 1])
    assert QParams(0.5, 1) == QParams(0.5, 1) and hash(QParams(0.5, 1)) == hash(QParams(0.5, 1))
    assert QParams(0.5, 1) != QParams(0.5, 2)
    with pytest.raises(AttributeError):
        qp.scale = 1.0  # frozen
    assert "axis=0" in repr(qc)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"scale": 0.0}, ValueError, "scale"),
        ({"scale": float("nan")}, ValueError, "scale"),
        ({"scale": -1.0}, ValueError, "scale"),
        ({"scale": 1.0, "zero_point": 256}, ValueError, "zero_point"),
        ({"scale": 1.0, "zero_point": -1}, ValueError, "zero_point"),
        ({"scale": 1.0, "zero_point": 0.5}, ValueError, "zero_point"),
        ({"scale": 1.0, "zero_point": 128, "dtype": "int8"}, ValueError, "zero_point"),
        ({"scale": 1.0, "zero_point": 200, "reduce_range": True}, ValueError, "zero_point"),
        ({"scale": 1.0, "dtype": "int16"}, ValueError, "dtype"),
        ({"scale": [1.0, 2.0]}, ValueError, "axis"),
        ({"scale": 1.0, "group_size": 2}, ValueError, "group_size"),
        ({"scale": [1.0, 2.0], "zero_point": [0, 0, 0], "axis": 0}, ValueError, "zero_point"),
        ({"scale": [[1.0]], "axis": 0}, ValueError, "scale"),
        ({"scale": "a"}, TypeError, "scale"),
        ({"scale": [1.0], "axis": 0, "group_size": 0}, ValueError, "group_size"),
    ],
)
def test_qparams_rejects(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        QParams(**kwargs)


def test_channel_params_length_mismatch():
    qp = QParams([1.0, 2.0], 0, axis=0)
    with pytest.raises(ValueError, match="expected 3 scales"):
        quantize(np.zeros((3, 2), np.float32), qp)


# --------------------------------------------------------------------------- choose_qparams


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
@pytest.mark.parametrize("reduce_range", [False, True])
@given(x=float_arrays())
def test_choose_qparams_matches_fbgemm_reference(x, dtype, reduce_range):
    qp = choose_qparams(x, dtype=dtype, reduce_range=reduce_range)
    qmin, qmax = ref_qrange(dtype, reduce_range)
    lo = float(x.min()) if x.size else 0.0
    hi = float(x.max()) if x.size else 0.0
    scale, zp = ref_choose_qparams_fbgemm(lo, hi, qmin, qmax)
    assert qp.scale == scale
    assert int(qp.zero_point) == zp
    assert qmin <= int(qp.zero_point) <= qmax


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
@pytest.mark.parametrize("reduce_range", [False, True])
@given(x=float_arrays(elements=st.floats(-100, 100, width=32)), data=st.data())
def test_roundtrip_error_within_half_step(x, dtype, reduce_range, data):
    axis = None
    if x.ndim and data.draw(st.booleans()):
        axis = data.draw(st.integers(-x.ndim, x.ndim - 1))
    qp = choose_qparams(x, dtype=dtype, axis=axis, reduce_range=reduce_range)
    q = quantize(x, qp)
    assert q.dtype == np.dtype(dtype) and q.shape == x.shape
    if q.size:
        assert q.min() >= qp.qmin and q.max() <= qp.qmax
    err = np.abs(dequantize(q, qp) - x)
    if axis is None:
        step = np.float32(qp.scale)
    else:
        shape = [1] * x.ndim
        shape[axis] = -1
        step = qp.scale.reshape(shape)
    # half a step, plus float32 rounding of x / scale and of the product
    assert np.all(err <= step * 0.5 * (1 + 1e-4) + np.abs(x) * 1e-6 + 1e-7)


@given(x=float_arrays(elements=st.floats(-100, 100, width=32)), data=st.data())
def test_symmetric_int8(x, data):
    reduce_range = data.draw(st.booleans())
    axis = data.draw(st.sampled_from([None, *range(x.ndim)]))
    qp = choose_qparams(x, dtype="int8", symmetric=True, axis=axis, reduce_range=reduce_range)
    assert np.all(qp.zero_point == 0)
    half = 63 if reduce_range else 127
    q = quantize(x, qp)
    if q.size:
        assert q.min() >= -half and q.max() <= half

    def expected_scale(amax):
        s = np.float32(amax) / np.float32(half)
        with np.errstate(divide="ignore", over="ignore"):
            usable = s > 0 and np.isfinite(np.float32(1.0) / s)
        return s if usable else np.float32(0.1)  # FBGEMM's fallback

    if axis is None:
        assert qp.scale == expected_scale(np.abs(x).max() if x.size else 0.0)
    else:
        moved = np.moveaxis(x, axis, 0)
        for c in range(x.shape[axis]):
            amax = np.abs(moved[c]).max() if moved[c].size else 0.0
            assert qp.scale[c] == expected_scale(amax)


def test_symmetric_uint8_zero_point_centre():
    x = np.array([-2.0, 1.0, 2.0], np.float32)
    qp = choose_qparams(x, dtype="uint8", symmetric=True)
    assert int(qp.zero_point) == 128
    np.testing.assert_array_equal(quantize(x, qp), [1, 192, 255])
    assert int(choose_qparams(x, symmetric=True, reduce_range=True).zero_point) == 64


@given(
    x=hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 4), st.integers(0, 5)).map(lambda s: (s[0] * 2, s[1])),
        elements=st.floats(-50, 50, width=32),
    ),
    symmetric=st.booleans(),
)
def test_per_group_equals_per_channel_of_group_ranges(x, symmetric):
    qp = choose_qparams(x, dtype="int8", symmetric=symmetric, axis=0, group_size=2)
    assert qp.granularity == "group" and qp.scale.shape == (x.shape[0] // 2,)
    for g in range(x.shape[0] // 2):
        sub = x[2 * g : 2 * g + 2]
        one = choose_qparams(sub, dtype="int8", symmetric=symmetric)
        assert qp.scale[g] == one.scale and qp.zero_point[g] == one.zero_point
    q = quantize(x, qp)
    s, z = qp.channel_params(x.shape[0])
    np.testing.assert_array_equal(q, ref_quantize(x, s[:, None], z[:, None], -128, 127, np.int8))


def test_choose_qparams_edge_values():
    zero = choose_qparams(np.zeros(4, np.float32))
    assert zero.scale == np.float32(0.1) and int(zero.zero_point) == 0
    tiny = choose_qparams(np.array([0.0, 1e-6], np.float32))
    assert tiny.scale == np.float32(6.1e-5)
    neg = choose_qparams(np.array([-3.0, -1.0], np.float32))
    assert int(neg.zero_point) == 255
    empty = choose_qparams(np.zeros((0, 3), np.float32), axis=1)
    assert empty.scale.shape == (3,)


@pytest.mark.parametrize(
    ("x", "kwargs", "exc", "match"),
    [
        (np.array([1.0, np.nan], np.float32), {}, ValueError, "finite"),
        (np.array([1.0, np.inf], np.float32), {}, ValueError, "finite"),
        (np.array([1, 2], np.int32), {}, TypeError, "float"),
        ("abc", {}, TypeError, "x"),
        (np.zeros(3, np.float32), {"dtype": "int4"}, ValueError, "dtype"),
        (np.zeros(3, np.float32), {"axis": 1}, ValueError, "axis"),
        (np.zeros(3, np.float32), {"axis": 1.0}, TypeError, "axis"),
        (np.zeros((3, 2), np.float32), {"group_size": 2}, ValueError, "group_size"),
        (np.zeros((3, 2), np.float32), {"axis": 0, "group_size": 2}, ValueError, "divisor"),
        (np.float32(1.0), {"axis": 0}, ValueError, "axis"),
    ],
)
def test_choose_qparams_rejects(x, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        choose_qparams(x, **kwargs)


# --------------------------------------------------------------------------- quantize


@given(
    x=float_arrays(max_dims=3),
    dtype=st.sampled_from(["uint8", "int8"]),
    scale=st.floats(0.0009765625, 10, width=32),
    data=st.data(),
)
def test_quantize_matches_reference(x, dtype, scale, data):
    qmin, qmax = ref_qrange(dtype)
    zp = data.draw(st.integers(qmin, qmax))
    qp = QParams(scale, zp, dtype=dtype)
    np.testing.assert_array_equal(quantize(x, qp), ref_quantize(x, scale, zp, qmin, qmax, dtype))
    q = quantize(x, qp)
    np.testing.assert_array_equal(dequantize(q, qp), ref_dequantize(q, scale, zp))


def test_quantize_strided_transposed_and_other_float_dtypes(rng):
    base = rng.standard_normal((12, 10)).astype(np.float32)
    qp = choose_qparams(base, dtype="int8", symmetric=True, axis=1)
    view = base.T[::2]  # non-contiguous, transposed: axis=1 of qp is axis 0 of base
    qpv = QParams(qp.scale, 0, dtype="int8", axis=0)
    expect = ref_quantize(view, qp.scale[::2, None], 0, -128, 127, np.int8)
    qpv = QParams(qp.scale[::2], 0, dtype="int8", axis=0)
    np.testing.assert_array_equal(quantize(view, qpv), expect)
    qt = QParams(0.05, 10)
    for dt in (np.float16, np.float64):
        x = base.astype(dt)
        np.testing.assert_array_equal(
            quantize(x, qt), ref_quantize(x.astype(np.float32), 0.05, 10, 0, 255, np.uint8)
        )


def test_quantize_large_parallel_blocks(rng):
    x = rng.standard_normal(300_001).astype(np.float32)
    qp = choose_qparams(x)
    np.testing.assert_array_equal(
        quantize(x, qp), ref_quantize(x, qp.scale, qp.zero_point, 0, 255, np.uint8)
    )


def test_quantize_reduce_range_clamps_to_7_bits():
    qp = QParams(1.0, 0, reduce_range=True)
    np.testing.assert_array_equal(quantize(np.float32([0, 100, 200, 300]), qp), [0, 100, 127, 127])


def test_quantize_rejects_non_finite_naming_position():
    x = np.zeros((2, 3), np.float32)
    x[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"x: expected finite values, got nan at index \(1, 2\)"):
        quantize(x, QParams(1.0, 0))
    with pytest.raises(TypeError, match="qparams"):
        quantize(x, (1.0, 0))
    with pytest.raises(TypeError, match="x: expected a float array"):
        quantize(np.zeros(3, np.int64), QParams(1.0, 0))
    with pytest.raises(TypeError, match="q: expected dtype int8"):
        dequantize(np.zeros(3, np.uint8), QParams(1.0, 0, dtype="int8"))
    with pytest.raises(TypeError, match="qparams"):
        dequantize(np.zeros(3, np.uint8), None)


def test_quantize_empty_and_scalar():
    qp = QParams(0.5, 1)
    assert quantize(np.zeros((0, 4), np.float32), qp).shape == (0, 4)
    assert quantize(np.float32(1.0), qp) == 3
    assert dequantize(np.zeros((3, 0), np.uint8), qp).shape == (3, 0)


# --------------------------------------------------------------------------- rowwise tables


@pytest.mark.parametrize("bits", [8, 4, 2])
@given(
    table=hnp.arrays(
        np.float32,
        st.tuples(st.integers(0, 6), st.integers(0, 11)),
        elements=st.floats(-1e3, 1e3, width=32),
    ),
)
def test_quantize_rowwise_matches_fbgemm_reference(table, bits):
    t = quantize_rowwise(table, bits=bits)
    np.testing.assert_array_equal(t.fused, ref_quantize_rowwise_fused(table, bits))
    assert t.shape == table.shape and t.nbytes == t.fused.nbytes
    if table.size:
        deq = t.dequantize()
        step = t.scale.astype(np.float32)[:, None]
        # half a step, plus (4/2-bit) the float16 rounding of the row minimum into the bias
        slack = np.abs(table.min(axis=1) - t.bias.astype(np.float32))[:, None]
        assert np.all(np.abs(deq - table) <= step * 0.5 * (1 + 1e-3) + slack + 1e-4)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_rowwise_layout_and_roundtrip(bits, rng):
    w = rng.standard_normal((7, 13)).astype(np.float32)
    t = quantize_rowwise(w, bits=bits)
    per_byte = 8 // bits
    cb = -(-13 // per_byte)
    assert t.code_bytes == cb and t.row_bytes == cb + (8 if bits == 8 else 4)
    assert t.scale.dtype == (np.float32 if bits == 8 else np.float16)
    np.testing.assert_array_equal(t.bias, w.min(axis=1).astype(t.param_dtype))
    back = RowwiseQuantizedTable.from_fused(t.to_fused(), bits=bits, dim=13)
    np.testing.assert_array_equal(back.dequantize(), t.dequantize())
    np.testing.assert_array_equal(t.dequantize(slice(2, 4)), t.dequantize()[2:4])
    assert "bits=" in repr(t)
    # float16 input
    t16 = quantize_rowwise(w.astype(np.float16), bits=bits)
    np.testing.assert_array_equal(
        t16.fused, ref_quantize_rowwise_fused(w.astype(np.float16).astype(np.float32), bits)
    )


def test_rowwise_rejects():
    with pytest.raises(ValueError, match="bits"):
        quantize_rowwise(np.zeros((2, 2), np.float32), bits=3)
    with pytest.raises(TypeError, match="bits"):
        quantize_rowwise(np.zeros((2, 2), np.float32), bits=8.0)
    with pytest.raises(TypeError, match="table: expected dtype"):
        quantize_rowwise(np.zeros((2, 2), np.float64))
    with pytest.raises(ValueError, match="table: expected a 2-D"):
        quantize_rowwise(np.zeros(4, np.float32))
    bad = np.zeros((2, 2), np.float32)
    bad[1, 0] = np.inf
    msg = r"table: expected finite values, got inf at index \(1, 0\)"
    with pytest.raises(ValueError, match=msg):
        quantize_rowwise(bad)
    with pytest.raises(ValueError, match="dim"):
        RowwiseQuantizedTable.from_fused(np.zeros((2, 6), np.uint8), bits=4, dim=5)
    with pytest.raises(ValueError, match="fused"):
        RowwiseQuantizedTable.from_fused(np.zeros((2, 3), np.uint8), bits=4)
    with pytest.raises(TypeError, match="fused"):
        RowwiseQuantizedTable.from_fused(np.zeros((2, 12), np.int8), bits=8)


# --------------------------------------------------------------------------- torch cross-checks


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dim", [4, 16, 64, 100])
def test_rowwise_bytes_equal_torch_prepack(bits, dim, rng):
    torch = torch_or_skip()
    w = (rng.standard_normal((64, dim)) * rng.uniform(1e-3, 100, (64, 1))).astype(np.float32)
    w[0] = 0.5  # constant row
    op = {
        8: torch.ops.quantized.embedding_bag_byte_prepack,
        4: torch.ops.quantized.embedding_bag_4bit_prepack,
        2: torch.ops.quantized.embedding_bag_2bit_prepack,
    }[bits]
    ref = op(torch.from_numpy(w)).numpy()
    t = quantize_rowwise(w, bits=bits)
    np.testing.assert_array_equal(t.fused, ref)
    t2 = RowwiseQuantizedTable.from_fused(ref, bits=bits)
    assert t2.dim == dim


def test_quantize_matches_torch(rng):
    torch = torch_or_skip()
    x = (rng.standard_normal((6, 9)) * 4).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qp = choose_qparams(x)
        s, z = torch._choose_qparams_per_tensor(torch.from_numpy(x), False)
        assert abs(s - float(qp.scale)) <= 1e-6 * s and z == int(qp.zero_point)
        tq = torch.quantize_per_tensor(
            torch.from_numpy(x), float(qp.scale), int(qp.zero_point), torch.quint8
        )
        np.testing.assert_array_equal(tq.int_repr().numpy(), quantize(x, qp))
        qc = choose_qparams(x, dtype="int8", symmetric=True, axis=1)
        tc = torch.quantize_per_channel(
            torch.from_numpy(x),
            torch.from_numpy(qc.scale.astype(np.float64)),
            torch.from_numpy(qc.zero_point.astype(np.int64)),
            1,
            torch.qint8,
        )
        np.testing.assert_array_equal(tc.int_repr().numpy(), quantize(x, qc))


def test_public_names_exported():
    for name in (
        "QParams",
        "choose_qparams",
        "quantize",
        "dequantize",
        "quantize_rowwise",
        "RowwiseQuantizedTable",
        "cache_info",
        "cache_clear",
        "set_num_threads",
    ):
        assert name in qgemm.__all__ and hasattr(qgemm, name)


# ------------------------------------------------ the one ChooseQuantizationParams (njit scalar)

_RANGE_EDGES = [0.0, -0.0, 1e-45, 1e-38, 1e-30, 6.1e-5, 1e-3, 1.0, 3.0, 1e30, 1e38]


@pytest.mark.parametrize(("qmin", "qmax"), [(0, 255), (0, 127), (-128, 127), (-64, 63)])
@given(
    lo=st.one_of(
        st.sampled_from(_RANGE_EDGES), st.floats(0.0, float(np.float32(1e38)), width=32)
    ).map(lambda v: -v),
    hi=st.one_of(st.sampled_from(_RANGE_EDGES), st.floats(0.0, float(np.float32(1e38)), width=32)),
)
def test_choose_qparams_scalar_is_the_fbgemm_reference(lo, hi, qmin, qmax):
    """The single implementation (called by choose_qparams and the dynamic GEMM prologue),
    including tiny ranges that hit the small-scale threshold and huge ones."""
    from qgemm._kernels.quantize import choose_qparams_kernel, choose_qparams_scalar

    scale, zp = choose_qparams_scalar(np.float32(lo), np.float32(hi), qmin, qmax)
    with np.errstate(over="ignore", divide="ignore"):  # 1 / scale overflowing is the point
        ref_scale, ref_zp = ref_choose_qparams_fbgemm(lo, hi, qmin, qmax)
    assert float(np.float32(scale)) == scale == ref_scale  # a float32 value
    assert int(zp) == ref_zp and qmin <= int(zp) <= qmax
    vs = np.empty(2, np.float32)
    vz = np.empty(2, np.int32)
    choose_qparams_kernel(())(np.array([lo, 0.0]), np.array([hi, 0.0]), qmin, qmax, vs, vz)
    assert vs[0] == scale and vz[0] == zp
    assert (vs[1], vz[1]) == ref_choose_qparams_fbgemm(0.0, 0.0, qmin, qmax)


def test_choose_qparams_per_channel_uses_the_scalar_per_channel(rng):
    from qgemm._kernels.quantize import choose_qparams_scalar

    x = (rng.standard_normal((5, 7)) * np.array([1e-6, 1, 0, 50, 1e-30])[:, None]).astype(
        np.float32
    )
    qp = choose_qparams(x, axis=0)
    for c in range(5):
        s, z = choose_qparams_scalar(x[c].min(), x[c].max(), 0, 255)
        assert qp.scale[c] == s and qp.zero_point[c] == z


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_rowwise_empty_table_dequantizes(bits):
    t = qgemm.quantize_rowwise(np.zeros((0, 7), np.float32), bits=bits)
    assert t.dequantize().shape == (0, 7)
    assert t.scale.shape == (0,) and t.bias.shape == (0,)
    assert t.unpack_codes().shape == (0, 7)
