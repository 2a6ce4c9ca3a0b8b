"""qgemm.distributed on a LocalCluster of 2 worker processes (started once per module).

References: ``tests.reference`` (``ref_average``, ``ref_embedding_bag``) and the in-process
implementations (``qgemm.train_decentralized``, ``DLRM.predict``), which the distributed ones
must reproduce.  Tolerances: float32 averages within 1 float32 ulp of the float64 reference
(the tree changes the float64 addition order only); integers exact; table-wise sharded
predictions exact; row-split pooled sums within twice the float32 summation bound.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

distributed = pytest.importorskip("distributed", reason="qgemm.distributed needs dask")
pytest.importorskip("dask.array", reason="qgemm.distributed needs dask.array")

import cloudpickle  # noqa: E402  (a dependency of distributed)

import qgemm  # noqa: E402
import qgemm.distributed as qd  # noqa: E402
from qgemm._kernels import averaging as _kavg  # noqa: E402
from qgemm.distributed._common import (  # noqa: E402
    DROPPED_ENVIRON,
    local_cluster,
    outgoing_bytes,
    worker_table,
)
from qgemm.distributed._predict import ClusterScorer  # noqa: E402
from qgemm.models import DLRM  # noqa: E402
from tests.reference import ref_average, ref_embedding_bag  # noqa: E402
from tests.test_distributed_units import tree_models  # noqa: E402

# workers unpickle this module's functions by value: they need not import the tests package
cloudpickle.register_pickle_by_value(sys.modules[__name__])

T = 60  # seconds: every .result() in this file


@pytest.fixture(scope="module")
def client():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # qgemm's own LocalCluster: the worker environment of the bench and the main job
        cluster = local_cluster(2, threads_per_worker=1)
    c = distributed.Client(cluster)
    try:
        yield c
    finally:
        c.close()
        cluster.close()


def addrs(client):
    return sorted(worker_table(client))


def names(client):
    info = worker_table(client)
    return [info[a]["name"] for a in sorted(info)]


def scatter1(client, obj, addr):
    """One object to one worker (a dict given to scatter directly is a key -> value map)."""
    return client.scatter([obj], workers=[addr], hash=False)[0]


def worker_keys(client):
    return {a: set(v) for a, v in client.run(lambda dask_worker: list(dask_worker.data)).items()}


# ------------------------------------------------------------------------------- import


def test_importing_qgemm_does_not_import_dask():
    code = (
        "import sys, qgemm; "
        "print(any(m.split('.')[0] in ('dask', 'distributed') for m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------ average


def make_model(seed, shape=(5, 3)):
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal(shape).astype(np.float32),
        "sub": {"b": rng.standard_normal(shape[-1:]), "steps": np.array(seed * 3, np.int64)},
        "mask": rng.integers(0, 2, 4).astype(bool),
    }


def assert_tree_close(got, want):
    assert got.keys() == want.keys()
    for k in want:
        if isinstance(want[k], dict):
            assert_tree_close(got[k], want[k])
            continue
        g, w = np.asarray(got[k]), np.asarray(want[k])
        assert g.dtype == w.dtype and g.shape == w.shape, k
        if w.dtype.kind == "f":
            np.testing.assert_allclose(g, w, rtol=2 * np.finfo(w.dtype).eps, atol=1e-30)
        else:
            np.testing.assert_array_equal(g, w)


def test_average_equals_qgemm_average(client):
    a0, a1 = addrs(client)
    models = [make_model(s) for s in range(5)]
    placement = [a0, a1, a0, a1, a0]
    futs = [scatter1(client, m, a) for m, a in zip(models, placement, strict=True)]
    ws = [1.0, 2.0, 0.5, 0.0, 3.0]
    before = worker_keys(client)
    fut = qd.average(futs, ws, client=client)
    assert isinstance(fut, distributed.Future)
    got = fut.result(timeout=T)
    assert_tree_close(got, ref_average(models, ws))
    assert_tree_close(got, qgemm.average(models, ws))
    # the average is on a worker; once released, no partial is left behind
    assert client.who_has([fut])[fut.key]
    del fut
    import time

    deadline = time.monotonic() + T  # a loaded box releases keys late: poll, bounded
    while worker_keys(client) != before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert worker_keys(client) == before


def test_average_int_policies_and_rowwise(client):
    a0, a1 = addrs(client)
    rng = np.random.default_rng(3)
    models = [
        {
            "t": qgemm.quantize_rowwise(rng.standard_normal((7, 5)).astype(np.float32), bits=8),
            "n": rng.integers(-5, 5, 3).astype(np.int32),
        }
        for _ in range(3)
    ]
    futs = [scatter1(client, m, a) for m, a in zip(models, [a0, a1, a1], strict=True)]
    for pol in ("max", "first", "sum", "round"):
        got = qd.average(futs, [1, 2, 1], client=client, int_policy=pol).result(timeout=T)
        want = qgemm.average(models, [1, 2, 1], int_policy=pol)
        np.testing.assert_array_equal(got["n"], want["n"])
        np.testing.assert_allclose(got["t"].dequantize(), want["t"].dequantize(), atol=1e-6)


@settings(max_examples=8)
@given(n=st.integers(1, 5), rows=st.sampled_from([0, 1, 3, 17]), seed=st.integers(0, 2**16))
def test_average_property(client, n, rows, seed):
    rng = np.random.default_rng(seed)
    models = [
        {
            "x": rng.standard_normal((rows, 3)).astype(np.float32),
            "k": rng.integers(0, 100, rows).astype(np.uint16),
        }
        for _ in range(n)
    ]
    ws = rng.integers(1, 4, n).astype(float).tolist()
    a = addrs(client)
    futs = [scatter1(client, m, a[rng.integers(0, 2)]) for m in models]
    got = qd.average(futs, ws, client=client).result(timeout=T)
    assert_tree_close(got, ref_average(models, ws))


def test_average_bad_input(client):
    a0, a1 = addrs(client)
    good = scatter1(client, make_model(0), a0)
    bad_model = make_model(1)
    bad_model["sub"]["b"] = np.zeros(4)
    bad = scatter1(client, bad_model, a1)
    with pytest.raises(ValueError, match=r"sub\.b"):
        qd.average([good, bad], client=client).result(timeout=T)
    with pytest.raises(TypeError, match=r"models\[1\]: expected a distributed.Future"):
        qd.average([good, make_model(2)], client=client)
    with pytest.raises(ValueError, match="weights: expected one weight per model"):
        qd.average([good], [1, 2], client=client)
    with pytest.raises(ValueError, match="int_policy"):
        qd.average([good], client=client, int_policy="mean")


def _worker_env():
    import qgemm as q
    from qgemm.distributed._common import prepare_worker

    prepare_worker()
    return {k: os.environ.get(k) for k in (*DROPPED_ENVIRON, "QGEMM_NUM_THREADS")}, (
        q.get_num_threads()
    )


def test_local_cluster_environ(client):
    # glibc defaults (as in the in-process baseline) and one kernel thread per worker thread
    for env, threads in client.run(_worker_env).values():
        assert all(env[k] is None for k in DROPPED_ENVIRON)
        assert env["QGEMM_NUM_THREADS"] == "1" and threads == 1


def wire_bound(models, ws, got, want):
    """|got - want| <= 2**-23 * sum(w |x|) / sum(w) + 1 float32 ulp of want: one float32
    rounding of a partial's sums (relative 2**-24) per wire crossing, plus the result's."""
    wsum = sum(ws)
    mag = sum(w * np.abs(m["w"].astype(np.float64)) for m, w in zip(models, ws, strict=True))
    tol = 2.0**-23 * mag / wsum + np.spacing(np.abs(want["w"]).astype(np.float32))
    assert np.all(np.abs(got["w"].astype(np.float64) - want["w"]) <= tol)


def test_average_wire_float32(client):
    a0, a1 = addrs(client)
    size = 3 * _kavg.MULTI_MIN + 5  # the multi kernel on the workers, odd length
    models = tree_models(4, size, 11)
    placement = [a0, a1, a0, a1]
    futs = [scatter1(client, m, a) for m, a in zip(models, placement, strict=True)]
    ws = [1.0, 2.0, 3.0, 0.5]
    want = ref_average(models, ws)
    moved = {}
    for wire in ("float64", "float32"):
        before = outgoing_bytes(client)
        got = qd.average(futs, ws, client=client, wire=wire)
        distributed.wait(got, timeout=T)
        after = outgoing_bytes(client)
        moved[wire] = sum(after.values()) - sum(before.values())
        got = got.result(timeout=T)
        assert got["w"].dtype == np.float32
        np.testing.assert_array_equal(got["steps"], want["steps"])
        np.testing.assert_allclose(got["d"], want["d"], rtol=4 * np.finfo(np.float64).eps)
        if wire == "float64":
            assert_tree_close(got, want)
        else:
            wire_bound(models, ws, got, want)
    # one partial crossed between the workers: float32 sums are half the bytes
    assert moved["float64"] >= 8 * size and moved["float32"] < 0.6 * moved["float64"]
    # all weight on one worker's models: the receiving side had none (its partial empty)
    ws0 = [0.0, 2.0, 0.0, 0.5]
    got = qd.average(futs, ws0, client=client, wire="float32").result(timeout=T)
    wire_bound(models, ws0, got, ref_average(models, ws0))
    with pytest.raises(ValueError, match="wire"):
        qd.average(futs, ws, client=client, wire="float16")


def test_average_shared_memory(client):
    """Between the two worker processes of this host the partial goes through /dev/shm:
    the same average, (almost) no bytes through Dask, the segment kept for the next
    reduction until ``release_shared_memory``."""
    from qgemm.distributed import _handoff

    if _handoff.host_token() is None:
        pytest.skip("no writable /dev/shm on this machine")
    a0, a1 = addrs(client)
    size = 300_001  # float64 sums of 2.4 MB: above the hand-off's 1 MiB
    models = tree_models(4, size, 3)
    futs = [scatter1(client, m, a) for m, a in zip(models, [a0, a1, a0, a1], strict=True)]
    ws = [1.0, 2.0, 3.0, 0.5]
    want = ref_average(models, ws)
    pids = client.run(os.getpid)

    def segments():
        mine = tuple(f"{_handoff.PREFIX}{p}-" for p in pids.values())
        return [f for f in os.listdir(_handoff.SHM_DIR) if f.startswith(mine)]

    seen = []
    for wire in ("float64", "float64", "float32"):
        before = outgoing_bytes(client)
        got = qd.average(futs, ws, client=client, wire=wire)
        distributed.wait(got, timeout=T)
        moved = sum(outgoing_bytes(client).values()) - sum(before.values())
        assert moved < size  # the names of the segments, not 4-8 bytes per parameter
        got = got.result(timeout=T)
        np.testing.assert_array_equal(got["steps"], want["steps"])
        # float64 leaf: sums regrouped by the tree, error within a few ulps of sum |w x|
        scale = max(float(np.abs(m["d"]).max()) for m in models)
        np.testing.assert_allclose(got["d"], want["d"], rtol=0, atol=8 * 2.0**-52 * scale)
        if wire == "float64":  # the handed-off float64 sums: the in-process bits
            np.testing.assert_array_equal(got["w"], qgemm.average(models, ws)["w"])
        else:
            wire_bound(models, ws, got, want)
        seen.append(segments())
    # one producer: the second float64 reduction wrote into the first one's segment (read by
    # then: re-used, not re-made); the float32 partial (another size) has its own
    assert len(seen[0]) == 1 and seen[1] == seen[0]
    assert 1 <= len(seen[2]) <= 2
    freed = qd.release_shared_memory(client)
    # the producer's last segment (the float32 sums), nothing on the consumer
    assert sorted(freed.values())[-1] >= 4 * size and sorted(freed.values())[0] == 0
    assert segments() == []


# ------------------------------------------------------------------------------ training


class LinSite:
    """Least squares on the site's own data, mini-batch SGD."""

    def __init__(self, seed, n, d=4):
        rng = np.random.default_rng(seed)
        self.x = rng.standard_normal((n, d)).astype(np.float32)
        true = np.arange(1, d + 1, dtype=np.float32) * (1 + 0.1 * seed)
        self.y = (self.x @ true + 0.01 * rng.standard_normal(n)).astype(np.float32)

    def __call__(self, p, *, epochs, lr):
        nb = 4
        for e in range(epochs):
            for j, (xb, yb) in enumerate(
                zip(np.array_split(self.x, nb), np.array_split(self.y, nb), strict=True)
            ):
                err = xb @ p["w"] + p["b"] - yb
                step = np.float32(lr(e + j / nb))
                p["w"] -= step * (xb.T @ err / max(len(yb), 1)).astype(np.float32)
                p["b"] -= step * np.float32(err.mean())
                p["steps"] += 1
        return p


def lin_factory(seed, n):
    return LinSite(seed, n)


def init_lin():
    return {
        "w": np.zeros(4, np.float32),
        "b": np.zeros((), np.float32),
        "steps": np.zeros((), np.int64),
    }


def lin_eval(p):
    x = np.random.default_rng(99).standard_normal((64, 4)).astype(np.float32)
    y = x @ np.arange(1, 5, dtype=np.float32)
    return {"mse": float(np.mean((x @ p["w"] + p["b"] - y) ** 2))}


def run_both(client, sizes, rounds=3, **kw):
    from functools import partial

    ws = [float(n) for n in sizes]
    clr = qgemm.CyclicalLR(base_lr=0.01, max_lr=0.1, step_size=1.0)
    local = qgemm.train_decentralized(
        init_lin(),
        [LinSite(s, n) for s, n in enumerate(sizes)],
        rounds=rounds,
        local_epochs=2,
        lr=clr,
        site_weights=ws,
        evaluate=lin_eval,
    )
    ns = names(client)
    sites = [
        qd.Site(partial(lin_factory, s, n), worker=ns[s % 2], name=f"dc{s}")
        for s, n in enumerate(sizes)
    ]
    dist = qd.train_decentralized(
        init_lin(),
        sites,
        client=client,
        rounds=rounds,
        local_epochs=2,
        lr=clr,
        site_weights=ws,
        evaluate=lin_eval,
        **kw,
    )
    return local, dist


def test_train_matches_in_process(client):
    local, dist = run_both(client, [40, 64, 24])
    assert isinstance(dist, qgemm.DecentralizedResult)
    assert_tree_close(dist.params, local.params)
    np.testing.assert_allclose(dist.metric("mse"), local.metric("mse"), rtol=1e-5)
    np.testing.assert_array_equal(dist.metric("lr_start"), local.metric("lr_start"))
    for h in dist.history[1:]:
        assert h["sites"] == ["dc0", "dc1", "dc2"] and h["dropped"] == []
        assert h["bytes_moved"] > 0
        assert h["data_bytes"] >= (40 + 64 + 24) * 5 * 4  # x and y, float32


def test_bytes_moved_independent_of_data_size(client):
    _, small = run_both(client, [50, 50], rounds=2)
    _, big = run_both(client, [5000, 5000], rounds=2)
    assert big.history[1]["data_bytes"] > 50 * small.history[1]["data_bytes"]
    for r in (1, 2):
        b_small, b_big = small.history[r]["bytes_moved"], big.history[r]["bytes_moved"]
        assert b_big < 2 * b_small + 4096, (b_small, b_big)
        assert b_big < big.history[r]["data_bytes"] / 10


def test_train_bad_input(client):
    with pytest.raises(ValueError, match=r"dc-x: worker 'nope' is not in the cluster"):
        qd.train_decentralized(
            init_lin(),
            [qd.Site(lambda: LinSite(0, 8), worker="nope", name="dc-x")],
            client=client,
            rounds=1,
            lr=0.1,
        )

    class Extra(LinSite):
        def __call__(self, p, *, epochs, lr):
            p = super().__call__(p, epochs=epochs, lr=lr)
            p["w"] = p["w"][:3].copy()
            return p

    ns = names(client)
    sites = [
        qd.Site(lambda: LinSite(0, 8), worker=ns[0], name="good"),
        qd.Site(lambda: Extra(1, 8), worker=ns[1], name="bad-dc"),
    ]
    with pytest.raises(ValueError, match=r"bad-dc: key 'w'"):
        qd.train_decentralized(init_lin(), sites, client=client, rounds=1, lr=0.1)
    with pytest.raises(TypeError, match=r"sites\[0\]: expected a Site"):
        qd.train_decentralized(init_lin(), [3], client=client, rounds=1, lr=0.1)


class DyingSite(LinSite):
    """Kills its worker process in round ``die_round`` (once: a marker file records it)."""

    def __init__(self, seed, n, marker, die_round):
        super().__init__(seed, n)
        self.marker, self.die_round, self.calls = marker, die_round, 0

    def __call__(self, p, *, epochs, lr):
        self.calls += 1
        if self.calls == self.die_round and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return super().__call__(p, epochs=epochs, lr=lr)


def test_worker_table_never_short(client):
    """Regression (the killed-worker flake): ``client.scheduler_info()`` returns a cache that
    the client's periodic refresh overwrites with a worker-less identity, so a poll could see
    no workers at all and drop live sites.  A refresh every 2 ms makes the race frequent
    (about 1 read in 20 came back short); ``worker_table`` asks the scheduler directly."""
    import dask

    with dask.config.set({"distributed.client.scheduler-info-interval": "2ms"}):
        c = distributed.Client(client.scheduler.address, timeout=T)
    try:
        want = set(worker_table(client))
        assert len(want) == 2
        for _ in range(150):
            assert set(worker_table(c)) == want
    finally:
        c.close()


def test_killed_worker_drops_site(client, tmp_path):
    ns = names(client)
    marker = str(tmp_path / "died")
    sites = [
        qd.Site(lambda: LinSite(0, 32), worker=ns[0], name="stays"),
        qd.Site(lambda: DyingSite(1, 32, marker, 2), worker=ns[1], name="dies"),
    ]
    with pytest.warns(qd.SiteLostWarning, match="dies"):
        res = qd.train_decentralized(
            init_lin(),
            sites,
            client=client,
            rounds=3,
            lr=0.05,
            site_weights=[1, 3],
            round_timeout=T,
            rejoin_timeout=T,  # a loaded box restarts the killed worker slowly
        )
    assert [h["dropped"] for h in res.history[1:]] == [[], ["dies"], []]
    assert res.history[2]["sites"] == ["stays"]
    # replay in process: round 2 averages the surviving site alone (weights renormalised);
    # the lost site's data is re-created from its factory on the restarted worker in round 3
    a, b = LinSite(0, 32), LinSite(1, 32)
    lr = lambda t: 0.05  # noqa: E731
    p = init_lin()
    p = qgemm.average(
        [a(copy.deepcopy(p), epochs=1, lr=lr), b(copy.deepcopy(p), epochs=1, lr=lr)], [1, 3]
    )
    p = a(copy.deepcopy(p), epochs=1, lr=lr)
    b = LinSite(1, 32)
    p = qgemm.average(
        [a(copy.deepcopy(p), epochs=1, lr=lr), b(copy.deepcopy(p), epochs=1, lr=lr)], [1, 3]
    )
    assert_tree_close(res.params, p)


# ------------------------------------------------------------------------------- sharded


@pytest.fixture(scope="module")
def dlrm():
    m = DLRM.random(tables=3, rows=[50, 200, 30], dim=8, bottom=(5, 16, 8), top=(12, 1), seed=4)
    return m, m.random_inputs(33, pooling=4, seed=5)


@pytest.mark.parametrize("which", ["float", "int8"])
def test_sharded_tablewise_bit_exact(client, dlrm, which):
    m, (dense, idx, off) = dlrm
    model = m if which == "float" else m.quantize(bits=8)
    sm = qd.ShardedDLRM(model, client, row_split=[])
    assert sm.row_split == ()
    assert len({a for p in sm.placement.values() for a, _, _ in p}) == 2  # both workers used
    np.testing.assert_array_equal(sm.predict(dense, idx, off), model.predict(dense, idx, off))
    fixed = [np.random.default_rng(k).integers(0, r, (33, 3)) for k, r in enumerate(m.rows)]
    np.testing.assert_array_equal(sm.predict(dense, fixed), model.predict(dense, fixed))
    sm.close()


def _no_shards_left(client, timeout=30.0):
    """Wait until the workers have dropped every table shard: ``ShardedDLRM.close`` releases
    futures, and Dask forgets their data asynchronously (a shard of an earlier test could
    otherwise still sit on a worker when the next one looks)."""
    deadline = time.monotonic() + timeout
    while any(qd.shard_contents(client).values()):
        assert time.monotonic() < deadline, f"shards still held: {qd.shard_contents(client)}"
        time.sleep(0.05)


def test_sharded_row_split(client, dlrm):
    m, (dense, idx, off) = dlrm
    _no_shards_left(client)
    sm = qd.ShardedDLRM(m, client, row_split=[1])
    assert sm.row_split == (1,)
    assert [(s, e) for _, s, e in sm.placement[1]] == qd.row_ranges(200, 2)
    # no worker holds the whole row-split table: its shards, and no array of its size
    held = qd.shard_contents(client)
    for shards in held.values():
        for t, s, e in shards:
            if t == 1:
                assert e - s < 200
    big = client.run(
        lambda dask_worker: [
            getattr(v, "data", v).shape[0]
            for v in list(dask_worker.data.values())
            if hasattr(getattr(v, "data", v), "shape")
        ]
    )
    assert all(200 not in rows for rows in big.values())
    # the row-split sum: within twice the float32 summation bound of the single process
    part = {}
    got = sm.predict(dense, idx, off, timings=part)
    assert set(part) == {"embedding", "mlp", "interaction"}
    want = m.predict(dense, idx, off)
    n = np.diff(np.append(off[1], len(idx[1])))  # terms per bag
    exact = ref_embedding_bag(m.tables[1], idx[1], off[1])
    mag = ref_embedding_bag(np.abs(m.tables[1]), idx[1], off[1])
    u = 2.0**-24
    gamma = (n - 1) * u / (1 - (n - 1) * u)
    bound = gamma[:, None] * mag
    # the shards' partial sums, added in shard order as the interaction worker adds them
    from qgemm.distributed._sharded import _pool_split
    from qgemm.models import _numpy_bag_sum

    p0, p1 = (_pool_split(f.result(timeout=T), idx[1], off[1], 33, 8) for f in sm._shards[1])
    sharded = p0 + p1
    single = np.empty((33, 8), np.float32)
    _numpy_bag_sum(m.tables[1], idx[1], off[1], single)
    assert np.all(np.abs(sharded - exact) <= bound + 1e-30)
    assert np.all(np.abs(single - exact) <= bound + 1e-30)
    assert np.all(np.abs(sharded - single) <= 2 * bound + 1e-30)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # deterministic: the fixed shard order gives the same bits every time
    np.testing.assert_array_equal(sm.predict(dense, idx, off), got)
    sm.close()


def test_sharded_bad_input(client, dlrm):
    m, (dense, idx, off) = dlrm
    with pytest.raises(ValueError, match=r"row_split\[0\]: expected a table in \[0, 3\)"):
        qd.ShardedDLRM(m, client, row_split=[3])
    with pytest.raises(ValueError, match=r"workers\[0\]: worker 'x' is not in the cluster"):
        qd.ShardedDLRM(m, client, workers=["x"])
    sm = qd.ShardedDLRM(m, client, row_split=[1])
    bad = [i.copy() for i in idx]
    bad[1][3] = 200
    with pytest.raises(IndexError, match=r"indices\[1\]"):
        sm.predict(dense, bad, off)
    sm.close()


def test_dlrm_shard_method(client, dlrm):
    """``DLRM.shard(client, **kw)`` is ShardedDLRM with the keywords passed through."""
    m, (dense, idx, off) = dlrm
    ns = names(client)
    sm = m.shard(client, row_split=[], interaction_worker=ns[1])
    assert isinstance(sm, qd.ShardedDLRM) and sm.row_split == ()
    assert sm.interaction_worker == addrs(client)[1]
    np.testing.assert_array_equal(sm.predict(dense, idx, off), m.predict(dense, idx, off))
    sm.close()
    sm = m.shard(client, workers=ns, row_split=[2])
    assert sm.row_split == (2,)
    assert [(s, e) for _, s, e in sm.placement[2]] == qd.row_ranges(30, 2)
    np.testing.assert_allclose(
        sm.predict(dense, idx, off), m.predict(dense, idx, off), rtol=1e-5, atol=1e-6
    )
    sm.close()
    with pytest.raises(ValueError, match=r"workers\[0\]: worker 'x' is not in the cluster"):
        m.shard(client, workers=["x"])
    with pytest.raises(TypeError, match="client: expected a distributed.Client"):
        m.shard("tcp://nowhere:1")


# ------------------------------------------------------------------------------- predict


def worker_threads():
    from qgemm.distributed._predict import use_worker_threads

    use_worker_threads()  # what every scoring task calls first
    return qgemm.get_num_threads()


def test_predict_dask_array(client, dlrm):
    import dask.array as da

    m, _ = dlrm
    q = m.quantize(bits=8)  # the kernels the table-wise test compiled already
    batches = [m.random_inputs(n, pooling=3, seed=10 + n) for n in (7, 1, 12)]
    dense = da.concatenate([da.from_array(b[0], chunks=-1) for b in batches])
    out = qd.predict(q, dense, client=client, bags=[(b[1], b[2]) for b in batches])
    assert isinstance(out, da.Array) and out.shape == (20, 1)
    got = out.compute()
    want = np.concatenate([q.predict(*b) for b in batches])
    np.testing.assert_array_equal(got, want)
    # each single-threaded worker process runs qgemm's kernels on one thread
    futs = [client.submit(worker_threads, workers=[a], pure=False) for a in addrs(client)]
    assert client.gather(futs) == [1, 1]
    with pytest.raises(ValueError, match="bags: expected one"):
        qd.predict(q, dense, client=client, bags=[])


def test_predict_dataframe(client, dlrm):
    """A click log as a dask data frame (one row id per table and sample): every partition
    scored where it lies, equal bit for bit to ``model.predict`` of that partition (float and
    int8 models; pandas hands out read-only arrays, which the workers must accept)."""
    pd = pytest.importorskip("pandas", reason="dask.dataframe needs pandas")
    dd = pytest.importorskip("dask.dataframe", reason="dask.dataframe needs pandas and pyarrow")

    m, _ = dlrm
    rng = np.random.default_rng(8)
    n = 25
    dense_cols = [f"d{j}" for j in range(5)]
    sparse_cols = [f"c{k}" for k in range(3)]
    frame = pd.DataFrame({c: rng.random(n).astype(np.float32) for c in dense_cols})
    for k, r in enumerate(m.rows):
        frame[sparse_cols[k]] = rng.integers(0, r, n)
    frame.index = pd.RangeIndex(100, 100 + n)

    def reference(model, ddf, dcols, scols):
        want = []
        for part in ddf.partitions:
            pf = part.compute()
            want.append(
                model.predict(
                    np.array(pf[dcols].to_numpy(np.float32)),  # writeable copies
                    [np.array(pf[c].to_numpy(np.int64)) for c in scols],
                    [np.arange(len(pf))] * len(scols),
                )
            )
        return np.concatenate(want)

    ddf = dd.from_pandas(frame, npartitions=3)
    out = qd.predict(m, ddf, client=client)  # default: float columns, then integer columns
    assert isinstance(out, dd.DataFrame) and out.npartitions == 3
    got = out.compute()
    assert list(got.columns) == ["p"] and got["p"].dtype == np.float32
    assert got.index.equals(frame.index)
    np.testing.assert_array_equal(
        got["p"].to_numpy()[:, None], reference(m, ddf, dense_cols, sparse_cols)
    )

    # explicit columns: shuffled order, plus a float label column that is not a feature
    q = m.quantize(bits=8)
    shuffled = frame[[*sparse_cols[::-1], "d3", "d0", "d4", "d1", "d2"]].assign(
        clicked=rng.random(n).astype(np.float32)
    )
    dcols, scols = ["d3", "d0", "d4", "d1", "d2"], sparse_cols[::-1]
    ddf2 = dd.from_pandas(shuffled, npartitions=2)
    with pytest.raises(ValueError, match="dense_columns: expected 5 columns, got 6"):
        qd.predict(q, ddf2, client=client)  # "clicked" is a float column too
    got2 = qd.predict(
        q, ddf2, client=client, dense_columns=dcols, sparse_columns=sparse_cols
    ).compute()
    want2 = reference(q, ddf2, dcols, sparse_cols)
    np.testing.assert_array_equal(got2["p"].to_numpy()[:, None], want2)
    # the same features by name, whatever the frame's column order
    np.testing.assert_array_equal(
        want2, reference(q, dd.from_pandas(frame, npartitions=2), dcols, sparse_cols)
    )
    with pytest.raises(ValueError, match="sparse_columns: expected 3 columns, got 2"):
        qd.predict(q, ddf2, client=client, dense_columns=dcols, sparse_columns=scols[:2])


def test_run_main_job_inference(client, dlrm):
    m, _ = dlrm
    q = m.quantize()
    reqs = [q.random_inputs(16, pooling=3, seed=s) for s in range(4)]
    # a model already used here carries process-local caches (table addresses): they must
    # not travel (a worker trusting them would read freed memory and crash)
    want = q.predict(*reqs[0])
    res = qd.run_main_job_inference(q, reqs, scheduler=client.scheduler.address, repeat=1)
    np.testing.assert_array_equal(q.predict(*reqs[0]), want)  # the local model still works
    (r,) = res["results"]
    assert r["workers"] == 2 and r["samples"] == 64 and r["samples_per_s"] > 0
    assert r["max_abs_diff"] == 0.0


def test_cluster_scorer(client, dlrm):
    m, _ = dlrm
    q = m.quantize()
    reqs = [q.random_inputs(n, pooling=3, seed=s) for s, n in enumerate((5, 1, 8))]
    scorer = ClusterScorer(client, q, reqs)
    try:
        # one partition per worker thread, each on its own worker, holding its requests
        assert sorted(a for a, _ in scorer.parts) == addrs(client)
        for a, f in scorer.parts:
            assert client.who_has([f])[f.key] == (a,)
        # one actor per worker, each on the worker holding its partition
        assert len(scorer.actors) == 2
        for (a, _), f in zip(scorer.parts, scorer._actor_futures, strict=True):
            assert client.who_has([f])[f.key] == (a,)
        seconds, preds = scorer.run()
        assert seconds > 0
        np.testing.assert_array_equal(
            np.concatenate(preds), np.concatenate([q.predict(*r) for r in reqs])
        )
    finally:
        scorer.close()
