"""``import qgemm`` compiles nothing and loads no kernel (issue 12).

Checked in fresh subprocesses with an empty kernel cache: Numba's ``numba:compile`` event
(fired for a compile and for a disk-cache load alike) never fires during ``import qgemm``, no
module-level dispatcher has a signature, ``cache_info()`` is empty, and the heavy modules (the
DLRM model and its kernels, the torch converter) are loaded only on first use of their public
names, which are the very objects of their modules.  No timings: module counts and events only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import qgemm

LAZY = {"DLRM": "qgemm.models", "from_torch": "qgemm.interop"}
HEAVY = ("qgemm.models", "qgemm._model_build", "qgemm._kernels.dlrm", "qgemm.interop")

_PRELUDE = """
import json, sys
from numba.core import event
from numba.core.dispatcher import Dispatcher

def compiled_dispatchers():
    # (module, name, signatures) of every module-level dispatcher with a signature, and how
    # many module-level dispatchers were looked at (so the check cannot pass vacuously)
    found, seen = [], 0
    for name, mod in sorted(sys.modules.items()):
        if not name.startswith("qgemm"):
            continue
        for attr, v in list(vars(mod).items()):
            if isinstance(v, Dispatcher):
                seen += 1
                if v.signatures:
                    found.append([name, attr, [str(s) for s in v.signatures]])
    return found, seen
"""


def _run(body: str, tmp_path) -> dict:
    env = {**os.environ, "QGEMM_CACHE_DIR": str(tmp_path / "cache"), "PYTHONWARNINGS": "ignore"}
    env.pop("NUMBA_CACHE_DIR", None)  # QGEMM_CACHE_DIR is the empty cache of this test
    code = _PRELUDE + textwrap.dedent(body)
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fresh_import(tmp_path_factory) -> dict:
    """One fresh process: ``import qgemm`` under a compile recorder, then the lazy names."""
    body = """
    with event.install_recorder("numba:compile") as rec:
        import qgemm
        at_import = {
            "events": len(rec.buffer),
            "modules": sorted(m for m in sys.modules if m.startswith("qgemm")),
            "foreign": [m for m in ("torch", "dask", "distributed", "scipy.optimize")
                        if m in sys.modules],
            "compiled": compiled_dispatchers()[0],
            "dispatchers": compiled_dispatchers()[1],
            "kernels": qgemm.cache_info().currsize,
            "misses": qgemm.cache_info().misses,
        }
        listed = dir(qgemm)
        from qgemm import DLRM
        import qgemm.interop, qgemm.models
        lazy = {
            "DLRM": DLRM is qgemm.models.DLRM and qgemm.DLRM is DLRM,
            "from_torch": qgemm.from_torch is qgemm.interop.from_torch,
        }
        every = all(getattr(qgemm, n) is not None for n in qgemm.__all__)
        after_lazy = {"events": len(rec.buffer), "compiled": compiled_dispatchers()[0]}
        import numba
        numba.njit(lambda v: v + 1)(1)  # the recorder does see a compile
        sanity = len(rec.buffer) - after_lazy["events"]
    print(json.dumps({"at_import": at_import, "dir": listed, "all": list(qgemm.__all__),
                      "lazy": lazy, "every": every, "after_lazy": after_lazy,
                      "sanity": sanity}))
    """
    return _run(body, tmp_path_factory.mktemp("import"))


def test_import_compiles_and_loads_nothing(fresh_import):
    at = fresh_import["at_import"]
    assert at["events"] == 0, "import qgemm compiled or loaded a kernel"
    assert at["compiled"] == []
    assert at["dispatchers"] > 0  # module-level dispatchers exist and were inspected
    assert at["kernels"] == 0 and at["misses"] == 0
    assert fresh_import["sanity"] > 0  # the compile recorder works in that process


def test_import_leaves_heavy_and_foreign_modules_unloaded(fresh_import):
    at = fresh_import["at_import"]
    loaded = [m for m in HEAVY if m in at["modules"]]
    assert loaded == [], f"import qgemm loaded {loaded}"
    assert at["foreign"] == []


def test_lazy_names_are_the_submodules_objects(fresh_import):
    assert fresh_import["lazy"] == {"DLRM": True, "from_torch": True}
    assert fresh_import["every"] is True
    assert set(fresh_import["all"]) <= set(fresh_import["dir"])
    assert set(LAZY) <= set(fresh_import["dir"])
    # loading the DLRM model and its kernel module compiles nothing either
    assert fresh_import["after_lazy"] == {"events": 0, "compiled": []}


def test_lazy_names_in_this_process():
    from qgemm.interop import from_torch
    from qgemm.models import DLRM

    assert qgemm.DLRM is DLRM and qgemm.from_torch is from_torch
    assert set(qgemm.__all__) <= set(dir(qgemm))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        qgemm.no_such_name  # noqa: B018


def test_no_module_of_qgemm_compiles_at_import(tmp_path):
    """Importing every module of the package (an optional peer missing: that module is
    skipped) leaves every module-level dispatcher uncompiled: no eager signature anywhere."""
    body = """
    import importlib, pkgutil
    with event.install_recorder("numba:compile") as rec:
        import qgemm
        skipped = []
        for m in pkgutil.walk_packages(qgemm.__path__, "qgemm."):
            if m.name == "qgemm.__main__":
                continue
            try:
                importlib.import_module(m.name)
            except ImportError as exc:
                skipped.append([m.name, str(exc)])
        found, seen = compiled_dispatchers()
    print(json.dumps({"events": len(rec.buffer), "compiled": found, "seen": seen,
                      "skipped": skipped,
                      "heavy": [m for m in HEAVY if m in sys.modules]}))
    """
    body = f"HEAVY = {HEAVY!r}\n" + textwrap.dedent(body)
    d = _run(body, tmp_path)
    assert d["compiled"] == [] and d["events"] == 0, d
    assert d["seen"] > 0
    assert d["heavy"] == list(HEAVY)  # the walk did import the lazily loaded modules
