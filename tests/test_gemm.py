"""Tests of qgemm.gemm: packing, the raw product, the fused output stages, every ISA path.

Agreement stated by the tests: raw int32 products and the requantized uint8 output are exact
(bit for bit) against the int64/float32 numpy reference in ``tests/reference.py`` -- qgemm
computes the same float32 operations in the same order; float outputs agree within
FLOAT32_RTOL/ATOL.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qgemm
from qgemm import _config
from qgemm.gemm import PackedWeight, linear, matmul_u8s8, pack_weight, quantized_linear
from qgemm.quantize import QParams, choose_qparams

from .conftest import FLOAT32_ATOL, FLOAT32_RTOL
from .reference import (
    ref_choose_qparams_fbgemm,
    ref_gemm_corrected,
    ref_linear_dynamic,
    ref_matmul_u8s8,
    ref_output_float,
    ref_output_requant,
)

ISAS = _config.supported_isas()


@pytest.fixture(params=ISAS)
def isa(request):
    old = _config.set_isa(request.param)
    yield request.param
    _config.set_isa(old)


def _codes(rng, n, k, lo=-128, hi=127):
    return rng.integers(lo, hi + 1, (n, k), dtype=np.int8)


def _pw_int8(codes, granularity="channel", zp=False, group_size=None, rng=None):
    n = codes.shape[0]
    rng = rng or np.random.default_rng(0)
    if granularity == "tensor":
        qp = QParams(0.02, 3 if zp else 0, dtype="int8")
    elif granularity == "channel":
        z = rng.integers(-5, 6, n).astype(np.int32) if zp else 0
        qp = QParams(rng.uniform(0.005, 0.05, n).astype(np.float32), z, dtype="int8", axis=0)
    else:
        g = -(-n // group_size)
        z = rng.integers(-5, 6, g).astype(np.int32) if zp else 0
        qp = QParams(
            rng.uniform(0.005, 0.05, g).astype(np.float32),
            z,
            dtype="int8",
            axis=0,
            group_size=group_size,
        )
    return pack_weight(codes, qparams=qp), qp


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("shape", [(0, 0), (1, 1), (3, 5), (17, 4), (16, 7), (65, 130), (5, 0)])
def test_pack_unpack_roundtrip(shape, rng):
    w = _codes(rng, *shape)
    pw = pack_weight(w, qparams=QParams(0.1, 0, dtype="int8"))
    assert pw.shape == shape and isinstance(pw, PackedWeight)
    np.testing.assert_array_equal(pw.unpack(), w)
    assert pw.unpack().dtype == np.int8
    assert pw.nbytes >= w.size
    assert pw._packed.size == 0 or pw._packed.ctypes.data % 64 == 0
    assert "PackedWeight" in repr(pw)


def test_pack_strided_and_readonly_views(rng):
    base = _codes(rng, 40, 70)
    for w in (base.T, base[::2, ::3], base[::-1]):
        np.testing.assert_array_equal(
            pack_weight(w, qparams=QParams(0.1, 0, dtype="int8")).unpack(), w
        )
    ro = base.copy()
    ro.setflags(write=False)
    pw = pack_weight(ro, qparams=QParams(0.1, 0, dtype="int8"))
    np.testing.assert_array_equal(pw.unpack(), ro)
    pairs = np.abs(np.pad(ro.astype(int), ((0, 0), (0, 2))))[:, :70].reshape(40, 35, 2)
    assert pw._pairmax == pairs.sum(axis=-1).max()
    np.testing.assert_array_equal(pw._colc, ro.sum(axis=1))


@pytest.mark.parametrize(
    ("gran", "kw", "axis", "gs"),
    [
        ("channel", {}, 0, None),
        ("tensor", {"granularity": "tensor"}, None, None),
        ("group", {"granularity": "group", "group_size": 4}, 0, 4),
    ],
)
@pytest.mark.parametrize("reduce_range", [False, True])
def test_pack_float_matches_choose_qparams(gran, kw, axis, gs, reduce_range, rng):
    w = rng.standard_normal((12, 9)).astype(np.float32)
    pw = pack_weight(w, reduce_range=reduce_range, **kw)
    qp = choose_qparams(
        w, dtype="int8", symmetric=True, axis=axis, group_size=gs, reduce_range=reduce_range
    )
    assert pw.qparams == qp and pw.granularity == gran
    np.testing.assert_array_equal(pw.unpack(), qgemm.quantize(w, qp))
    lim = 63 if reduce_range else 127
    assert np.abs(pw.unpack().astype(int)).max() == lim
    np.testing.assert_allclose(pw.dequantize(), w, atol=float(np.max(pw.scale)) / 2 + 1e-7)
    assert pw.scale.shape == (12,) and not pw.scale.flags.writeable


def test_pack_with_qparams_for_float_weights(rng):
    w = rng.standard_normal((4, 8)).astype(np.float32)
    qp = QParams(0.05, 2, dtype="int8")
    pw = pack_weight(w, qparams=qp)
    np.testing.assert_array_equal(pw.unpack(), qgemm.quantize(w, qp))
    np.testing.assert_array_equal(pw.zero_point, [2] * 4)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"w": np.zeros((2, 2), np.float64)}, TypeError, "w"),
        ({"w": np.zeros(3, np.float32)}, ValueError, "w"),
        ({"w": np.zeros((2, 2), np.int8)}, ValueError, "qparams"),
        ({"w": np.zeros((2, 2), np.float32), "qparams": 1.0}, TypeError, "qparams"),
        ({"w": np.zeros((2, 2), np.float32), "granularity": "row"}, ValueError, "granularity"),
        ({"w": np.zeros((2, 2), np.float32), "granularity": "group"}, ValueError, "group_size"),
        ({"w": np.zeros((4, 2), np.float32), "group_size": 2}, ValueError, "group_size"),
        (
            {"w": np.zeros((3, 2), np.float32), "granularity": "group", "group_size": 2},
            ValueError,
            "group_size",
        ),
        ({"w": np.array([[np.nan, 1]], np.float32)}, ValueError, "w"),
        ({"w": np.zeros((2, 2), np.int8), "qparams": QParams(0.1, 0)}, ValueError, "qparams"),
        (
            {
                "w": np.zeros((2, 2), np.int8),
                "qparams": QParams([0.1] * 3, 0, dtype="int8", axis=0),
            },
            ValueError,
            "qparams",
        ),
        (
            {
                "w": np.zeros((2, 2), np.int8),
                "qparams": QParams([0.1] * 2, 0, dtype="int8", axis=1),
            },
            ValueError,
            "qparams",
        ),
        (
            {
                "w": np.zeros((2, 2), np.int8),
                "qparams": QParams(0.1, 0, dtype="int8"),
                "granularity": "channel",
            },
            ValueError,
            "granularity",
        ),
        (
            {
                "w": np.full((2, 2), 100, np.int8),
                "qparams": QParams(0.1, 0, dtype="int8"),
                "reduce_range": True,
            },
            ValueError,
            "reduce_range",
        ),
        ({"w": np.zeros((2, 2), np.float32), "reduce_range": 1}, TypeError, "reduce_range"),
        (
            {"w": np.zeros((1, 65794), np.int8), "qparams": QParams(0.1, 0, dtype="int8")},
            ValueError,
            "too large",
        ),
        (
            {"w": np.zeros((1, 33026), np.int8), "qparams": QParams(0.1, 1, dtype="int8")},
            ValueError,
            "too large",
        ),
    ],
)
def test_pack_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        pack_weight(**kwargs)


# --------------------------------------------------------------------------- raw product

# Shapes covering 0, 1, sizes that are not multiples of 4 (K), 16/64 (N) or of any MR.
RAW_SHAPES = [
    (1, 1, 1),
    (0, 5, 8),
    (3, 0, 8),
    (2, 3, 0),
    (7, 17, 13),
    (6, 64, 32),
    (13, 70, 36),
    (1, 130, 260),
]


@pytest.mark.parametrize("mnk", RAW_SHAPES)
def test_matmul_exact_all_isas(isa, mnk, rng):
    m, n, k = mnk
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    b = rng.integers(-128, 128, (k, n), dtype=np.int8)
    out = matmul_u8s8(a, b)
    assert out.dtype == np.int32 and out.shape == (m, n)
    np.testing.assert_array_equal(out, ref_matmul_u8s8(a, b.T))
    pw = pack_weight(np.ascontiguousarray(b.T), qparams=QParams(1.0, 0, dtype="int8"))
    np.testing.assert_array_equal(matmul_u8s8(a, pw), out)


@pytest.mark.parametrize("mnk", [(5, 33, 40), (1, 8, 6), (9, 70, 128)])
def test_matmul_saturate_reproduces_fbgemm_avx2(isa, mnk, rng):
    m, n, k = mnk
    a = rng.integers(128, 256, (m, k), dtype=np.uint8)
    b = rng.integers(-128, 128, (k, n), dtype=np.int8)
    b[:, 0] = 127  # guarantees saturating pairs in column 0
    a[0] = 255
    sat = matmul_u8s8(a, b, saturate=True)
    np.testing.assert_array_equal(sat, ref_matmul_u8s8(a, b.T, saturate=True))
    exact = matmul_u8s8(a, b)
    np.testing.assert_array_equal(exact, ref_matmul_u8s8(a, b.T))
    assert (sat != exact).any()


def test_matmul_worst_case_pairs(isa):
    # A = 255, B = 127: each pmaddubsw pair is 64770 -> saturates to 32767 (half the true sum)
    a = np.full((2, 512), 255, np.uint8)
    b = np.full((512, 3), 127, np.int8)
    np.testing.assert_array_equal(matmul_u8s8(a, b), np.full((2, 3), 255 * 127 * 512))
    np.testing.assert_array_equal(matmul_u8s8(a, b, saturate=True), np.full((2, 3), 32767 * 256))
    b[:] = -128
    np.testing.assert_array_equal(matmul_u8s8(a, b), np.full((2, 3), -255 * 128 * 512))
    np.testing.assert_array_equal(matmul_u8s8(a, b, saturate=True), np.full((2, 3), -32768 * 256))


def test_matmul_fast_path_when_provably_exact(isa, rng):
    # activations <= 127 and reduce-range weights both make vpmaddubsw exact
    a = rng.integers(0, 128, (5, 64), dtype=np.uint8)
    b = rng.integers(-128, 128, (64, 40), dtype=np.int8)
    np.testing.assert_array_equal(matmul_u8s8(a, b), ref_matmul_u8s8(a, b.T))
    a2 = rng.integers(0, 256, (5, 64), dtype=np.uint8)
    b2 = rng.integers(-64, 64, (64, 40), dtype=np.int8)
    np.testing.assert_array_equal(matmul_u8s8(a2, b2), ref_matmul_u8s8(a2, b2.T))


@given(
    m=st.integers(0, 11),
    n=st.integers(0, 70),
    k=st.integers(0, 40),
    saturate=st.booleans(),
    transposed=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_matmul_hypothesis(m, n, k, saturate, transposed, seed):
    rng = np.random.default_rng(seed)
    if transposed:  # strided / transposed views of a
        a = rng.integers(0, 256, (k, m), dtype=np.uint8).T
        b = rng.integers(-128, 128, (n, k), dtype=np.int8).T
    else:
        a = rng.integers(0, 256, (m, 2 * k), dtype=np.uint8)[:, ::2]
        b = rng.integers(-128, 128, (k, n), dtype=np.int8)
    out = matmul_u8s8(a, b, saturate=saturate)
    np.testing.assert_array_equal(out, ref_matmul_u8s8(a, b.T, saturate=saturate))


def test_matmul_parallel_path(isa, rng):
    # big enough for the parallel twin (and for row-chunk splitting with few column tiles; the
    # last: many column tiles, the last 64-column panel and 16-column tile partial)
    for m, n, k in [(64, 200, 100), (300, 20, 64), (7, 1000, 700)]:
        a = rng.integers(0, 256, (m, k), dtype=np.uint8)
        b = rng.integers(-128, 128, (k, n), dtype=np.int8)
        np.testing.assert_array_equal(matmul_u8s8(a, b), ref_matmul_u8s8(a, b.T))


def test_parallel_output_stages(rng):
    """Problems large enough for the parallel kernels (threads > 1) and the parallel
    activation-quantization prologue, default ISA: every output stage, with zero points."""
    m, n, k = 300, 100, 256
    codes = _codes(rng, n, k)
    pw, _ = _pw_int8(codes, "channel", zp=True, rng=rng)
    xq = rng.integers(0, 256, (m, k), dtype=np.uint8)
    xqp = QParams(0.03, 117)
    bias = rng.standard_normal(n).astype(np.float32)
    raw = ref_gemm_corrected(xq, 117, codes, pw.zero_point)
    oqp = QParams(0.2, 5)
    np.testing.assert_array_equal(
        quantized_linear(xq, xqp, pw, bias, relu=True, out_qparams=oqp),
        ref_output_requant(raw, xqp.scale, pw.scale, oqp.scale, 5, bias, True),
    )
    np.testing.assert_allclose(
        quantized_linear(xq, xqp, pw, bias),
        ref_output_float(raw, xqp.scale, pw.scale, bias),
        rtol=FLOAT32_RTOL,
        atol=FLOAT32_ATOL,
    )
    x = rng.standard_normal((m, k)).astype(np.float32)
    _check_linear(x, pw, codes, bias, True, None)
    x[150, 7] = np.nan
    with pytest.raises(ValueError, match=r"x: .*index \(150, 7\)"):
        linear(x, pw)


def test_matmul_out_and_readonly_inputs(rng):
    a = rng.integers(0, 256, (4, 8), dtype=np.uint8)
    b = rng.integers(-128, 128, (8, 5), dtype=np.int8)
    a.setflags(write=False)
    out = np.full((4, 5), -7, np.int32)
    res = matmul_u8s8(np.broadcast_to(a[:1], (4, 8)), b, out=out)
    assert res is out
    np.testing.assert_array_equal(out, ref_matmul_u8s8(np.broadcast_to(a[:1], (4, 8)), b.T))
    np.testing.assert_array_equal(matmul_u8s8(a, b), ref_matmul_u8s8(a, b.T))


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "match"),
    [
        ((np.zeros((2, 3), np.int8), np.zeros((3, 2), np.int8)), {}, TypeError, "a"),
        ((np.zeros((2, 3), np.uint8), np.zeros((3, 2), np.uint8)), {}, TypeError, "b"),
        ((np.zeros((2, 3), np.uint8), np.zeros((4, 2), np.int8)), {}, ValueError, "a"),
        ((np.zeros(3, np.uint8), np.zeros((3, 2), np.int8)), {}, ValueError, "a"),
        ((np.zeros((2, 3), np.uint8), np.zeros(3, np.int8)), {}, ValueError, "b"),
        (
            (np.zeros((2, 3), np.uint8), np.zeros((3, 2), np.int8)),
            {"out": np.zeros((2, 2), np.int64)},
            TypeError,
            "out",
        ),
        (
            (np.zeros((2, 3), np.uint8), np.zeros((3, 2), np.int8)),
            {"out": np.zeros((2, 3), np.int32)},
            ValueError,
            "out",
        ),
        (
            (np.zeros((2, 3), np.uint8), np.zeros((3, 2), np.int8)),
            {"out": np.zeros((2, 4), np.int32)[:, ::2]},
            ValueError,
            "out",
        ),
        (
            (np.zeros((2, 3), np.uint8), np.zeros((3, 2), np.int8)),
            {"saturate": 1},
            TypeError,
            "saturate",
        ),
        (
            (np.zeros((1, 65794), np.uint8), np.zeros((65794, 1), np.int8)),
            {},
            ValueError,
            "too large",
        ),
        (("x", np.zeros((3, 2), np.int8)), {}, TypeError, "a"),
    ],
)
def test_matmul_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        matmul_u8s8(*args, **kwargs)


# --------------------------------------------------------------------------- static output stages


def _bias(kind, n, rng):
    if kind is None:
        return None
    if kind == "float":
        return rng.standard_normal(n).astype(np.float32)
    return rng.integers(-3000, 3000, n).astype(np.int32)


def _check_quantized_linear(
    m, n, k, gran, zp, bias_kind, relu, out_kind, saturate, rng, batch=None, strided=False
):
    codes = _codes(rng, n, k)
    pw, qp = _pw_int8(codes, gran, zp, group_size=4 if gran == "group" else None, rng=rng)
    shape = (m, k) if batch is None else (batch, m, k)
    if strided:
        xq = rng.integers(0, 256, shape[:-1] + (2 * k,), dtype=np.uint8)[..., ::2]
    else:
        xq = rng.integers(0, 256, shape, dtype=np.uint8)
    xqp = QParams(np.float32(rng.uniform(0.01, 0.1)), int(rng.integers(0, 256)))
    bias = _bias(bias_kind, n, rng)
    x2 = xq.reshape(int(np.prod(shape[:-1])), k)
    raw = ref_gemm_corrected(x2, xqp.zero_point, codes, pw.zero_point, saturate)
    if out_kind == "u8":
        oqp = QParams(np.float32(rng.uniform(0.05, 0.5)), int(rng.integers(0, 256)))
        got = quantized_linear(xq, xqp, pw, bias, relu=relu, out_qparams=oqp, saturate=saturate)
        ref = ref_output_requant(raw, xqp.scale, pw.scale, oqp.scale, oqp.zero_point, bias, relu)
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got.reshape(ref.shape), ref)
    else:
        got = quantized_linear(xq, xqp, pw, bias, relu=relu, saturate=saturate)
        ref = ref_output_float(raw, xqp.scale, pw.scale, bias, relu)
        assert got.dtype == np.float32
        np.testing.assert_allclose(
            got.reshape(ref.shape), ref, rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL
        )
    assert got.shape == shape[:-1] + (n,)


@pytest.mark.parametrize("out_kind", ["f32", "u8"])
@pytest.mark.parametrize("gran", ["tensor", "channel", "group"])
def test_quantized_linear_all_isas(isa, gran, out_kind, rng):
    for bias_kind, relu, zp in [(None, False, False), ("float", True, True), ("int", False, True)]:
        _check_quantized_linear(7, 37, 22, gran, zp, bias_kind, relu, out_kind, False, rng)
    _check_quantized_linear(70, 100, 64, gran, True, "float", True, out_kind, False, rng)
    _check_quantized_linear(3, 21, 13, gran, False, "float", False, out_kind, True, rng)


@given(
    m=st.integers(0, 9),
    n=st.integers(1, 70),
    k=st.integers(0, 30),
    gran=st.sampled_from(["tensor", "channel", "group"]),
    zp=st.booleans(),
    bias_kind=st.sampled_from([None, "float", "int"]),
    relu=st.booleans(),
    out_kind=st.sampled_from(["f32", "u8"]),
    saturate=st.booleans(),
    batch=st.sampled_from([None, 2]),
    strided=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_quantized_linear_hypothesis(
    m, n, k, gran, zp, bias_kind, relu, out_kind, saturate, batch, strided, seed
):
    rng = np.random.default_rng(seed)
    _check_quantized_linear(
        m, n, k, gran, zp, bias_kind, relu, out_kind, saturate, rng, batch=batch, strided=strided
    )


def test_quantized_linear_out_and_1d(rng):
    codes = _codes(rng, 5, 8)
    pw, _ = _pw_int8(codes, "channel")
    xq = rng.integers(0, 256, 8, dtype=np.uint8)
    xqp = QParams(0.05, 100)
    y = quantized_linear(xq, xqp, pw)
    assert y.shape == (5,)
    out = np.empty(5, np.float32)
    assert quantized_linear(xq, xqp, pw, out=out) is out
    np.testing.assert_array_equal(out, y)
    oqp = QParams(0.1, 10)
    out8 = np.empty((1, 5), np.uint8)
    assert quantized_linear(xq[None], xqp, pw, out_qparams=oqp, out=out8) is out8


def test_quantized_linear_requant_clamps_to_out_qmax(rng):
    codes = np.full((3, 4), 127, np.int8)
    pw, _ = _pw_int8(codes, "tensor")
    xq = np.full((2, 4), 255, np.uint8)
    oqp = QParams(1e-3, 0, reduce_range=True)
    got = quantized_linear(xq, QParams(0.1, 0), pw, out_qparams=oqp)
    np.testing.assert_array_equal(got, np.full((2, 3), 127))


def _ql_args():
    pw = pack_weight(np.ones((3, 4), np.float32))
    return np.zeros((2, 4), np.uint8), QParams(0.1, 0), pw


@pytest.mark.parametrize(
    ("change", "exc", "match"),
    [
        ({"x_q": np.zeros((2, 4), np.int8)}, TypeError, "x_q"),
        ({"x_q": np.zeros((2, 5), np.uint8)}, ValueError, "x_q"),
        ({"x_q": np.uint8(3)}, ValueError, "x_q"),
        ({"x_qparams": 0.1}, TypeError, "x_qparams"),
        ({"x_qparams": QParams(0.1, 0, dtype="int8")}, ValueError, "x_qparams"),
        ({"weight": np.ones((3, 4), np.int8)}, TypeError, "weight"),
        ({"bias": np.zeros(3, np.float64)}, TypeError, "bias"),
        ({"bias": np.zeros(4, np.float32)}, ValueError, "bias"),
        ({"bias": np.array([0, np.inf, 0], np.float32)}, ValueError, "bias"),
        ({"relu": "yes"}, TypeError, "relu"),
        ({"out_qparams": 0.1}, TypeError, "out_qparams"),
        ({"out_qparams": QParams(0.1, 0, dtype="int8")}, ValueError, "out_qparams"),
        ({"out_qparams": QParams(1e-44, 0)}, ValueError, "out_qparams"),
        ({"out": np.zeros((2, 3), np.float64)}, TypeError, "out"),
        ({"out": np.zeros((3, 3), np.float32)}, ValueError, "out"),
    ],
)
def test_quantized_linear_errors(change, exc, match):
    x_q, xqp, pw = _ql_args()
    kw = {"x_q": x_q, "x_qparams": xqp, "weight": pw} | change
    args = (kw.pop("x_q"), kw.pop("x_qparams"), kw.pop("weight"))
    out = kw.get("out")
    if out is not None:
        out[...] = 7
    with pytest.raises(exc, match=match):
        quantized_linear(*args, **kw)
    if out is not None:
        assert (out == 7).all()  # never half-written


# --------------------------------------------------------------------------- dynamic


def _check_linear(x, pw, codes, bias, relu, reduce_range, saturate=False, **kw):
    got = linear(x, pw, bias, relu=relu, reduce_range=reduce_range, saturate=saturate, **kw)
    rr = reduce_range
    if rr is None:
        rr = _config.get_isa() == "avx2" and not saturate and pw._pairmax * 255 > 32767
    ref = ref_linear_dynamic(x, codes, pw.scale, pw.zero_point, bias, relu, rr, saturate)
    np.testing.assert_allclose(got.reshape(ref.shape), ref, rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL)
    assert got.shape == x.shape[:-1] + (codes.shape[0],)
    return got


@pytest.mark.parametrize("reduce_range", [None, False, True])
def test_linear_all_isas(isa, reduce_range, rng):
    for m, n, k, relu in [(1, 37, 22, False), (9, 70, 64, True), (80, 130, 40, False)]:
        w = rng.standard_normal((n, k)).astype(np.float32)
        x = (rng.standard_normal((m, k)) * 3 + 1).astype(np.float32)
        pw = pack_weight(w)
        bias = rng.standard_normal(n).astype(np.float32)
        _check_linear(x, pw, pw.unpack(), bias, relu, reduce_range)
    _check_linear(x, pw, pw.unpack(), None, False, False, saturate=True)


@given(
    m=st.integers(0, 7),
    n=st.integers(1, 40),
    k=st.integers(0, 24),
    gran=st.sampled_from(["tensor", "channel", "group"]),
    zp=st.booleans(),
    has_bias=st.booleans(),
    relu=st.booleans(),
    reduce_range=st.sampled_from([None, False, True]),
    batch=st.sampled_from([None, 3]),
    transposed=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_linear_hypothesis(
    m, n, k, gran, zp, has_bias, relu, reduce_range, batch, transposed, seed
):
    rng = np.random.default_rng(seed)
    codes = _codes(rng, n, k)
    pw, _ = _pw_int8(codes, gran, zp, group_size=4 if gran == "group" else None, rng=rng)
    shape = (m, k) if batch is None else (batch, m, k)
    x = (rng.standard_normal(shape[::-1]) * rng.uniform(0.01, 100)).astype(np.float32)
    x = x.T if transposed else np.ascontiguousarray(x.T)
    bias = rng.standard_normal(n).astype(np.float32) if has_bias else None
    _check_linear(x, pw, codes, bias, relu, reduce_range)


def test_linear_close_to_float(rng):
    w = rng.standard_normal((64, 256)).astype(np.float32)
    x = rng.standard_normal((16, 256)).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)
    y = linear(x, pack_weight(w), b, reduce_range=False)
    ref = x @ w.T + b
    rel = np.abs(y - ref).max() / np.abs(ref).max()
    assert rel < 0.02


def test_linear_constant_and_tiny_inputs(rng):
    w = rng.standard_normal((8, 4)).astype(np.float32)
    pw = pack_weight(w)
    for x in (
        np.zeros((2, 4), np.float32),
        np.full((2, 4), 1e-30, np.float32),
        np.full((1, 4), -3.0, np.float32),
    ):
        _check_linear(x, pw, pw.unpack(), None, False, False)


def test_linear_qparams_match_choose_qparams(rng):
    # the fused activation quantization is choose_qparams + quantize, exactly
    w = np.eye(4, dtype=np.float32)
    pw = pack_weight(w, granularity="tensor")
    x = rng.standard_normal((3, 4)).astype(np.float32)
    qp = choose_qparams(x)
    s, z = ref_choose_qparams_fbgemm(x.min(), x.max(), 0, 255)
    assert np.float32(qp.scale) == s and int(qp.zero_point) == z
    xq = qgemm.quantize(x, qp)
    via_static = quantized_linear(xq, qp, pw)
    np.testing.assert_array_equal(linear(x, pw, reduce_range=False), via_static)


@pytest.mark.parametrize(
    ("change", "exc", "match"),
    [
        ({"x": np.zeros((2, 4), np.float64)}, TypeError, "x"),
        ({"x": np.zeros((2, 5), np.float32)}, ValueError, "x"),
        ({"x": np.array([[0, 1, np.nan, 2]], np.float32)}, ValueError, "x"),
        (
            {"x": np.array([[0, 1, 2, 3], [0, 1, 2, -np.inf]], np.float32)},
            ValueError,
            r"x: .*index \(1, 3\)",
        ),
        ({"weight": "w"}, TypeError, "weight"),
        ({"bias": np.zeros(3, np.int32)}, TypeError, "bias"),
        ({"bias": np.zeros((1, 3), np.float32)}, ValueError, "bias"),
        ({"bias": np.array([0, np.nan, 0], np.float32)}, ValueError, "bias"),
        ({"reduce_range": "no"}, TypeError, "reduce_range"),
        ({"out": np.zeros((2, 3), np.float64)}, TypeError, "out"),
    ],
)
def test_linear_errors(change, exc, match):
    kw = {"x": np.ones((2, 4), np.float32), "weight": pack_weight(np.ones((3, 4), np.float32))}
    kw |= change
    out = np.full((2, 3), 7, np.float32)
    kw.setdefault("out", out)
    with pytest.raises(exc, match=match):
        linear(kw.pop("x"), kw.pop("weight"), **kw)
    assert (out == 7).all()


@pytest.mark.parametrize("m, k", [(1, 4), (5, 8), (5, 7), (9, 130)])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_linear_first_non_finite_activation_named(m, k, bad, rng):
    # the serial activation prologue scans x in one pass when K needs no k-group padding and
    # row by row otherwise: either way the first non-finite element (row-major) is named and
    # out stays untouched
    pw = pack_weight(rng.standard_normal((6, k)).astype(np.float32))
    for i, j in [(m - 1, k - 1), (m // 2, 0), (0, k // 2)]:
        x = rng.standard_normal((m, k)).astype(np.float32)
        x[i, j] = bad
        out = np.full((m, 6), 7, np.float32)
        with pytest.raises(ValueError, match=rf"x: .*index \({i}, {j}\)"):
            linear(x, pw, out=out)
        assert (out == 7).all()


def test_kernel_cache_keys(rng):
    pw = pack_weight(rng.standard_normal((20, 8)).astype(np.float32))
    linear(np.ones((1, 8), np.float32), pw)
    info = qgemm.cache_info().families["gemm"]
    assert any(key[0] == "dynamic" for key in info.keys)


# --------------------------------------------------------------------------- torch cross-check


def test_cross_check_torch_fbgemm(rng):
    """Agreement with torch's FBGEMM: the requantized output is bit-identical, the float output
    within float32 rounding, and ``linear`` vs ``linear_dynamic`` within 1e-5 of the output
    range (FBGEMM quantizes activations with a multiply by 1/scale, qgemm divides: codes differ
    by 1 in rare ties).  FBGEMM is exact with VNNI; on other x86 CPUs its ``vpmaddubsw``
    saturates with 8-bit activations, and qgemm's ``saturate=True`` twin is compared there."""
    from qgemm import _isa

    from .conftest import torch_or_skip

    torch = torch_or_skip()
    fbgemm_saturates = not _isa.cpu_features().get("avx512vnni", False)
    m, n, k = 13, 40, 64
    w = rng.standard_normal((n, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    pw = pack_weight(w)
    qw = torch.quantize_per_channel(
        torch.from_numpy(w),
        torch.from_numpy(pw.scale.astype(np.float64)),
        torch.zeros(n, dtype=torch.int64),
        0,
        torch.qint8,
    )
    np.testing.assert_array_equal(qw.int_repr().numpy(), pw.unpack())
    packed = torch.ops.quantized.linear_prepack(qw, torch.from_numpy(bias))
    x = (rng.standard_normal((m, k)) * 2).astype(np.float32)
    xqp = choose_qparams(x, reduce_range=True)  # <= 127: exact on AVX2 FBGEMM as well
    xq = qgemm.quantize(x, xqp)
    tx = torch._make_per_tensor_quantized_tensor(
        torch.from_numpy(xq), float(xqp.scale), int(xqp.zero_point)
    )
    oqp = QParams(0.05, 30)
    got = quantized_linear(xq, xqp, pw, bias, relu=True, out_qparams=oqp)
    ref = torch.ops.quantized.linear_relu(tx, packed, float(oqp.scale), int(oqp.zero_point))
    np.testing.assert_array_equal(got, ref.int_repr().numpy())
    got = quantized_linear(xq, xqp, pw, bias, out_qparams=oqp)
    ref = torch.ops.quantized.linear(tx, packed, float(oqp.scale), int(oqp.zero_point))
    np.testing.assert_array_equal(got, ref.int_repr().numpy())
    for rr in (True, False):
        yd = torch.ops.quantized.linear_dynamic(torch.from_numpy(x), packed, rr).numpy()
        got = linear(x, pw, bias, reduce_range=rr, saturate=fbgemm_saturates and not rr)
        span = float(np.abs(yd).max())
        np.testing.assert_allclose(got, yd, rtol=0, atol=1e-5 * span + 1e-6)


def test_adaptive_thread_choice_gives_identical_results(rng):
    """QGEMM_ADAPTIVE_THREADS (timed choice between the parallel kernel and its serial twin)
    never changes the numbers: both twins run over many calls and agree bit for bit."""
    from qgemm import _config

    m, n, k = 200, 300, 256
    codes = _codes(rng, n, k)
    pw, _ = _pw_int8(codes, "channel", zp=False, rng=rng)
    xq = rng.integers(0, 256, (m, k), dtype=np.uint8)
    xqp = QParams(0.03, 117)
    oqp = QParams(0.2, 5)
    expect = quantized_linear(xq, xqp, pw, out_qparams=oqp)
    old = _config.set_adaptive_threads(True)
    try:
        assert _config.adaptive_threads()
        for _ in range(6):  # first calls measure the parallel twin, then the serial one
            np.testing.assert_array_equal(quantized_linear(xq, xqp, pw, out_qparams=oqp), expect)
    finally:
        _config.set_adaptive_threads(old)
    assert not _config.adaptive_threads()
