"""Numba's threading layer, and safe concurrent launches of parallel kernels on every layer.

Numba picks its layer at the first parallel launch: TBB, then OpenMP, then its own
``workqueue`` (``NUMBA_THREADING_LAYER`` forces one).  TBB and OpenMP accept parallel launches
from several Python threads at once; ``workqueue`` does not -- two concurrent launches abort the
process ("Numba workqueue threading layer is terminating: Concurrent access has been
detected").  qgemm keeps Numba's order (TBB when the ``tbb`` wheel is installed, else OpenMP,
whose runtime ships with most Linux systems) and, when the layer turns out to be
``workqueue``, :func:`guard` wraps every kernel compiled with ``parallel=...`` in one process-wide
lock, so concurrent calls run one after the other instead of crashing.  Serial kernels and the
other layers are left untouched (no lock, no wrapper).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import numba

__all__ = ["layer", "needs_lock", "guard", "is_parallel", "launch_lock"]

launch_lock = threading.RLock()
"""Held around every parallel launch when the layer is ``workqueue``."""

_state: dict[str, Any] = {"layer": None}
_state_lock = threading.Lock()


def layer() -> str:
    """The threading layer Numba uses in this process (``tbb``, ``omp`` or ``workqueue``).

    Starts Numba's thread pool if no parallel kernel has run yet (what the first parallel
    launch would do anyway; a few milliseconds)."""
    name = _state["layer"]
    if name is None:
        with _state_lock:
            if _state["layer"] is None:
                from numba.np.ufunc import parallel

                parallel._launch_threads()
                _state["layer"] = numba.threading_layer()
            name = _state["layer"]
    return name


def needs_lock() -> bool:
    """Whether parallel launches must be serialised (the ``workqueue`` layer)."""
    return layer() == "workqueue"


def is_parallel(kernel: Any) -> bool:
    """Whether ``kernel`` is a Numba dispatcher compiled with ``parallel=...`` on."""
    opts = getattr(kernel, "targetoptions", None)
    return bool(opts and opts.get("parallel"))


def guard(kernel: Callable) -> Callable:
    """``kernel`` itself, or -- on the ``workqueue`` layer -- a wrapper that launches it under
    :data:`launch_lock` (same call signature and result)."""
    # Every kernel is wrapped on workqueue, not only those whose dispatcher says parallel: a
    # kernel built cold was seen reporting no ``parallel`` target option while launching a
    # parallel region (8-thread stress with an empty cache aborted the process).  Serial
    # kernels then take the lock too -- only on this layer, where safety comes first.
    if not callable(kernel) or not needs_lock():
        return kernel

    @functools.wraps(kernel, updated=())
    def serialised(*args: Any) -> Any:
        with launch_lock:
            return kernel(*args)

    serialised.dispatcher = kernel  # type: ignore[attr-defined]
    return serialised
