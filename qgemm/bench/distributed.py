"""Benchmark of :mod:`qgemm.distributed` on a LocalCluster (``python -m qgemm bench --only
distributed``): the three targets of issue 13, each against its in-process baseline in the
same run.

* distributed average of 4 x 50M-float32 models on 2 workers vs ``qgemm.average`` of the same
  models in one process (target: within 2x), with each worker's resident memory after the
  reduction in units of one model;
* batch inference on 2 single-threaded workers vs one process with 2 threads (target:
  >= 0.8x the throughput);
* decentralised training: bytes moved per round for two data sizes (target: independent of
  the data size, O(model size x sites)).
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import numpy as np

from ._timing import Table, median_time

N_MODELS = 4
N_PARAMS = 50_000_000


def _make_model(n_params: int, seed: int) -> dict:
    return {
        "emb": np.full(n_params - 1000, np.float32(seed + 1), np.float32),
        "mlp": np.full(1000, np.float32(seed), np.float32),
    }


def _rss(dask_worker: Any = None) -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


class _Site:
    def __init__(self, seed: int, n: int, d: int = 64):
        rng = np.random.default_rng(seed)
        self.x = rng.standard_normal((n, d)).astype(np.float32)
        self.y = rng.standard_normal(n).astype(np.float32)

    def __call__(self, p: dict, *, epochs: int, lr: Any) -> dict:
        for e in range(epochs):
            err = self.x @ p["w"] - self.y
            p["w"] -= np.float32(lr(e)) * (self.x.T @ err / len(self.y)).astype(np.float32)
        return p


def _site(seed: int, n: int) -> _Site:
    return _Site(seed, n)


def _average_table(client: Any, quick: bool) -> Table:
    from distributed import wait

    import qgemm
    import qgemm.distributed as qd

    n_params = N_PARAMS // 10 if quick else N_PARAMS
    from qgemm.distributed._common import worker_table

    addrs = sorted(worker_table(client))
    futs = [
        client.submit(_make_model, n_params, i, workers=[addrs[i % 2]], pure=False)
        for i in range(N_MODELS)
    ]
    wait(futs)
    ws = [float(i + 1) for i in range(N_MODELS)]
    base = client.run(_rss)

    def dist() -> None:
        qd.average(futs, ws, client=client).result()

    t_dist = median_time(dist, min_time=0.0, repeat=3)
    after = client.run(_rss)
    for f in futs:
        f.release()
    models = [_make_model(n_params, i) for i in range(N_MODELS)]
    t_local = median_time(lambda: qgemm.average(models, ws), min_time=0.0, repeat=3)
    one = n_params * 4
    mem = ", ".join(f"{a.rsplit(':', 1)[-1]}: +{(after[a] - base[a]) / one:.2f}" for a in after)
    return Table(
        title=f"Distributed average, {N_MODELS} x {n_params / 1e6:.0f}M float32 on 2 workers",
        columns=["impl", "s", "x vs in-process"],
        rows=[
            ["qgemm.average (1 process)", t_local, 1.0],
            ["qgemm.distributed.average", t_dist, t_local / t_dist],
        ],
        notes=[
            "target: distributed within 2x of in-process (x vs in-process >= 0.5)",
            f"worker RSS growth after the reduction, in models (2 models held per worker "
            f"+ the partial/result): {mem}",
        ],
    )


def _inference_table(quick: bool) -> Table:
    import qgemm
    import qgemm.distributed as qd
    from qgemm.models import DLRM

    rows = 20_000 if quick else 200_000
    model = DLRM.random(
        tables=8, rows=rows, dim=64, bottom=(13, 256, 64), top=(256, 1), seed=0
    ).quantize()
    reqs = [model.random_inputs(128, pooling=20, seed=s) for s in range(16 if quick else 64)]
    res = qd.run_main_job_inference(model, reqs, workers=[2], repeat=3)["results"][0]
    prev = qgemm.get_num_threads()
    qgemm.set_num_threads(2)
    try:
        for r in reqs[:2]:
            model.predict(*r)
        t0 = time.perf_counter()
        for r in reqs:
            model.predict(*r)
        t_local = time.perf_counter() - t0
    finally:
        qgemm.set_num_threads(prev)
    local = sum(r[0].shape[0] for r in reqs) / t_local
    return Table(
        title="Batch inference, int8 DLRM, batch 128",
        columns=["impl", "samples/s", "x vs 1 process"],
        rows=[
            ["1 process, 2 threads", local, 1.0],
            ["2 workers x 1 thread", res["samples_per_s"], res["samples_per_s"] / local],
        ],
        notes=[
            "target: 2 workers >= 0.8x one 2-thread process",
            f"max |cluster - local| prediction: {res['max_abs_diff']:.1e}",
        ],
    )


def _training_table(client: Any, quick: bool) -> Table:
    import qgemm.distributed as qd
    from qgemm.distributed._common import worker_table

    names = [w["name"] for w in worker_table(client).values()]
    init = {"w": np.zeros(64, np.float32)}
    rows = []
    for n in (1000, 20_000) if quick else (10_000, 200_000):
        sites = [qd.Site(partial(_site, k, n), worker=names[k % len(names)]) for k in range(2)]
        res = qd.train_decentralized(init, sites, client=client, rounds=3, local_epochs=1, lr=0.01)
        for h in res.history[1:]:
            rows.append(
                [
                    n,
                    h["round"],
                    h["bytes_moved"],
                    h["data_bytes"],
                    h["bytes_moved"] / h["data_bytes"],
                ]
            )
    return Table(
        title="Decentralised training, 2 sites, 64-parameter model: bytes per round",
        columns=["samples/site", "round", "bytes moved", "data bytes kept", "moved/data"],
        rows=rows,
        notes=[
            "target: bytes moved independent of the data size (model x sites plus Dask's "
            "per-task overhead)"
        ],
    )


def run(*, quick: bool = False, progress: Any = None) -> list[Table]:
    """The distributed tables for ``python -m qgemm bench``."""
    import warnings

    from distributed import Client, LocalCluster

    tables = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster = LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        )
    with cluster, Client(cluster) as client:
        tables.append(_average_table(client, quick))
        if progress is not None:
            progress.step("distributed average")
        tables.append(_training_table(client, quick))
        if progress is not None:
            progress.step("decentralised training")
    tables.append(_inference_table(quick))
    if progress is not None:
        progress.step("distributed inference")
    return tables
