"""``python -m qgemm`` (the main job): tiny configurations through a real subprocess, and the
argument parsing in process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qgemm import cli

TINY = [
    "--rows",
    "1000",
    "--tables",
    "3",
    "--dim",
    "8",
    "--bottom",
    "5-16",
    "--top",
    "12-1",
    "--batch",
    "16",
    "--batches",
    "4",
    "--seconds",
    "0.05",
    "--rounds",
    "1",
]


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qgemm", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def json_run():
    return run_cli(*TINY, "--json", "--bits", "4")


def test_json_output_parses(json_run):
    assert json_run.returncode == 0, json_run.stderr
    doc = json.loads(json_run.stdout)  # stdout is exactly one JSON document
    for model in ("float32", "int8"):
        for part in ("embedding", "mlp", "interaction", "latency", "throughput"):
            assert doc[model][part] >= 0
        assert doc[model]["calls"] >= 3
        assert 0.99 < sum(doc[model]["share"].values()) < 1.01
    assert doc["float32"]["engine"] == "numpy" and doc["int8"]["engine"] == "qgemm"
    assert set(doc["speedup"]) == {"embedding", "mlp", "interaction", "total"}
    assert doc["speedup"]["total"] > 0
    assert doc["memory"]["int8_bytes"] < doc["memory"]["float32_bytes"]
    acc = doc["accuracy"]
    assert acc["predictions"] == 4 * 16
    assert 0 <= acc["mean_abs_diff"] <= acc["max_abs_diff"] <= 0.1
    assert 0 <= acc["topk_overlap"] <= 1 and 0 <= acc["top1_agreement"] <= 1
    cfg = doc["config"]
    assert cfg["bits"] == 4 and cfg["bottom"] == [5, 16, 8] and cfg["top"] == [8 + 6, 12, 1]
    assert set(doc["build_seconds"]) == {"model", "quantize", "click_log", "warmup"}


def test_text_report_and_progress():
    out = run_cli(*TINY, "--threads", "1")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for needle in (
        "float32 (numpy)",
        "int8 (qgemm)",
        "latency, median",
        "embedding",
        "mlp",
        "interaction",
        "memory",
        "|Δ prediction|",
        "top-10 per batch",
        "qgemm threads 1",
        "OpenBLAS) 1 threads",
    ):
        assert needle in text, needle
    assert "[" in out.stderr and "round 1/1" in out.stderr  # the progress bar is on stderr


def test_help_lists_options():
    out = run_cli("--help", timeout=60)
    assert out.returncode == 0
    for opt in (
        "--batch",
        "--tables",
        "--rows",
        "--dim",
        "--bits",
        "--threads",
        "--json",
        "--seed",
        "--pooling",
        "--seconds",
        "--batches",
        "--model",
    ):
        assert opt in out.stdout, opt


def test_parser_defaults_and_errors():
    parser = cli.build_parser()
    args = parser.parse_args([])
    assert (args.batch, args.tables, args.rows, args.dim, args.bits) == (128, 8, 1_000_000, 64, 8)
    assert args.bottom == [13, 512, 256] and args.top == [512, 256, 1]
    for bad in (
        ["--bits", "3"],
        ["--batch", "0"],
        ["--top", "5-x"],
        ["--seconds", "-1"],
        ["--seed", "-3"],
        ["--rows", "1.5"],
    ):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(bad)
        assert exc.value.code == 2


def test_in_process_json(capsys):
    code = cli.main([*TINY, "--json", "--no-progress", "--batches", "2"])
    assert code == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["config"]["batches"] == 2
    assert captured.err == ""  # --no-progress: nothing on stderr


def test_phases_on_stderr(capsys):
    """--phases: start-up, kernels per family (what this run built or loaded, as cache_info
    counts them) and run, on stderr; stdout stays the report / one JSON document."""
    import qgemm

    qgemm.cache_clear()  # this process's counters start at zero: every kernel is a miss again
    code = cli.main([*TINY, "--json", "--no-progress", "--phases"])
    assert code == 0
    captured = capsys.readouterr()
    json.loads(captured.out)  # still exactly one document on stdout
    ph = json.loads(captured.err.strip().splitlines()[-1])["phases"]
    assert ph["startup"] is None  # called in-process: no start-up phase of its own
    fams = ph["families"]
    assert {"gemm", "embedding_bags", "dlrm_interaction"} <= set(fams)
    assert all(f["keys"] >= 1 and f["seconds"] >= 0 for f in fams.values())
    assert ph["kernels"] == pytest.approx(sum(f["seconds"] for f in fams.values()))
    assert ph["run"] >= 0 and ph["total"] >= ph["kernels"] + ph["run"] - 1e-9
    ci = qgemm.cache_info().families
    for name, f in fams.items():  # after cache_clear: exactly this run's counters
        assert f["seconds"] == pytest.approx(ci[name].compile_seconds + ci[name].generic_seconds)
        assert f["keys"] == len(ci[name].build_seconds) + len(ci[name].generic_keys)
    assert set(fams) == {n for n, f in ci.items() if f.build_seconds or f.generic_keys}

    code = cli.main([*TINY, "--no-progress", "--phases", "--batches", "2"])
    assert code == 0
    err = capsys.readouterr().err
    assert "phases   start-up" in err and "kernels compiled or loaded 0.00 s" in err
    assert err.splitlines()[-1] == "kernels  -"  # all built by the first run: nothing new


def test_phases_subprocess_startup():
    out = run_cli(*TINY, "--no-progress", "--phases", "--batches", "2")
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stderr.splitlines() if ln.startswith("phases"))
    start = float(line.split("import qgemm)")[1].split("s |")[0])
    assert 0 < start < 120  # the age of the process when the command line was entered


def test_too_many_threads(capsys):
    import numba

    code = cli.main([*TINY, "--threads", str(numba.config.NUMBA_NUM_THREADS + 1)])
    assert code == 2
    assert "--threads" in capsys.readouterr().err


def test_saved_model(tmp_path, capsys):
    from qgemm.models import DLRM

    path = tmp_path / "tiny.npz"
    DLRM.random(tables=2, rows=[30, 40], dim=4, bottom=(3, 4), top=(5, 1), seed=1).save(path)
    code = cli.main(
        [
            "--model",
            str(path),
            "--batch",
            "8",
            "--batches",
            "2",
            "--seconds",
            "0.05",
            "--rounds",
            "1",
            "--json",
            "--no-progress",
        ]
    )
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["config"]["model"] == str(path)
    assert doc["config"]["rows"] == [30, 40] and doc["config"]["bottom"] == [3, 4]
    assert cli.main(["--model", str(tmp_path / "missing.npz"), "--no-progress"]) == 2
    assert "--model" in capsys.readouterr().err


# -- --workers / --scheduler: the int8 inference on a Dask cluster ---------------------------


def test_cluster_options_parse():
    parser = cli.build_parser()
    args = parser.parse_args(["--workers", "1", "2"])
    assert args.workers == [1, 2] and args.scheduler is None
    args = parser.parse_args(["--scheduler", "tcp://127.0.0.1:8786"])
    assert args.scheduler == "tcp://127.0.0.1:8786" and args.workers is None
    assert parser.parse_args([]).workers is None
    for bad in (["--workers", "0"], ["--workers"], ["--workers", "1", "--scheduler", "x"]):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(bad)
        assert exc.value.code == 2


@pytest.fixture(scope="module")
def workers_run():
    """One run on a single-worker LocalCluster, tiny model (bounded by the subprocess
    timeout)."""
    pytest.importorskip("distributed", reason="--workers needs qgemm[distributed]")
    return run_cli(*TINY, "--workers", "1", "--json", "--no-progress", timeout=300)


def test_workers_json(workers_run):
    """The JSON report carries the cluster's throughput; its predictions equal this
    process's."""
    out = workers_run
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout)  # still exactly one JSON document
    cl = doc["cluster"]
    assert cl["engine"] == "dask.distributed" and cl["scheduler"] is None
    assert cl["threads_per_worker"] == 1
    assert cl["local_int8_samples_per_s"] == doc["int8"]["throughput"]
    (r,) = cl["results"]
    assert r["workers"] == 1 and r["batches"] == 4 and r["samples"] == 4 * 16
    assert r["samples_per_s"] > 0 and r["seconds"] > 0
    assert r["max_abs_diff"] == 0.0  # the same int8 model, the same bits on the worker
    assert r["x_local"] == pytest.approx(r["samples_per_s"] / cl["local_int8_samples_per_s"])


def test_workers_text_report(workers_run, capsys):
    from qgemm.bench import main_job

    assert workers_run.returncode == 0, workers_run.stderr[-3000:]
    doc = json.loads(workers_run.stdout)
    main_job._print_cluster(doc["cluster"], doc["config"])
    text = capsys.readouterr().out
    assert "LocalCluster of single-threaded worker processes" in text
    assert "4 batches x 16" in text and "samples/s" in text and "x this process" in text
    (r,) = doc["cluster"]["results"]
    row = next(ln.split() for ln in text.splitlines() if ln.split()[:1] == ["1"])
    assert row[1] == f"{r['samples_per_s']:,.0f}" and row[2] == f"{r['x_local']:.2f}x"
    doc["cluster"]["scheduler"] = "tcp://scheduler.example:8786"
    main_job._print_cluster(doc["cluster"], doc["config"])
    assert "the workers of tcp://scheduler.example:8786" in capsys.readouterr().out


def test_workers_without_dask(monkeypatch, capsys):
    from qgemm.bench import main_job

    monkeypatch.setattr(main_job, "_have_distributed", lambda: False)
    assert cli.main([*TINY, "--workers", "2", "--no-progress"]) == 2
    assert "--workers: needs Dask" in capsys.readouterr().err


def test_scheduler_option(capsys):
    """``--scheduler ADDR``: the workers of a running scheduler (here an in-process cluster of
    one thread worker, cheap to start); the hosting process keeps its thread count."""
    distributed = pytest.importorskip("distributed", reason="--scheduler needs qgemm[distributed]")
    import warnings

    import qgemm

    threads = qgemm.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster = distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
        )
    try:
        addr = cluster.scheduler_address
        code = cli.main([*TINY, "--scheduler", addr, "--json", "--no-progress"])
        doc = json.loads(capsys.readouterr().out)
    finally:
        cluster.close()
    assert code == 0
    assert doc["cluster"]["scheduler"] == addr and doc["cluster"]["threads_per_worker"] is None
    (r,) = doc["cluster"]["results"]
    assert r["workers"] == 1 and r["samples"] == 4 * 16 and r["max_abs_diff"] == 0.0
    assert qgemm.get_num_threads() == threads
