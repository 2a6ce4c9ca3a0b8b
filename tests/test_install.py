"""The README's set-up on a fresh machine, in the order that used to break (issue 12).

One temporary venv (``--system-site-packages --without-pip``, so numba/numpy and the build
tools come from this environment and nothing is downloaded; this environment's pip installs
into it): install qgemm non-editable, run a small main job (kernels compile into
the per-user cache folder, nothing is written into ``site-packages``), then re-install it
editable with ``--no-deps`` (the test extra is already present) and import
``qgemm._kernels.averaging`` -- the import an old ``__pycache__`` full of Numba files turned into
a namespace-package error.  A last run points the cache at an unusable folder: one warning,
and the job still works.

Numba compiles the main job's kernels cold in the venv (its cache is keyed on the source path),
so this takes minutes: marked ``slow`` (CI runs ``-m slow``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
_SMALL_JOB = ["--tables", "2", "--rows", "1000", "--dim", "16", "--bottom", "13-32",
              "--top", "32-1", "--batch", "64", "--batches", "2", "--seconds", "0.2",
              "--rounds", "1", "--no-progress", "--json"]  # fmt: skip


def _copy_source(dst: Path) -> Path:
    """The package source without caches or build products (pip must not write into the
    working tree that other processes use)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "*.nbi", "*.nbc")
    shutil.copytree(REPO / "qgemm", dst / "qgemm", ignore=ignore)
    for f in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / f).exists():
            shutil.copy2(REPO / f, dst / f)
    return dst


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("QGEMM_CACHE_DIR", "NUMBA_CACHE_DIR")}
    env.update(XDG_CACHE_HOME=str(tmp / "xdg"), PYTHONNOUSERSITE="1", **extra)
    env.pop("PYTHONPATH", None)
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 1500):
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{args}\nstdout:\n{r.stdout[-2000:]}\nstderr:\n{r.stderr[-4000:]}"
    return r


def _tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("install")
    src = _copy_source(tmp / "src")
    # no pip of its own (its bundled setuptools may be too old to build a wheel): this
    # environment's pip installs into it (``pip --python``), building with this setuptools
    venv_cmd = [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip"]
    venv_cmd.append(str(tmp / "venv"))
    _run(venv_cmd, tmp, _env(tmp))
    py = tmp / "venv" / ("Scripts" if os.name == "nt" else "bin") / "python"
    return tmp, src, py


def test_install_run_then_editable(venv):
    tmp, src, py = venv
    env = _env(tmp)
    pip = [sys.executable, "-m", "pip", "--python", str(py), "install", "--quiet", "--no-deps"]
    pip.append("--no-build-isolation")
    _run([*pip, str(src)], tmp, env)
    where = _run([str(py), "-c", "import qgemm, os; print(os.path.dirname(qgemm.__file__))"],
                 tmp, env).stdout.strip()  # fmt: skip
    site_pkg = Path(where)
    assert site_pkg.parent.name == "site-packages" and str(tmp / "venv") in where
    before = _tree(site_pkg)

    r = _run([str(py), "-m", "qgemm", *_SMALL_JOB], tmp, env)
    report = json.loads(r.stdout)
    assert report  # the main job's JSON report
    info = json.loads(_run([str(py), "-m", "qgemm", "info", "--json"], tmp, env).stdout)
    cache = Path(info["cache_dir"])
    assert cache == tmp / "xdg" / "qgemm" / info["qgemm"] and info["cache_persistent"]
    assert any(cache.rglob("*.nbi")), "no kernel index in the per-user cache folder"
    assert _tree(site_pkg) == before, "the main job wrote into site-packages"
    assert not list(site_pkg.rglob("*.nbi")) and not list(site_pkg.rglob("*.nbc"))

    # the README's second command, in the same venv: editable, the test extra already present
    _run([*pip, "-e", str(src)], tmp, env)
    r = _run([str(py), "-c", "import qgemm, qgemm._kernels.averaging as a; print(a.__file__)"],
             tmp, env)  # fmt: skip
    assert Path(r.stdout.strip()).resolve() == (src / "qgemm" / "_kernels" / "averaging.py")

    # `cache clear` empties the folder the job filled
    r = _run([str(py), "-m", "qgemm", "cache", "clear"], tmp, env)
    assert "cleared" in r.stdout and not any(cache.rglob("*.nbi"))


def test_unusable_cache_folder_falls_back_with_one_warning(venv, tmp_path):
    tmp, src, py = venv
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = _env(tmp, QGEMM_CACHE_DIR=str(blocker / "cache"))
    code = (
        "import numpy as np, qgemm\n"
        "from qgemm import _config\n"
        "x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(4, 16)\n"
        "t = qgemm.quantize_rowwise(x)\n"
        "print(_config.cache_persistent(), _config.cache_dir())\n"
    )
    r = _run([str(py), "-c", code], tmp, env)
    persistent, path = r.stdout.split()
    assert persistent == "False" and not path.startswith(str(blocker))
    assert r.stderr.count("is not usable") == 1, r.stderr
    assert not Path(path).exists(), "the temporary cache folder was not removed at exit"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_cache_folder(venv, tmp_path):
    tmp, src, py = venv
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    env = _env(tmp, QGEMM_CACHE_DIR=str(ro))
    r = _run([str(py), "-c", "import qgemm; print(qgemm._config.cache_persistent())"], tmp, env)
    assert r.stdout.strip() == "False" and r.stderr.count("is not usable") == 1
