"""The numpy generic tier (``qgemm/_kernels/gemm_generic.py``, ``quantize_generic.py``; the
embedding families' ``embedding_generic.py`` has its own file, ``test_tiers_embedding.py``).

Every family with a numpy generic tier is forced to it (``QGEMM_JIT=generic``) and compared
bit for bit with the eager specialised kernel through the public API, over hypothesis shapes
(0, 1, odd sizes), every GEMM kind, saturating or not, adversarial weights, zero points,
per-channel scales and non-finite inputs (the same exception).  The raw int32 product is also
checked against a plain numpy reference, and a fresh interpreter with an empty cache serves
``pack_weight`` + ``linear`` from the generic tier.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qgemm
from qgemm import _cache
from qgemm._kernels import embedding_generic, gemm_generic, quantize_generic
from qgemm._kernels.quantize_generic import choose_qparams_np
from qgemm.embedding import check_bags
from tests._jit import forced_jit_mode

NUMPY_FAMILIES = tuple(sorted(_cache.GENERIC_PROVIDERS))


def _outcome(fn):
    """``fn()``'s result, or ``(exception type, message)`` when it raises."""
    try:
        return fn()
    except (ValueError, TypeError, OverflowError, IndexError) as exc:
        return (type(exc), str(exc))


def _same(a, b, what=""):
    if isinstance(a, tuple) and a and isinstance(a[0], type):
        assert a == b, what
        return
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            _same(a[k], b[k], f"{what}/{k}")
        return
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{what}[{i}]")
        return
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray), what
        assert a.dtype == b.dtype and a.shape == b.shape, what
        np.testing.assert_array_equal(
            np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8), what
        )
        return
    assert type(a) is type(b) and (a == b or (a != a and b != b)), what


@pytest.fixture(scope="module")
def both_tiers():
    """``run(fn) -> (eager outcome, generic outcome)``; the JIT mode is restored after."""
    old = _cache.get_jit_mode()

    def run(fn):
        with forced_jit_mode("eager"):
            spec = _outcome(fn)
        with forced_jit_mode("generic"):
            gen = _outcome(fn)
        return spec, gen

    yield run
    _cache.set_jit_mode(old)
    assert _cache.get_jit_mode() == old


def _check(run, fn, what=""):
    spec, gen = run(fn)
    _same(spec, gen, what)
    return gen


# ------------------------------------------------------------------------- the modules


def test_constants_match_the_numba_modules():
    from qgemm._kernels import gemm, output_stage, quantize

    assert gemm_generic.KINDS == gemm.KINDS
    assert gemm_generic.N_STAGE == len(output_stage.OutputStage._fields)
    assert quantize_generic.SMALL_SCALE_THRESHOLD == quantize.SMALL_SCALE_THRESHOLD


@pytest.mark.parametrize("module", [gemm_generic, quantize_generic, embedding_generic])
def test_numpy_tier_modules_import_no_numba(module):
    tree = ast.parse(Path(module.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [("." * node.level) + (node.module or "")]
        else:
            continue
        for name in names:
            assert not name.startswith(("numba", "llvmlite")), name
            # relative imports: only the numpy tier itself and the tuning constants
            if node in tree.body:  # module level (a builder may read the config lazily)
                allowed = (".quantize_generic", ".embedding_codes", ".._tuning")
                assert not name.startswith(".") or name in allowed, name


_NO_NUMBA = """
import sys, types
pkg = types.ModuleType("qgemm")  # the package without its __init__ (which imports Numba)
pkg.__path__ = [sys.argv[1]]
sys.modules["qgemm"] = pkg
import qgemm._kernels.gemm_generic, qgemm._kernels.quantize_generic
import qgemm._kernels.embedding_generic
assert "numba" not in sys.modules and "llvmlite" not in sys.modules, sorted(sys.modules)
print("ok")
"""


def test_numpy_tier_modules_load_without_numba():
    pkg = str(Path(qgemm.__file__).parent)
    run = subprocess.run(
        [sys.executable, "-c", _NO_NUMBA, pkg], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_every_numpy_family_is_served_by_the_generic_tier(both_tiers):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 7)).astype(np.float32)
    x = rng.standard_normal((3, 7)).astype(np.float32)
    t = rng.standard_normal((4, 6)).astype(np.float32)
    qgemm.cache_clear()
    with forced_jit_mode("generic"):
        pw = qgemm.pack_weight(w)
        qp = qgemm.choose_qparams(x)
        qgemm.dequantize(qgemm.quantize(x, qp), qp)
        qgemm.linear(x, pw)
        qgemm.quantize_rowwise(t, bits=4)
        qgemm.embedding_bag(t, np.array([0, 3, 1]), np.array([0, 2]))
        check_bags(np.array([0, 3, 1]), np.array([0, 2]), rows=4)
    info = qgemm.cache_info()
    for name in NUMPY_FAMILIES:
        fam = info.families[name]
        # served by generic kernels only: nothing specialised built, nothing compiled
        assert fam.generic_keys and not fam.keys and fam.compile_seconds == 0.0, (name, fam)
        with forced_jit_mode("generic"):
            kern = _cache.get_kernel(name, _any_key(name))
        assert _cache.tier_of(kern) == "generic-only" and not hasattr(kern, "py_func"), name
    qgemm.cache_clear()


_BAG_KEY = ("portable", "float32", "int64", "int64", "offsets", "sum", False, 0, False, False)


def _any_key(family):
    return {
        "gemm": ("float", "portable", "portable", 1, 1, 16, False),
        "quantize": ("uint8", False),
        "dequantize": ("int8", False),
        "rowwise_codes": (4,),
        "embedding_bag": _BAG_KEY,
        "check_bags": ("int64", "int64"),
    }.get(family, ())


# ---------------------------------------------------------------------- choose_qparams

_RANGES = st.one_of(
    st.floats(-1e6, 1e6),
    st.floats(-1e-3, 1e-3),  # the small-scale branch
    st.sampled_from([0.0, -0.0, 1e-30, -1e-30, 6.1e-5, 3.4e38, -3.4e38]),
)
_QRANGES = [(0, 255), (0, 127), (-128, 127), (-64, 63)]


@given(
    lo=st.lists(_RANGES, min_size=0, max_size=9),
    hi=st.lists(_RANGES, min_size=9, max_size=9),
    q=st.sampled_from(_QRANGES),
)
def test_choose_qparams_twin_is_bit_identical(lo, hi, q):
    from qgemm._kernels.quantize import choose_qparams_kernel

    n = len(lo)
    lo64 = np.array(lo, np.float64)
    hi64 = np.array(hi[:n], np.float64)
    with forced_jit_mode("eager"):
        kern = choose_qparams_kernel(())
    s1, z1 = np.empty(n, np.float32), np.empty(n, np.int32)
    kern(lo64, hi64, q[0], q[1], s1, z1)
    s2, z2 = choose_qparams_np(lo64, hi64, *q)
    _same(s1, s2)
    _same(z1, z2)


@given(
    shape=st.sampled_from([(1,), (3,), (2, 5), (4, 1, 3), (7, 2)]),
    axis=st.sampled_from([None, 0, -1]),
    dtype=st.sampled_from(["uint8", "int8"]),
    symmetric=st.booleans(),
    reduce_range=st.booleans(),
    scale=st.sampled_from([1e-6, 1.0, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_choose_qparams_quantize_dequantize(
    both_tiers, shape, axis, dtype, symmetric, reduce_range, scale, seed
):
    x = (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)

    def ops():
        qp = qgemm.choose_qparams(
            x, dtype=dtype, symmetric=symmetric, axis=axis, reduce_range=reduce_range
        )
        q = qgemm.quantize(x, qp)
        return [np.asarray(qp.scale), np.asarray(qp.zero_point), q, qgemm.dequantize(q, qp)]

    _check(both_tiers, ops)


@given(
    n=st.integers(0, 40),
    c=st.integers(1, 5),
    dtype=st.sampled_from(["uint8", "int8"]),
    bad=st.sampled_from([None, np.nan, np.inf, -np.inf]),
    chunk=st.sampled_from([None, 1, 4, 7]),
    seed=st.integers(0, 2**16),
)
def test_quantize_per_channel_chunks_and_nonfinite(both_tiers, n, c, dtype, bad, chunk, seed):
    """Every chunking of the numpy tier (per channel over the last or a middle axis, short
    segments gathered), the first non-finite value reported as by the specialised kernel."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, c, 3)) * 10).astype(np.float32)
    if bad is not None and x.size:
        x.reshape(-1)[rng.integers(0, x.size, 2)] = bad
    lo = -128 if dtype == "int8" else 0
    qps = [
        qgemm.QParams(np.float32(0.3), 3, dtype=dtype),
        qgemm.QParams(
            rng.uniform(0.01, 1, c).astype(np.float32), np.arange(c) + lo, dtype=dtype, axis=1
        ),
        qgemm.QParams(rng.uniform(0.01, 1, 3).astype(np.float32), [lo, 5, 7], dtype=dtype, axis=2),
    ]
    old = quantize_generic._CHUNK
    if chunk is not None:
        quantize_generic._CHUNK = chunk
    try:
        for qp in qps:
            _check(both_tiers, lambda qp=qp: qgemm.quantize(x, qp), "quantize")
            if bad is None:
                q = qgemm.quantize(x, qp)
                _check(both_tiers, lambda qp=qp, q=q: qgemm.dequantize(q, qp), "dequantize")
    finally:
        quantize_generic._CHUNK = old


# ----------------------------------------------------------------------------- rowwise


def _table(rng, rows, dim, pattern, bad):
    t = rng.standard_normal((rows, dim)).astype(np.float32)
    if pattern == "zeros":
        t[:] = 0.0
    elif pattern == "signed_zeros":  # the sign of a zero min/max is in the bias bytes
        t[:] = np.where(rng.random((rows, dim)) < 0.5, np.float32(-0.0), np.float32(0.0))
    elif pattern == "constant":
        t[:] = np.float32(rng.standard_normal())
    elif pattern == "wide":
        t *= np.float32(1e4)
    if bad is not None and t.size:
        t.reshape(-1)[rng.integers(0, t.size, 2)] = bad
    return t


@given(
    rows=st.integers(0, 9),
    dim=st.sampled_from([0, 1, 2, 3, 5, 8, 17]),
    bits=st.sampled_from([4, 2]),
    pattern=st.sampled_from(["normal", "zeros", "signed_zeros", "constant", "wide"]),
    bad=st.sampled_from([None, np.nan, np.inf]),
    chunk=st.sampled_from([None, 1, 6]),
    seed=st.integers(0, 2**16),
)
def test_quantize_rowwise_bytes(both_tiers, rows, dim, bits, pattern, bad, chunk, seed):
    t = _table(np.random.default_rng(seed), rows, dim, pattern, bad)
    old = quantize_generic._CHUNK
    if chunk is not None:
        quantize_generic._CHUNK = chunk
    try:
        _check(both_tiers, lambda: qgemm.quantize_rowwise(t, bits=bits).fused)
    finally:
        quantize_generic._CHUNK = old


@given(
    rows=st.integers(0, 9),
    dim=st.sampled_from([0, 1, 2, 3, 5, 8, 17]),
    pattern=st.sampled_from(["normal", "zeros", "signed_zeros", "constant", "wide"]),
    bad=st.sampled_from([None, np.nan, -np.inf]),
    chunk=st.sampled_from([None, 1, 6]),
    seed=st.integers(0, 2**16),
)
def test_rowwise8_fused_numpy_kernel(rows, dim, pattern, bad, chunk, seed):
    """The numpy one-pass 8-bit kernel (not registered as a tier: see the module docstring)
    against the specialised one, called directly: same bytes, rows with a non-finite value
    left untouched, the same first bad index."""
    from qgemm._kernels.rowwise_generic import rowwise8_fused_kernel

    t = _table(np.random.default_rng(seed), rows, dim, pattern, bad)
    with forced_jit_mode("eager"):
        spec = rowwise8_fused_kernel(())
    f1 = np.full((rows, dim + 8), 0xAB, np.uint8)
    f2 = f1.copy()
    old = quantize_generic._CHUNK
    if chunk is not None:
        quantize_generic._CHUNK = chunk
    try:
        got = quantize_generic.generic_rowwise8_fused_kernel(())(t, f2)
    finally:
        quantize_generic._CHUNK = old
    assert got == spec(t, f1)
    _same(f1, f2)


def test_rowwise_minmax_first_zero_sign():
    """Numba's ``min(lo, v)`` keeps the first of equal values: the sign of a zero min/max."""
    x = np.array([[0.0, -0.0, 1.0], [-0.0, 0.0, -1.0], [-0.0, 0.0, 0.0]], np.float32)
    from qgemm._kernels.quantize import rowwise_minmax_kernel

    mn, mx = np.empty(3, np.float32), np.empty(3, np.float32)
    assert quantize_generic.generic_rowwise_minmax_kernel(())(x, mn, mx) == -1
    np.testing.assert_array_equal(np.signbit(mn), [False, True, True])
    np.testing.assert_array_equal(np.signbit(mx), [False, True, True])
    np.testing.assert_array_equal(mn, [0, -1, 0])
    np.testing.assert_array_equal(mx, [1, 0, 0])
    with forced_jit_mode("eager"):
        spec = rowwise_minmax_kernel(())
    mn2, mx2 = np.empty(3, np.float32), np.empty(3, np.float32)
    assert spec(x, mn2, mx2) == -1
    _same([mn, mx], [mn2, mx2])


# ------------------------------------------------------------------------- pack_weight


def _codes(rng, n, k, kind):
    if kind == "saturating":  # both codes of every pair -128 or 127: |w0| + |w1| >= 254
        half = rng.choice(np.array([-128, 127], np.int8), (n, (k + 1) // 2))
        return np.ascontiguousarray(np.repeat(half, 2, axis=1)[:, :k])
    if kind == "none":  # no pair can saturate
        return rng.integers(-3, 4, (n, k)).astype(np.int8)
    return rng.integers(-128, 128, (n, k)).astype(np.int8)


def _packed_state(pw):
    return [pw._packed, pw._colc, np.int64(pw._pairmax), pw._w_scale, pw._w_zp, pw.unpack()]


@given(
    n=st.sampled_from([0, 1, 2, 7, 16, 17, 33, 65]),
    k=st.sampled_from([0, 1, 3, 4, 9, 70]),
    kind=st.sampled_from(["random", "saturating", "none"]),
    seed=st.integers(0, 2**16),
)
def test_pack_weight_panels_identical(both_tiers, n, k, kind, seed):
    rng = np.random.default_rng(seed)
    codes = _codes(rng, n, k, kind)
    w = rng.standard_normal((n, k)).astype(np.float32)
    qp = qgemm.QParams(np.float32(0.01), 0, dtype="int8")
    _check(both_tiers, lambda: _packed_state(qgemm.pack_weight(codes, qparams=qp)), "codes")
    for gran in ("channel", "tensor"):
        _check(both_tiers, lambda g=gran: _packed_state(qgemm.pack_weight(w, granularity=g)), gran)


# -------------------------------------------------------------------------------- GEMM


def _weight(rng, n, k, kind, gran, zp):
    codes = _codes(rng, n, k, kind)
    if gran == "tensor":
        qp = qgemm.QParams(np.float32(0.02), int(rng.integers(-5, 6)) if zp else 0, dtype="int8")
    else:
        zps = rng.integers(-5, 6, n) if zp else np.zeros(n, np.int64)
        scales = rng.uniform(0.001, 0.05, n).astype(np.float32)
        qp = qgemm.QParams(scales, zps, dtype="int8", axis=0)
    return qgemm.pack_weight(codes, qparams=qp)


def _gemm_kinds(pw, rng, m, saturate, relu, bias_kind, bad, act):
    n, k = pw.shape
    x = (rng.standard_normal((m, k)) * 3).astype(np.float32)
    if act == "high":  # codes near 255: pairs with big weights saturate
        x = np.abs(x) + np.float32(5.0)
    elif act == "tiny":  # the small-scale branch of the dynamic parameters
        x *= np.float32(1e-7)
    elif act == "zeros":
        x[:] = np.where(rng.random(x.shape) < 0.5, np.float32(-0.0), np.float32(0.0))
    elif act == "huge":
        x *= np.float32(1e30)
    xq = rng.integers(200 if act == "high" else 0, 256, (m, k)).astype(np.uint8)
    qp = qgemm.QParams(np.float32(0.05), int(rng.integers(0, 256)))
    if bias_kind == "int32":
        b = rng.integers(-1000, 1000, n).astype(np.int32)
    elif bias_kind == "float":
        b = rng.standard_normal(n).astype(np.float32)
    else:
        b = None
    if bad == "x" and x.size:
        x.reshape(-1)[rng.integers(0, x.size)] = np.nan
    fb = b
    if bad == "bias" and n:
        fb = rng.standard_normal(n).astype(np.float32)
        fb[rng.integers(0, n)] = np.inf
    out_qp = qgemm.QParams(np.float32(0.05 * max(k, 1) ** 0.5), int(rng.integers(0, 256)))
    fb_dyn = fb if fb is None or fb.dtype == np.float32 else None
    return {
        "dynamic": _outcome(lambda: qgemm.linear(x, pw, fb_dyn, relu=relu, saturate=saturate)),
        "dynamic7": _outcome(lambda: qgemm.linear(x, pw, fb_dyn, reduce_range=True)),
        "float": _outcome(
            lambda: qgemm.quantized_linear(xq, qp, pw, fb, relu=relu, saturate=saturate)
        ),
        "requant": _outcome(
            lambda: qgemm.quantized_linear(
                xq, qp, pw, fb, relu=relu, out_qparams=out_qp, saturate=saturate
            )
        ),
        "raw": _outcome(lambda: qgemm.matmul_u8s8(xq, pw, saturate=saturate)),
    }


@given(
    m=st.sampled_from([0, 1, 3, 5, 17]),
    n=st.sampled_from([1, 2, 7, 17, 33, 65]),
    k=st.sampled_from([0, 1, 3, 4, 9, 70]),
    kind=st.sampled_from(["random", "saturating", "none"]),
    gran=st.sampled_from(["channel", "tensor"]),
    zp=st.booleans(),
    saturate=st.booleans(),
    relu=st.booleans(),
    bias_kind=st.sampled_from([None, "float", "int32"]),
    bad=st.sampled_from([None, None, "x", "bias"]),
    act=st.sampled_from(["normal", "high", "tiny", "zeros", "huge"]),
    seed=st.integers(0, 2**16),
)
def test_gemm_every_kind_bit_identical(
    both_tiers, m, n, k, kind, gran, zp, saturate, relu, bias_kind, bad, act, seed
):
    weights = []

    def ops():
        # packed inside: a packed weight memoises its call plans, kernels included
        pw = _weight(np.random.default_rng(seed), n, k, kind, gran, zp)
        weights.append(pw)
        rng = np.random.default_rng(seed + 1)
        return _gemm_kinds(pw, rng, m, saturate, relu, bias_kind, bad, act)

    spec, gen = both_tiers(ops)
    _same(spec, gen)
    kernels = [(p.ser or p.par, i) for i, w in enumerate(weights) for p in w._plans.values()]
    for kern, i in kernels:
        assert _cache.tier_of(kern) == ("specialised" if i == 0 else "generic-only"), kern


def _reference_raw(a, w, saturate):
    """Plain numpy: ``a @ w.T`` in int64, or with FBGEMM's AVX2 int16 pair saturation."""
    if not saturate:
        return a.astype(np.int64) @ w.astype(np.int64).T
    k = a.shape[1]
    kp = k + (k & 1)
    prod = a[:, None, :].astype(np.int64) * w[None, :, :].astype(np.int64)
    prod = np.concatenate([prod, np.zeros(prod.shape[:2] + (kp - k,), np.int64)], axis=2)
    return np.clip(prod[..., 0::2] + prod[..., 1::2], -32768, 32767).sum(-1)


@given(
    m=st.integers(0, 9),
    n=st.integers(0, 40),
    k=st.integers(0, 75),
    kind=st.sampled_from(["random", "saturating", "none"]),
    saturate=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gemm_generic_raw_against_numpy_reference(m, n, k, kind, saturate, seed):
    rng = np.random.default_rng(seed)
    w = _codes(rng, n, k, kind)
    a = rng.integers(0, 256, (m, k)).astype(np.uint8)
    if kind == "saturating":
        a |= np.uint8(0x80)
    with forced_jit_mode("generic"):
        got = qgemm.matmul_u8s8(a, np.ascontiguousarray(w.T), saturate=saturate)
    want = _reference_raw(a, w, saturate)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)


def test_gemm_generic_saturation_chunks(monkeypatch):
    """Row chunks of the saturation correction (tiny chunks) change nothing."""
    rng = np.random.default_rng(5)
    w = _codes(rng, 19, 37, "saturating")
    a = (rng.integers(0, 256, (11, 37)) | 0x80).astype(np.uint8)
    want = _reference_raw(a, w, True)
    assert (want != _reference_raw(a, w, False)).mean() > 0.5  # most entries saturate
    monkeypatch.setattr(gemm_generic, "_CHUNK_ELEMS", 7)
    with forced_jit_mode("generic"):
        got = qgemm.matmul_u8s8(a, np.ascontiguousarray(w.T), saturate=True)
    np.testing.assert_array_equal(got, want)


def test_gemm_generic_wraps_like_int32():
    """The accumulator wraps exactly as the kernels' int32 arithmetic (kernel called directly:
    the wrappers keep K within int32)."""
    kern = gemm_generic.generic_gemm_kernel(("raw", "portable", "portable", 1, 1, 16, False))
    K, N, NP = 4 * 20000, 1, 16
    a = np.full((1, K), 255, np.uint8)
    b = np.full(NP * K, -128, np.int8)
    out = np.zeros((1, N), np.int32)
    z = np.zeros(N + 64, np.int32)
    f = np.zeros(N + 64, np.float32)
    stage = (z, False, z[:N], f, np.int32(0), np.float32(1), 255, z[:N], f[:N], False,
             np.float32(1), np.int32(0), 255)  # fmt: skip
    assert kern(a, 1, K, K // 4, b, b, N, NP, 256, *stage, 1, 1, out) == -1
    assert out[0, 0] == np.int64(255 * -128 * K).astype(np.int32)


# ---------------------------------------------------------------- a fresh interpreter

_FRESH = """
import json, os, numpy as np, qgemm
rng = np.random.default_rng(0)
pw = qgemm.pack_weight(rng.standard_normal((9, 13)).astype(np.float32))
y = qgemm.linear(rng.standard_normal((3, 13)).astype(np.float32), pw)
info = qgemm.cache_info()
fams = {n: sorted(set(f.tiers.values())) for n, f in info.families.items() if f.tiers}
print(json.dumps({"jit": info.jit_mode, "tiers": fams, "shape": list(y.shape)}), flush=True)
os._exit(0)  # no background build outlives the test
"""


def test_fresh_interpreter_serves_pack_and_linear_from_the_generic_tier(tmp_path):
    env = {
        **os.environ,
        "QGEMM_CACHE_DIR": str(tmp_path),
        "QGEMM_JIT": "tiered",
        "QGEMM_JIT_WORKER": "thread",
    }
    env.pop("NUMBA_CACHE_DIR", None)
    run = subprocess.run(
        [sys.executable, "-c", _FRESH], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["jit"] == "tiered" and got["shape"] == [3, 9]
    # pack_weight: quantize + gemm_pack; linear: the dynamic gemm kernel -- all generic, and
    # nothing else was needed
    assert {"gemm_pack", "quantize", "gemm"} <= got["tiers"].keys(), got
    assert all(t == ["generic"] for t in got["tiers"].values()), got


@pytest.mark.parametrize("kind", ["dynamic", "float", "requant"])
def test_gemm_generic_error_codes_leave_out_untouched(kind):
    """The specialised kernels' codes: ``-2 - j`` for the first non-finite bias (checked
    first), ``i * K + k`` for the first non-finite activation; ``out`` is not written."""
    from qgemm.gemm import _stage

    rng = np.random.default_rng(11)
    pw = qgemm.pack_weight(rng.standard_normal((5, 8)).astype(np.float32))
    kern = gemm_generic.generic_gemm_kernel((kind, "portable", "portable", 1, 1, 16, False))
    head = (pw._kg, pw._packed, pw._packed, 5, pw._np, pw._pairmax)
    if kind == "dynamic":
        a = rng.standard_normal((3, 8)).astype(np.float32)
        a[1, 2] = np.nan
        a[2, 0] = np.inf
        out = np.full((3, 5), 7.5, np.float32)
    else:
        a = rng.integers(0, 256, (3, 8)).astype(np.uint8)
        out = np.full((3, 5), 7, np.float32 if kind == "float" else np.uint8)
    before = out.copy()
    oqp = qgemm.QParams(np.float32(0.2), 5) if kind == "requant" else None
    for bias, want in [
        (np.array([0, 1, np.nan, -np.inf, 0], np.float32), -4),
        (np.zeros(5, np.float32), 1 * 8 + 2 if kind == "dynamic" else -1),
    ]:
        st_ = _stage(pw, kind, qgemm.QParams(np.float32(0.1), 3), oqp, bias)
        assert kern(a, 3, 8, *head, *st_, 1, 1, out) == want
        if want != -1:
            np.testing.assert_array_equal(out, before)
    if kind != "dynamic":
        assert not np.array_equal(out, before)  # the successful call wrote
