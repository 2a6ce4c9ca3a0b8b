"""train_decentralized(client=...) hands the call to qgemm.distributed, imported lazily;
importing qgemm never imports Dask."""

from __future__ import annotations

import subprocess
import sys
import types

import numpy as np

import qgemm
from qgemm.averaging import DecentralizedResult, train_decentralized


def _site(p, *, epochs, lr):
    for e in range(epochs):
        p["w"] -= lr(e) * (p["w"] - 2.0)
    return p


def test_client_delegates_to_qgemm_distributed(monkeypatch):
    calls = []
    sentinel = DecentralizedResult(params={"w": np.ones(1)})

    def fake(init_params, sites, **kw):
        calls.append((init_params, sites, kw))
        return sentinel

    monkeypatch.setitem(
        sys.modules, "qgemm.distributed", types.SimpleNamespace(train_decentralized=fake)
    )
    client, init, sites = object(), {"w": np.zeros(1)}, [_site, _site]
    got = qgemm.train_decentralized(
        init, sites, rounds=2, local_epochs=3, lr=0.5, site_weights=[1, 2], client=client
    )
    assert got is sentinel and len(calls) == 1
    p, s, kw = calls[0]
    assert p is init and s is sites
    assert kw == dict(
        client=client,
        rounds=2,
        local_epochs=3,
        lr=0.5,
        site_weights=[1, 2],
        evaluate=None,
        int_policy="max",
    )


def test_client_none_runs_in_process():
    res = train_decentralized(
        {"w": np.zeros(1)}, [_site], rounds=1, local_epochs=1, lr=0.5, client=None
    )
    np.testing.assert_array_equal(res.params["w"], [1.0])


def test_import_qgemm_does_not_import_dask():
    code = "import sys, qgemm, qgemm.averaging, qgemm.training; print('dask' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
