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


def _env_cache(tmp_path, **extra):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "QGEMM_CACHE_DIR": str(tmp_path), **extra}
    env.pop("NUMBA_CACHE_DIR", None)
    return env


def _qgemm(args, env, timeout=900):
    return subprocess.run(
        [sys.executable, "-m", "qgemm", *args], capture_output=True, text=True, env=env,
        timeout=timeout,
    )  # fmt: skip


def test_info_shows_cache_tiers_and_threading(tmp_path):
    r = _qgemm(["info", "--json"], _env_cache(tmp_path, QGEMM_JIT="generic"))
    d = json.loads(r.stdout)
    assert d["cache_dir"] == str(tmp_path) and d["cache_source"] == "QGEMM_CACHE_DIR"
    assert d["cache_persistent"] is True and d["jit"] == "generic"
    assert d["threading_layer"] in ("tbb", "omp", "workqueue")
    assert d["parallel_launches"] in ("concurrent", "serialised (lock)")
    assert {"generic_seconds", "queue"} <= set(d["cache_info"])
    r = _qgemm(["info", "--json"], _env_cache(tmp_path, NUMBA_THREADING_LAYER="workqueue"))
    d = json.loads(r.stdout)
    assert d["threading_layer"] == "workqueue" and d["parallel_launches"] == "serialised (lock)"
    r = _qgemm(["info"], _env_cache(tmp_path, QGEMM_JIT="sometimes"))
    assert r.returncode != 0 and "QGEMM_JIT" in r.stderr


def test_warmup_then_cache_info_and_clear(tmp_path):
    env = _env_cache(tmp_path)
    r = _qgemm(["warmup", "--ops", "quantize", "--no-progress"], env)
    assert r.returncode == 0, r.stderr
    assert "quantize" in r.stdout
    nbi = list(tmp_path.rglob("*.nbi"))
    assert nbi, "warmup compiled nothing into the cache folder"
    r = _qgemm(["cache", "info"], env)
    assert r.returncode == 0 and str(tmp_path) in r.stdout and "persistent  True" in r.stdout
    # a warmed process loads instead of compiling
    code = (
        "import numpy as np, qgemm\n"
        "qgemm.quantize_rowwise(np.ones((3, 5), np.float32))\n"
        "print(qgemm.cache_info().compile_seconds)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and float(r.stdout) < 2.0, (r.stdout, r.stderr)
    r = _qgemm(["cache", "clear"], env)
    assert r.returncode == 0 and "cleared" in r.stdout
    assert not list(tmp_path.rglob("*.nbi"))


def test_cache_clear_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "thesis.tex").write_text("do not delete")
    r = _qgemm(["cache", "clear"], _env_cache(tmp_path))
    assert r.returncode == 1 and "refusing" in r.stderr
    assert (tmp_path / "thesis.tex").exists()


def test_warmup_rejects_unknown_ops():
    assert cli.main(["warmup", "--ops", "gemm,nope", "--no-progress"]) == 2


def test_warmup_api_validation_and_model_spec():
    import qgemm
    from qgemm.warmup import model_spec, warmup

    with pytest.raises(ValueError, match="ops: unknown op group"):
        warmup(ops=["bogus"])
    with pytest.raises(ValueError, match="jobs: expected an int >= 1"):
        warmup(ops=[], jobs=0)
    assert warmup(ops=[]) == {}
    m = qgemm.DLRM.random(tables=2, rows=[5000, 7], dim=4, bottom=(3, 8, 4), top=(6, 1))
    spec = model_spec(m)
    assert spec == {
        "tables": 2, "rows": [1000, 7], "dim": 4, "bottom": [3, 8, 4], "top": [6, 1],
        "self_interaction": False, "bits": 0, "float": True,
    }  # fmt: skip
    q = model_spec(m.quantize(bits=4))
    assert q["bits"] == 4 and q["float"] is False


def test_first_call_suite_is_registered():
    from qgemm import bench
    from qgemm.bench import first_call

    assert bench.SUITES["first_call"] == "qgemm.bench.first_call"
    assert set(first_call.OPS) >= {"linear", "quantized_linear", "embedding_bag"}
