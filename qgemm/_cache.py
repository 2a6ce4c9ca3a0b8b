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
* ``cache_info()`` reports hits, misses, compile seconds and the keys built, per family, the
  tier of each kernel and the background queue.

Tiers (``QGEMM_JIT``, or :func:`set_jit_mode`)
-------------------------------------------
A family may register a *generic* builder (``kernel_family(name, generic=build_generic,
generic_key=reduce)``, or an entry of :data:`GENERIC_PROVIDERS`): ``build_generic(key)``
returns a kernel with the call signature of ``build(key)`` and bit-identical results, compiled
for few keys (``generic_key(key)``; shape-agnostic, ``cache=True``), so it is quick to build.
It may be any callable: the GEMM, packing and quantization families' generic tiers are numpy
(:mod:`qgemm._kernels.gemm_generic`, :mod:`qgemm._kernels.quantize_generic`), so a first
``pack_weight`` / ``linear`` / ``quantize`` in a fresh process compiles nothing.

* ``eager``: ``get_kernel`` builds the specialised kernel before returning (the old behaviour).
* ``tiered`` (default): a miss whose specialised kernel is not known to be in the disk cache
  returns a *tiered* kernel at once -- a thin callable serving the generic kernel -- and
  queues the specialised build on a background worker; when it is ready the tiered kernel
  forwards to it and later ``get_kernel`` calls return the specialised kernel itself.  A key
  built before (recorded in the disk cache folder) is loaded synchronously: a disk load.
* ``generic``: the generic kernel, always (tests force each tier with it).

The worker is a daemon thread that runs each build in a subprocess writing into the disk
cache, which the parent then loads (``QGEMM_JIT_WORKER=process``, default: the parent never
holds Numba's compiler lock for a background compile), or builds in the thread itself
(``QGEMM_JIT_WORKER=thread``; see :mod:`qgemm._tiers` for the measurements).
:func:`wait_ready` blocks until the queue is empty; benchmarks call it (or run with
``QGEMM_JIT=eager``) so they measure the specialised tier.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

# ``_tiers`` imports ``_diskcache``, which sets numba.config.CACHE_DIR before any kernel exists
from . import _threading, _tiers
from ._tiers import JIT_MODES, get_jit_mode, set_jit_mode

__all__ = [
    "kernel_family",
    "get_kernel",
    "cache_info",
    "cache_clear",
    "CacheInfo",
    "FamilyInfo",
    "JIT_MODES",
    "get_jit_mode",
    "set_jit_mode",
    "wait_ready",
    "epoch",
    "tier_of",
    "GENERIC_PROVIDERS",
]

GENERIC_PROVIDERS: dict[str, str] = {
    "gemm": "qgemm._kernels.gemm_generic:generic_gemm_kernel",
    "gemm_pack": "qgemm._kernels.quantize_generic:generic_pack_kernel",
    "choose_qparams": "qgemm._kernels.quantize_generic:generic_choose_qparams_kernel",
    "quantize": "qgemm._kernels.quantize_generic:generic_quantize_kernel",
    "dequantize": "qgemm._kernels.quantize_generic:generic_dequantize_kernel",
    "rowwise_minmax": "qgemm._kernels.quantize_generic:generic_rowwise_minmax_kernel",
    "rowwise_codes": "qgemm._kernels.quantize_generic:generic_rowwise_codes_kernel",
    "embedding_bag": "qgemm._kernels.embedding_generic:generic_embedding_bag_kernel",
    "check_bags": "qgemm._kernels.embedding_generic:generic_check_bags_kernel",
}
"""Family -> ``"module:attribute"`` of a generic builder registered from outside the family's
own module (imported on the first tiered miss).  The attribute is a function ``key -> kernel``
with an optional ``generic_key`` attribute (``key -> hashable``) naming the kernels it shares."""


@dataclass(frozen=True)
class FamilyInfo:
    """Counters of one kernel family."""

    hits: int
    misses: int
    compile_seconds: float
    keys: tuple[Hashable, ...]
    """Every key served: built specialised, or served by the generic tier (see ``tiers``)."""
    tiers: dict[Hashable, str] = field(default_factory=dict)
    """Tier of each key asked for: ``"specialised"``, ``"generic"`` (served by the generic
    kernel, specialised build queued or running) or ``"generic-only"`` (``QGEMM_JIT=generic``
    or a failed specialised build)."""
    generic_seconds: float = 0.0
    generic_keys: tuple[Hashable, ...] = ()
    build_seconds: dict[Hashable, float] = field(default_factory=dict)


@dataclass(frozen=True)
class CacheInfo:
    """Snapshot of the kernel cache returned by :func:`qgemm.cache_info`."""

    hits: int
    misses: int
    compile_seconds: float
    currsize: int
    families: dict[str, FamilyInfo] = field(default_factory=dict)
    jit_mode: str = "eager"
    queue: tuple[tuple[str, Hashable], ...] = ()
    """Background builds not finished yet (running first), as ``(family, key)``."""
    generic_seconds: float = 0.0

    def __str__(self) -> str:
        lines = [
            f"kernels: {self.currsize}  hits: {self.hits}  misses: {self.misses}  "
            f"compile: {self.compile_seconds:.2f} s  generic: {self.generic_seconds:.2f} s  "
            f"jit: {self.jit_mode}  queue: {len(self.queue)}"
        ]
        for name, fam in sorted(self.families.items()):
            gen = sum(t != "specialised" for t in fam.tiers.values())
            lines.append(
                f"  {name}: {len(fam.keys)} kernels, {fam.hits} hits, {fam.misses} misses, "
                f"{fam.compile_seconds:.2f} s" + (f", {gen} on the generic tier" if gen else "")
            )
        return "\n".join(lines)


class _Family:
    __slots__ = (
        "name",
        "build",
        "kernels",
        "key_locks",
        "hits",
        "misses",
        "seconds",
        "generic",
        "generic_key",
        "generic_kernels",
        "generic_seconds",
        "tiered",
        "failed",
        "no_generic",
        "build_seconds",
    )

    def __init__(self, name: str, build: Callable[[Any], Callable]):
        self.name = name
        self.build = build
        self.kernels: dict[Hashable, Callable] = {}
        self.key_locks: dict[Hashable, threading.Lock] = {}
        self.hits = 0
        self.misses = 0
        self.seconds = 0.0
        self.generic: Callable[[Any], Callable] | None = None
        self.generic_key: Callable[[Any], Hashable] = _identity
        self.generic_kernels: dict[Hashable, Callable] = {}
        self.generic_seconds = 0.0
        self.tiered: dict[Hashable, _tiers.TieredKernel] = {}
        self.failed: set[Hashable] = set()
        self.no_generic: set[Hashable] = set()
        """Keys the generic builder declines (``NotImplementedError``): built eagerly."""
        self.build_seconds: dict[Hashable, float] = {}


def _identity(key: Hashable) -> Hashable:
    return key


_registry_lock = threading.Lock()
_families: dict[str, _Family] = {}
_generation = [0]  # bumped by cache_clear: background results of older generations are dropped


def kernel_family(
    name: str,
    *,
    generic: Callable[[Any], Callable] | None = None,
    generic_key: Callable[[Any], Hashable] | None = None,
) -> Callable[[Callable[[Any], Callable]], Callable[[Any], Callable]]:
    """Register ``build(key) -> kernel`` as the factory of kernel family ``name``.

    Returns a function ``key -> kernel`` that goes through the cache, so a module can write::

        @kernel_family("gemm", generic=build_generic_gemm)
        def gemm_kernel(key): ...          # the factory
        kern = gemm_kernel(("avx2", 4, 16, True))   # memoised lookup

    ``generic(key)`` (optional) builds a kernel with the same call signature and bit-identical
    results for the generic tier; kernels it builds are shared by the keys with the same
    ``generic_key(key)`` (default: the key itself).
    """

    def register(build: Callable[[Any], Callable]) -> Callable[[Any], Callable]:
        with _registry_lock:
            if name in _families:
                raise ValueError(f"kernel family {name!r} is already registered")
            fam = _Family(name, build)
            if generic is not None:
                fam.generic = generic
                fam.generic_key = generic_key or getattr(generic, "generic_key", _identity)  # type: ignore[assignment]
            _families[name] = fam

        def lookup(key: Hashable) -> Callable:
            return get_kernel(name, key)

        lookup.__name__ = getattr(build, "__name__", name)
        lookup.__doc__ = build.__doc__
        lookup.build = build  # type: ignore[attr-defined]
        return lookup

    return register


def _generic_builder(fam: _Family) -> Callable[[Any], Callable] | None:
    if fam.generic is None and fam.name in GENERIC_PROVIDERS:
        import importlib

        mod, _, attr = GENERIC_PROVIDERS[fam.name].partition(":")
        builder = getattr(importlib.import_module(mod), attr)
        with _registry_lock:
            if fam.generic is None:
                fam.generic_key = getattr(builder, "generic_key", _identity)
                fam.generic = builder
    return fam.generic


def _get_generic(fam: _Family, key: Hashable) -> Callable:
    """The generic kernel serving ``key`` (built under the family's per-key locks)."""
    build = _generic_builder(fam)
    assert build is not None
    gkey = ("<generic>", fam.generic_key(key))
    kern = fam.generic_kernels.get(gkey)
    if kern is not None:
        return kern
    with _registry_lock:
        key_lock = fam.key_locks.setdefault(gkey, threading.Lock())
    with key_lock:
        kern = fam.generic_kernels.get(gkey)
        if kern is None:
            t0 = time.perf_counter()
            try:
                kern = _threading.guard(build(key))
            finally:
                with _registry_lock:
                    fam.key_locks.pop(gkey, None)
            with _registry_lock:
                fam.generic_kernels[gkey] = kern
                fam.generic_seconds += time.perf_counter() - t0
    return kern


def _build_specialised(fam: _Family, key: Hashable) -> Callable:
    t0 = time.perf_counter()
    kern = _threading.guard(fam.build(key))
    dt = time.perf_counter() - t0
    with _registry_lock:
        fam.kernels[key] = kern
        fam.misses += 1
        fam.seconds += dt
        fam.build_seconds[key] = dt
    _tiers.record_built(fam.name, key, fam.build)
    return kern


def _finish_background(
    fam: _Family, key: Hashable, generation: int, tk: _tiers.TieredKernel
) -> None:
    """Run on the worker: build the specialised kernel and swap it in.

    After a :func:`cache_clear` the build still runs (the tiered kernel handed out, perhaps
    memoised by a caller, deserves its specialised kernel; with the key now in the disk cache
    it is a load) but the result is not put back into the cleared cache."""
    current = generation == _generation[0]
    try:
        if current:
            kern = _build_specialised(fam, key)
        else:
            kern = _threading.guard(fam.build(key))
            _tiers.record_built(fam.name, key, fam.build)
    except BaseException as exc:  # the generic kernel keeps serving; reported in cache_info
        with _registry_lock:
            if current:
                fam.failed.add(key)
        _tiers.report_failure(fam.name, key, exc)
        return
    with _registry_lock:
        if fam.tiered.get(key) is tk:
            del fam.tiered[key]
    tk.swap(kern)
    _tiers.bump_epoch()


def _has_generic(fam: _Family) -> bool:
    return fam.generic is not None or fam.name in GENERIC_PROVIDERS


def get_kernel(family: str, key: Hashable) -> Callable:
    """The kernel of ``family`` for signature ``key``, built on first use (see the tiers)."""
    fam = _families.get(family)
    if fam is None:
        raise KeyError(f"family: no kernel family named {family!r}; known: {sorted(_families)}")
    kern = fam.kernels.get(key)  # lock-free fast path (dict reads are atomic)
    if kern is not None and not (_tiers._state["mode"] == "generic" and _has_generic(fam)):
        # Counted without the lock: the hot path stays ~0.1 us.  Under heavy concurrent use an
        # increment can be lost, so hits are a lower bound; misses and builds are exact.
        fam.hits += 1
        return kern
    mode = _tiers.get_jit_mode()
    if mode != "eager" and _has_generic(fam):
        if mode == "generic" and key not in fam.no_generic:
            try:
                kern = _get_generic(fam, key)
            except NotImplementedError:  # no generic kernel for this key: the specialised one
                with _registry_lock:
                    fam.no_generic.add(key)
            else:
                fam.hits += 1
                return kern
        tk = fam.tiered.get(key)
        if tk is not None:
            fam.hits += 1
            return tk
        if (
            mode == "tiered"
            and key not in fam.failed
            and key not in fam.no_generic
            and not _tiers.known_built(family, key, fam.build)
        ):
            # (a failed key with a tiered kernel returned above; one whose generic build
            # failed is built eagerly below)
            return _tiered_miss(fam, key)
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
        try:
            kern = _build_specialised(fam, key)
        finally:  # a failed build is not cached; waiters retry it themselves
            with _registry_lock:
                fam.key_locks.pop(key, None)
    return kern


def _tiered_miss(fam: _Family, key: Hashable) -> Callable:
    with _registry_lock:
        key_lock = fam.key_locks.setdefault(key, threading.Lock())
    with key_lock:
        kern = fam.kernels.get(key) or fam.tiered.get(key)
        if kern is not None:
            with _registry_lock:
                fam.hits += 1
            return kern
        try:
            try:
                generic = _get_generic(fam, key)
            except NotImplementedError:  # declined by design (documented per family): eager
                with _registry_lock:
                    fam.no_generic.add(key)
                    fam.key_locks.pop(key, None)
                return _build_specialised(fam, key)
            except Exception as exc:  # a broken generic tier never breaks the op: go eager
                _tiers.report_failure(fam.name, key, exc, tier="generic")
                with _registry_lock:
                    fam.failed.add(key)
                    fam.key_locks.pop(key, None)
                return _build_specialised(fam, key)
            tk = _tiers.TieredKernel(generic, fam.name, key)
            with _registry_lock:
                fam.tiered[key] = tk
                generation = _generation[0]
        finally:
            with _registry_lock:
                fam.key_locks.pop(key, None)
    _tiers.submit(fam.name, key, fam.build, lambda: _finish_background(fam, key, generation, tk))
    return tk


def tier_of(kernel: Callable) -> str:
    """``"specialised"``, ``"generic"`` (a tiered kernel not swapped yet) or ``"generic-only"``
    for a kernel returned by :func:`get_kernel`."""
    if isinstance(kernel, _tiers.TieredKernel):
        return "specialised" if kernel.ready else "generic"
    with _registry_lock:
        for fam in _families.values():
            if any(k is kernel for k in fam.generic_kernels.values()):
                return "generic-only"
    return "specialised"


def wait_ready(timeout: float | None = None) -> bool:
    """Block until every queued specialised build is done and swapped in; False on timeout."""
    return _tiers.wait_idle(timeout)


def epoch() -> int:
    """A counter bumped whenever a tiered kernel is swapped for its specialised build (callers
    that memoise kernels can include it in their memo key)."""
    return _tiers.current_epoch()


def cache_info() -> CacheInfo:
    """Hits, misses, compile seconds, keys and tiers of every kernel family, and the queue."""
    with _registry_lock:
        fams = {}
        for name, f in _families.items():
            tiers = {k: "specialised" for k in f.kernels}
            for k in f.tiered:
                tiers[k] = "generic-only" if k in f.failed else "generic"
            fams[name] = FamilyInfo(
                f.hits,
                f.misses,
                f.seconds,
                tuple(tiers),
                tiers,
                f.generic_seconds,
                tuple(g[1] for g in f.generic_kernels),  # type: ignore[index]
                dict(f.build_seconds),
            )
    return CacheInfo(
        hits=sum(f.hits for f in fams.values()),
        misses=sum(f.misses for f in fams.values()),
        compile_seconds=sum(f.compile_seconds for f in fams.values()),
        currsize=sum(len(f.keys) for f in fams.values()),  # kernels handed out, any tier
        families=fams,
        jit_mode=_tiers.get_jit_mode(),
        queue=_tiers.pending(),
        generic_seconds=sum(f.generic_seconds for f in fams.values()),
    )


def cache_clear() -> None:
    """Forget every built kernel and reset the counters (Numba's on-disk cache stays).

    Builds still queued or running finish and are swapped into the tiered kernels handed out
    before, but are not kept in the (cleared) cache."""
    with _registry_lock:
        _generation[0] += 1
        for f in _families.values():
            f.kernels.clear()
            f.generic_kernels.clear()
            f.tiered.clear()
            f.failed.clear()
            f.no_generic.clear()
            f.build_seconds.clear()
            f.hits = f.misses = 0
            f.seconds = f.generic_seconds = 0.0
    _tiers.bump_epoch()
