from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qgemm import cli


def run_cli(*args, timeout=300):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "qgemm", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


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
    r = subprocess.run([sys.executable, "-m", "qgemm", "info", "--json"], capture_output=True,
                       text=True, env=env, timeout=120)
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
