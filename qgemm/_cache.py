"""The one mechanism that builds, memoises and counts qgemm's specialised kernels.

This is qgemm's analogue of FBGEMM's run-time code generation (``CodeCache``): a *kernel
family* is a factory ``build(key) -> callable`` registered under a name; ``get_kernel(family,
key)`` returns the kernel for a hashable signature key (dtypes, epilogue flags, tile sizes,
ISA, ...), building it on first use.

* Thread-safe with double-checked locking: the registry lock is held only to look up or
  create a per-key lock; the build runs under the per-key lock, so two threads asking for the
  same new key build it once while other keys build concurrently (Numba serialises the LLVM
  part with its own compiler lock).
* Factories should compile eagerly (``@njit(signature, cache=True)``) so the time measured
  here is the real compile time -- or, with a warm on-disk cache, the load time.  Numba's
  on-disk cache includes the values a closure captures in its index key, so one factory
  closure can be cached on disk for every key.
* ``cache_info()`` reports hits, misses, compile seconds and the keys built, per family.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["kernel_family", "get_kernel", "cache_info", "cache_clear", "CacheInfo"]


@dataclass(frozen=True)
class FamilyInfo:
    """Counters of one kernel family."""

    hits: int
    misses: int
    compile_seconds: float
    keys: tuple[Hashable, ...]


@dataclass(frozen=True)
class CacheInfo:
    """Snapshot of the kernel cache returned by :func:`qgemm.cache_info`."""

    hits: int
    misses: int
    compile_seconds: float
    currsize: int
    families: dict[str, FamilyInfo] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [
            f"kernels: {self.currsize}  hits: {self.hits}  misses: {self.misses}  "
            f"compile: {self.compile_seconds:.2f} s"
        ]
        for name, fam in sorted(self.families.items()):
            lines.append(
                f"  {name}: {len(fam.keys)} kernels, {fam.hits} hits, {fam.misses} misses, "
                f"{fam.compile_seconds:.2f} s"
            )
        return "\n".join(lines)


class _Family:
    __slots__ = ("name", "build", "kernels", "key_locks", "hits", "misses", "seconds")

    def __init__(self, name: str, build: Callable[[Any], Callable]):
        self.name = name
        self.build = build
        self.kernels: dict[Hashable, Callable] = {}
        self.key_locks: dict[Hashable, threading.Lock] = {}
        self.hits = 0
        self.misses = 0
        self.seconds = 0.0


_registry_lock = threading.Lock()
_families: dict[str, _Family] = {}


def kernel_family(name: str) -> Callable[[Callable[[Any], Callable]], Callable[[Any], Callable]]:
    """Register ``build(key) -> kernel`` as the factory of kernel family ``name``.

    Returns a function ``key -> kernel`` that goes through the cache, so a module can write::

        @kernel_family("gemm")
        def gemm_kernel(key): ...          # the factory
        kern = gemm_kernel(("avx2", 4, 16, True))   # memoised lookup
    """

    def register(build: Callable[[Any], Callable]) -> Callable[[Any], Callable]:
        with _registry_lock:
            if name in _families:
                raise ValueError(f"kernel family {name!r} is already registered")
            _families[name] = _Family(name, build)

        def lookup(key: Hashable) -> Callable:
            return get_kernel(name, key)

        lookup.__name__ = getattr(build, "__name__", name)
        lookup.__doc__ = build.__doc__
        lookup.build = build  # type: ignore[attr-defined]
        return lookup

    return register


def get_kernel(family: str, key: Hashable) -> Callable:
    """The kernel of ``family`` for signature ``key``, built on first use."""
    fam = _families.get(family)
    if fam is None:
        raise KeyError(f"family: no kernel family named {family!r}; known: {sorted(_families)}")
    kern = fam.kernels.get(key)  # lock-free fast path (dict reads are atomic)
    if kern is not None:
        # Counted without the lock: the hot path stays ~0.1 us.  Under heavy concurrent use an
        # increment can be lost, so hits are a lower bound; misses and builds are exact.
        fam.hits += 1
        return kern
    with _registry_lock:
        kern = fam.kernels.get(key)
        if kern is not None:
            fam.hits += 1
            return kern
        key_lock = fam.key_locks.setdefault(key, threading.Lock())
    with key_lock:
        kern = fam.kernels.get(key)
        if kern is not None:  # another thread built it while we waited
            with _registry_lock:
                fam.hits += 1
            return kern
        t0 = time.perf_counter()
        try:
            kern = fam.build(key)
        except BaseException:
            with _registry_lock:  # a failed build is not cached; waiters retry it themselves
                fam.key_locks.pop(key, None)
            raise
        dt = time.perf_counter() - t0
        with _registry_lock:
            fam.kernels[key] = kern
            fam.misses += 1
            fam.seconds += dt
            fam.key_locks.pop(key, None)
    return kern


def cache_info() -> CacheInfo:
    """Hits, misses, compile seconds and keys of every kernel family."""
    with _registry_lock:
        fams = {
            name: FamilyInfo(f.hits, f.misses, f.seconds, tuple(f.kernels))
            for name, f in _families.items()
        }
    return CacheInfo(
        hits=sum(f.hits for f in fams.values()),
        misses=sum(f.misses for f in fams.values()),
        compile_seconds=sum(f.compile_seconds for f in fams.values()),
        currsize=sum(len(f.keys) for f in fams.values()),
        families=fams,
    )


def cache_clear() -> None:
    """Forget every built kernel and reset the counters (Numba's on-disk cache stays)."""
    with _registry_lock:
        for f in _families.values():
            f.kernels.clear()
            f.hits = f.misses = 0
            f.seconds = 0.0
