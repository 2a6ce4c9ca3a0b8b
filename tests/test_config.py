from __future__ import annotations

import os
import platform
import subprocess
import sys

import numba
import pytest

import qgemm
from qgemm import _config


def test_threads_roundtrip_and_validation():
    n0 = qgemm.get_num_threads()
    assert 1 <= n0 <= numba.config.NUMBA_NUM_THREADS
    old = qgemm.set_num_threads(1)
    try:
        assert old == n0 and qgemm.get_num_threads() == 1
        assert _config.sync_threads() == 1 and numba.get_num_threads() == 1
    finally:
        qgemm.set_num_threads(n0)
    with pytest.raises(ValueError, match="n: expected 1 <= n"):
        qgemm.set_num_threads(0)
    with pytest.raises(ValueError, match="n: expected 1 <= n"):
        qgemm.set_num_threads(numba.config.NUMBA_NUM_THREADS + 1)
    with pytest.raises(TypeError, match="n: expected an int"):
        qgemm.set_num_threads(1.5)
    with pytest.raises(TypeError, match="n: expected an int"):
        qgemm.set_num_threads(True)


def test_isa_detection_and_override():
    sup = _config.supported_isas()
    assert sup[0] == "portable" and qgemm.get_isa() in sup
    old = qgemm.set_isa("portable")
    try:
        assert qgemm.get_isa() == "portable"
    finally:
        qgemm.set_isa(old)
    with pytest.raises(ValueError, match="isa"):
        qgemm.set_isa("neon9000")
    missing = [i for i in _config.ISA_PATHS if i not in sup]
    for isa in missing:
        with pytest.raises(ValueError, match="not supported"):
            qgemm.set_isa(isa)


def _run(code, **env):
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True
    )


def test_environment_overrides():
    r = _run(
        "import qgemm; print(qgemm.get_isa(), qgemm.get_num_threads())",
        QGEMM_ISA="portable",
        QGEMM_NUM_THREADS="1",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["portable", "1"]
    r = _run("import qgemm", QGEMM_ISA="sparc")
    assert r.returncode != 0 and "QGEMM_ISA" in r.stderr
    r = _run("import qgemm", QGEMM_NUM_THREADS="many")
    assert r.returncode != 0 and "QGEMM_NUM_THREADS" in r.stderr


def test_fastmath_policy_never_assumes_finite():
    flags = _config.fastmath_flags()
    assert flags is False or not ({"nnan", "ninf", "fast"} & set(flags))


# --------------------------------------------------------------------------- the ISA table

_LANES = {
    "vnni": 16,
    "vnni256": 8,
    "avx2": 8,
    "avx2x": 8,
    "avx2w": 8,
    "avx2v": 8,
    "avx2s": 8,
    "portable": 16,
    "portables": 16,
}


def test_isa_table_is_consistent():
    from qgemm import _isa
    from qgemm._kernels.gemm import VARIANTS

    assert _isa.ISA_PATHS == tuple(p.name for p in _isa.PATHS) == _config.ISA_PATHS
    assert _isa.ISA_PATHS[0] == "portable" and _isa.path("portable").requires == ()
    for p in _isa.PATHS:
        assert _isa.path(p.name) is p
        for kern in (p.default, p.saturating):
            assert {kern.fast, kern.exact} <= set(VARIANTS), p.name
            assert set(kern.tiles) == set(_isa.PANEL_WIDTHS), p.name
            for npw, t in kern.tiles.items():
                for variant in (kern.fast, kern.exact):
                    assert t.nr == t.nv * _LANES[variant], (p.name, variant, t)
                assert npw % t.nr == 0 and t.mr >= 1, (p.name, npw, t)
        # exact by default: only the saturating twin may use the saturating variants
        assert p.default.exact not in ("avx2s", "portables")
        assert p.saturating.fast in ("avx2s", "portables")
        variant, tile = p.ceiling
        assert variant == p.default.fast and tile == p.default.tiles[p.ceiling_panel]
    assert [p.name for p in _isa.PATHS if p.int16_pairs] == ["avx2"]
    # every native x86 path needs at least what the AVX2 path needs (the portable path nothing;
    # the VNNI paths are siblings: AVX-VNNI and AVX512-VNNI do not imply each other)
    avx2 = set(_isa.path("avx2").requires)
    for p in _isa.PATHS[2:]:
        assert avx2 <= set(p.requires), p.name


def test_isa_tiles_for_each_path():
    from qgemm import _isa

    assert _isa.path("avx512vnni").tile(False, 64)[2] == _isa.Tile(6, 4, 64)
    assert _isa.path("avx512vnni").tile(False, 16)[2] == _isa.Tile(8, 1, 16)
    assert _isa.path("avx512vnni").tile(True, 64)[:2] == ("avx2s", "avx2s")
    assert _isa.path("avx2").tile(False, 64) == ("avx2", "avx2v", _isa.Tile(4, 2, 16))
    assert _isa.path("portable").tile(True, 64) == ("portables", "portables", _isa.Tile(4, 4, 64))
    assert [_isa.panel_width(n) for n in (0, 1, 16, 17, 1000)] == [16, 16, 16, 64, 64]
    with pytest.raises(KeyError):
        _isa.path("neon9000")


@pytest.mark.parametrize(
    ("features", "machine", "expected"),
    [
        ({}, "x86_64", ("portable",)),
        ({"avx2": True}, "x86_64", ("portable",)),  # FMA missing
        ({"avx2": True, "fma": True}, "AMD64", ("portable", "avx2")),
        ({"avx2": True, "fma": True, "avx512f": True, "avx512bw": True, "avx512vl": True},
         "x86_64", ("portable", "avx2")),  # no VNNI
        ({f: True for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512vnni")},
         "x86_64", ("portable", "avx2", "avx512vnni")),
        ({f: True for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512vnni")},
         "aarch64", ("portable",)),
        ({"avx2": False, "fma": True}, "x86_64", ("portable",)),
    ],
)  # fmt: skip
def test_isa_detection_from_features(features, machine, expected):
    from qgemm import _isa

    assert _isa.detect(features, machine) == expected


def test_isa_path_follows_set_isa():
    for name in _config.supported_isas():
        old = _config.set_isa(name)
        try:
            assert _config.isa_path().name == name == qgemm.get_isa()
        finally:
            _config.set_isa(old)
    from qgemm import _isa

    assert _config.supported_isas() == _isa.detect(_config.cpu_features(), platform.machine())


@pytest.mark.skipif("avx2" not in _config.supported_isas(), reason="this CPU has no AVX2+FMA")
def test_environment_forces_avx2():
    r = _run("import qgemm; print(qgemm.get_isa())", QGEMM_ISA=" AVX2 ")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["avx2"]


def test_environment_rejects_unsupported_isa():
    missing = [i for i in _config.ISA_PATHS if i not in _config.supported_isas()]
    if not missing:
        pytest.skip("this CPU supports every ISA path")
    r = _run("import qgemm", QGEMM_ISA=missing[-1])
    assert r.returncode != 0 and "not supported by this CPU" in r.stderr


# --------------------------------------------------------------------- the on-disk cache

from qgemm import _diskcache  # noqa: E402


def test_cache_dir_precedence(tmp_path):
    q, n, x = tmp_path / "q", tmp_path / "n", tmp_path / "xdg"
    both = {"QGEMM_CACHE_DIR": str(q), "NUMBA_CACHE_DIR": str(n), "XDG_CACHE_HOME": str(x)}
    got = _diskcache.resolve(both)
    assert (got.path, got.source, got.persistent) == (str(q), "QGEMM_CACHE_DIR", True)
    got = _diskcache.resolve({"NUMBA_CACHE_DIR": str(n), "XDG_CACHE_HOME": str(x)})
    assert (got.path, got.source) == (str(n), "NUMBA_CACHE_DIR")
    got = _diskcache.resolve({"XDG_CACHE_HOME": str(x)})
    if sys.platform.startswith("linux"):
        assert got.path == str(x / "qgemm" / qgemm.__version__) and got.source == "default"
    assert os.path.exists(os.path.join(got.path, _diskcache.MARKER))
    assert not os.path.exists(os.path.join(str(n), _diskcache.MARKER))  # a shared folder


def test_default_dir_per_platform(tmp_path):
    v = qgemm.__version__
    home = os.path.expanduser("~")
    assert _diskcache.default_dir({}, "linux") == os.path.join(home, ".cache", "qgemm", v)
    assert _diskcache.default_dir({"XDG_CACHE_HOME": "/x"}, "linux") == f"/x/qgemm/{v}"
    assert _diskcache.default_dir({}, "darwin") == os.path.join(
        home, "Library", "Caches", "qgemm", v
    )
    win = _diskcache.default_dir({"LOCALAPPDATA": "C:/L"}, "win32")
    assert win == os.path.join("C:/L", "qgemm", "Cache", v)


def test_cache_dir_in_use_is_outside_the_package():
    pkg = os.path.dirname(os.path.abspath(qgemm.__file__))
    d = _config.cache_dir()
    assert numba.config.CACHE_DIR == d
    assert os.path.commonpath([os.path.realpath(d), os.path.realpath(pkg)]) != pkg


def test_unusable_cache_dir_warns_and_falls_back(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.warns(RuntimeWarning, match="not usable") as rec:
        got = _diskcache.resolve({"QGEMM_CACHE_DIR": str(blocker / "sub")})
    assert len(rec) == 1
    assert got.source == "temporary" and not got.persistent and os.path.isdir(got.path)
    assert "NotADirectoryError" in got.reason or "FileExistsError" in got.reason
    pkg_dir = os.path.join(os.path.dirname(os.path.abspath(qgemm.__file__)), "_kernels")
    with pytest.warns(RuntimeWarning, match="inside the qgemm package"):
        assert not _diskcache.resolve({"QGEMM_CACHE_DIR": pkg_dir}).persistent


def test_unusable_cache_dir_in_a_fresh_process(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = _run(
        "import qgemm; from qgemm import _config; print(_config.cache_persistent())",
        QGEMM_CACHE_DIR=str(blocker / "sub"),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False"] and r.stderr.count("is not usable") == 1


def _fake_cache(root, names):
    for n in names:
        p = root / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"0")


def test_clear_only_deletes_cache_files(tmp_path):
    ours = tmp_path / "ours"
    _fake_cache(ours, ["_kernels_abc/gemm.py311.nbi", "_kernels_abc/gemm.py311.1.nbc",
                       ".qgemm-built", _diskcache.MARKER])  # fmt: skip
    path, removed = _diskcache.clear(str(ours))
    assert removed == 3 and sorted(os.listdir(ours)) == [_diskcache.MARKER]
    other = tmp_path / "other"
    _fake_cache(other, ["a.nbi", "notes.txt"])
    with pytest.raises(ValueError, match="does not look like a Numba kernel cache"):
        _diskcache.clear(str(other))
    assert (other / "notes.txt").exists() and (other / "a.nbi").exists()
    assert _diskcache.clear(str(tmp_path / "missing")) == (str(tmp_path / "missing"), 0)


def test_clear_in_a_shared_numba_folder_keeps_other_projects(tmp_path):
    shared = tmp_path / "shared"
    mine = sorted(_diskcache._package_subpaths())[0]
    _fake_cache(shared, [f"{mine}/k.py311.nbi", "otherproj_123/f.py311.nbi"])
    _, removed = _diskcache.clear(str(shared))
    assert removed == 1 and os.listdir(shared) == ["otherproj_123"]


# ------------------------------------------------- threading layer: workqueue is serialised

_STRESS = """
import threading, numpy as np, qgemm
from qgemm import _threading
rng = np.random.default_rng(0)
pw = qgemm.pack_weight(rng.standard_normal((128, 128)).astype(np.float32))
x = rng.standard_normal((256, 128)).astype(np.float32)
tab = rng.standard_normal((500, 64)).astype(np.float32)
qt = qgemm.quantize_rowwise(tab)
idx = rng.integers(0, 500, 4000); off = np.arange(0, 4000, 20)
ops = {"linear": lambda: qgemm.linear(x, pw), "bag": lambda: qgemm.embedding_bag(qt, idx, off),
       "rowwise": lambda: qgemm.quantize_rowwise(tab).fused}
n = qgemm.get_num_threads()
qgemm.set_num_threads(1)
ref = {k: f() for k, f in ops.items()}  # the serial answer
qgemm.set_num_threads(n)
errors = []
def work(i):
    for r in range(24):
        k = list(ops)[(i + r) % 3]
        if not np.array_equal(ops[k](), ref[k]):
            errors.append(k)
ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
[t.start() for t in ts]; [t.join() for t in ts]
print(_threading.layer(), _threading.needs_lock(), n, len(errors))
"""


def test_workqueue_layer_concurrent_launches_are_safe():
    r = _run(_STRESS, NUMBA_THREADING_LAYER="workqueue", QGEMM_JIT="eager")
    assert r.returncode == 0, r.stderr[-3000:]
    layer, locked, n, errors = r.stdout.split()
    assert (layer, locked, errors) == ("workqueue", "True", "0")
    if int(n) < 2:
        pytest.skip("one core: the parallel kernels never ran concurrently")


def test_default_layer_is_threadsafe_and_reported():
    from qgemm import _threading

    layer = _threading.layer()
    assert layer in ("tbb", "omp", "workqueue")
    assert _threading.needs_lock() == (layer == "workqueue")
    if layer != "workqueue":
        assert _threading.guard(len) is len  # nothing is wrapped on a thread-safe layer
