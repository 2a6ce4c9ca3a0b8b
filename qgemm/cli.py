"""Command line: ``python -m qgemm [main-job options]``, ``python -m qgemm info``,
``python -m qgemm bench``, ``python -m qgemm cache {info,clear}``,
``python -m qgemm warmup [--ops ...]``.

The main job (no sub-command) is the DLRM-style int8 inference demo of
:mod:`qgemm.bench.main_job` (``--phases``: start-up, kernel builds per family and run seconds
on stderr); the suites of ``bench`` are listed in :data:`qgemm.bench.SUITES`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from typing import Any

from .bench import SUITES


def info_dict() -> dict[str, Any]:
    """Everything ``python -m qgemm info`` prints, as a dict."""
    import llvmlite
    import numba
    import numpy

    import qgemm

    from . import _config, _diskcache, _threading, _tiers

    feats = _config.cpu_features()
    interesting = [
        "sse4.2",
        "avx",
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512vnni",
        "avxvnni",
        "neon",
        "sve",
    ]
    ci = qgemm.cache_info()
    fastmath = _config.fastmath_flags()
    return {
        "qgemm": qgemm.__version__,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "numba": numba.__version__,
        "llvmlite": llvmlite.__version__,
        "machine": platform.machine(),
        "cpu": _config.cpu_name(),
        "cpu_features": {k: feats[k] for k in interesting if k in feats},
        "isa": _config.get_isa(),
        "supported_isas": list(_config.supported_isas()),
        "threads": _config.get_num_threads(),
        "max_threads": numba.config.NUMBA_NUM_THREADS,  # type: ignore[attr-defined]
        "threading_layer": _threading.layer(),
        "parallel_launches": "serialised (lock)" if _threading.needs_lock() else "concurrent",
        "fastmath": sorted(fastmath) if isinstance(fastmath, frozenset) else [],
        "cache_dir": _config.cache_dir(),
        "cache_source": _diskcache.location().source,
        "cache_persistent": _diskcache.location().persistent,
        "jit": ci.jit_mode,
        "jit_worker": _tiers.get_worker(),
        "cache_info": {
            "kernels": ci.currsize,
            "hits": ci.hits,
            "misses": ci.misses,
            "compile_seconds": round(ci.compile_seconds, 3),
            "generic_seconds": round(ci.generic_seconds, 3),
            "queue": len(ci.queue),
            "families": {k: len(v.keys) for k, v in ci.families.items()},
        },
    }


def _cmd_info(args: argparse.Namespace) -> int:
    d = info_dict()
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    width = max(len(k) for k in d)
    for k, v in d.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items()) or "-"
        elif isinstance(v, list):
            v = ", ".join(map(str, v)) or "-"
        print(f"{k.ljust(width)}  {v}")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from . import _diskcache, _tiers

    loc = _diskcache.location()
    if args.action == "clear":
        try:
            path, removed = _diskcache.clear()
        except ValueError as exc:
            print(f"cache clear: {exc}", file=sys.stderr)
            return 1
        _tiers.forget_built()
        print(f"cleared {path}: {removed} files removed")
        return 0
    files = nbytes = 0
    for root, _dirs, names in os.walk(loc.path):
        for n in names:
            files += 1
            nbytes += os.path.getsize(os.path.join(root, n))
    print(f"cache_dir   {loc.path}")
    print(f"source      {loc.source}")
    print(f"persistent  {loc.persistent}" + (f" ({loc.reason})" if loc.reason else ""))
    print(f"files       {files} ({nbytes / 2**20:.1f} MiB)")
    return 0


def _cmd_warmup(args: argparse.Namespace) -> int:
    from .warmup import warmup  # (qgemm.warmup may be the function re-exported by __init__)

    try:
        times = warmup(ops=args.ops, jobs=args.jobs, progress=not args.no_progress)
    except (ValueError, RuntimeError) as exc:
        print(str(exc), file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    for name, dt in times.items():
        print(f"{name:<10} {dt:6.2f} s")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import _config
    from .bench._timing import Progress

    if args.threads:
        _config.set_num_threads(args.threads)
    wanted = args.only.split(",") if args.only else list(SUITES)
    unknown = [w for w in wanted if w not in SUITES]
    if unknown:
        print(f"--only: unknown suite(s) {unknown}; choose from {list(SUITES)}", file=sys.stderr)
        return 2
    tables = []
    for name in wanted:
        try:
            mod = importlib.import_module(SUITES[name])
        except ImportError as exc:  # a suite whose module is absent in this build
            print(f"[bench] skipping {name}: {exc}", file=sys.stderr)
            continue
        progress = Progress(0, label=f"bench {name}", enabled=not args.no_progress)
        tables += mod.run(quick=args.quick, progress=progress)
        progress.close()
    header = info_dict()
    if args.json:
        doc = {
            "machine": {k: header[k] for k in ("cpu", "isa", "threads", "numba")},
            "tables": [t.to_dict() for t in tables],
        }
        print(json.dumps(doc, indent=2, default=float))
    else:
        print(
            f"qgemm {header['qgemm']} | {header['cpu']} | isa {header['isa']} | "
            f"{header['threads']} threads | numba {header['numba']}"
        )
        for t in tables:
            print()
            print(t.render())
    if args.plot:
        _plot(tables, args.plot)
    return 0


def _plot(tables, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed; skipping the plot", file=sys.stderr)
        return
    ratio_tables = [t for t in tables if any("vs" in c or "×" in c for c in t.columns)]
    if not ratio_tables:
        print("--plot: no ratio columns to plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(
        len(ratio_tables), 1, figsize=(10, 3.2 * len(ratio_tables)), squeeze=False
    )
    for ax, t in zip(axes[:, 0], ratio_tables, strict=True):
        cols = [i for i, c in enumerate(t.columns) if "vs" in c or "×" in c]
        labels = [str(r[0]) for r in t.rows]
        width = 0.8 / max(1, len(cols))
        for j, ci in enumerate(cols):
            vals = [
                float(r[ci]) if isinstance(r[ci], (int, float)) else float("nan") for r in t.rows
            ]
            ax.bar([i + j * width for i in range(len(labels))], vals, width, label=t.columns[ci])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(
            [i + 0.4 - width / 2 for i in range(len(labels))],
            labels,
            rotation=45,
            ha="right",
            fontsize=7,
        )
        ax.set_title(t.title, fontsize=9)
        ax.set_ylabel("speed-up (×)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    from .bench import main_job

    parser = argparse.ArgumentParser(
        prog="python -m qgemm",
        description="qgemm's main job: DLRM-style int8 inference, float32 (numpy) vs int8 "
        "(qgemm), with the time split, memory and accuracy impact.  Sub-commands: "
        "'info' (versions, CPU, ISA path, threads, kernel cache), 'bench' (side-by-side "
        "benchmarks against numpy, PyTorch/FBGEMM and ONNX Runtime), 'cache info|clear' "
        "(the on-disk kernel cache) and 'warmup' (compile ahead of time).",
    )
    main_job.add_arguments(parser)
    parser.add_argument(
        "--phases",
        action="store_true",
        help="main job: print on stderr the seconds of start-up (python + import qgemm), of "
        "the kernels compiled or loaded (per family) and of the run",
    )
    sub = parser.add_subparsers(dest="command")
    p_info = sub.add_parser("info", help="versions, CPU features, ISA path, threads, cache")
    p_info.add_argument("--json", action="store_true", help="print one JSON document")
    p_bench = sub.add_parser("bench", help="benchmarks vs numpy, torch/FBGEMM, ONNX Runtime")
    p_bench.add_argument("--quick", action="store_true", help="fewer shapes, shorter timing")
    p_bench.add_argument("--json", action="store_true", help="stdout carries only JSON")
    p_bench.add_argument("--plot", metavar="PNG", help="write a bar chart of the ratios")
    p_bench.add_argument(
        "--only", metavar="SUITES", help=f"comma-separated subset of {','.join(SUITES)}"
    )
    p_bench.add_argument("--threads", type=int, help="thread count (default: all cores)")
    p_bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_cache = sub.add_parser("cache", help="the on-disk kernel cache: where it is, or empty it")
    p_cache.add_argument("action", choices=["info", "clear"], help="show it, or empty it")
    p_warm = sub.add_parser(
        "warmup", help="compile the kernels a workload needs into the disk cache, in parallel"
    )
    from .warmup import OPS

    p_warm.add_argument(
        "--ops", metavar="GROUPS", help=f"comma-separated subset of {','.join(OPS)} (default all)"
    )
    p_warm.add_argument("--jobs", type=int, help="worker processes (default: the CPU count)")
    p_warm.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _measure_specialised() -> None:
    """Benchmarks and the main job time the specialised tier: compile eagerly unless the
    user chose a mode with ``QGEMM_JIT``."""
    if not os.environ.get("QGEMM_JIT"):
        from . import _cache

        _cache.set_jit_mode("eager")


def _process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``), or None where unknown."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime, in ticks
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _kernel_counts() -> dict[str, tuple[float, int]]:
    """``family -> (seconds, kernels)`` built or loaded so far in this process."""
    from . import _cache

    return {
        name: (f.compile_seconds + f.generic_seconds, len(f.build_seconds) + len(f.generic_keys))
        for name, f in _cache.cache_info().families.items()
    }


def phase_times(
    startup: float | None,
    run_seconds: float,
    before: dict[str, tuple[float, int]] | None = None,
) -> dict[str, Any]:
    """The phases of a main-job run: ``startup`` (process start to the command line's entry:
    python, ``import qgemm``), ``kernels`` (seconds this process spent building or loading
    kernels since the snapshot ``before`` of :func:`_kernel_counts`, per family, as
    :func:`qgemm.cache_info` counts them), ``run`` (the rest of the ``run_seconds`` the job
    took) and ``total``."""
    before = before or {}
    fams = {}
    for name, (sec, n) in _kernel_counts().items():
        sec0, n0 = before.get(name, (0.0, 0))
        if n > n0 or sec > sec0:
            fams[name] = {"seconds": sec - sec0, "keys": n - n0}
    fams = dict(sorted(fams.items(), key=lambda kv: -kv[1]["seconds"]))
    kernels = sum(f["seconds"] for f in fams.values())
    return {
        "startup": startup,
        "kernels": kernels,
        "families": fams,
        "run": max(run_seconds - kernels, 0.0),
        "total": (startup or 0.0) + run_seconds,
    }


def _print_phases(ph: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"phases": ph}), file=sys.stderr)
        return
    start = "?" if ph["startup"] is None else f"{ph['startup']:.2f} s"
    print(
        f"phases   start-up (python + import qgemm) {start} | kernels compiled or loaded "
        f"{ph['kernels']:.2f} s | run {ph['run']:.2f} s | total {ph['total']:.2f} s",
        file=sys.stderr,
    )
    fams = ", ".join(
        f"{n} {f['seconds']:.2f} s ({f['keys']} key{'s' if f['keys'] != 1 else ''})"
        for n, f in ph["families"].items()
    )
    print(f"kernels  {fams or '-'}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    startup = _process_age() if argv is None else None  # (None: called in-process)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in (None, "bench"):
        _measure_specialised()
    if args.command == "info":
        return _cmd_info(args)
    if args.command == "bench":
        return _cmd_bench(args)
    if args.command == "cache":
        return _cmd_cache(args)
    if args.command == "warmup":
        return _cmd_warmup(args)
    from .bench import main_job

    before = _kernel_counts()
    t0 = time.perf_counter()
    code = main_job.run(args)
    if args.phases:
        _print_phases(phase_times(startup, time.perf_counter() - t0, before), args.json)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
