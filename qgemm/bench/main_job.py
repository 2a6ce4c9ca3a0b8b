"""The main job of ``python -m qgemm``: DLRM-style inference, float32 (numpy) vs int8 (qgemm).

It builds a random DLRM (:class:`qgemm.models.DLRM`), converts it to int8 (``pack_weight`` for
every linear layer, ``quantize_rowwise`` for every table), generates a synthetic click log,
and reports, for both models: per-batch latency and throughput, the time split between
embedding lookups, MLPs and the feature interaction (the characterisation of Park et al.,
"Deep Learning Inference in Facebook Data Centers", 2018), model memory, and the accuracy
impact of int8 (max/mean |Δ prediction|, agreement of the top-k rankings).

Default configuration, and why
------------------------------
* **8 tables x 1,000,000 rows x dim 64** (2 GiB float32, 0.56 GiB 8-bit): the table count,
  row count and dimension of facebookresearch/dlrm's reference benchmark configuration; far
  larger than the 32 MB L3, so lookups are DRAM-bound as in production.
* **bottom 13-512-256-64, top 512-256-1**: DLRM's Criteo-Kaggle MLPs (13 dense features) with
  the embedding dimension as the bottom output; the top input is ``64 + 9*8/2 = 100``.
* **~20 lookups per bag** (bag lengths uniform in 1..39), between Criteo's one-hot features
  and the 100 of DLRM's benchmark; **batch 128**, a serving-size batch.
* 64 distinct batches of indices, cycled: every call touches rows not in cache.
On two Zen 4 cores building (tables ~0.1 s each with the parallel generator), converting,
compiling (warm disk cache) and ~3 s of timing per model fit in ~10-20 s.

Timing: float and int8 blocks alternate (rounds), with a pause between blocks (numpy's BLAS
and Numba's worker threads spin after a call and would steal a core); medians per batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

DEFAULTS: dict[str, Any] = {
    "batch": 128,
    "tables": 8,
    "rows": 1_000_000,
    "dim": 64,
    "pooling": 20,
    "bottom": "13-512-256",
    "top": "512-256-1",
    "bits": 8,
    "batches": 64,
    "seconds": 0.75,
    "rounds": 3,
    "topk": 10,
    "seed": 0,
}


ROUND_PAUSE_SECONDS = 0.05
"""Idle time before each timing round: long enough for the other engine's worker threads
(OpenBLAS's, Numba's OpenMP team) to stop spinning, so neither round runs against them."""


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in str(text).split("-") if s != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 512-256-1, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes like 512-256-1, got {text!r}")
    return sizes


def _positive(kind):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a positive {kind.__name__}, got {text!r}"
            ) from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return v

    parse.__name__ = kind.__name__
    return parse


_BLAS_SETTERS = (
    "scipy_openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads",
    "openblas_set_num_threads64_",
    "openblas_set_num_threads",
)


def _set_blas_threads(n: int) -> str:
    """Best effort: give numpy's OpenBLAS ``n`` threads too (so ``--threads`` applies to both
    sides of the comparison), through the library's own setter found among the loaded
    shared objects (what threadpoolctl does).  Returns a description for the report."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            libs = sorted(
                {
                    ln.split()[-1]
                    for ln in f
                    if "openblas" in ln.lower() and ln.split()[-1].startswith("/")
                }
            )
    except OSError:
        libs = []
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _BLAS_SETTERS:
            fn = getattr(lib, name, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                return f"numpy BLAS (OpenBLAS) {n} threads"
    return "numpy BLAS threads not controlled (set OPENBLAS_NUM_THREADS / OMP_NUM_THREADS)"


def _nonnegative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}")
    return v


_OPTIONS: tuple[tuple[str, Any, str], ...] = (
    ("batch", int, "samples per batch"),
    ("tables", int, "embedding tables = sparse features"),
    ("rows", int, "rows per table"),
    ("dim", int, "embedding dimension, also the bottom MLP's output"),
    ("pooling", int, "mean lookups per bag; lengths uniform in 1..2*P-1"),
    ("batches", int, "distinct batches in the synthetic click log"),
    ("seconds", float, "timing budget per model in seconds"),
    ("rounds", int, "alternating float/int8 timing rounds"),
    ("topk", int, "k of the per-batch top-k ranking agreement"),
)
"""The main job's positive numeric options: ``(name, type, help)``; defaults in DEFAULTS."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the main job's options to the top-level parser of ``python -m qgemm``."""
    d = DEFAULTS
    g = parser.add_argument_group("main job (DLRM inference, float32 vs int8)")
    for name, kind, text in _OPTIONS:
        shown = f"{d[name]:,}" if isinstance(d[name], int) else d[name]
        g.add_argument(
            f"--{name}", type=_positive(kind), default=d[name], help=f"{text} (default {shown})"
        )
    for name, text in (
        ("bottom", "dense features and hidden sizes of the bottom MLP; its output is --dim"),
        ("top", "top MLP output sizes; its input is dim + n(n-1)/2"),
    ):
        g.add_argument(
            f"--{name}",
            type=_sizes,
            default=_sizes(d[name]),
            metavar="SIZES",
            help=f"{text} (default {d[name]})",
        )
    g.add_argument(
        "--bits",
        type=int,
        choices=(8, 4, 2),
        default=d["bits"],
        help="bits per quantized table element (linear layers are always int8; "
        f"default {d['bits']})",
    )
    g.add_argument(
        "--threads",
        type=_positive(int),
        default=None,
        help="threads for qgemm's kernels and (OpenBLAS) numpy's matmuls (default: all cores)",
    )
    g.add_argument(
        "--seed",
        type=_nonnegative_int,
        default=d["seed"],
        help=f"seed of weights and click log (default {d['seed']})",
    )
    g.add_argument(
        "--model",
        metavar="NPZ",
        default=None,
        help="run a saved float model (DLRM.save / a facebookresearch/dlrm "
        "state_dict as .npz) instead of a random one; its sizes override "
        "--tables/--rows/--dim/--bottom/--top",
    )
    g.add_argument(
        "--json",
        action="store_true",
        help="stdout carries exactly one JSON document (progress stays on stderr)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    _add_cluster_arguments(parser)


def _add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """``--workers N [N ...]`` / ``--scheduler ADDR``: the int8 model's inference on a Dask
    cluster too (needs ``qgemm[distributed]``), throughput per worker count."""
    g = parser.add_argument_group(
        "cluster (needs qgemm[distributed]): the int8 inference on Dask workers as well"
    )
    x = g.add_mutually_exclusive_group()
    x.add_argument(
        "--workers",
        type=_positive(int),
        nargs="+",
        metavar="N",
        default=None,
        help="also score the click log on a LocalCluster of N single-threaded worker "
        "processes, once per N given (e.g. --workers 1 2)",
    )
    x.add_argument(
        "--scheduler",
        metavar="ADDR",
        default=None,
        help="also score the click log on the workers of the running Dask scheduler at ADDR",
    )


def _time_block(
    model,
    log,
    start: int,
    seconds: float,
    lat: list,
    parts: list,
    preds: dict[int, Any],
    min_calls: int = 3,
) -> int:
    """Run batches from ``log`` (cycling from ``start``) for ``seconds`` (at least
    ``min_calls``), recording per-call latency and per-part seconds, and the predictions of
    each batch the first time it runs (``preds[batch index]``, for the accuracy report);
    returns the next position.  Time-bounded rather than count-bounded, so a busy machine
    (slow tail calls) cannot stretch the run past its budget."""
    n = len(log)
    clock = time.perf_counter
    end = clock() + seconds
    c = 0
    while c < min_calls or clock() < end:
        i = (start + c) % n
        dense, idx, off = log[i]
        t: dict[str, float] = {}
        t0 = clock()
        p = model.predict(dense, idx, off, timings=t)
        lat.append(clock() - t0)
        parts.append(t)
        if i not in preds:
            preds[i] = p.reshape(-1)
        c += 1
    return start + c


def _all_predictions(model, log, preds: dict[int, Any]) -> Any:
    """The predictions of every batch of ``log`` in order: those the timing rounds recorded,
    the rest (a budget shorter than one pass over the log) computed now."""
    import numpy as np

    return np.concatenate(
        [preds[i] if i in preds else model.predict(*b).reshape(-1) for i, b in enumerate(log)]
    )


def _summary(lat: list[float], parts: list[dict], batch: int) -> dict[str, Any]:
    from ..models import PARTS

    med = statistics.median(lat)
    out: dict[str, Any] = {}
    for p in PARTS:
        out[p] = statistics.median(t[p] for t in parts) * 1e3
    # validation, allocation, sigmoid: the per-call remainder, then its median
    out["other"] = (
        statistics.median(
            max(0.0, lt - sum(t[p] for p in PARTS)) for lt, t in zip(lat, parts, strict=True)
        )
        * 1e3
    )
    out["latency"] = med * 1e3
    lat_sorted = sorted(lat)
    out["latency_p90"] = lat_sorted[min(len(lat) - 1, int(0.9 * len(lat)))] * 1e3
    out["throughput"] = batch / med if med > 0 else float("inf")
    out["calls"] = len(lat)
    total = sum(out[p] for p in (*PARTS, "other"))
    out["share"] = {p: (out[p] / total if total > 0 else 0.0) for p in (*PARTS, "other")}
    return out


def _accuracy(pf, pq, batch: int, k: int) -> dict[str, Any]:
    import numpy as np

    d = np.abs(pf.astype(np.float64) - pq.astype(np.float64))
    overlaps, top1 = [], []
    kk = min(k, batch)
    for b0 in range(0, pf.shape[0] - batch + 1, batch):
        f = pf[b0 : b0 + batch]
        q = pq[b0 : b0 + batch]
        top_f = set(np.argsort(-f, kind="stable")[:kk].tolist())
        top_q = set(np.argsort(-q, kind="stable")[:kk].tolist())
        overlaps.append(len(top_f & top_q) / kk)
        top1.append(int(np.argmax(f) == np.argmax(q)))
    n_all = pf.shape[0]
    kg = max(1, n_all // 100)
    gf = set(np.argsort(-pf, kind="stable")[:kg].tolist())
    gq = set(np.argsort(-pq, kind="stable")[:kg].tolist())
    return {
        "predictions": int(n_all),
        "max_abs_diff": float(d.max()) if d.size else 0.0,
        "mean_abs_diff": float(d.mean()) if d.size else 0.0,
        "topk": kk,
        "topk_overlap": float(np.mean(overlaps)) if overlaps else float("nan"),
        "top1_agreement": float(np.mean(top1)) if top1 else float("nan"),
        "global_top1pct_overlap": len(gf & gq) / kg,
        "prediction_mean": float(pf.mean()) if pf.size else float("nan"),
        "prediction_std": float(pf.std()) if pf.size else float("nan"),
    }


def run(args: argparse.Namespace) -> int:
    """Build, convert, time and compare; print the report (or one JSON document)."""
    import numba
    import numpy as np

    from .. import _config
    from ..models import DLRM, PARTS
    from ._timing import Progress

    blas = "numpy BLAS default threads"
    if args.threads:
        max_threads = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
        if args.threads > max_threads:
            print(
                f"--threads: at most {max_threads} on this machine, got {args.threads}",
                file=sys.stderr,
            )
            return 2
        _config.set_num_threads(args.threads)
        blas = _set_blas_threads(args.threads)
    bottom = [*args.bottom, args.dim]
    if len(bottom) < 2:
        print("--bottom: expected at least the dense-feature count", file=sys.stderr)
        return 2
    on_cluster = bool(getattr(args, "workers", None) or getattr(args, "scheduler", None))
    if on_cluster and not _have_distributed():
        opt = "--workers" if args.workers else "--scheduler"
        print(f"{opt}: needs Dask: pip install 'qgemm[distributed]'", file=sys.stderr)
        return 2
    progress = Progress(
        5 + 2 * args.rounds + on_cluster, label="qgemm main job", enabled=not args.no_progress
    )
    build: dict[str, float] = {}

    t0 = time.perf_counter()
    progress.step("building the float32 model")
    if args.model:
        try:
            model = DLRM.load(args.model)
        except (OSError, ValueError, TypeError) as exc:
            progress.close()
            print(f"--model: cannot load {args.model!r}: {exc}", file=sys.stderr)
            return 2
    else:
        model = DLRM.random(
            tables=args.tables,
            rows=args.rows,
            dim=args.dim,
            bottom=bottom,
            top=args.top,
            seed=args.seed,
        )
    build["model"] = time.perf_counter() - t0

    progress.step(f"converting to int8 ({args.bits}-bit tables)")
    t0 = time.perf_counter()
    qmodel = model.quantize(bits=args.bits)
    build["quantize"] = time.perf_counter() - t0

    progress.step("generating the click log")
    t0 = time.perf_counter()
    log = [
        model.random_inputs(args.batch, pooling=args.pooling, seed=args.seed + 1 + i)
        for i in range(args.batches)
    ]
    build["click_log"] = time.perf_counter() - t0

    progress.step("compiling / loading kernels")
    t0 = time.perf_counter()
    dense, idx, off = log[0]
    model.predict(dense, idx, off)
    qmodel.predict(dense, idx, off)
    build["warmup"] = time.perf_counter() - t0

    block = args.seconds / args.rounds
    lat: dict[str, list[float]] = {"float32": [], "int8": []}
    parts: dict[str, list[dict]] = {"float32": [], "int8": []}
    preds: dict[str, dict[int, Any]] = {"float32": {}, "int8": {}}
    pos = {"float32": 0, "int8": 0}
    models = {"float32": model, "int8": qmodel}
    for r in range(args.rounds):
        for name in ("float32", "int8"):
            time.sleep(ROUND_PAUSE_SECONDS)
            pos[name] = _time_block(
                models[name], log, pos[name], block, lat[name], parts[name], preds[name]
            )
            progress.step(f"round {r + 1}/{args.rounds}: {name}")
    summ = {k: _summary(lat[k], parts[k], args.batch) for k in lat}

    progress.step("accuracy")
    pf = _all_predictions(model, log, preds["float32"])
    pq = _all_predictions(qmodel, log, preds["int8"])
    acc = _accuracy(pf, pq, args.batch, args.topk)
    cluster = None
    if on_cluster:
        where = f"scheduler {args.scheduler}" if args.scheduler else f"{args.workers} workers"
        progress.step(f"cluster inference ({where})")
        try:
            cluster = _run_cluster(args, qmodel, log, summ["int8"]["throughput"])
        except (OSError, TimeoutError) as exc:
            progress.close()
            print(f"--scheduler: cannot use {args.scheduler!r}: {exc}", file=sys.stderr)
            return 2
    progress.close()

    mem = {"float32": model.memory(), "int8": qmodel.memory()}
    speedup = {
        p: summ["float32"][p] / summ["int8"][p] if summ["int8"][p] > 0 else None for p in PARTS
    }
    speedup["total"] = summ["float32"]["latency"] / summ["int8"]["latency"]
    info = {
        "cpu": _config.cpu_name(),
        "isa": _config.get_isa(),
        "threads": _config.get_num_threads(),
        "numba": numba.__version__,
        "numpy": np.__version__,
        "blas": blas,
    }
    rows = sorted(set(model.rows))
    config = {
        "model": args.model or "random",
        "batch": args.batch,
        "tables": model.num_tables,
        "rows": rows[0] if len(rows) == 1 else list(model.rows),
        "dim": model.dim,
        "pooling": args.pooling,
        "bottom": list(model.bottom_sizes),
        "top": list(model.top_sizes),
        "bits": args.bits,
        "batches": args.batches,
        "seed": args.seed,
        "lookups_per_batch": int(sum(i.size for i in log[0][1])),
    }
    if args.json:
        doc = {
            "config": config,
            "machine": info,
            "time_unit": "ms per batch",
            "build_seconds": build,
            "float32": {**summ["float32"], "engine": "numpy", "memory_bytes": mem["float32"]},
            "int8": {**summ["int8"], "engine": "qgemm", "memory_bytes": mem["int8"]},
            "speedup": speedup,
            "memory": {
                "float32_bytes": mem["float32"]["total"],
                "int8_bytes": mem["int8"]["total"],
                "ratio": mem["float32"]["total"] / mem["int8"]["total"],
            },
            "accuracy": acc,
        }
        if cluster is not None:
            doc["cluster"] = cluster
        print(json.dumps(doc, indent=2))
        sys.stdout.flush()
        return 0
    _print_report(config, info, build, summ, speedup, mem, acc)
    if cluster is not None:
        _print_cluster(cluster, config)
    sys.stdout.flush()
    return 0


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _print_report(config, info, build, summ, speedup, mem, acc) -> None:
    from ..models import PARTS

    f, q = summ["float32"], summ["int8"]
    c = config
    print("qgemm main job: DLRM-style inference, float32 (numpy) vs int8 (qgemm)")
    rows = f"{c['rows']:,}" if isinstance(c["rows"], int) else "/".join(map(str, c["rows"]))
    src = "" if c["model"] == "random" else f" from {c['model']}"
    print(
        f"model    {c['tables']} tables x {rows} rows x dim {c['dim']}{src} "
        f"({c['bits']}-bit rows when quantized), bottom MLP "
        f"{'-'.join(map(str, c['bottom']))}, top MLP {'-'.join(map(str, c['top']))}, "
        f"~{c['pooling']} lookups per bag"
    )
    print(
        f"machine  {info['cpu']} | isa {info['isa']} | qgemm threads {info['threads']} | "
        f"numba {info['numba']} | numpy {info['numpy']} | {info['blas']}"
    )
    print(
        f"built    model {build['model']:.2f} s, int8 conversion {build['quantize']:.2f} s, "
        f"click log {build['click_log']:.2f} s ({c['batches']} batches x {c['batch']}, "
        f"{c['lookups_per_batch']:,} lookups each), kernels {build['warmup']:.2f} s"
    )
    print()
    w = 26
    print(
        f"{'per batch of ' + str(c['batch']):<{w}}{'float32 (numpy)':>18}{'int8 (qgemm)':>18}"
        f"{'speed-up':>10}"
    )
    print("-" * (w + 46))
    print(
        f"{'latency, median':<{w}}{f['latency']:>15.3f} ms{q['latency']:>15.3f} ms"
        f"{speedup['total']:>9.2f}x"
    )
    print(f"{'latency, p90':<{w}}{f['latency_p90']:>15.3f} ms{q['latency_p90']:>15.3f} ms")
    print(f"{'throughput':<{w}}{f['throughput']:>11,.0f} smp/s{q['throughput']:>11,.0f} smp/s")
    for p in (*PARTS, "other"):
        sp = f"{speedup[p]:>9.2f}x" if p in speedup and speedup[p] else ""
        print(
            f"{'  ' + p:<{w}}{f[p]:>8.3f} ms ({f['share'][p]:>4.0%})"
            f"{q[p]:>8.3f} ms ({q['share'][p]:>4.0%}){sp}"
        )
    print(f"{'(timed calls)':<{w}}{f['calls']:>18}{q['calls']:>18}")
    print()
    mf, mq = mem["float32"], mem["int8"]
    print(
        f"{'memory':<{w}}{_mib(mf['total']):>18}{_mib(mq['total']):>18}"
        f"{mf['total'] / mq['total']:>8.2f}x smaller"
    )
    for p in ("embedding", "mlp"):
        print(f"{'  ' + p:<{w}}{_mib(mf[p]):>18}{_mib(mq[p]):>18}{mf[p] / mq[p]:>9.2f}x")
    print()
    print(
        f"accuracy over {acc['predictions']:,} predictions (float32 mean "
        f"{acc['prediction_mean']:.3f}, std {acc['prediction_std']:.3f}):"
    )
    print(f"  |Δ prediction| max {acc['max_abs_diff']:.2e}, mean {acc['mean_abs_diff']:.2e}")
    print(
        f"  top-{acc['topk']} per batch: {acc['topk_overlap']:.1%} overlap, same top-1 in "
        f"{acc['top1_agreement']:.1%} of batches; global top-1%: "
        f"{acc['global_top1pct_overlap']:.1%} overlap"
    )


# -- the main job on a Dask cluster (--workers / --scheduler) -------------------------------


def _have_distributed() -> bool:
    import importlib.util

    return importlib.util.find_spec("distributed") is not None


def _run_cluster(args: argparse.Namespace, qmodel: Any, log: list, local: float) -> dict:
    """The int8 model scored over the click log on the cluster(s): throughput per worker
    count (:func:`qgemm.distributed.run_main_job_inference`, fastest of ``--rounds``
    passes), next to this process's int8 throughput."""
    import logging

    from ..distributed import run_main_job_inference

    logging.getLogger("distributed").setLevel(logging.WARNING)  # keep stderr to the progress
    res = run_main_job_inference(
        qmodel, log, workers=args.workers, scheduler=args.scheduler, repeat=args.rounds
    )
    for r in res["results"]:
        r["x_local"] = r["samples_per_s"] / local if local > 0 else None
    return {
        "engine": "dask.distributed",
        "scheduler": res["scheduler"],
        "threads_per_worker": None if args.scheduler else 1,
        "local_int8_samples_per_s": local,
        "results": res["results"],
    }


def _print_cluster(cluster: dict, config: dict) -> None:
    where = (
        f"the workers of {cluster['scheduler']}"
        if cluster["scheduler"]
        else "a LocalCluster of single-threaded worker processes"
    )
    print()
    print(
        f"int8 inference on {where} ({config['batches']} batches x {config['batch']}, "
        f"model broadcast once, fastest pass):"
    )
    print(f"{'workers':>8}{'samples/s':>14}{'x this process':>16}{'max |Δ| vs local':>18}")
    for r in cluster["results"]:
        x = "" if r["x_local"] is None else f"{r['x_local']:.2f}x"
        print(f"{r['workers']:>8}{r['samples_per_s']:>14,.0f}{x:>16}{r['max_abs_diff']:>18.1e}")
    print(f"{'(this process, int8)':<22}{cluster['local_int8_samples_per_s']:>,.0f} samples/s")
