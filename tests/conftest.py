"""Shared test configuration.

Tolerances live here (one place); hypothesis runs without deadlines because the first example
of a new signature pays for Numba compilation.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "qgemm",
    deadline=None,
    max_examples=int(os.environ.get("QGEMM_HYPOTHESIS_EXAMPLES", "40")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=bool(os.environ.get("CI")),
)
settings.load_profile("qgemm")

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
