from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qgemm import cli


def run_cli(*args, timeout=300):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "qgemm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_info_text_and_json():
    r = run_cli("info")
    assert r.returncode == 0, r.stderr
    for word in ("numba", "llvmlite", "isa", "threads", "cache_dir", "cache_info"):
        assert word in r.stdout
    r = run_cli("info", "--json")
    d = json.loads(r.stdout)
    assert d["isa"] in d["supported_isas"] and d["threads"] >= 1
    assert set(d["cache_info"]) >= {"kernels", "hits", "misses", "compile_seconds"}


def test_info_reports_forced_portable_path():
    env = {**os.environ, "QGEMM_ISA": "portable"}
    r = subprocess.run(
        [sys.executable, "-m", "qgemm", "info", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert json.loads(r.stdout)["isa"] == "portable"


def test_help_lists_subcommands():
    r = run_cli("--help")
    assert r.returncode == 0
    assert "info" in r.stdout and "bench" in r.stdout and "--json" in r.stdout
    r = run_cli("bench", "--help")
    for opt in ("--quick", "--json", "--plot", "--only"):
        assert opt in r.stdout


def test_bench_rejects_unknown_suite():
    assert cli.main(["bench", "--only", "nope", "--no-progress"]) == 2


def test_info_dict_in_process():
    d = cli.info_dict()
    assert d["qgemm"] and isinstance(d["cpu_features"], dict)


@pytest.mark.parametrize("bad", [["--threads"], ["bench", "--threads", "x"]])
def test_argparse_errors_exit_2(bad):
    r = run_cli(*bad)
    assert r.returncode == 2


def test_bench_runs_a_registered_suite(monkeypatch, capsys):
    """A suite is one entry of ``qgemm.bench.SUITES``: the command line finds it by name."""
    import types

    from qgemm import bench
    from qgemm.bench._timing import Table

    calls = []

    def run(*, quick=False, progress=None):
        calls.append(quick)
        return [Table("fake suite", ["shape", "× peer"], [["1x1", 2.0]])]

    mod = types.ModuleType("qgemm_fake_suite")
    mod.run = run
    monkeypatch.setitem(sys.modules, "qgemm_fake_suite", mod)
    monkeypatch.setitem(bench.SUITES, "fake", "qgemm_fake_suite")
    assert cli.main(["bench", "--only", "fake", "--quick", "--json", "--no-progress"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert calls == [True]
    assert [t["title"] for t in doc["tables"]] == ["fake suite"]
    assert doc["tables"][0]["rows"] == [{"shape": "1x1", "× peer": 2.0}]
