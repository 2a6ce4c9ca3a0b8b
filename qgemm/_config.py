"""Run-time configuration: threads, instruction-set path, fastmath policy, on-disk cache.

Everything here is read once at import and can be changed at run time through the
functions below.  Environment variables:

``QGEMM_NUM_THREADS``
    Default thread count (otherwise all cores Numba sees).
``QGEMM_ISA``
    Force an instruction-set path: ``portable``, ``avx2`` or ``avx512vnni`` (the paths of
    :data:`qgemm._isa.PATHS`).  Only paths the host supports can be chosen; asking for more
    than the CPU has raises at import.  (The analogue of FBGEMM's
    ``FBGEMM_ENABLE_INSTRUCTIONS``.)
``QGEMM_CACHE_DIR``
    Directory of Numba's on-disk kernel cache (then ``NUMBA_CACHE_DIR``; default the per-user
    ``$XDG_CACHE_HOME/qgemm/<version>``; see :mod:`qgemm._diskcache`).
``QGEMM_JIT``
    ``tiered`` (default), ``eager`` or ``generic``: how kernels are compiled (see
    :mod:`qgemm._cache`).
``QGEMM_FASTMATH``
    ``0`` turns off the relaxed floating-point flags used by float reductions.
``QGEMM_ADAPTIVE_THREADS``
    ``1`` lets GEMM calls choose between their parallel and serial kernels by timing them.
"""

from __future__ import annotations

import os
from typing import Any

import numba

# ``_diskcache`` settles the on-disk cache location at import, before any ``cache=True``
# kernel is defined.
from . import _diskcache, _isa
from ._isa import ISA_PATHS, cpu_features, cpu_name

__all__ = [
    "ISA_PATHS",
    "cpu_features",
    "cpu_name",
    "supported_isas",
    "get_isa",
    "set_isa",
    "isa_path",
    "fastmath_flags",
    "adaptive_threads",
    "set_adaptive_threads",
    "get_num_threads",
    "set_num_threads",
    "sync_threads",
    "cache_dir",
    "cache_persistent",
]


def supported_isas() -> tuple[str, ...]:
    """The ISA paths this host can run, most portable first (see :mod:`qgemm._isa`)."""
    return _isa.host_paths()


def _isa_from_env() -> str:
    supported = supported_isas()
    forced = os.environ.get("QGEMM_ISA", "").strip().lower()
    if not forced:
        return supported[-1]
    if forced not in ISA_PATHS:
        raise ValueError(f"QGEMM_ISA: expected one of {ISA_PATHS}, got {forced!r}")
    if forced not in supported:
        raise ValueError(
            f"QGEMM_ISA: {forced!r} is not supported by this CPU ({cpu_name()}); "
            f"supported paths are {supported}"
        )
    return forced


_state: dict[str, Any] = {
    "isa": _isa_from_env(),
    "adaptive_threads": os.environ.get("QGEMM_ADAPTIVE_THREADS", "0").strip()
    not in ("0", "false", "no", ""),
    "fastmath": not _diskcache.strict_float(),  # (its kernels have their own cache folder)
}


def get_isa() -> str:
    """The instruction-set path kernels are built for (``"portable"``, ``"avx2"``, ...)."""
    return _state["isa"]


def isa_path() -> _isa.IsaPath:
    """The :mod:`qgemm._isa` table row of the current path (microkernel variants, tiles)."""
    return _isa.path(_state["isa"])


def set_isa(isa: str) -> str:
    """Choose the instruction-set path for kernels built from now on; returns the old one.

    Kernels are cached per ISA, so switching back and forth does not recompile.
    """
    if isa not in ISA_PATHS:
        raise ValueError(f"isa: expected one of {ISA_PATHS}, got {isa!r}")
    if isa not in supported_isas():
        raise ValueError(
            f"isa: {isa!r} is not supported by this CPU; supported: {supported_isas()}"
        )
    old = _state["isa"]
    _state["isa"] = isa
    return old


def fastmath_flags() -> frozenset[str] | bool:
    """LLVM fast-math flags for float *reductions* (sums in embedding bags, averaging).

    Reassociation lets LLVM vectorise reductions; no flag assumes the absence of NaN or inf,
    so non-finite values propagate as IEEE says.  Integer kernels never use fastmath.
    """
    if not _state["fastmath"]:
        return False
    return frozenset({"reassoc", "contract", "nsz", "arcp"})


def _numba_threads() -> int:
    """Threads Numba started with (``NUMBA_NUM_THREADS``)."""
    return int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]


def _default_threads() -> int:
    env = os.environ.get("QGEMM_NUM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"QGEMM_NUM_THREADS: expected an integer, got {env!r}") from None
        return max(1, min(n, _numba_threads()))
    return _numba_threads()


def adaptive_threads() -> bool:
    """Whether parallel-eligible GEMM calls time themselves and fall back to their serial twin
    when it is faster (``QGEMM_ADAPTIVE_THREADS=1``; off by default).

    Off, a call big enough for threads always runs in parallel: deterministic and best on a
    machine whose cores are free.  On, it helps when other processes keep a core busy (a
    fork/join region then waits milliseconds for a descheduled worker); results are
    bit-identical either way.
    """
    return _state["adaptive_threads"]


def set_adaptive_threads(on: bool) -> bool:
    """Turn the adaptive serial/parallel choice on or off; returns the previous setting."""
    old = _state["adaptive_threads"]
    _state["adaptive_threads"] = bool(on)
    return old


def get_num_threads() -> int:
    """Threads qgemm's parallel kernels use (default: all cores)."""
    return _state["threads"]


def sync_threads() -> int:
    """Apply the configured thread count to the calling Python thread; returns it.

    Numba's thread count is per calling thread, qgemm's is process-wide: every public
    wrapper calls this before a parallel kernel (it costs a comparison when nothing changed).
    """
    n = _state["threads"]
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    return n


def set_num_threads(n: int) -> int:
    """Set the thread count for qgemm's parallel kernels; returns the previous value.

    ``n`` must be between 1 and the number of threads Numba started with
    (``NUMBA_NUM_THREADS``, normally the core count).
    """
    if isinstance(n, bool) or not isinstance(n, (int,)) and not hasattr(n, "__index__"):
        raise TypeError(f"n: expected an int, got {type(n).__name__}")
    n = int(n)
    hi = _numba_threads()
    if not 1 <= n <= hi:
        raise ValueError(f"n: expected 1 <= n <= {hi}, got {n}")
    old = _state["threads"]
    _state["threads"] = n
    numba.set_num_threads(n)
    return old


def cache_dir() -> str:
    """Directory of Numba's on-disk cache for qgemm's kernels (never inside the package).

    ``QGEMM_CACHE_DIR``, then ``NUMBA_CACHE_DIR``, then the per-user cache folder; an unusable
    folder falls back to a temporary one (see :func:`cache_persistent`).
    """
    return _diskcache.location().path


def cache_persistent() -> bool:
    """Whether the on-disk cache survives the process (False after the read-only fallback)."""
    return _diskcache.location().persistent


_state["threads"] = _default_threads()
