"""Where Numba's on-disk cache of qgemm's kernels lives (settled before any kernel is defined).

Order of precedence:

1. ``QGEMM_CACHE_DIR``;
2. ``NUMBA_CACHE_DIR`` (Numba reads it into ``numba.config.CACHE_DIR`` itself);
3. the per-user cache folder: ``$XDG_CACHE_HOME/qgemm/<version>`` (else
   ``~/.cache/qgemm/<version>`` on Linux, ``~/Library/Caches/qgemm/<version>`` on macOS,
   ``%LOCALAPPDATA%\\qgemm\\Cache\\<version>`` on Windows).

``python -m qgemm cache clear`` (:func:`clear`) empties a folder qgemm made (it holds
:data:`MARKER`) and, in a folder shared with other projects (``NUMBA_CACHE_DIR``), only the
sub-folders Numba made for qgemm's own source folders; it refuses a folder holding anything
Numba's cache does not write.

The cache never lives inside the installed package (``site-packages``): Numba's default there
leaves ``__pycache__`` folders behind that break a later editable install.  A folder that cannot
be created or written gives one :class:`RuntimeWarning` and a private temporary folder (removed
at exit), so kernels still compile -- just without persistence -- and nothing ever raises.

This module is imported by :mod:`qgemm._cache`, which every kernel module imports first.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numba

__all__ = [
    "CacheDir",
    "resolve",
    "location",
    "clear",
    "looks_like_cache",
    "strict_float",
    "numba_dir",
    "MARKER",
]

MARKER = ".qgemm-kernel-cache"
"""File written at the top of the folders qgemm creates; ``cache clear`` trusts it."""

_CACHE_SUFFIXES = (".nbi", ".nbc")


def _version() -> str:
    """qgemm's ``__version__``, read from the package's ``__init__.py`` (this module runs while
    that file is being imported; ``importlib.metadata`` would cost ~50 ms and can name another
    installed copy)."""
    import re

    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "__init__.py")) as f:
            m = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", f.read(), re.M)
    except OSError:
        m = None
    return m.group(1) if m else "dev"


def default_dir(env: Mapping[str, str] | None = None, platform: str | None = None) -> str:
    """The per-user cache folder of this qgemm version (no environment override applied)."""
    env = os.environ if env is None else env
    platform = sys.platform if platform is None else platform
    ver = _version()
    home = os.path.expanduser("~")
    if platform.startswith("win"):
        base = env.get("LOCALAPPDATA") or os.path.join(home, "AppData", "Local")
        return os.path.join(base, "qgemm", "Cache", ver)
    if platform == "darwin":
        return os.path.join(home, "Library", "Caches", "qgemm", ver)
    base = env.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
    return os.path.join(base, "qgemm", ver)


@dataclass(frozen=True)
class CacheDir:
    """The resolved on-disk cache: ``path``, where it came from, and whether it persists."""

    path: str
    source: str  # "QGEMM_CACHE_DIR", "NUMBA_CACHE_DIR", "default" or "temporary"
    persistent: bool
    reason: str = ""  # why the fallback was taken


def _writable(path: str) -> str:
    """'' if ``path`` can be created and written, else the reason."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def _inside_package(path: str) -> bool:
    pkg = os.path.dirname(os.path.abspath(__file__))
    try:
        return os.path.commonpath([os.path.realpath(path), os.path.realpath(pkg)]) == (
            os.path.realpath(pkg)
        )
    except ValueError:  # different drives
        return False


def resolve(env: Mapping[str, str] | None = None) -> CacheDir:
    """Choose the cache folder from the environment; never raises, may warn (see module doc)."""
    env = os.environ if env is None else env
    for name in ("QGEMM_CACHE_DIR", "NUMBA_CACHE_DIR"):
        value = env.get(name, "").strip()
        if value:
            path, source = os.path.abspath(os.path.expanduser(value)), name
            break
    else:
        path, source = default_dir(env), "default"
    if _inside_package(path):
        reason = f"{path} is inside the qgemm package"
    else:
        reason = _writable(path)
    if not reason:
        marker = os.path.join(path, MARKER)
        if source != "NUMBA_CACHE_DIR" and not os.path.exists(marker):
            try:
                with open(marker, "w") as f:
                    f.write("Numba's cache of qgemm kernels (python -m qgemm cache clear)\n")
            except OSError:
                pass
        return CacheDir(path, source, True)
    tmp = tempfile.mkdtemp(prefix="qgemm-cache-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    warnings.warn(
        f"qgemm: the kernel cache folder {path} (from {source}) is not usable ({reason}); "
        f"kernels are compiled without a persistent disk cache this session "
        f"(set QGEMM_CACHE_DIR to a writable folder to keep them)",
        RuntimeWarning,
        stacklevel=2,
    )
    return CacheDir(tmp, "temporary", False, reason)


STRICT_FLOAT_SUBDIR = "strict-float"
"""Sub-folder of the cache folder holding the kernels built with ``QGEMM_FASTMATH=0``."""


def strict_float(env: Mapping[str, str] | None = None) -> bool:
    """Whether ``QGEMM_FASTMATH`` turns the relaxed float flags off (read once per process)."""
    env = os.environ if env is None else env
    return env.get("QGEMM_FASTMATH", "1").strip().lower() in ("0", "false", "no")


def numba_dir(cache: CacheDir, strict: bool) -> str:
    """The folder Numba writes to: strict-float kernels get a sub-folder of their own, since
    Numba keys a cache entry on bytecode and closure values, not on the ``fastmath`` option
    (a kernel built with the relaxed flags would otherwise be loaded under
    ``QGEMM_FASTMATH=0``, or the other way round)."""
    return os.path.join(cache.path, STRICT_FLOAT_SUBDIR) if strict else cache.path


_current: CacheDir = resolve()
numba.config.CACHE_DIR = numba_dir(_current, strict_float())  # type: ignore[attr-defined]


def location() -> CacheDir:
    """The cache folder in use this session."""
    return _current


def looks_like_cache(path: str) -> bool:
    """Whether ``path`` holds only what Numba's cache writes (index/data files, folders,
    qgemm's marker), so that deleting its content cannot destroy anything else."""
    if not os.path.isdir(path):
        return False
    for root, _dirs, files in os.walk(path):
        for f in files:
            if f == MARKER or f.endswith(_CACHE_SUFFIXES) or f.startswith(".probe-"):
                continue
            if root == path and f.startswith(".qgemm-"):  # qgemm's own bookkeeping files
                continue
            return False
    return True


def _package_subpaths() -> set[str]:
    """The sub-folder names Numba's cache gives qgemm's source folders
    (``<folder>_<sha1(abs folder)>``, as ``numba.core.caching`` names them)."""
    import hashlib

    pkg = os.path.dirname(os.path.abspath(__file__))
    names = set()
    for root, dirs, _files in os.walk(pkg):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        digest = hashlib.sha1(root.encode()).hexdigest()
        names.add(f"{os.path.basename(root)}_{digest}")
    return names


def clear(path: str | None = None) -> tuple[str, int]:
    """Empty the cache folder (default: the one in use); returns ``(path, files removed)``.

    Raises ``ValueError`` for a folder that holds anything Numba's cache does not write.
    """
    path = os.path.abspath(path or _current.path)
    if not os.path.exists(path):
        return path, 0
    if not looks_like_cache(path):
        raise ValueError(
            f"path: {path} does not look like a Numba kernel cache (it holds files other than "
            f"*.nbi/*.nbc); refusing to delete it"
        )
    ours = os.path.exists(os.path.join(path, MARKER))
    own_subpaths = _package_subpaths()
    removed = 0
    for entry in os.listdir(path):
        full = os.path.join(path, entry)
        if entry == MARKER or (
            not ours and entry not in own_subpaths and entry != STRICT_FLOAT_SUBDIR
        ):
            continue
        if os.path.isdir(full) and not os.path.islink(full):
            removed += sum(len(fs) for _r, _d, fs in os.walk(full))
            shutil.rmtree(full)
        else:
            os.unlink(full)
            removed += 1
    return path, removed
