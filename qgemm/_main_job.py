"""The main job of ``python -m qgemm`` (placeholder until the DLRM demo lands):
quantize an embedding table and a layer's weights, and report memory and error."""

from __future__ import annotations

import argparse
import json
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=200_000, help="embedding table rows")
    parser.add_argument("--dim", type=int, default=64, help="embedding dimension")
    parser.add_argument("--json", action="store_true", help="stdout carries one JSON document")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    import qgemm

    rng = np.random.default_rng(0)
    table = rng.standard_normal((args.rows, args.dim)).astype(np.float32)
    report = {"rows": args.rows, "dim": args.dim, "float32_bytes": int(table.nbytes), "tables": {}}
    for bits in (8, 4, 2):
        t0 = time.perf_counter()
        q = qgemm.quantize_rowwise(table, bits=bits)
        dt = time.perf_counter() - t0
        err = np.abs(q.dequantize(slice(0, 10_000)) - table[:10_000])
        report["tables"][f"{bits}bit"] = {
            "bytes": q.nbytes, "ratio": table.nbytes / q.nbytes, "seconds": dt,
            "max_abs_err": float(err.max()), "mean_abs_err": float(err.mean()),
        }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"table {args.rows} x {args.dim} float32: {table.nbytes / 2**20:.1f} MiB")
        for k, v in report["tables"].items():
            print(f"  {k}: {v['bytes'] / 2**20:.1f} MiB ({v['ratio']:.1f}x smaller), "
                  f"mean |err| {v['mean_abs_err']:.4f}, quantized in {v['seconds']*1e3:.0f} ms")
    sys.stdout.flush()
    return 0
