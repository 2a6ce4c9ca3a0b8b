"""Repository-level checks: lint, format, types, layout (tools stay out of ``import qgemm``,
no module over 700 lines, every bench suite resolves), the asv suite is importable, the
README's commands exist."""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    if shutil.which("ruff") is None:
        pytest.skip("ruff not installed (it is in the test extra)")
    r = subprocess.run(
        ["ruff", "check", "qgemm", "tests", "asv_benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format_clean():
    if shutil.which("ruff") is None:
        pytest.skip("ruff not installed (it is in the test extra)")
    r = subprocess.run(
        ["ruff", "format", "--check", "qgemm", "tests", "asv_benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_clean(tmp_path):
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy not installed (it is in the test extra)")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "qgemm",
            "--ignore-missing-imports",
            "--cache-dir",
            str(tmp_path / "mypy"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr


MAX_MODULE_LINES = 700


def test_no_module_over_700_lines():
    lines = {
        str(p.relative_to(ROOT)): len(p.read_text().splitlines())
        for p in sorted((ROOT / "qgemm").rglob("*.py"))
    }
    assert len(lines) > 20  # the walk found the package
    long = {k: n for k, n in lines.items() if n > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_import_qgemm_loads_no_tools():
    """The library never imports its tools (bench suites, the command line) nor the optional
    peers (torch, ONNX Runtime, Dask)."""
    code = (
        "import json, sys, qgemm; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('qgemm.bench', "
        "'qgemm.cli', 'torch', 'onnx', 'dask', 'distributed')))))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []


def test_bench_suites_resolve():
    from qgemm.bench import SUITES

    assert {"gemm", "embedding", "averaging", "models"} <= set(SUITES)
    for name, module in SUITES.items():
        assert module.startswith("qgemm.bench."), name
        assert callable(importlib.import_module(module).run), name


def test_asv_suite_discovers():
    if shutil.which("asv") is None:
        pytest.skip("asv not installed (it is in the test extra)")
    r = subprocess.run(
        ["asv", "check", "--python=same"],
        cwd=ROOT / "asv_benchmarks",
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0 and "No problems found" in r.stdout, r.stdout + r.stderr


def test_readme_commands_match_ci():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install . && python -m qgemm" in readme
    test_cmd = "pip install -e '.[test]' && python -m pytest"
    assert test_cmd in readme
    assert test_cmd in ci
    assert sys.version_info >= (3, 10)


def test_readme_python_examples_run(capsys):
    import re

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["y"].shape == (16, 256) and namespace["y8"].dtype.name == "uint8"
