"""Fuzzing at scale (issue 17): hypothesis properties over every public op, compared with the
plain-numpy oracle in ``tests/reference.py``.

The ``fuzz``-marked properties are opt-in (``pytest -m fuzz``, which loads the ``fuzz``
profile of ``tests/conftest.py``: ``QGEMM_FUZZ_EXAMPLES`` examples each, default 2000).  Two
small smoke properties run in the default suite.

Inputs: shapes from 0 through odd sizes, strided views, every dtype an op takes, and
adversarial values -- int8 weights at +-127/-128, uint8 activations at 255, huge and tiny
scales, float32 denormals, float16 infinities in tables.  Arrays are drawn from a seed and a
"flavour" (numpy fills them: hypothesis drawing thousands of elements one by one is slow) so
shrinking still works on shapes, flavours and flags.

Tolerances: integers exact; quantized outputs exact (same float32 rounding as the reference);
float32 outputs within ``FLOAT_REL`` times the sum of the magnitudes that were added (float32
accumulation in any order), see ``_assert_float``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qgemm

from .reference import (
    ref_average,
    ref_embedding_bag,
    ref_gemm_corrected,
    ref_linear_dynamic,
    ref_matmul_u8s8,
    ref_output_float,
    ref_output_requant,
    ref_quantize,
    ref_quantize_rowwise_fused,
)

fuzz = pytest.mark.fuzz

#: float32 outputs: |got - ref| <= FLOAT_REL * (sum of magnitudes added) + FLOAT_ABS.
FLOAT_REL = 2e-6
FLOAT_ABS = 1e-30

DIMS = st.sampled_from([0, 1, 2, 3, 4, 7, 8, 15, 16, 17, 31, 33, 64, 65])
SMALL = st.integers(0, 9)
SEEDS = st.integers(0, 2**32 - 1)
U8_FLAVOURS = ("random", "max", "zero", "extremes")
S8_FLAVOURS = ("random", "max", "min", "extremes", "zero")


def _u8(rng, shape, flavour):
    if flavour == "max":
        return np.full(shape, 255, np.uint8)
    if flavour == "zero":
        return np.zeros(shape, np.uint8)
    if flavour == "extremes":
        return rng.choice(np.array([0, 1, 254, 255], np.uint8), size=shape)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _s8(rng, shape, flavour):
    if flavour == "max":
        return np.full(shape, 127, np.int8)
    if flavour == "min":
        return np.full(shape, -128, np.int8)
    if flavour == "zero":
        return np.zeros(shape, np.int8)
    if flavour == "extremes":
        return rng.choice(np.array([-128, -127, 0, 126, 127], np.int8), size=shape)
    return rng.integers(-128, 128, shape, dtype=np.int8)


def _f32(rng, shape, flavour, mag=1.0):
    """float32 values: normal * mag, or with denormals / huge / signed zeros mixed in."""
    x = (rng.standard_normal(shape) * mag).astype(np.float32)
    if flavour == "denormal":
        x = (rng.standard_normal(shape) * 1e-40).astype(np.float32)
    elif flavour == "mixed" and x.size:
        pool = np.array([0.0, -0.0, 1e-45, -1e-44, 3e-39, mag * 1e3, -mag * 1e3], np.float32)
        mask = rng.random(shape) < 0.3
        x[mask] = rng.choice(pool, size=int(mask.sum()))
    return x


def _view(rng, base_shape, make, strided):
    """``make(shape)`` -> array; with ``strided`` a non-contiguous view of that shape."""
    if not strided:
        return make(base_shape)
    big = make((base_shape[0], 2 * base_shape[1] + 1))
    return big[:, 1::2][:, : base_shape[1]]


def _assert_float(got, ref, mag, what=""):
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    fin = np.isfinite(ref)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref), err_msg=f"{what}: NaN pattern")
    np.testing.assert_array_equal(
        got[~fin & ~np.isnan(ref)], ref[~fin & ~np.isnan(ref)], err_msg=f"{what}: infinities"
    )
    err = np.abs(got[fin] - ref[fin])
    tol = FLOAT_REL * np.asarray(mag, np.float64)[fin] + FLOAT_ABS
    bad = err > tol
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} elements off; worst err {err.max():.3g} vs tol "
        f"{tol[np.argmax(err - tol)]:.3g}"
    )


# ---------------------------------------------------------------------------------------------
# GEMM


@st.composite
def gemm_case(draw):
    m, k, n = draw(SMALL | DIMS), draw(DIMS), draw(SMALL | DIMS)
    seed = draw(SEEDS)
    rng = np.random.default_rng(seed)
    af, wf = draw(st.sampled_from(U8_FLAVOURS)), draw(st.sampled_from(S8_FLAVOURS))
    strided = draw(st.booleans())
    a = _view(rng, (m, k), lambda s: _u8(rng, s, af), strided)
    w = _s8(rng, (n, k), wf)  # [N, K]
    return a, w, draw(st.booleans()), rng


def _check_matmul(a, w, saturate):
    got = qgemm.matmul_u8s8(a, np.ascontiguousarray(w.T), saturate=saturate)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, ref_matmul_u8s8(a, w, saturate))


@given(gemm_case())
@settings(max_examples=10)
def test_smoke_matmul_u8s8(case):
    a, w, saturate, _ = case
    _check_matmul(a, w, saturate)


@fuzz
@given(gemm_case())
def test_fuzz_matmul_u8s8(case):
    a, w, saturate, _ = case
    _check_matmul(a, w, saturate)


SCALES = st.sampled_from([1e-12, 3e-7, 0.01, 0.5, 1.0, 37.0, 1e4])


@fuzz
@given(
    gemm_case(),
    SCALES,
    SCALES,
    st.sampled_from(["tensor", "channel"]),
    st.sampled_from([None, "float", "int"]),
    st.booleans(),
    st.booleans(),
    st.integers(0, 255),
)
def test_fuzz_quantized_linear(case, a_scale, w_scale, gran, bias_kind, relu, requant, a_zp):
    a, w, saturate, rng = case
    n = w.shape[0]
    if gran == "channel":
        ws = (w_scale * rng.uniform(0.5, 2.0, n)).astype(np.float32)
        wq = qgemm.QParams(ws, np.zeros(n, np.int32), dtype="int8", axis=0)
    else:
        ws = np.float32(w_scale)
        wq = qgemm.QParams(ws, 0, dtype="int8")
    pw = qgemm.pack_weight(w, qparams=wq)
    aq = qgemm.QParams(a_scale, a_zp)
    bias = None
    if bias_kind == "float":
        bias = (rng.standard_normal(n) * a_scale * w_scale * 100).astype(np.float32)
    elif bias_kind == "int":
        bias = rng.integers(-(2**20), 2**20, n).astype(np.int32)
    raw = ref_gemm_corrected(a, a_zp, w, 0, saturate)
    if requant:
        c_scale = np.float32(a_scale * w_scale * max(1, a.shape[1]) * 8)
        oq = qgemm.QParams(c_scale, 7)
        got = qgemm.quantized_linear(a, aq, pw, bias, relu=relu, out_qparams=oq, saturate=saturate)
        ref = ref_output_requant(raw, a_scale, ws, c_scale, 7, bias, relu)
        assert got.dtype == np.uint8
        diff = np.abs(got.astype(np.int32) - ref.astype(np.int32))
        assert diff.max(initial=0) <= 1, "requantized output more than 1 LSB off"
        return
    got = qgemm.quantized_linear(a, aq, pw, bias, relu=relu, saturate=saturate)
    ref = ref_output_float(raw, a_scale, ws, bias, relu)
    ws_b = np.broadcast_to(np.asarray(ws, np.float64), (n,))
    fb = 0 if bias is None or bias.dtype == np.int32 else np.abs(bias.astype(np.float64))
    ib = 0 if bias is None or bias.dtype != np.int32 else np.abs(bias.astype(np.float64))
    mag = (np.abs(raw) + ib) * float(np.float32(a_scale)) * ws_b[None, :] + fb
    _assert_float(got, ref, 4 * mag, "quantized_linear")


@fuzz
@given(
    st.tuples(SMALL | DIMS, DIMS, SMALL | DIMS),
    SEEDS,
    st.sampled_from(["random", "denormal", "mixed"]),
    st.sampled_from([1e-30, 1e-3, 1.0, 1e3, 1e30]),
    st.booleans(),
    st.booleans(),
    st.sampled_from(S8_FLAVOURS),
)
def test_fuzz_linear(shape, seed, xf, mag, relu, strided, wf):
    m, k, n = shape
    rng = np.random.default_rng(seed)
    x = _view(rng, (m, k), lambda s: _f32(rng, s, xf, mag), strided)
    w = _s8(rng, (n, k), wf)
    ws = np.float32(0.02)
    pw = qgemm.pack_weight(w, qparams=qgemm.QParams(ws, 0, dtype="int8"))
    bias = rng.standard_normal(n).astype(np.float32)
    got = qgemm.linear(x, pw, bias, relu=relu, reduce_range=False)
    ref = ref_linear_dynamic(x, w, ws, 0, bias, relu)
    qp = qgemm.choose_qparams(x) if x.size else qgemm.QParams(0.1, 0)
    # one activation code of slack per product: |w| * scale per element
    mag_ = (
        (
            np.abs(w.astype(np.int64)).sum(axis=1)[None, :]
            * float(qp.scale)
            * (255 + 1)
            * float(ws)
            + np.abs(bias)[None, :]
        )
        if m
        else np.zeros((0, n))
    )
    _assert_float(got, ref, np.broadcast_to(mag_, ref.shape), "linear")


# ---------------------------------------------------------------------------------------------
# Embedding bags


def _ref_dequantize_fused(fused, bits, dim):
    """A fused rowwise table -> float64 ``[rows, dim]`` and per-element magnitude of the
    dequantization terms (``|code * scale| + |bias|``), from the bytes alone."""
    fused = np.asarray(fused)
    rows, width = fused.shape
    pdt = np.float32 if bits == 8 else np.float16
    ps = np.dtype(pdt).itemsize
    params = np.ascontiguousarray(fused[:, width - 2 * ps :]).view(pdt).astype(np.float64)
    scale, bias = params[:, 0:1], params[:, 1:2]
    per = 8 // bits
    codes = np.zeros((rows, dim), np.float64)
    for j in range(dim):
        codes[:, j] = (fused[:, j // per] >> ((j % per) * bits)) & ((1 << bits) - 1)
    with np.errstate(invalid="ignore", over="ignore"):
        vals = codes * scale + bias
        mag = np.abs(codes * scale) + np.abs(bias)
    return vals, mag


TABLE_KINDS = ("float32", "float16", "q8", "q4", "q2")


@st.composite
def bag_case(draw, dims=DIMS, kinds=TABLE_KINDS):
    seed = draw(SEEDS)
    rng = np.random.default_rng(seed)
    rows = draw(st.integers(1, 40))
    dim = draw(dims)
    kind = draw(st.sampled_from(kinds))
    big = {"float32": [1e30], "q8": [1e30], "float16": [], "q4": [], "q2": []}[kind]
    mag = draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e3, *big]))
    flavour = draw(st.sampled_from(["random", "denormal", "mixed"]))
    table = _f32(rng, (rows, dim), flavour, mag)
    if kind in ("q4", "q2"):  # keep float16 bias and scale finite (else quantize_rowwise raises)
        table = np.clip(table, np.float32(-3e4), np.float32(3e4))
    if kind == "float16":
        t16 = table.astype(np.float16)
        if draw(st.booleans()) and t16.size:  # float16 infinities in the table
            t16.reshape(-1)[rng.integers(0, t16.size, 1 + t16.size // 10)] = rng.choice(
                np.array([np.inf, -np.inf], np.float16), size=1 + t16.size // 10
            )
        tab, vals, tmag = t16, t16.astype(np.float64), np.abs(t16.astype(np.float64))
    elif kind == "float32":
        tab, vals, tmag = table, table.astype(np.float64), np.abs(table.astype(np.float64))
    else:
        bits = int(kind[1])
        tab = qgemm.quantize_rowwise(table, bits=bits)
        vals, tmag = _ref_dequantize_fused(tab.fused, bits, dim)
    nidx = draw(st.integers(0, 60))
    idx_dtype = draw(st.sampled_from([np.int32, np.int64]))
    idx = rng.integers(0, rows, nidx).astype(idx_dtype)
    nbags = draw(st.integers(0, 12))
    if nbags == 0:
        idx = idx[:0]
        nidx = 0
    use_lengths = draw(st.booleans())
    include_last = draw(st.booleans()) and not use_lengths
    offsets = lengths = None
    if use_lengths:
        cuts = np.sort(rng.integers(0, nidx + 1, max(nbags - 1, 0)))
        lengths = np.diff(np.concatenate([[0], cuts, [nidx]])).astype(idx_dtype)
        lengths = lengths[:nbags]
    else:
        offsets = np.sort(rng.integers(0, nidx + 1, nbags)).astype(idx_dtype)
        if nbags:
            offsets[0] = 0
        if include_last:
            offsets = np.concatenate([offsets, [nidx]]).astype(idx_dtype)
    mode = draw(st.sampled_from(["sum", "mean", "max"]))
    psw = None
    if mode == "sum" and draw(st.booleans()):
        psw = _f32(rng, (len(idx),), "random", 1.0)
    pad = draw(st.none() | st.integers(-rows, rows - 1))
    return dict(
        tab=tab,
        vals=vals,
        tmag=tmag,
        idx=idx,
        offsets=offsets,
        lengths=lengths,
        include_last=include_last,
        mode=mode,
        psw=psw,
        pad=pad,
    )


def _check_bag(c):
    got = qgemm.embedding_bag(
        c["tab"],
        c["idx"],
        c["offsets"],
        lengths=c["lengths"],
        mode=c["mode"],
        per_sample_weights=c["psw"],
        include_last_offset=c["include_last"],
        padding_idx=c["pad"],
    )
    with np.errstate(invalid="ignore", over="ignore"):
        ref = ref_embedding_bag(
            c["vals"],
            c["idx"],
            c["offsets"],
            c["lengths"],
            c["mode"],
            c["psw"],
            c["include_last"],
            c["pad"],
        )
        mag = ref_embedding_bag(
            c["tmag"],
            c["idx"],
            c["offsets"],
            c["lengths"],
            "sum",
            None if c["psw"] is None else np.abs(c["psw"]),
            c["include_last"],
            c["pad"],
        )
    assert got.dtype == np.float32
    # Where the float64 reference overflows float32, the float32 result is +-inf.
    big = np.isfinite(ref) & (np.abs(ref) > np.finfo(np.float32).max)
    ref[big] = np.sign(ref[big]) * np.inf
    _assert_float(got, ref, mag, f"embedding_bag[{c['mode']}]")


@given(bag_case(dims=st.sampled_from([0, 3, 16]), kinds=("float32", "q8", "q4")))
@settings(max_examples=10)
def test_smoke_embedding_bag(case):
    _check_bag(case)


@fuzz
@given(bag_case())
def test_fuzz_embedding_bag(case):
    _check_bag(case)


# ---------------------------------------------------------------------------------------------
# Quantization


@fuzz
@given(
    st.tuples(SMALL | DIMS, DIMS),
    SEEDS,
    st.sampled_from(["random", "denormal", "mixed"]),
    st.sampled_from([1e-30, 1e-3, 1.0, 1e3, 1e30]),
    st.sampled_from([1e-38, 1e-20, 1e-7, 0.05, 1.0, 1e4, 1e20, 3e38]),
    st.sampled_from(["uint8", "int8"]),
    st.booleans(),
    st.sampled_from([None, 0, 1]),
    st.booleans(),
    st.sampled_from([np.float32, np.float64, np.float16]),
)
def test_fuzz_quantize(shape, seed, xf, mag, scale, dtype, reduce_range, axis, strided, xdt):
    rng = np.random.default_rng(seed)
    # float16 inputs: magnitudes that stay finite in float16 ("mixed" adds 1e3 x mag)
    x = _view(
        rng,
        shape,
        lambda s: _f32(rng, s, xf, min(mag, 60.0) if xdt == np.float16 else mag),
        strided,
    ).astype(xdt)
    lo, hi = qgemm.qrange(dtype, reduce_range)
    if axis is None:
        zp = int(rng.integers(lo, hi + 1))
        qp = qgemm.QParams(scale, zp, dtype=dtype, reduce_range=reduce_range)
        s_b, z_b = np.float32(scale), zp
    else:
        c = x.shape[axis]
        sc = (scale * rng.uniform(0.5, 1.0, c)).astype(np.float32)
        sc = np.where(sc > 0, sc, np.float32(scale))
        zps = rng.integers(lo, hi + 1, c).astype(np.int32)
        qp = qgemm.QParams(sc, zps, dtype=dtype, axis=axis, reduce_range=reduce_range)
        bshape = (-1, 1) if axis == 0 else (1, -1)
        s_b, z_b = sc.reshape(bshape), zps.reshape(bshape)
    got = qgemm.quantize(x, qp)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        ref = ref_quantize(x.astype(np.float32), s_b, z_b, lo, hi, np.dtype(dtype))
    np.testing.assert_array_equal(got, ref)


@fuzz
@given(
    st.tuples(st.integers(0, 12), DIMS),
    SEEDS,
    st.sampled_from(["random", "denormal", "mixed"]),
    st.sampled_from([1e-30, 1e-3, 1.0, 1e3, 3e4]),
    st.sampled_from([8, 4, 2]),
)
def test_fuzz_quantize_rowwise(shape, seed, flavour, mag, bits):
    rng = np.random.default_rng(seed)
    table = _f32(rng, shape, flavour, mag)
    if bits < 8 and table.size and _float16_overflow(table, bits):
        # the row's float16 bias or scale would be +-inf: the table would dequantize to NaN
        with pytest.raises(ValueError, match="float16"):
            qgemm.quantize_rowwise(table, bits=bits)
        return
    got = qgemm.quantize_rowwise(table, bits=bits)
    np.testing.assert_array_equal(got.fused, ref_quantize_rowwise_fused(table, bits))


def _float16_overflow(table, bits):
    """Whether some row's float16 bias (its min) or float16 scale overflows (4/2-bit)."""
    with np.errstate(over="ignore"):
        mn = table.min(axis=1).astype(np.float16)
        rng = table.max(axis=1) - mn.astype(np.float32)
        scale = (rng / np.float32((1 << bits) - 1)).astype(np.float16)
    return bool(np.isinf(mn).any() or np.isinf(scale).any())


# ---------------------------------------------------------------------------------------------
# Averaging

LEAF_DTYPES = st.sampled_from(["float16", "float32", "float64", "int32", "int64", "uint8"])


@st.composite
def models_case(draw):
    seed = draw(SEEDS)
    rng = np.random.default_rng(seed)
    k = draw(st.integers(1, 5))
    spec = draw(
        st.lists(
            st.tuples(LEAF_DTYPES, st.sampled_from([(), (0,), (1,), (3, 5), (17,), (40_000,)])),
            min_size=1,
            max_size=4,
        )
    )
    mag = draw(st.sampled_from([1e-40, 1e-3, 1.0, 1e4, 1e300]))
    nested = draw(st.booleans())
    models = []
    for _ in range(k):
        m = {}
        for i, (dt, shape) in enumerate(spec):
            if dt.startswith("float"):
                cap = {"float16": 6e4, "float32": 1e38, "float64": 1e300}[dt]
                v = np.asarray(rng.standard_normal(shape) * min(mag, cap)).astype(dt)
            else:
                info = np.iinfo(dt)
                v = np.asarray(rng.integers(max(info.min, -1000), min(info.max, 1000), shape))
                v = v.astype(dt)
            m[f"leaf{i}"] = v
        models.append({"a": m, "b": {"c": m[next(iter(m))]}} if nested else m)
    weights = [draw(st.sampled_from([0.0, 0.5, 1.0, 3.0, 1e-8, 1e8])) for _ in range(k)]
    if not any(weights):
        weights[draw(st.integers(0, k - 1))] = 1.0
    return models, weights, draw(st.sampled_from(["max", "first", "round"])), draw(st.booleans())


@fuzz
@given(models_case())
def test_fuzz_average(case):
    models, weights, policy, stream = case
    src = iter(models) if stream else models
    got = qgemm.average(src, weights, int_policy=policy)
    with np.errstate(over="ignore", invalid="ignore"):
        ref = ref_average(models, weights, policy)

    def cmp(g, r, path):
        if isinstance(r, dict):
            assert isinstance(g, dict) and g.keys() == r.keys(), path
            for key in r:
                cmp(g[key], r[key], f"{path}.{key}")
            return
        g, r = np.asarray(g), np.asarray(r)
        assert g.dtype == r.dtype and g.shape == r.shape, path
        np.testing.assert_array_equal(g, r, err_msg=path)

    cmp(got, ref, "models")
