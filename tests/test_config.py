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

_LANES = {"vnni": 16, "avx2": 8, "avx2x": 8, "avx2s": 8, "portable": 16, "portables": 16}


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
    # a path's requirements include those of every path before it that shares its machines
    for i, p in enumerate(_isa.PATHS[1:], 1):
        assert set(_isa.PATHS[i - 1].requires) <= set(p.requires)


def test_isa_tiles_for_each_path():
    from qgemm import _isa

    assert _isa.path("avx512vnni").tile(False, 64)[2] == _isa.Tile(6, 4, 64)
    assert _isa.path("avx512vnni").tile(False, 16)[2] == _isa.Tile(8, 1, 16)
    assert _isa.path("avx512vnni").tile(True, 64)[:2] == ("avx2s", "avx2s")
    assert _isa.path("avx2").tile(False, 64) == ("avx2", "avx2x", _isa.Tile(4, 2, 16))
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
