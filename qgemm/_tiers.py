"""The machinery of tiered compilation used by :mod:`qgemm._cache`: the JIT mode, the tiered
kernel that forwards to the generic kernel until its specialised build is swapped in, the
background worker and its queue, and the record of keys already built into the disk cache.

``QGEMM_JIT`` = ``tiered`` (default) | ``eager`` | ``generic``;
``QGEMM_JIT_WORKER`` = ``process`` (default) | ``thread``.

Why a process by default (measured on 2 busy cores): a build in a thread releases the GIL well
(LLVM runs in ctypes calls; the main thread kept 94% of its Python speed, 108% with a
process) and finishes sooner (26 s vs 44 s for two GEMM kernels), but it holds Numba's
global compiler lock for the whole compile, so every other first call or cache load in the
process waits behind it: 8 threads x mixed ops with ``cache_clear()`` storms on a cold cache
starved (some ops got no call in 10 s) with a thread and passed with a process.
"""

from __future__ import annotations

import ast
import collections
import hashlib
import inspect
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Hashable
from typing import Any

import numba

from . import _diskcache

__all__ = [
    "JIT_MODES",
    "WORKERS",
    "get_jit_mode",
    "set_jit_mode",
    "get_worker",
    "set_worker",
    "TieredKernel",
    "submit",
    "pending",
    "wait_idle",
    "record_built",
    "known_built",
]

JIT_MODES = ("tiered", "eager", "generic")
WORKERS = ("process", "thread")


def _from_env(name: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(name, "").strip().lower() or choices[0]
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


_state: dict[str, Any] = {
    "mode": _from_env("QGEMM_JIT", JIT_MODES),
    "worker": _from_env("QGEMM_JIT_WORKER", WORKERS),
    "epoch": 0,
}


def get_jit_mode() -> str:
    """How kernels are compiled: ``"tiered"``, ``"eager"`` or ``"generic"``."""
    return _state["mode"]


def set_jit_mode(mode: str) -> str:
    """Choose the JIT mode for kernels asked for from now on; returns the previous mode."""
    if mode not in JIT_MODES:
        raise ValueError(f"mode: expected one of {JIT_MODES}, got {mode!r}")
    old = _state["mode"]
    _state["mode"] = mode
    if mode != old:  # kernels memoised by callers (plans of packed weights) are looked up again
        bump_epoch()
    return old


def get_worker() -> str:
    """Where background builds run: ``"thread"`` or ``"process"``."""
    return _state["worker"]


def set_worker(worker: str) -> str:
    """Choose the background worker kind; returns the previous one."""
    if worker not in WORKERS:
        raise ValueError(f"worker: expected one of {WORKERS}, got {worker!r}")
    old = _state["worker"]
    _state["worker"] = worker
    return old


def current_epoch() -> int:
    return _state["epoch"]


def bump_epoch() -> None:
    _state["epoch"] += 1


class TieredKernel:
    """Callable like the specialised kernel of ``(family, key)``: forwards to the generic
    kernel until :meth:`swap` installs the specialised one (one attribute read per call)."""

    __slots__ = ("kernel", "family", "key", "ready")

    def __init__(self, generic: Callable, family: str, key: Hashable):
        self.kernel = generic
        self.family = family
        self.key = key
        self.ready = False

    def __call__(self, *args: Any) -> Any:
        return self.kernel(*args)

    def swap(self, kernel: Callable) -> None:
        self.kernel = kernel
        self.ready = True

    def __repr__(self) -> str:
        tier = "specialised" if self.ready else "generic"
        return f"<TieredKernel {self.family} {self.key!r} ({tier})>"


# ----------------------------------------------------------------------- background worker

_cond = threading.Condition()
_queue: collections.deque[tuple[str, Hashable, Callable, Callable[[], None]]] = collections.deque()
_running: list[tuple[str, Hashable]] = []
_worker: list[threading.Thread] = []
_timings: list[tuple[str, Hashable, float]] = []
"""(family, key, seconds) of finished background builds (the bench reads them)."""


def submit(family: str, key: Hashable, build: Callable, job: Callable[[], None]) -> None:
    """Queue ``job`` (the specialised build of ``(family, key)``) on the background worker."""
    with _cond:
        _queue.append((family, key, build, job))
        if not _worker or not _worker[0].is_alive():
            t = threading.Thread(target=_work, name="qgemm-jit", daemon=True)
            _worker[:] = [t]
            t.start()
        _cond.notify_all()


def _work() -> None:
    while True:
        with _cond:
            while not _queue:
                if not _cond.wait(timeout=30.0) and not _queue:
                    _worker.clear()  # idle: the thread ends, a later submit starts another
                    return
            family, key, build, job = _queue.popleft()
            _running.append((family, key))
        t0 = time.perf_counter()
        try:
            if get_worker() == "process":
                _compile_in_subprocess(build, key)
            job()
        finally:
            with _cond:
                _running.remove((family, key))
                _timings.append((family, key, time.perf_counter() - t0))
                _cond.notify_all()


def pending() -> tuple[tuple[str, Hashable], ...]:
    """Background builds not finished yet, the running one first."""
    with _cond:
        return tuple(_running) + tuple((f, k) for f, k, _b, _j in _queue)


def wait_idle(timeout: float | None = None) -> bool:
    """Wait until the queue is empty and nothing runs; False if ``timeout`` passed first."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with _cond:
        while _queue or _running:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            _cond.wait(timeout=left)
    return True


def timings() -> list[tuple[str, Hashable, float]]:
    with _cond:
        return list(_timings)


def _compile_in_subprocess(build: Callable, key: Hashable) -> None:
    """Compile ``build(key)`` in a fresh interpreter writing into this process's disk cache, so
    the in-process build that follows is a load.  Falls back silently (the in-process build
    then compiles) when the key does not round-trip through ``repr``."""
    try:
        if ast.literal_eval(repr(key)) != key:
            return
    except (ValueError, SyntaxError):
        return
    code = (
        "import importlib, ast\n"
        f"m = importlib.import_module({build.__module__!r})\n"
        f"getattr(m, {build.__name__!r}).build(ast.literal_eval({repr(key)!r}))\n"
    )
    env = {
        **os.environ,
        "QGEMM_CACHE_DIR": str(numba.config.CACHE_DIR),  # type: ignore[attr-defined]
        "QGEMM_JIT": "eager",
    }
    subprocess.run(
        [sys.executable, "-c", code], env=env, check=False, capture_output=True, timeout=600
    )


_warned: set[tuple[str, str]] = set()


def report_failure(
    family: str, key: Hashable, exc: BaseException, tier: str = "specialised"
) -> None:
    """One warning per family and tier: a failed build never fails the op."""
    if (family, tier) in _warned:
        return
    _warned.add((family, tier))
    if tier == "generic":
        what = "the specialised kernel is compiled before the call instead"
    else:
        what = "the generic kernel keeps serving it"
    warnings.warn(
        f"qgemm: {tier} build of kernel {family} {key!r} failed "
        f"({type(exc).__name__}: {exc}); {what}",
        RuntimeWarning,
        stacklevel=2,
    )


# ------------------------------------------------------- keys already in the disk cache

_BUILT_FILE = ".qgemm-built"
_built: set[str] | None = None
_built_lock = threading.Lock()


def _stamp(family: str, key: Hashable, build: Callable) -> str:
    try:
        st = os.stat(inspect.getfile(build))
        src = f"{st.st_mtime_ns}:{st.st_size}"
    except (TypeError, OSError):
        src = "?"
    text = f"{family}|{key!r}|{src}|{numba.__version__}"
    return hashlib.sha1(text.encode()).hexdigest()[:24]


def _built_path() -> str:
    return os.path.join(_diskcache.location().path, _BUILT_FILE)


def _load_built() -> set[str]:
    global _built
    with _built_lock:
        if _built is None:
            try:
                with open(_built_path()) as f:
                    _built = {line.strip() for line in f if line.strip()}
            except OSError:
                _built = set()
        return _built


def known_built(family: str, key: Hashable, build: Callable) -> bool:
    """Whether this key's specialised kernel was built into the disk cache before (by this or
    an earlier process with the same source), so building it now is a quick load."""
    return _stamp(family, key, build) in _load_built()


def record_built(family: str, key: Hashable, build: Callable) -> None:
    """Note that ``(family, key)`` is now in the disk cache (one line appended)."""
    stamp = _stamp(family, key, build)
    built = _load_built()
    if stamp in built:
        return
    with _built_lock:
        built.add(stamp)
    try:
        with open(_built_path(), "a") as f:
            f.write(stamp + "\n")
    except OSError:
        pass


def forget_built() -> None:
    """Drop the in-memory record (after ``cache clear`` removed the disk cache)."""
    global _built
    with _built_lock:
        _built = None
