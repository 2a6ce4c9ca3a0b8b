"""Repository-level checks: lint, the asv suite is importable, the README's commands exist."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    if shutil.which("ruff") is None:
        pytest.skip("ruff not installed (it is in the test extra)")
    r = subprocess.run(["ruff", "check", "qgemm", "tests", "asv_benchmarks"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_asv_suite_discovers():
    if shutil.which("asv") is None:
        pytest.skip("asv not installed (it is in the test extra)")
    r = subprocess.run(["asv", "check", "--python=same"], cwd=ROOT / "asv_benchmarks",
                       capture_output=True, text=True, timeout=600)
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
