"""Shared test configuration.

Tolerances live here (one place); hypothesis runs without deadlines because the first example
of a new signature pays for Numba compilation.
"""

from __future__ import annotations

import os

# Tiered compilation would build a generic and a specialised kernel for every new key; the
# suite compiles each once (tests that exercise the tiers force them themselves).
os.environ.setdefault("QGEMM_JIT", "eager")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "qgemm",
    deadline=None,
    max_examples=int(os.environ.get("QGEMM_HYPOTHESIS_EXAMPLES", "40")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=bool(os.environ.get("CI")),
)
# ``-m fuzz`` (or QGEMM_HYPOTHESIS_PROFILE=fuzz): thousands of examples per property.
settings.register_profile(
    "fuzz",
    deadline=None,
    max_examples=int(os.environ.get("QGEMM_FUZZ_EXAMPLES", "2000")),
    suppress_health_check=list(HealthCheck),
    derandomize=False,
    print_blob=True,
)
settings.load_profile(os.environ.get("QGEMM_HYPOTHESIS_PROFILE", "qgemm"))

_OPT_IN = ("slow", "fuzz")


def pytest_configure(config):
    markexpr = config.getoption("-m", default="") or ""
    if "fuzz" in markexpr and "not fuzz" not in markexpr:
        settings.load_profile("fuzz")


def pytest_collection_modifyitems(config, items):
    """``slow`` and ``fuzz`` tests are deselected unless ``-m`` names them."""
    markexpr = config.getoption("-m", default="") or ""
    wanted = {n for n in _OPT_IN if n in markexpr and f"not {n}" not in markexpr}
    keep, drop = [], []
    for item in items:
        opt = {n for n in _OPT_IN if n in item.keywords}
        (drop if opt - wanted else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


# Float tolerances (relative, absolute) by output dtype, used across the suite.
FLOAT32_RTOL = 1e-5
FLOAT32_ATOL = 1e-5


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def torch_or_skip():
    """Import torch with the fbgemm engine, or skip the test."""
    torch = pytest.importorskip("torch")
    torch.backends.quantized.engine = "fbgemm"
    return torch
