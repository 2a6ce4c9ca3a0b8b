"""The JIT-mode switch shared by the tier tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from qgemm import _cache


@contextlib.contextmanager
def forced_jit_mode(mode: str) -> Iterator[None]:
    """Kernels of JIT ``mode`` inside the block (``"generic"``: the generic tier even for keys
    whose specialised kernel is built; the mode switch bumps the kernel epoch, so plans
    memoised on packed weights are looked up again), the previous mode after it."""
    old = _cache.set_jit_mode(mode)
    try:
        yield
    finally:
        _cache.set_jit_mode(old)
