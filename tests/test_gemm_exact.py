"""Tests of issue 15's int8 GEMM work: exact full-range int8 on AVX2 (the int16 ``vpmaddwd``
path, ``avx2w``), the AVX-VNNI path (``avxvnni``), half-precision dispatch through
``pack_weight`` / ``linear``.

Agreement: raw int32 products are exact (bit for bit) against the int64 numpy reference
(``tests/reference.py``: ``ref_matmul_u8s8``, with ``saturate=True`` FBGEMM's AVX2 int16 pair
saturation); the half-precision results within float32 rounding of ``x @ w16.T``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from llvmlite import binding as llvm
from llvmlite import ir

import qgemm
from qgemm import _config, _isa
from qgemm._kernels import gemm_ukernel as uk
from qgemm.gemm import linear, matmul_u8s8, pack_weight, quantized_linear
from qgemm.quantize import QParams

from .conftest import FLOAT32_ATOL, FLOAT32_RTOL
from .reference import ref_matmul_u8s8

ISAS = _config.supported_isas()
_ONE = QParams(1.0, 0, dtype="int8")


@pytest.fixture(params=ISAS)
def isa(request):
    old = _config.set_isa(request.param)
    yield request.param
    _config.set_isa(old)


def _pairs_saturating(w: np.ndarray) -> np.ndarray:
    """``[N, ceil(K / 2)]`` bool: the pair ``(2i, 2i + 1)`` of each row can saturate int16."""
    n, k = w.shape
    wp = np.zeros((n, k + (k & 1)), np.int64)
    wp[:, :k] = np.abs(w.astype(np.int64))
    return 255 * wp.reshape(n, -1, 2).sum(axis=-1) > 32767


def _weights(kind: str, rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Adversarial int8 weights ``[N, K]``: ``all`` pairs saturating, ``none``, ``random``."""
    if kind == "all":  # |w| >= 65 everywhere: every full pair sums beyond 128
        w = rng.integers(65, 128, (n, k)) * rng.choice([-1, 1], (n, k))
        w[rng.random((n, k)) < 0.1] = -128
        return w.astype(np.int8)
    if kind == "none":  # |w0| + |w1| <= 128 for every pair, touching the bound
        w = rng.integers(-64, 65, (n, k)).astype(np.int8)
        w[:, : k - k % 2 : 2] = 64
        return w
    return rng.integers(-128, 128, (n, k), dtype=np.int8)


@pytest.mark.parametrize("kind", ["all", "none", "random"])
@pytest.mark.parametrize("mnk", [(1, 1, 1), (4, 16, 8), (7, 70, 33), (13, 130, 260)])
def test_adversarial_weights_exact(isa, kind, mnk, rng):
    m, n, k = mnk
    w = _weights(kind, rng, n, k)
    if kind == "all":
        assert _pairs_saturating(w)[:, : k // 2].all()
    if kind == "none":
        assert not _pairs_saturating(w).any()
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    a[0] = 255  # the worst activation row
    pw = pack_weight(w, qparams=_ONE)
    np.testing.assert_array_equal(matmul_u8s8(a, pw), ref_matmul_u8s8(a, w))
    sat = matmul_u8s8(a, pw, saturate=True)
    np.testing.assert_array_equal(sat, ref_matmul_u8s8(a, w, saturate=True))
    if kind == "all" and k > 1:
        assert (sat != ref_matmul_u8s8(a, w)).any()  # the twin really saturates


def test_wide_twin_layout(rng):
    # the int16 twin holds w[p * NP + c, 2 h + t] at [p, h, c, t], zero padded
    for n, k in [(1, 1), (17, 9), (70, 36)]:
        w = rng.integers(-128, 128, (n, k), dtype=np.int8)
        pw = pack_weight(w, qparams=_ONE)
        npw, kg = pw._np, pw._kg
        npan = -(-n // npw)
        wide = pw._wide().view(np.int16).reshape(npan, 2 * kg, npw, 2)
        ref = np.zeros((npan * npw, 4 * kg), np.int16)
        ref[:n, :k] = w
        back = wide.transpose(0, 2, 1, 3).reshape(npan * npw, 4 * kg)
        np.testing.assert_array_equal(back, ref)
        assert pw._wide() is pw._wide()  # made once
        assert pw.nbytes >= pw._packed.nbytes * 3


def test_avx2_exact_path_reads_the_int8_panels(rng):
    # the AVX2 default's exact variant widens the int8 panel in registers: no int16 twin
    if "avx2" not in ISAS:
        pytest.skip("the AVX2 path needs a CPU with AVX2 and FMA")
    assert _isa.path("avx2").default.exact == "avx2v"
    old = _config.set_isa("avx2")
    try:
        w = _weights("all", rng, 20, 12)
        pw = pack_weight(w, qparams=_ONE)
        a = np.full((3, 12), 255, np.uint8)
        np.testing.assert_array_equal(matmul_u8s8(a, pw), ref_matmul_u8s8(a, w))
        assert pw._packed16 is None
        assert all(plan.head[2] is pw._packed for plan in pw._plans.values())
    finally:
        _config.set_isa(old)


@pytest.fixture(params=["avx2v", "avx2w", "avx2x"])
def avx2_exact(request, monkeypatch):
    """The AVX2 path with its exact variant replaced by each exact AVX2 microkernel."""
    if "avx2" not in ISAS:
        pytest.skip("the AVX2 path needs a CPU with AVX2 and FMA")
    row = _isa.path("avx2")
    forced = dataclasses.replace(row, default=_isa.Kernel("avx2", request.param, row.default.tiles))
    monkeypatch.setitem(_isa._BY_NAME, "avx2", forced)
    old = _config.set_isa("avx2")
    yield request.param
    _config.set_isa(old)


@pytest.mark.parametrize("kind", ["all", "random"])
def test_every_exact_avx2_variant(avx2_exact, kind, rng):
    for m, n, k in [(1, 1, 3), (5, 70, 33), (9, 130, 64)]:
        w = _weights(kind, rng, n, k)
        a = rng.integers(0, 256, (m, k), dtype=np.uint8)
        a[0] = 255
        pw = pack_weight(w, qparams=_ONE)
        np.testing.assert_array_equal(matmul_u8s8(a, pw), ref_matmul_u8s8(a, w))
        b = rng.standard_normal(n).astype(np.float32)
        y = quantized_linear(a, QParams(0.5, 3), pw, b, relu=True)
        raw = ref_matmul_u8s8(a, w) - 3 * w.astype(np.int64).sum(axis=1)
        ref = np.maximum(raw.astype(np.float32) * np.float32(0.5) + b, 0)
        np.testing.assert_allclose(y, ref, rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL)
        can_saturate = pw._pairmax * 255 > 32767
        assert (pw._packed16 is not None) == (avx2_exact == "avx2w" and can_saturate)


@given(
    m=st.integers(0, 9),
    n=st.integers(0, 70),
    k=st.integers(0, 37),
    kind=st.sampled_from(["all", "none", "random"]),
    out_kind=st.sampled_from(["raw", "float", "requant", "dynamic"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_exact_hypothesis(m, n, k, kind, out_kind, seed):
    rng = np.random.default_rng(seed)
    w = _weights(kind, rng, n, k) if n and k else np.zeros((n, k), np.int8)
    pw = pack_weight(w, qparams=QParams(0.01, 0, dtype="int8"))
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    a[:, :1] = 255  # full range: the dynamic kind then quantizes with scale 1, zero point 0
    a[:, 1:2] = 0
    ref = ref_matmul_u8s8(a, w)
    ref32 = ref.astype(np.float32)  # exact: |raw| < 2^24
    if out_kind == "raw":
        np.testing.assert_array_equal(matmul_u8s8(a, pw), ref)
    elif out_kind == "float":
        y = quantized_linear(a, QParams(0.5, 0), pw)
        r = ref32 * np.float32(0.5) * np.float32(0.01)
        np.testing.assert_allclose(y, r, rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL)
    elif out_kind == "requant":
        y = quantized_linear(a, QParams(1.0, 0), pw, out_qparams=QParams(1.0, 0))
        r = np.clip(np.rint(ref32 * np.float32(0.01)), 0, 255)
        np.testing.assert_array_equal(y, r.astype(np.uint8))
    else:
        y = linear(a.astype(np.float32), pw, reduce_range=False)
        assert y.shape == (m, n)
        if k >= 2:  # (k = 1: the range is [0, 255] only when the value is 0)
            r = ref32 * np.float32(0.01)
            np.testing.assert_allclose(y, r, rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL)


def test_parallel_wide_path(rng):
    # big enough for the parallel twin, with saturating weights and full-range activations
    for m, n, k in [(64, 200, 100), (300, 20, 64)]:
        w = _weights("random", rng, n, k)
        a = rng.integers(0, 256, (m, k), dtype=np.uint8)
        np.testing.assert_array_equal(matmul_u8s8(a, pack_weight(w, qparams=_ONE)),
                                      ref_matmul_u8s8(a, w))  # fmt: skip


def test_pickled_weight_rebuilds_wide_twin(rng):
    import pickle

    w = _weights("all", rng, 9, 10)
    pw = pack_weight(w, qparams=_ONE)
    a = np.full((2, 10), 255, np.uint8)
    matmul_u8s8(a, pw)
    pw2 = pickle.loads(pickle.dumps(pw))
    assert pw2._packed16 is None
    np.testing.assert_array_equal(matmul_u8s8(a, pw2), ref_matmul_u8s8(a, w))


# ------------------------------------------------------------------------------- AVX-VNNI


def test_avxvnni_in_the_table():
    row = _isa.path("avxvnni")
    assert row.requires == ("avx2", "fma", "avxvnni")
    assert row.default.fast == row.default.exact == "vnni256"
    assert not row.int16_pairs
    feats = {"avx2": True, "fma": True, "avxvnni": True}
    assert _isa.detect(feats, "x86_64")[-1] == "avxvnni"
    assert "avxvnni" not in _isa.detect({"avx2": True, "fma": True}, "x86_64")
    both = dict(feats, avx512f=True, avx512bw=True, avx512vl=True, avx512vnni=True)
    assert _isa.detect(both, "x86_64")[-1] == "avx512vnni"  # Sapphire Rapids: the zmm path
    for npw in _isa.PANEL_WIDTHS:
        t = row.default.tiles[npw]
        assert t.nr == 8 * t.nv and npw % t.nr == 0


def _tile_asm(variant: int, features: str, rows: int = 2, nv: int = 2) -> str:
    """Assembly of one microkernel tile (int32 store) compiled for a target with ``features``
    (the instruction selection runs; nothing is executed)."""
    mod = ir.Module(name="tile")
    mod.triple = "x86_64-unknown-linux-gnu"
    i8p = ir.IntType(8).as_pointer()
    i64 = ir.IntType(64)
    fnty = ir.FunctionType(ir.VoidType(), [i8p, i64, i8p, i64, i64, i8p, i8p, i64])
    fn = ir.Function(mod, fnty, "tile")
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    a, lda, b, bstride, kg, init, out, ldo = fn.args
    outp = {"mode": uk.RAW, "o_base": out, "ldo": ldo}
    uk._emit_tile(builder, mod, a, lda, b, bstride, kg, init, outp, rows, nv, variant)
    builder.ret_void()
    parsed = llvm.parse_assembly(str(mod))
    parsed.verify()
    target = llvm.Target.from_triple(mod.triple)
    tm = target.create_target_machine(cpu="x86-64", features=features, opt=2)
    return tm.emit_assembly(parsed)


def test_avxvnni_microkernel_compiles_for_an_avxvnni_target():
    asm = _tile_asm(uk.VNNI256, "+avx2,+fma,+avxvnni")
    assert "vpdpbusd" in asm
    assert "%ymm" in asm and "%zmm" not in asm  # VEX, 256-bit: no AVX-512 needed


@pytest.mark.parametrize("variant", [uk.AVX2_WIDE, uk.AVX2_WIDEN])
def test_wide_microkernels_are_vpmaddwd_only(variant):
    asm = _tile_asm(variant, "+avx2,+fma")
    assert "vpmaddwd" in asm and "vpmaddubsw" not in asm
    if variant == uk.AVX2_WIDEN:
        assert "vpmovsxbw" in asm  # the int8 panel widened in registers


@pytest.mark.skipif("avxvnni" not in ISAS, reason="this CPU has no AVX-VNNI (avxvnni)")
def test_avxvnni_path_runs_exact(rng):  # pragma: no cover - needs an AVX-VNNI CPU
    old = _config.set_isa("avxvnni")
    try:
        for m, n, k in [(1, 1, 1), (7, 70, 33), (13, 130, 260)]:
            w = _weights("random", rng, n, k)
            a = rng.integers(0, 256, (m, k), dtype=np.uint8)
            pw = pack_weight(w, qparams=_ONE)
            np.testing.assert_array_equal(matmul_u8s8(a, pw), ref_matmul_u8s8(a, w))
    finally:
        _config.set_isa(old)


# ------------------------------------------------------------------------- half dispatch


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_pack_weight_half_dtype_dispatch(dtype, rng):
    w = rng.standard_normal((20, 33)).astype(np.float32)
    x = rng.standard_normal((3, 33)).astype(np.float32)
    bias = rng.standard_normal(20).astype(np.float32)
    pw = pack_weight(w, dtype=dtype)
    assert isinstance(pw, qgemm._half.HalfPackedWeight) and pw.dtype == dtype
    w16 = pw.unpack().astype(np.float64)
    y = linear(x, pw, bias, relu=True)
    ref = np.maximum(x.astype(np.float64) @ w16.T + bias, 0)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="reduce_range/saturate"):
        linear(x, pw, reduce_range=True)
    with pytest.raises(ValueError, match="only for dtype='int8'"):
        pack_weight(w, dtype=dtype, reduce_range=True)
    with pytest.raises(TypeError, match="expected a PackedWeight .*got HalfPackedWeight"):
        quantized_linear(np.zeros((1, 33), np.uint8), QParams(1.0, 0), pw)
    with pytest.raises(ValueError, match="saturate: only for half-precision"):
        pack_weight(w, saturate=True)
