from __future__ import annotations

import os
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
    r = _run("import qgemm; print(qgemm.get_isa(), qgemm.get_num_threads())",
             QGEMM_ISA="portable", QGEMM_NUM_THREADS="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["portable", "1"]
    r = _run("import qgemm", QGEMM_ISA="sparc")
    assert r.returncode != 0 and "QGEMM_ISA" in r.stderr
    r = _run("import qgemm", QGEMM_NUM_THREADS="many")
    assert r.returncode != 0 and "QGEMM_NUM_THREADS" in r.stderr


def test_fastmath_policy_never_assumes_finite():
    flags = _config.fastmath_flags()
    assert flags is False or not ({"nnan", "ninf", "fast"} & set(flags))
