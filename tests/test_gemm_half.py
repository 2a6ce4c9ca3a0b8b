"""Tests of the float16 / bfloat16-weight GEMM (qgemm._half, qgemm._kernels.gemm_half).

Agreement stated by the tests:

* packing: the rounded weights are bit-exact against independent numpy references (float16:
  ``astype(np.float16)``; bfloat16: a truncate-and-round-half-even reference on the float32
  bits, and torch's ``to(torch.bfloat16)`` when torch is installed), NaN/inf/subnormals kept;
* products: against a float64 reference with the rounded weights, within the float32 bound
  ``|y - y_exact| <= (K + 2) * 2**-24 * (|x| @ |w16|.T + |bias|)`` (qgemm's sequential FMA
  sum is inside ``(K + 1) u``; one more ``u`` covers the final rounding to float32);
* serial vs parallel kernels, 1 vs 2 threads, and every row-tile size: bit-identical.
"""

from __future__ import annotations

import dataclasses
import math

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qgemm
from qgemm import _config
from qgemm._half import HalfPackedWeight, linear_half, pack_weight_half
from qgemm._kernels.gemm_half import PANEL, _h2f_bits, gemm_half_kernel, tile_shape

from .conftest import torch_or_skip

U = 2.0**-24
NATIVE = [i for i in _config.supported_isas() if i != "portable"]
ISAS = ["portable"] + NATIVE[:1]  # portable and the best native path this CPU has
DTYPES = ["float16", "bfloat16"]


# ------------------------------------------------------------------------ references


def ref_round_bf16(w: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits: truncate, then round half to even on the dropped 16 bits;
    NaN -> quiet NaN with the same sign and top payload bits."""
    bits = np.ascontiguousarray(w, np.float32).view(np.uint32)
    upper = bits >> 16
    rem = bits & 0xFFFF
    up = (rem > 0x8000) | ((rem == 0x8000) & ((upper & 1) == 1))
    out = (upper + up).astype(np.uint16)  # a carry into the exponent is the correct rounding
    nan = np.isnan(w)
    out[nan] = (upper[nan] | 0x0040).astype(np.uint16)
    return out


def ref_rounded(w: np.ndarray, dtype: str) -> np.ndarray:
    """The weights as the GEMM must use them, float32."""
    if dtype == "float16":
        return w.astype(np.float16).astype(np.float32)
    return (ref_round_bf16(w).astype(np.uint32) << 16).view(np.float32)


def ref_linear(x, w16, bias=None, relu=False):
    """float64 ``x @ w16.T + bias`` (ReLU keeps NaN) and the float32 error bound."""
    x64 = x.astype(np.float64)
    w64 = w16.astype(np.float64)
    y = x64 @ w64.T
    mag = np.abs(x64) @ np.abs(w64).T
    if bias is not None:
        y = y + bias
        mag = mag + np.abs(bias.astype(np.float64))
    if relu:
        y = np.where(y < 0, 0.0, y)
    k = x.shape[-1]
    return y, (k + 2) * U * mag + 1e-37


def assert_close(y, x, w16, bias=None, relu=False):
    ref, tol = ref_linear(x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), w16, bias, relu)
    y2 = y.reshape(ref.shape)
    assert y.dtype == np.float32
    err = np.abs(y2.astype(np.float64) - ref)
    bad = ~(err <= tol)
    assert not bad.any(), f"max excess {np.max(err - tol)} at {np.argwhere(bad)[0]}"


@pytest.fixture(params=ISAS)
def isa(request):
    old = _config.set_isa(request.param)
    yield request.param
    _config.set_isa(old)


def _data(rng, m, n, k):
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    return x, w, b


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 0), (1, 1), (3, 5), (16, 7), (17, 4), (33, 130), (5, 0)])
def test_pack_unpack_exact(dtype, shape, rng):
    w = (rng.standard_normal(shape) * 10.0 ** rng.integers(-8, 4, shape)).astype(np.float32)
    pw = pack_weight_half(w, dtype)
    assert isinstance(pw, HalfPackedWeight)
    assert pw.shape == shape and pw.dtype == dtype
    n, k = shape
    assert pw.nbytes == 2 * (-(-n // PANEL) * PANEL) * k
    u = pw.unpack()
    assert u.dtype == np.float32 and u.shape == shape
    np.testing.assert_array_equal(u.view(np.uint32), ref_rounded(w, dtype).view(np.uint32))
    if pw.nbytes:
        assert pw._packed.ctypes.data % 64 == 0


def test_pack_float16_is_numpy_astype_on_edge_values():
    vals = np.array(
        [0.0, -0.0, 1.0, 65504.0, 65519.99, -65519.99, 6e-8, 3e-8, 2.9e-8, 6.1e-5, 1 / 3,
         np.inf, -np.inf, np.nan, 1.0009765625, 1.00048828125, 1.00146484375],
        np.float32,
    )  # fmt: skip
    pw = pack_weight_half(vals.reshape(1, -1), "float16")
    want = vals.astype(np.float16)
    np.testing.assert_array_equal(pw.codes()[0], want.view(np.uint16))
    np.testing.assert_array_equal(pw.unpack()[0], want.astype(np.float32))


def test_pack_bfloat16_edge_values():
    bits = np.array(
        [0x3F808000, 0x3F818000, 0x3F808001, 0x3F80FFFF, 0x7F7F7FFF, 0x00000001, 0x80000000,
         0x7F800000, 0xFF800000, 0x7FC00001, 0xFFA00000, 0x7F810000, 0x3F7FFFFF],
        np.uint32,
    )  # fmt: skip
    w = bits.view(np.float32).reshape(1, -1)
    codes = pack_weight_half(w, "bfloat16").codes()[0]
    want = [0x3F80, 0x3F82, 0x3F81, 0x3F81, 0x7F7F, 0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0,
            0xFFE0, 0x7FC1, 0x3F80]  # fmt: skip
    np.testing.assert_array_equal(codes, np.array(want, np.uint16))
    assert np.isnan(pack_weight_half(w, "bfloat16").unpack()[0, 9:12]).all()


def test_pack_bfloat16_matches_torch(rng):
    torch = torch_or_skip()
    w = (rng.standard_normal((37, 29)) * 10.0 ** rng.integers(-30, 30, (37, 29))).astype(np.float32)
    w[0, :3] = [np.nan, np.inf, -np.inf]
    tb = torch.from_numpy(w).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    ours = pack_weight_half(w, "bfloat16").codes()
    nan = np.isnan(w)  # torch's NaN bit pattern is its own (0xFFFF here): NaN-ness only
    np.testing.assert_array_equal(ours[~nan], tb[~nan])
    assert ((ours[nan] & 0x7F80) == 0x7F80).all() and (ours[nan] & 0x7F).all()


def test_pack_overflow_raises_or_saturates():
    w = np.array([[1.0, 70000.0], [-65520.0, 2.0]], np.float32)
    with pytest.raises(ValueError, match=r"w: expected values within the float16 range.*0, 1"):
        pack_weight_half(w, "float16")
    u = pack_weight_half(w, "float16", saturate=True).unpack()
    np.testing.assert_array_equal(u, [[1.0, 65504.0], [-65504.0, 2.0]])
    big = np.array([[3.4e38, -3.4e38, np.inf, np.nan]], np.float32)
    with pytest.raises(ValueError, match="bfloat16 range"):
        pack_weight_half(big, "bfloat16")
    ub = pack_weight_half(big, "bfloat16", saturate=True).unpack()[0]
    hi = np.uint32(0x7F7F0000).view(np.float32)
    assert ub[0] == hi and ub[1] == -hi and ub[2] == np.inf and np.isnan(ub[3])
    # infinities are values, not overflow: kept without saturate
    assert np.isinf(pack_weight_half(np.array([[np.inf]], np.float32)).unpack()).all()


def test_pack_inputs(rng):
    w = rng.standard_normal((8, 6)).astype(np.float32)
    ref = pack_weight_half(w).codes()
    np.testing.assert_array_equal(pack_weight_half(w.T.copy().T).codes(), ref)
    ro = w.copy()
    ro.setflags(write=False)
    np.testing.assert_array_equal(pack_weight_half(ro, dtype=np.float16).codes(), ref)
    np.testing.assert_array_equal(pack_weight_half(w.astype(np.float16)).codes(), ref)
    assert pack_weight_half(w, "bf16").dtype == "bfloat16"
    assert "HalfPackedWeight(shape=(8, 6)" in repr(pack_weight_half(w))


@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        ((np.ones((2, 2)),), {}, TypeError, "w: expected dtype float32 or float16, got float64"),
        ((np.ones((2, 2), np.int8),), {}, TypeError, "w: expected dtype"),
        ((np.ones(3, np.float32),), {}, ValueError, "w: expected a 2-D array, got 1-D"),
        (("abc",), {}, TypeError, "w: expected an array, got str"),
        ((np.ones((2, 2), np.float32), "int8"), {}, ValueError, "dtype: expected 'float16'"),
        ((np.ones((2, 2), np.float32),), {"saturate": 1}, TypeError, "saturate: expected a bool"),
    ],
)
def test_pack_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        pack_weight_half(*args, **kwargs)


def test_soft_fp16_conversion_exhaustive():
    """The portable path's scalar binary16 -> binary32 conversion, all 65536 codes."""
    codes = np.arange(65536, dtype=np.uint32)
    got = np.array([_h2f_bits(np.uint32(c)) for c in codes], np.uint32)
    want = codes.astype(np.uint16).view(np.float16).astype(np.float32).view(np.uint32)
    nan = np.isnan(want.view(np.float32))
    np.testing.assert_array_equal(got[~nan], want[~nan])
    # NaN: sign and payload kept exactly (numpy may quiet signalling NaNs: compare modulo
    # the quiet bit)
    c = codes[nan]
    exact = ((c & 0x8000) << 16) | 0x7F800000 | ((c & 0x3FF) << 13)
    np.testing.assert_array_equal(got[nan], exact)
    np.testing.assert_array_equal(got[nan] | 0x400000, want[nan] | 0x400000)


# ------------------------------------------------------------------------ the product


# (isa, relu, bias): every flag combination natively, two on the portable path (compile time)
_FLAG_CASES = [(i, r, b) for i in NATIVE[:1] for r in (False, True) for b in (False, True)] + [
    ("portable", False, False),
    ("portable", True, True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", _FLAG_CASES, ids=lambda c: f"{c[0]}-relu{c[1]:d}-bias{c[2]:d}")
@pytest.mark.parametrize("mnk", [(1, 1, 1), (7, 33, 19), (13, 64, 40), (2, 100, 3), (6, 16, 1)])
def test_linear_matches_reference(dtype, case, mnk, rng):
    isa, relu, with_bias = case
    old = _config.set_isa(isa)
    try:
        _check_linear(dtype, relu, with_bias, mnk, rng)
    finally:
        _config.set_isa(old)


def _check_linear(dtype, relu, with_bias, mnk, rng):
    m, n, k = mnk
    x, w, b = _data(rng, m, n, k)
    pw = pack_weight_half(w, dtype)
    bias = b if with_bias else None
    y = linear_half(x, pw, bias=bias, relu=relu)
    assert y.shape == (m, n)
    assert_close(y, x, ref_rounded(w, dtype), bias, relu)
    if relu:
        assert (y >= 0).all()


@settings(max_examples=30)
@given(
    m=st.integers(0, 19),
    n=st.integers(0, 70),
    k=st.integers(0, 45),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["c", "rows", "cols", "t", "3d"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_linear_hypothesis_shapes_and_layouts(m, n, k, dtype, layout, seed):
    rng = np.random.default_rng(seed)
    x, w, b = _data(rng, m, n, k)
    if layout == "rows":  # row stride > K, unit inner stride: read in place
        x = np.ascontiguousarray(np.concatenate([x, x[:, :3]], axis=1))[:, :k]
    elif layout == "cols":  # inner stride 2
        x = np.repeat(x, 2, axis=1)[:, ::2]
    elif layout == "t":
        x = np.ascontiguousarray(x.T).T
    pw = pack_weight_half(w, dtype)
    if layout == "3d" and m % 2 == 0:
        x3 = x.reshape(2, m // 2, k)
        y = linear_half(x3, pw, bias=b, relu=True)
        assert y.shape == (2, m // 2, n)
    else:
        y = linear_half(x, pw, bias=b, relu=True)
        assert y.shape == (m, n)
    assert_close(y, x, ref_rounded(w, dtype), b, True)


def test_linear_native_and_portable_agree(rng):
    if not NATIVE:
        pytest.skip("no native ISA on this CPU")
    x, w, b = _data(rng, 9, 37, 70)
    pw = pack_weight_half(w, "float16")
    ys = {}
    for name in ("portable", NATIVE[0]):
        old = _config.set_isa(name)
        try:
            ys[name] = linear_half(x, pw, bias=b, relu=True)
        finally:
            _config.set_isa(old)
    yp, yn = ys["portable"], ys[NATIVE[0]]
    # both are the sequential sum over k; FMA on both where the CPU has it
    np.testing.assert_allclose(yn, yp, rtol=0, atol=float(np.max(ref_linear(x, pw.unpack())[1])))


def test_rows_and_tiles_bit_identical(rng):
    """Row ``i`` of the result does not depend on M (row tiles of 1..MR rows, wide tiles over
    2 and 4 panels for 1 and 2 rows, over 2 panels for more rows on AVX-512): every output is
    the same sequential FMA sum."""
    x, w, b = _data(rng, 13, 150, 33)
    pw = pack_weight_half(w, "bfloat16")
    full = linear_half(x, pw, bias=b)
    for m in (1, 2, 3, 4, 5, 6, 7):
        np.testing.assert_array_equal(linear_half(x[:m], pw, bias=b), full[:m])
    np.testing.assert_array_equal(linear_half(x[5], pw, bias=b), full[5])


@pytest.mark.parametrize("dtype", DTYPES)
def test_single_row_tile_prefetch_bit_identical(dtype, rng):
    """Calls with M <= MR take the tile that prefetches its panel ahead on AVX2 (past the next
    panel and the buffer's end at the last one: K = 150 rows are 4800 bytes per panel); the
    rows equal those of a larger-M call, which does not prefetch."""
    x, w, b = _data(rng, 13, 16 * 5 + 3, 150)
    pw = pack_weight_half(w, dtype)
    full = linear_half(x, pw, bias=b, relu=True)
    for m in range(1, 7):
        np.testing.assert_array_equal(linear_half(x[:m], pw, bias=b, relu=True), full[:m])
        np.testing.assert_array_equal(linear_half(x[7 - m : 7], pw), linear_half(x, pw)[7 - m : 7])


def test_parallel_kernel_bit_identical(monkeypatch, rng):
    x, w, b = _data(rng, 23, 150, 37)
    pw = pack_weight_half(w, "float16")
    ser = linear_half(x, pw, bias=b, relu=True)
    row = dataclasses.replace(_config.isa_path(), parallel_min_macs=0)
    monkeypatch.setattr(_config, "isa_path", lambda: row)
    old = qgemm.get_num_threads()
    try:
        for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            qgemm.set_num_threads(threads)
            np.testing.assert_array_equal(linear_half(x, pw, bias=b, relu=True), ser)
        np.testing.assert_array_equal(linear_half(x[:1], pw, bias=b, relu=True), ser[:1])
    finally:
        qgemm.set_num_threads(old)
    keys = qgemm.cache_info().families["gemm_half"].keys
    assert any(key[4] for key in keys) and any(not key[4] for key in keys)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dynamic_tasks_bit_identical(dtype, rng):
    """The parallel twin's workers take (panel group x row chunk) tasks from an atomic counter:
    any chunk size and worker count (more workers than tasks too) gives the serial bits."""
    if not NATIVE:
        pytest.skip("no native ISA on this CPU")
    isa = NATIVE[0]
    mr = tile_shape(isa)[0]
    m, n, k = 31, 16 * 9 + 5, 23  # 3 panel groups, the last one with a partial panel
    x, w, b = _data(rng, m, n, k)
    pw = pack_weight_half(w, dtype)
    ser = gemm_half_kernel((isa, dtype, True, True, False, mr))
    par = gemm_half_kernel((isa, dtype, True, True, True, mr))
    want = np.empty(m * n, np.float32)
    ser(x, m, k, pw._packed, n, want, b, mr * -(-m // mr), 1)
    assert_close(want.reshape(m, n), x, pw.unpack(), b, True)
    old = numba.get_num_threads()
    try:
        for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(threads)
            for mrows in (mr, 2 * mr, 5 * mr, mr * -(-m // mr)):
                for workers in (1, threads, 64):
                    got = np.full(m * n, np.nan, np.float32)
                    par(x, m, k, pw._packed, n, got, b, mrows, workers)
                    np.testing.assert_array_equal(got, want)
    finally:
        numba.set_num_threads(old)


@pytest.mark.parametrize("isa_name", ISAS)
def test_serial_and_parallel_twins_differ_in_closure(isa_name):
    """Numba's disk cache keys an entry on the bytecode and the closure's values, not on the
    ``parallel`` option: twins with equal closures would share one entry, and whichever was
    compiled first would serve both (a parallel kernel then runs on one thread)."""
    mr = tile_shape(isa_name)[0]

    def cells(parallel):
        kern = gemm_half_kernel((isa_name, "float16", False, True, parallel, mr))
        return [c.cell_contents for c in getattr(kern, "dispatcher", kern).py_func.__closure__]

    assert cells(False) != cells(True)


def test_avx512_tile_codegen(rng):
    """The AVX-512 tile (one 16-lane vector per panel, 12 rows) built for this host: LLVM
    legalises the 16-lane vectors on AVX2, so the layout logic is checked here even though
    the zmm path itself only runs on an AVX-512 CPU."""
    if not NATIVE:
        pytest.skip("no native ISA on this CPU")
    mr = tile_shape("avx512vnni")[0]
    kern = gemm_half_kernel(("avx512vnni", "float16", True, True, False, mr))
    m, n, k = 14, 77, 21
    x, w, b = _data(rng, m, n, k)
    pw = pack_weight_half(w, "float16")
    out = np.empty((m, n), np.float32)
    kern(x, m, k, pw._packed, n, out.reshape(-1), b, mr * 2, 1)
    assert_close(out, x, pw.unpack(), b, True)


def test_cache_key_has_isa(isa, rng):
    x, w, _ = _data(rng, 2, 3, 4)
    linear_half(x, pack_weight_half(w))
    keys = qgemm.cache_info().families["gemm_half"].keys
    assert (isa, "float16", False, False, False, tile_shape(isa)[0]) in keys


# ---------------------------------------------------------------- edge values, out, errors


def test_nonfinite_propagate(isa, rng):
    x, w, b = _data(rng, 4, 20, 9)
    x[1, 3] = np.nan
    w[5, 2] = np.inf
    pw = pack_weight_half(w)
    y = linear_half(x, pw, bias=b)
    assert np.isnan(y[1]).all()
    rows = [0, 2, 3]
    np.testing.assert_array_equal(y[rows, 5], np.sign(x[rows, 2]) * np.inf)
    mask = np.ones_like(y, bool)
    mask[1] = False
    mask[:, 5] = False
    assert np.isfinite(y[mask]).all()
    yr = linear_half(x, pw, bias=b, relu=True)
    assert np.isnan(yr[1]).all()  # ReLU keeps NaN
    np.testing.assert_array_equal(yr[rows, 5], np.where(x[rows, 2] > 0, np.inf, 0.0))
    bn = b.copy()
    bn[7] = np.nan
    assert np.isnan(linear_half(x, pw, bias=bn)[:, 7]).all()


def test_k_zero_and_empty(isa):
    pw = pack_weight_half(np.zeros((3, 0), np.float32))
    b = np.array([1.0, -2.0, 0.5], np.float32)
    y = linear_half(np.zeros((2, 0), np.float32), pw, bias=b, relu=True)
    np.testing.assert_array_equal(y, [[1.0, 0.0, 0.5]] * 2)
    np.testing.assert_array_equal(linear_half(np.zeros((2, 0), np.float32), pw), np.zeros((2, 3)))
    assert linear_half(np.zeros((0, 0), np.float32), pw).shape == (0, 3)
    pw0 = pack_weight_half(np.zeros((0, 4), np.float32))
    assert linear_half(np.ones((3, 4), np.float32), pw0).shape == (3, 0)


def test_subnormal_weights_and_activations(isa):
    codes = np.arange(1, 1024, dtype=np.uint16)  # every positive float16 subnormal
    w = codes.view(np.float16).astype(np.float32).reshape(-1, 1)
    pw = pack_weight_half(w)
    np.testing.assert_array_equal(pw.unpack(), w)
    y = linear_half(np.array([[2.0**10]], np.float32), pw)
    np.testing.assert_array_equal(y[0], w[:, 0] * 2.0**10)


def test_out_and_inputs(rng):
    x, w, b = _data(rng, 5, 18, 12)
    pw = pack_weight_half(w)
    ref = linear_half(x, pw, bias=b)
    out = np.full((5, 18), 7.0, np.float32)
    assert linear_half(x, pw, bias=b, out=out) is out
    np.testing.assert_array_equal(out, ref)
    xr = x.copy()
    xr.setflags(write=False)
    br = b.copy()
    br.setflags(write=False)
    np.testing.assert_array_equal(linear_half(xr, pw, bias=br), ref)
    b_strided = np.stack([b, b], axis=1)[:, 0]
    np.testing.assert_array_equal(linear_half(x, pw, bias=b_strided), ref)
    # out aliasing x (N == K): computed aside, then copied
    ws = rng.standard_normal((12, 12)).astype(np.float32)
    pws = pack_weight_half(ws)
    xa = x.copy()
    want = linear_half(xa, pws)
    got = linear_half(xa, pws, out=xa)
    assert got is xa
    np.testing.assert_array_equal(got, want)


def _pw():
    return pack_weight_half(np.ones((4, 3), np.float32))


@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        ((np.ones((2, 3)), "pw"), {}, TypeError, "x: expected dtype float32, got float64"),
        ((np.ones((2, 4), np.float32), "pw"), {}, ValueError, "x: expected last dimension K = 3"),
        ((np.float32(1.0), "pw"), {}, ValueError, "x: expected at least 1 dimension"),
        ((np.ones((2, 3), np.float32), np.ones((4, 3))), {}, TypeError, "weight: expected a Half"),
        ((np.ones((2, 3), np.float32), "pw"), {"bias": np.ones(3, np.float32)}, ValueError,
         "bias: expected length 4"),
        ((np.ones((2, 3), np.float32), "pw"), {"bias": np.ones(4)}, TypeError,
         "bias: expected dtype float32"),
        ((np.ones((2, 3), np.float32), "pw"), {"relu": None}, TypeError, "relu: expected a bool"),
        ((np.ones((2, 3), np.float32), "pw"), {"out": np.empty((2, 4))}, TypeError,
         "out: expected dtype float32"),
        ((np.ones((2, 3), np.float32), "pw"), {"out": np.empty((4, 2), np.float32)}, ValueError,
         r"out: expected shape \(2, 4\)"),
        ((np.ones((2, 3), np.float32), "pw"), {"out": np.empty((4, 2), np.float32).T},
         ValueError, "out: expected a C-contiguous array"),
    ],
)  # fmt: skip
def test_linear_errors(args, kwargs, exc, match):
    args = tuple(_pw() if isinstance(a, str) and a == "pw" else a for a in args)
    with pytest.raises(exc, match=match):
        linear_half(*args, **kwargs)


def test_error_leaves_out_untouched():
    out = np.full((2, 4), 3.0, np.float32)
    with pytest.raises(ValueError):
        linear_half(np.ones((2, 3), np.float32), _pw(), bias=np.ones(5, np.float32), out=out)
    assert (out == 3.0).all()


# ----------------------------------------------------------------------- torch / FBGEMM


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("mnk", [(1, 40, 64), (9, 33, 130), (20, 128, 256)])
def test_matches_torch_fbgemm_fp16(relu, mnk, rng):
    torch = torch_or_skip()
    m, n, k = mnk
    x, w, b = _data(rng, m, n, k)
    w[0, 0] = 1e5  # torch's prepack saturates to 65504: qgemm's saturate=True
    pt = torch.ops.quantized.linear_prepack_fp16(torch.from_numpy(w), torch.from_numpy(b))
    q = torch.ops.quantized
    op = q.linear_relu_dynamic_fp16 if relu else q.linear_dynamic_fp16
    yt = op(torch.from_numpy(x), pt).numpy()
    pw = pack_weight_half(w, "float16", saturate=True)
    y = linear_half(x, pw, bias=b, relu=relu)
    _, tol = ref_linear(x, pw.unpack(), b, relu)
    assert np.all(np.abs(y.astype(np.float64) - yt) <= 2 * tol)  # both within the bound
    assert_close(yt, x, pw.unpack(), b, relu)  # torch uses the same rounded weights
