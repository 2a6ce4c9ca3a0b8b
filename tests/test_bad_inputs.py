"""Bad bytes, bad files and resource misuse (issue 17): every one gets a clear numpy-style
exception naming the file or field, and nothing is half-built or half-written.

Covers ``RowwiseQuantizedTable.from_fused`` on corrupt fused bytes, ``DLRM.load`` on truncated,
tampered, empty and pickle-bearing ``.npz`` files, ``DLRM.from_state_dict`` with wrong shapes,
dtypes and non-finite weights, ``out=`` aliasing an input, ``average`` over a generator that
raises halfway, and an interrupted ``DLRM.save``.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest

import qgemm
from qgemm.models import DLRM

from .reference import ref_embedding_bag, ref_quantize_rowwise_fused

# ---------------------------------------------------------------------------------------------
# RowwiseQuantizedTable.from_fused


def _fused(bits: int, rows: int = 4, dim: int = 6) -> np.ndarray:
    table = np.random.default_rng(bits).standard_normal((rows, dim)).astype(np.float32)
    return ref_quantize_rowwise_fused(table, bits)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_from_fused_round_trip_is_byte_exact(bits):
    f = _fused(bits, dim=7)
    t = qgemm.RowwiseQuantizedTable.from_fused(f, bits=bits, dim=7)
    assert t.shape == (4, 7)
    np.testing.assert_array_equal(t.to_fused(), f)


@pytest.mark.parametrize("bits, dim", [(8, 5), (8, 7), (4, 8), (4, 3), (2, 9), (2, 4)])
def test_from_fused_wrong_row_width(bits, dim):
    f = _fused(bits, dim=6)
    with pytest.raises(ValueError, match=r"dim: a \d-bit row of \d+ bytes"):
        qgemm.RowwiseQuantizedTable.from_fused(f, bits=bits, dim=dim)


@pytest.mark.parametrize("bits, width", [(8, 7), (4, 3), (2, 0)])
def test_from_fused_row_too_narrow_for_scale_and_bias(bits, width):
    with pytest.raises(ValueError, match="fused: expected rows of at least"):
        qgemm.RowwiseQuantizedTable.from_fused(np.zeros((2, width), np.uint8), bits=bits)


@pytest.mark.parametrize("dtype", [np.int8, np.float32, np.uint16])
def test_from_fused_wrong_dtype(dtype):
    with pytest.raises(TypeError, match="fused: expected dtype uint8"):
        qgemm.RowwiseQuantizedTable.from_fused(np.zeros((2, 12), dtype), bits=8)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("field", ["scale", "bias"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_from_fused_non_finite_scale_or_bias(bits, field, bad):
    f = _fused(bits).copy()
    pdt = np.float32 if bits == 8 else np.float16
    size = np.dtype(pdt).itemsize
    start = f.shape[1] - 2 * size + (size if field == "bias" else 0)
    f[2, start : start + size] = np.array([bad], pdt).view(np.uint8)
    before = f.copy()
    with pytest.raises(ValueError, match=rf"fused: row 2 has a non-finite {field}"):
        qgemm.RowwiseQuantizedTable.from_fused(f, bits=bits)
    np.testing.assert_array_equal(f, before)  # the caller's bytes are untouched


def test_from_fused_non_finite_check_covers_every_row():
    f = _fused(8, rows=300).copy()
    f[-1, -4:] = np.array([np.nan], np.float32).view(np.uint8)
    with pytest.raises(ValueError, match="row 299"):
        qgemm.RowwiseQuantizedTable.from_fused(f, bits=8)


def test_from_fused_empty_table_is_fine():
    t = qgemm.RowwiseQuantizedTable.from_fused(np.zeros((0, 12), np.uint8), bits=4)
    assert t.shape == (0, 16)


# ---------------------------------------------------------------------------------------------
# DLRM .npz files and state_dicts


@pytest.fixture(scope="module")
def model():
    return DLRM.random(tables=2, rows=10, dim=4, bottom=(3, 5, 4), top=(3, 1), seed=3)


@pytest.fixture
def saved(model, tmp_path):
    path = tmp_path / "m.npz"
    model.save(path)
    return path


def _same_model(a: DLRM, b: DLRM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
    assert a.self_interaction == b.self_interaction


def test_save_load_round_trip(model, saved):
    _same_model(DLRM.load(saved), model)


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.9, 0.99])
def test_load_truncated_npz(saved, keep):
    raw = saved.read_bytes()
    saved.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(ValueError, match=rf"{saved.name}.*(truncated|corrupt|not a valid)"):
        DLRM.load(saved)


@pytest.mark.parametrize("where", [0.05, 0.3, 0.6, 0.95])
def test_load_tampered_npz(saved, where):
    raw = bytearray(saved.read_bytes())
    pos = int(len(raw) * where)
    raw[pos : pos + 4] = bytes(b ^ 0xA5 for b in raw[pos : pos + 4])
    saved.write_bytes(bytes(raw))
    try:
        back = DLRM.load(saved)
    except ValueError as exc:
        assert saved.name in str(exc)
        return
    # A flipped byte inside array data the zip layer does not check (numpy's .npz entries
    # carry a CRC, so this should not happen): then the model must still be well-formed.
    assert isinstance(back, DLRM)


def test_load_npz_entry_with_bad_crc_names_the_entry(model, tmp_path):
    path = tmp_path / "crc.npz"
    model.save(path)
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("emb_l.0.weight.npy")
        offset = info.header_offset + 30 + len(info.filename) + len(info.extra) + 200
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"crc\.npz"):
        DLRM.load(path)


def test_load_npz_with_pickled_objects_is_refused(model, tmp_path, monkeypatch):
    path = tmp_path / "pickled.npz"
    sd = model.state_dict()
    np.savez(path, **sd, extra=np.array([{"payload": 1}], dtype=object))
    calls = []
    real_load = np.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("allow_pickle", False))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(np, "load", spy)
    with pytest.raises(ValueError, match=r"pickled\.npz.*'extra'.*object"):
        DLRM.load(path)
    assert calls and not any(calls), "np.load must never be called with allow_pickle=True"


def test_load_npz_with_object_array_as_a_weight(model, tmp_path):
    path = tmp_path / "objleaf.npz"
    sd = dict(model.state_dict())
    sd["emb_l.0.weight"] = np.array([[1.0, 2.0]], dtype=object)
    np.savez(path, **sd)
    with pytest.raises(ValueError, match=r"emb_l\.0\.weight"):
        DLRM.load(path)


def test_load_empty_file(tmp_path):
    path = tmp_path / "empty.npz"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.npz"):
        DLRM.load(path)


def test_load_npy_instead_of_npz(tmp_path):
    path = tmp_path / "single.npy"
    np.save(path, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"single\.npy.*\.npz"):
        DLRM.load(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        DLRM.load(tmp_path / "nope.npz")


def test_load_npz_with_wrong_shapes_names_the_field(model, tmp_path):
    path = tmp_path / "shapes.npz"
    sd = dict(model.state_dict())
    sd["bot_l.2.weight"] = np.zeros((4, 6), np.float32)  # previous layer has 5 outputs
    np.savez(path, **sd)
    with pytest.raises(ValueError, match=r"shapes\.npz.*bottom\[1\]\.weight.*expected 5 inputs"):
        DLRM.load(path)


def _sd(model, **changes):
    sd = dict(model.state_dict())
    sd.update(changes)
    return sd


@pytest.mark.parametrize(
    "key, value, exc, pattern",
    [
        ("bot_l.2.weight", np.zeros((4, 6), np.float32), ValueError, r"expected 5 inputs"),
        ("bot_l.0.bias", np.zeros(4, np.float32), ValueError, r"bias: expected shape \(5,\)"),
        ("bot_l.0.weight", np.zeros((5, 3, 1), np.float32), ValueError, r"bottom\[0\]\.weight"),
        ("emb_l.1.weight", np.zeros((10, 3), np.float32), ValueError, r"embedding dimension"),
        ("emb_l.0.weight", np.zeros(10, np.float32), ValueError, r"tables\[0\]"),
        ("top_l.0.weight", np.zeros((3, 6), np.float32), ValueError, r"top"),
        ("emb_l.0.weight", np.zeros((10, 4), np.int64), TypeError, r"emb_l\.0\.weight.*int64"),
        ("top_l.0.bias", np.zeros(3, np.complex64), TypeError, r"top_l\.0\.bias.*complex64"),
        ("bot_l.0.weight", np.zeros((5, 3), bool), TypeError, r"bot_l\.0\.weight.*bool"),
        ("emb_l.5.weight", np.zeros((10, 4), np.float32), ValueError, r"numbered"),
        ("emb_l.0.extra", np.zeros(1, np.float32), ValueError, r"unsupported key"),
    ],
)
def test_state_dict_wrong_shapes_or_dtypes(model, key, value, exc, pattern):
    with pytest.raises(exc, match=pattern):
        DLRM.from_state_dict(_sd(model, **{key: value}))


@pytest.mark.parametrize("key", ["bot_l.0.weight", "top_l.0.bias", "emb_l.1.weight"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_state_dict_non_finite_weights(model, key, bad):
    v = model.state_dict()[key].copy()
    v.reshape(-1)[-1] = bad
    with pytest.raises(ValueError, match=rf"state_dict\['{key}'\].*(NaN|inf|finite)"):
        DLRM.from_state_dict(_sd(model, **{key: v}))


def test_state_dict_accepts_float16_and_float64(model):
    sd = {
        k: v.astype(np.float64 if "emb" in k else np.float16) for k, v in model.state_dict().items()
    }
    back = DLRM.from_state_dict(sd)
    assert all(v.dtype == np.float32 for v in back.state_dict().values())


def test_state_dict_from_torch_tensors_with_wrong_dtype(model):
    torch = pytest.importorskip("torch")
    sd = {k: torch.from_numpy(v.copy()) for k, v in model.state_dict().items()}
    sd["emb_l.0.weight"] = sd["emb_l.0.weight"].to(torch.int32)
    with pytest.raises(TypeError, match=r"emb_l\.0\.weight"):
        DLRM.from_state_dict(sd)
    sd["emb_l.0.weight"] = torch.zeros((10, 4), dtype=torch.float32)
    sd["top_l.0.weight"] = torch.zeros((3, 2), dtype=torch.float32)
    with pytest.raises(ValueError, match="top"):
        DLRM.from_state_dict(sd)


# ---------------------------------------------------------------------------------------------
# Interrupted writes: DLRM.save never leaves a half-written file


class _Interrupt(KeyboardInterrupt):
    pass


def _interrupt_after(monkeypatch, n: int) -> None:
    real = np.lib.format.write_array
    count = [0]

    def write_array(*args, **kwargs):
        count[0] += 1
        if count[0] > n:
            raise _Interrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", write_array)


def test_save_interrupted_leaves_no_file(model, tmp_path, monkeypatch):
    path = tmp_path / "out.npz"
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(_Interrupt):
        model.save(path)
    assert os.listdir(tmp_path) == []


def test_save_interrupted_keeps_the_previous_file(model, tmp_path, monkeypatch):
    path = tmp_path / "out.npz"
    other = DLRM.random(tables=2, rows=10, dim=4, bottom=(3, 5, 4), top=(3, 1), seed=4)
    other.save(path)
    before = path.read_bytes()
    _interrupt_after(monkeypatch, 3)
    with pytest.raises(_Interrupt):
        model.save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.npz"]


def test_save_appends_npz_like_numpy(model, tmp_path):
    model.save(tmp_path / "plain")
    assert os.listdir(tmp_path) == ["plain.npz"]
    _same_model(DLRM.load(tmp_path / "plain.npz"), model)


# ---------------------------------------------------------------------------------------------
# out= aliasing an input: detected or handled correctly (same answer as without aliasing)


@pytest.fixture(scope="module")
def gemm_case():
    rng = np.random.default_rng(7)
    k = n = 48
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((33, k)).astype(np.float32)
    return qgemm.pack_weight(w), x, rng.standard_normal(n).astype(np.float32)


def _alias_ok(fn, out, expected):
    """``fn(out)`` either raises ValueError mentioning ``out`` or returns ``expected``."""
    try:
        got = fn(out)
    except ValueError as exc:
        assert "out" in str(exc)
        return
    np.testing.assert_array_equal(got, expected)


def test_linear_out_aliases_x(gemm_case):
    pw, x, b = gemm_case
    expected = qgemm.linear(x, pw, b)
    x2 = x.copy()
    _alias_ok(lambda o: qgemm.linear(x2, pw, b, out=o), x2, expected)


def test_linear_out_aliases_bias(gemm_case):
    pw, x, b = gemm_case
    expected = qgemm.linear(x[:1], pw, b)
    b2 = b.copy()
    _alias_ok(lambda o: qgemm.linear(x[:1], pw, b2, out=o), b2.reshape(1, -1), expected)


def test_quantized_linear_out_aliases_x(gemm_case):
    pw, x, b = gemm_case
    qp = qgemm.choose_qparams(x)
    xq = qgemm.quantize(x, qp)
    oq = qgemm.QParams(0.05, 3)
    expected = qgemm.quantized_linear(xq, qp, pw, b, out_qparams=oq)
    xq2 = xq.copy()
    _alias_ok(
        lambda o: qgemm.quantized_linear(xq2, qp, pw, b, out_qparams=oq, out=o), xq2, expected
    )


@pytest.mark.parametrize("start", [0, 2])
def test_embedding_bag_out_aliases_table(start):
    rng = np.random.default_rng(8)
    table = rng.standard_normal((12, 4)).astype(np.float32)
    idx = np.array([1, 2, 3, 0, 5, 4, 2], np.int64)
    off = np.array([0, 2, 3, 5], np.int64)
    expected = ref_embedding_bag(table, idx, off).astype(np.float32)
    t2 = table.copy()
    _alias_ok(lambda o: qgemm.embedding_bag(t2, idx, off, out=o), t2[start : start + 4], expected)


def test_embedding_bag_out_aliases_per_sample_weights():
    rng = np.random.default_rng(9)
    table = rng.standard_normal((12, 4)).astype(np.float32)
    idx = np.arange(8, dtype=np.int64) % 12
    off = np.array([0, 2, 4, 6], np.int64)
    psw = rng.standard_normal(16).astype(np.float32)
    # The aliased call must give the bits of the same call on a private copy of the weights
    # (which the reference checks within tolerance).
    expected = qgemm.embedding_bag(table, idx, off, per_sample_weights=psw[:8].copy())
    np.testing.assert_allclose(
        expected, ref_embedding_bag(table, idx, off, weights=psw[:8]), rtol=1e-5, atol=1e-6
    )
    _alias_ok(
        lambda o: qgemm.embedding_bag(table, idx, off, per_sample_weights=psw[:8], out=o),
        psw.reshape(4, 4),
        np.float32(1) * expected,
    )


# ---------------------------------------------------------------------------------------------
# average over a generator that fails halfway


class _Boom(RuntimeError):
    pass


def _models(n: int = 4):
    rng = np.random.default_rng(11)
    t = qgemm.quantize_rowwise(rng.standard_normal((6, 5)).astype(np.float32), bits=4)
    return [
        {
            "w": rng.standard_normal((3, 7)).astype(np.float32),
            "big": rng.standard_normal(40_000),
            "n": {"steps": np.array(j), "t": t},
        }
        for j in range(n)
    ]


def _snapshot(models):
    out = []
    for m in models:
        out.append(
            {
                "w": m["w"].copy(),
                "big": m["big"].copy(),
                "steps": m["n"]["steps"].copy(),
                "t": m["n"]["t"].fused.copy(),
            }
        )
    return out


def _unchanged(models, snap):
    for m, s in zip(models, snap, strict=True):
        np.testing.assert_array_equal(m["w"], s["w"])
        np.testing.assert_array_equal(m["big"], s["big"])
        np.testing.assert_array_equal(m["n"]["steps"], s["steps"])
        np.testing.assert_array_equal(m["n"]["t"].fused, s["t"])


@pytest.mark.parametrize("fail_at", [0, 1, 3])
@pytest.mark.parametrize("error", [_Boom, _Interrupt])
def test_average_generator_raising_halfway(fail_at, error):
    models = _models()
    snap = _snapshot(models)
    raised = error("halfway")

    def gen():
        for j, m in enumerate(models):
            if j == fail_at:
                raise raised
            yield m

    with pytest.raises(error) as info:
        qgemm.average(gen())
    assert info.value is raised  # the original error, not a wrapper
    _unchanged(models, snap)
    # the library is still usable and the models average as before
    expected = qgemm.average(models)
    again = qgemm.average(iter(models))
    np.testing.assert_array_equal(expected["big"], again["big"])


@pytest.mark.parametrize("error", [_Boom, _Interrupt])
def test_average_weights_generator_raising_halfway(error):
    models = _models()
    snap = _snapshot(models)
    raised = error("weights")

    def weights():
        yield 1.0
        yield 2.0
        raise raised

    with pytest.raises(error) as info:
        qgemm.average(iter(models), weights())
    assert info.value is raised
    _unchanged(models, snap)


def test_running_average_update_failing_leaves_state_usable():
    models = _models(3)
    ra = qgemm.RunningAverage()
    ra.update(models[0])
    bad = {"w": models[1]["w"], "big": models[1]["big"][:10], "n": models[1]["n"]}
    with pytest.raises(ValueError):
        ra.update(bad)
    ra.update(models[1])
    expected = qgemm.average(models[:2])
    np.testing.assert_array_equal(ra.value["big"], expected["big"])
