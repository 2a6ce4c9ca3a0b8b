"""The numpy generic tier of ``embedding_bag`` and ``check_bags``
(``qgemm/_kernels/embedding_generic.py``).

``QGEMM_JIT=generic`` against the eager specialised kernels through the public API, bit for
bit: every table kind x mode x weights, serial and parallel kernels, specialised and run-time
dims (the fastmath arithmetic differs between them), then hypothesis shapes over the
conventions (offsets, ``include_last_offset``, lengths, 2-D bags), index dtypes, padding,
``out`` (the prevalidating kernels), 0 bags, empty bags, 0-row tables, dim 1 and odd dims, and
the same exception for bad indices, offsets and lengths.
"""

from __future__ import annotations

import warnings
import zlib
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qgemm
import qgemm.embedding as emb
from qgemm._kernels import embedding_generic as eg
from tests import test_tiers_numpy
from tests._jit import forced_jit_mode
from tests.test_tiers_numpy import _outcome, _same

both_tiers = test_tiers_numpy.both_tiers  # the module fixture: (eager, generic) outcomes

KINDS = ("float32", "float16", "rowwise8", "rowwise4", "rowwise2")
POOLS = (("sum", False), ("sum", True), ("mean", False), ("max", False))


def _table(rng, kind, rows, dim, zeros=True):
    spread = 2 if zeros else 5  # row magnitudes far apart: sums that round (2-bit codes too)
    t = rng.standard_normal((rows, dim)) * np.exp(rng.standard_normal((rows, 1)) * spread)
    t = np.clip(t, -3e4, 3e4).astype(np.float32)  # finite float16 tables, scales, biases
    if zeros:  # signed zeros: the sign of an all-zero sum depends on the kernel's order
        t[rng.random(t.shape) < 0.2] = np.float32(0.0)
        t[rng.random(t.shape) < 0.1] = np.float32(-0.0)
    if kind == "float32":
        return t
    if kind == "float16":
        return t.astype(np.float16)
    return qgemm.quantize_rowwise(t, bits=int(kind[7:]))


class _Parallel:
    """Force the wrapper's serial/parallel kernel choice inside the block."""

    def __init__(self, parallel):
        self.min_work = 1 if parallel else 1 << 62

    def __enter__(self):
        self.old = emb.PARALLEL_MIN_WORK
        emb.PARALLEL_MIN_WORK = self.min_work

    def __exit__(self, *exc):
        emb.PARALLEL_MIN_WORK = self.old


# --------------------------------------------------------------------------- the module


def test_codes_and_flags_match_the_kernels():
    from qgemm import _config
    from qgemm._kernels import embedding, embedding_codes

    assert eg.KINDS is embedding.KINDS is embedding_codes.KINDS  # one table, shared
    assert {eg.BAD_INDEX, eg.BAD_FIRST_OFFSET, eg.DECREASING_OFFSET, eg.OFFSET_PAST_END,
            eg.NEGATIVE_LENGTH, eg.LENGTHS_SUM} == set(embedding.ERRORS)  # fmt: skip
    assert eg.OK not in embedding.ERRORS
    assert eg._FASTMATH == _config.fastmath_flags()


def _fma_exact(a, b, c):
    """float32 ``fma`` by exact rational arithmetic (round to nearest, ties to even)."""
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    if exact == 0:  # the sign of a zero: IEEE's rules, the same in float64
        return np.float32(np.float64(a) * np.float64(b) + np.float64(c))
    limit = Fraction(float(np.finfo(np.float32).max)) + Fraction(2) ** 103  # max + ulp / 2
    if abs(exact) >= limit:
        return np.float32(np.inf if exact > 0 else -np.inf)
    near = np.float32(float(exact))  # within one float32 step of the answer
    best = None
    for cand in (np.nextafter(near, np.float32(-np.inf)), near, np.nextafter(near, np.inf)):
        if not np.isfinite(cand):
            continue
        err = abs(Fraction(float(cand)) - exact)
        even = (int(np.array(cand).view(np.uint32)) & 1) == 0
        if best is None or err < best[0] or (err == best[0] and even):
            best = (err, cand)
    return best[1]


_F32 = st.one_of(
    st.floats(-1e6, 1e6, width=32),
    st.floats(-(2.0**-64), 2.0**-64, width=32),  # products in the float32 subnormal range
    st.sampled_from([0.0, -0.0, 2.0**-126, -(2.0**-149), 3e38, np.inf, -np.inf]),
)


@settings(max_examples=400)
@given(a=_F32, b=_F32, c=_F32, tweak=st.integers(-3, 3))
def test_fma32_is_correctly_rounded(a, b, c, tweak):
    a, b = np.float32(a), np.float32(b)
    # c near -round(a * b) puts the exact sum close to float32 ties (the double-rounding cases)
    with np.errstate(all="ignore"):  # (overflow to inf in the set-up is fine)
        near = np.float32(-(np.float64(a) * np.float64(b)))
        c = near + np.float32(tweak) * np.spacing(near) if tweak else np.float32(c)
    got = eg.fma32(np.array([a]), np.array([b]), np.array([c], np.float32))[0]
    if not (np.isfinite(a) and np.isfinite(b) and np.isfinite(c)):
        with np.errstate(all="ignore"):
            want = np.float32(np.float64(a) * np.float64(b) + np.float64(c))  # inf or NaN
        assert got == want or (got != got and want != want), (a, b, c, got, want)
        return
    want = _fma_exact(a, b, np.float32(c))
    assert got.view(np.uint32) == want.view(np.uint32), (a, b, c, got, want)


def test_fma32_double_rounding_case():
    """a * b + c = 1 + 2^-24 + 2^-70: float64 rounds to the float32 tie 1 + 2^-24, which then
    goes to 1 (even); the correctly rounded float32 is 1 + 2^-23."""
    a = np.float32(2.0**-12 * (1 + 2.0**-23))
    b = np.float32(-(2.0**-12) * (1 - 2.0**-23))  # a * b = -(2^-24 - 2^-70)
    c = np.float32(1 + 2.0**-23)
    assert np.float32(np.float64(a) * np.float64(b) + np.float64(c)) == np.float32(1.0)
    assert _fma_exact(a, b, c) == np.float32(1 + 2.0**-23)
    assert eg.fma32(a, b, c) == np.float32(1 + 2.0**-23)


# ------------------------------------------------------------ arithmetic of every key kind


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("pool", POOLS, ids=lambda p: p[0] + ("_weighted" if p[1] else ""))
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_mode_and_weights_bit_identical(both_tiers, kind, pool, parallel):
    """Specialised dims (4, 12) and run-time dims (5, 37, 301: vector bodies and scalar
    remainders of the parallel plane loops) share two kernels per key kind; signed zeros in
    the small tables, full-range values in the larger ones."""
    mode, weighted = pool
    rng = np.random.default_rng(zlib.crc32(repr((kind, pool, parallel)).encode()))
    for dim, zeros in ((4, True), (12, True), (5, True), (37, False), (301, False)):
        tab = _table(rng, kind, 30, dim, zeros)
        n = 200
        idx = rng.integers(0, 30, n)
        offs = np.sort(rng.integers(0, n, 12))  # long bags: rounding differences add up
        offs[0] = 0
        w = rng.standard_normal(n).astype(np.float32) if weighted else None

        def call(tab=tab, idx=idx, offs=offs, w=w):
            with _Parallel(parallel):
                return qgemm.embedding_bag(
                    tab, idx, offs, mode=mode, per_sample_weights=w, padding_idx=3
                )

        spec, gen = both_tiers(call)
        _same(spec, gen, f"dim {dim}")


def test_host_dependent_variant_is_declined_quietly():
    """The parallel unweighted quantized sum over a run-time dim has no generic kernel (its
    vectorisation is host-dependent): the builder declines, and the op is served by the
    specialised kernel, without a warning, in every JIT mode; its neighbours stay generic."""
    rng = np.random.default_rng(7)
    tab = qgemm.quantize_rowwise(rng.standard_normal((30, 37)).astype(np.float32), bits=8)
    idx = rng.integers(0, 30, 200)
    offs = np.arange(0, 200, 10)
    key = ("avx2", "rowwise8", "int64", "int64", "offsets", "sum", False, 0, True, False)
    with pytest.raises(NotImplementedError, match="host-dependently"):
        eg.generic_embedding_bag_kernel(key)
    assert callable(eg.generic_embedding_bag_kernel(key[:6] + (True,) + key[7:]))  # weighted
    assert callable(eg.generic_embedding_bag_kernel(key[:8] + (False,) + key[9:]))  # serial
    with forced_jit_mode("eager"), _Parallel(True):
        want = qgemm.embedding_bag(tab, idx, offs)
    for mode in ("generic", "tiered"):
        qgemm.cache_clear()
        with forced_jit_mode(mode), _Parallel(True), warnings.catch_warnings():
            warnings.simplefilter("error")
            got = qgemm.embedding_bag(tab, idx, offs)
            fam = qgemm.cache_info().families["embedding_bag"]
            assert fam.generic_keys == (), (mode, fam.generic_keys)
            assert set(fam.tiers.values()) == {"specialised"}, (mode, fam.tiers)
            np.testing.assert_array_equal(got, want)
            with _Parallel(False):  # the serial kernel of the same table has a generic tier
                qgemm.embedding_bag(tab, idx, offs)
            if mode == "generic":
                assert len(qgemm.cache_info().families["embedding_bag"].generic_keys) == 1
    qgemm.cache_clear()


@pytest.mark.parametrize("pool", POOLS, ids=lambda p: p[0] + ("_weighted" if p[1] else ""))
@pytest.mark.parametrize("kind", ["float32", "float16", "rowwise8"])
@pytest.mark.parametrize("dim", [8, 5])
def test_non_finite_rows_bit_identical(both_tiers, kind, pool, dim):
    """inf, -inf and NaN in float rows (inf - inf, inf * 0), huge quantized rows (products and
    sums overflowing float32)."""
    mode, weighted = pool
    rng = np.random.default_rng(dim)
    t = rng.standard_normal((10, dim)).astype(np.float32)
    if kind == "rowwise8":
        t[1:4] = np.clip(t[1:4] * np.float32(1e38), -3e38, 3e38)
        tab = qgemm.quantize_rowwise(t, bits=8)
    else:
        t[1, :2], t[2, 1:3], t[3, 2] = np.inf, -np.inf, np.nan
        tab = t.astype(kind)
    idx = rng.integers(0, 10, 80)
    w = rng.choice(np.array([0, 1, -2, 0.5], np.float32), 80) if weighted else None
    call = lambda: qgemm.embedding_bag(tab, idx, np.arange(0, 80, 4), mode=mode,  # noqa: E731
                                       per_sample_weights=w)  # fmt: skip
    _same(*both_tiers(call))


# ------------------------------------------------------------------- conventions, shapes


@st.composite
def _bags(draw):
    rows = draw(st.integers(0, 7))
    dim = draw(st.sampled_from([1, 3, 4, 8, 13]))
    conv = draw(st.sampled_from(["offsets", "last", "lengths", "fixed"]))
    idt = draw(st.sampled_from([np.int32, np.int64]))
    odt = draw(st.sampled_from([np.int32, np.int64]))
    nbags = draw(st.integers(0, 5))
    lens = draw(st.lists(st.integers(0, 4), min_size=nbags, max_size=nbags))
    if conv == "fixed":
        per = draw(st.integers(0, 3))
        lens = [per] * nbags
    n = sum(lens)
    if rows == 0:
        lens, n = [0] * nbags, 0
    idx = np.array(draw(st.lists(st.integers(0, max(rows - 1, 0)), min_size=n, max_size=n)), idt)
    pad = draw(st.sampled_from([None, 0, -1])) if rows else None
    return rows, dim, conv, idx, odt, lens, pad


def _bag_args(conv, idx, odt, lens):
    """``(indices, keyword arguments)`` of an embedding_bag call for one convention."""
    starts = np.concatenate([[0], np.cumsum(lens)]).astype(odt)
    if conv == "fixed":
        return idx.reshape(len(lens), lens[0] if lens else 0), {}
    if conv == "lengths":
        return idx, {"lengths": np.array(lens, odt)}
    if conv == "last":
        return idx, {"offsets": starts, "include_last_offset": True}
    if not lens:  # no bags: offsets empty (the indices then belong to no bag)
        return idx, {"offsets": starts[:0]}
    return idx, {"offsets": starts[:-1]}


@settings(max_examples=25)
@given(bags=_bags(), kind=st.sampled_from(KINDS), pool=st.sampled_from(POOLS),
       use_out=st.booleans(), seed=st.integers(0, 2**16))  # fmt: skip
def test_conventions_and_shapes_bit_identical(both_tiers, bags, kind, pool, use_out, seed):
    rows, dim, conv, idx, odt, lens, pad = bags
    mode, weighted = pool
    rng = np.random.default_rng(seed)
    tab = _table(rng, kind, rows, dim)
    indices, kw = _bag_args(conv, idx, odt, lens)
    w = rng.standard_normal(indices.shape).astype(np.float32) if weighted else None

    def call():
        out = np.full((len(lens), dim), 7.0, np.float32) if use_out else None
        return qgemm.embedding_bag(
            tab, indices, mode=mode, per_sample_weights=w, padding_idx=pad, out=out, **kw
        )

    _same(*both_tiers(call))


# --------------------------------------------------------------------------- bad inputs

_BAD = [
    ("index too large", [0, 5, 1, 9], {"offsets": [0, 2]}),
    ("negative index", [0, 1, -2, 3], {"offsets": [0, 1, 3]}),
    ("index after the last offset", [0, 1, 2, 8], {"offsets": [0, 2, 3], "last": True}),
    ("index with no bag at all", [0, 8], {"offsets": []}),
    ("first offset", [0, 1, 2], {"offsets": [1, 2]}),
    ("decreasing offsets", [0, 1, 2], {"offsets": [0, 2, 1]}),
    ("offset past the end", [0, 1, 2], {"offsets": [0, 4]}),
    ("negative length", [0, 1, 2], {"lengths": [2, -1, 2]}),
    ("lengths sum", [0, 1, 2], {"lengths": [1, 1]}),
    ("2-D bad index", [[0, 1], [6, 2]], {}),
]


@pytest.mark.parametrize("case", _BAD, ids=[c[0] for c in _BAD])
@pytest.mark.parametrize("kind", ["float32", "rowwise4"])
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("use_out", [False, True])
def test_bad_bags_same_exception(both_tiers, case, kind, dtype, use_out):
    _, indices, kw = case
    tab = _table(np.random.default_rng(1), kind, 6, 4)
    kw = {k: np.array(v, dtype) for k, v in kw.items() if k != "last"}
    if case[2].get("last"):
        kw["include_last_offset"] = True
    idx = np.array(indices, dtype)
    bags = (idx.shape[0] if idx.ndim == 2 else
            kw.get("lengths", kw.get("offsets", np.zeros(0))).size
            - bool(kw.get("include_last_offset")))  # fmt: skip
    before = np.full((max(bags, 0), 4), 3.0, np.float32)

    def call():
        out = before.copy() if use_out else None
        res = _outcome(lambda: qgemm.embedding_bag(tab, idx, out=out, **kw))
        if use_out and isinstance(res, tuple):
            _same(out, before)  # untouched by a failed call
        return res

    spec, gen = both_tiers(call)
    _same(spec, gen)
    if case[0] != "index with no bag at all":
        assert isinstance(spec, tuple) and spec[0] in (IndexError, ValueError), spec


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize(
    "indices, offsets",
    [([0, 4, 2], [0, 2]), ([0, 5, 2], [0, 2]), ([0, -1], [0]), ([], []), ([3], []),
     ([0, 1], [1]), ([0, 1, 2], [0, 2, 1]), ([0, 1], [0, 3]), ([0, 1], [0, 0, 2])],
)  # fmt: skip
def test_check_bags_same_outcome(both_tiers, dtype, indices, offsets):
    idx = np.array(indices, dtype)
    offs = np.array(offsets, np.int64 if dtype is np.int32 else np.int32)
    _same(*both_tiers(lambda: emb.check_bags(idx, offs, rows=5)))
    _same(*both_tiers(lambda: emb.check_bags(idx.reshape(1, -1), None, rows=5)))


def test_chunks_change_nothing(both_tiers, monkeypatch):
    """Bags pooled in chunks of a few output elements give the same bits."""
    rng = np.random.default_rng(4)
    tab = _table(rng, "rowwise8", 20, 12)
    idx = rng.integers(0, 20, 60)
    offs = np.arange(0, 60, 4)
    whole = both_tiers(lambda: qgemm.embedding_bag(tab, idx, offs, mode="mean"))
    monkeypatch.setattr(eg, "_CHUNK", 25)
    chunked = both_tiers(lambda: qgemm.embedding_bag(tab, idx, offs, mode="mean"))
    _same(whole[0], chunked[1])
