"""Tests of the GEMM's output stage as one value (:class:`OutputStage`, its memo and its one
lowering to the microkernels' operands), the ISA table's choices as the GEMM sees them, and
packed-weight pickling.

Agreement: as in ``test_gemm.py`` -- integers and requantized uint8 exact against
``tests/reference.py``, float outputs within FLOAT32_RTOL/ATOL, lowered operands bit for bit
against the same float32 numpy operations.
"""

from __future__ import annotations

import numpy as np
import pytest

from qgemm import _config
from qgemm.gemm import PackedWeight, linear, matmul_u8s8, pack_weight, quantized_linear
from qgemm.quantize import QParams

from .conftest import FLOAT32_ATOL, FLOAT32_RTOL
from .reference import ref_gemm_corrected, ref_matmul_u8s8, ref_output_float, ref_output_requant
from .test_gemm import ISAS, _codes, _pw_int8


@pytest.fixture(params=ISAS)
def isa(request):
    old = _config.set_isa(request.param)
    yield request.param
    _config.set_isa(old)


# --------------------------------------------------------------------------- the output stage


def test_output_stage_is_one_named_value_memoised_per_call_options(rng):
    from qgemm._kernels.output_stage import PAD, OutputStage
    from qgemm.gemm import _stage

    codes = _codes(rng, 20, 12)
    pw, qp = _pw_int8(codes, "channel", zp=True, rng=rng)
    xqp, oqp = QParams(0.03, 117), QParams(0.2, 5, reduce_range=True)
    bias = rng.standard_normal(20).astype(np.float32)
    st = _stage(pw, "requant", xqp, oqp, bias, True)
    assert isinstance(st, OutputStage) and st._fields[0] == "w_zero_point"
    np.testing.assert_array_equal(st.w_scale[:20], qp.scale)
    np.testing.assert_array_equal(st.w_scale[20:], np.zeros(PAD, np.float32))
    np.testing.assert_array_equal(st.w_zero_point[:20], qp.zero_point)
    assert st.has_w_zero_point and st.w_zero_point.shape == (20 + PAD,)
    np.testing.assert_array_equal(
        st.w_colsum, codes.astype(np.int64).sum(axis=1) - 12 * qp.zero_point
    )
    assert (st.x_zero_point, st.x_scale) == (117, np.float32(0.03))
    assert (st.out_scale, st.out_zero_point, st.out_qmax, st.relu) == (
        np.float32(0.2),
        5,
        127,
        True,
    )
    assert st.float_bias is bias and not st.int_bias.any()
    # memoised on the identity of the call's inputs; anything new makes a new value
    assert _stage(pw, "requant", xqp, oqp, bias, True) is st
    assert _stage(pw, "requant", xqp, oqp, bias.copy(), True) is not st
    ib = np.arange(20, dtype=np.int32)
    st2 = _stage(pw, "float", xqp, None, ib, False)
    assert st2.int_bias is ib and not st2.float_bias.any() and st2.out_qmax == 255
    assert _stage(pw, "dynamic", bias=None, relu=False, x_qmax=127).x_qmax == 127


def test_memoised_stage_reads_the_bias_in_place(rng):
    codes = _codes(rng, 9, 16)
    pw, _ = _pw_int8(codes, "tensor", zp=False, rng=rng)
    xq = rng.integers(0, 256, (3, 16), dtype=np.uint8)
    xqp = QParams(0.05, 100)
    bias = np.zeros(9, np.float32)
    quantized_linear(xq, xqp, pw, bias)
    bias += 1.5  # mutated in place: same object, the memoised stage must see the new values
    raw = ref_gemm_corrected(xq, 100, codes, pw.zero_point)
    np.testing.assert_allclose(
        quantized_linear(xq, xqp, pw, bias),
        ref_output_float(raw, xqp.scale, pw.scale, bias),
        rtol=FLOAT32_RTOL,
        atol=FLOAT32_ATOL,
    )


@pytest.mark.parametrize("relu", [False, True])
def test_lower_gives_the_microkernel_operands(relu, rng):
    """The one place the description becomes flat operands, against numpy float32."""
    from qgemm._kernels.gemm_ukernel import FLOAT, RAW, REQUANT
    from qgemm._kernels.output_stage import PAD, lower
    from qgemm.gemm import _stage

    pw, qp = _pw_int8(_codes(rng, 7, 5), "channel", rng=rng)
    bias = rng.standard_normal(7).astype(np.float32)
    oqp = QParams(0.3, 9)
    st = _stage(pw, "requant", QParams(0.02, 3), oqp, bias, relu)
    xs = np.float32(0.07)  # the activation scale in effect (e.g. chosen per call)
    p1, p2, s1, s2, s3 = lower(st, xs, REQUANT, True)
    ab = (xs * qp.scale).astype(np.float32)
    np.testing.assert_array_equal(p2[:7], (ab / np.float32(0.3)).astype(np.float32))
    np.testing.assert_array_equal(p1[:7], (bias / ab).astype(np.float32))
    assert p1.shape == p2.shape == (7 + PAD,) and not p1[7:].any() and not p2[7:].any()
    assert (s1, s2, s3) == (9.0, 9.0 if relu else 0.0, 255.0)
    p1, p2, s1, s2, s3 = lower(st, xs, FLOAT, True)
    np.testing.assert_array_equal(p1[:7], qp.scale)
    np.testing.assert_array_equal(p2, np.concatenate([bias, np.zeros(PAD, np.float32)]))
    assert s1 == xs and s2 == (0.0 if relu else -np.inf)
    p1, p2, *_ = lower(st, xs, FLOAT, False)
    assert p2.shape == (7,)
    assert lower(st, xs, RAW, False)[2:] == (0.0, 0.0, 0.0)


def test_packed_weight_pickles_without_caches(rng):
    import pickle

    pw = pack_weight(rng.standard_normal((20, 12)).astype(np.float32))
    x = rng.standard_normal((3, 12)).astype(np.float32)
    y = linear(x, pw)
    back = pickle.loads(pickle.dumps(pw))
    assert type(back) is PackedWeight and back._plans == {} and back._stage_memo is None
    assert back._packed.ctypes.data % 64 == 0 and not back.scale.flags.writeable
    np.testing.assert_array_equal(back.unpack(), pw.unpack())
    np.testing.assert_array_equal(linear(x, back), y)


def test_linear_reduce_range_default_follows_the_isa_table(isa, rng):
    from qgemm import _isa

    pw = pack_weight(rng.standard_normal((8, 64)).astype(np.float32))  # pairs can saturate
    x = rng.standard_normal((2, 64)).astype(np.float32)
    seven_bit = _isa.path(isa).int16_pairs
    np.testing.assert_array_equal(linear(x, pw), linear(x, pw, reduce_range=seven_bit))


@pytest.mark.skipif(
    "avx512vnni" not in ISAS, reason="this CPU has no AVX-512 VNNI (the path cannot run here)"
)
def test_vnni_path_exact_with_its_tiles(rng):
    old = _config.set_isa("avx512vnni")
    try:
        for n in (16, 70):  # both panel widths: 8x16 and 6x64 tiles
            codes = _codes(rng, n, 36)
            pw, _ = _pw_int8(codes, "channel", zp=True, rng=rng)
            xq = rng.integers(0, 256, (13, 36), dtype=np.uint8)
            np.testing.assert_array_equal(matmul_u8s8(xq, pw), ref_matmul_u8s8(xq, codes))
            raw = ref_gemm_corrected(xq, 7, codes, pw.zero_point)
            oqp = QParams(0.5, 4)
            np.testing.assert_array_equal(
                quantized_linear(xq, QParams(0.03, 7), pw, relu=True, out_qparams=oqp),
                ref_output_requant(raw, np.float32(0.03), pw.scale, oqp.scale, 4, None, True),
            )
    finally:
        _config.set_isa(old)
