"""Same-host hand-off of a partial between Dask worker processes through shared memory.

Dask moves a task's result to the worker that needs it over TCP, also between two worker
processes of one machine: for the distributed average that transfer is most of the time
(a 50M-parameter float64 partial is 400 MB; 0.35 s of the 0.41 s the reduction took on
2 workers here).  When producer and consumer share a host (the same shared-memory namespace:
:func:`host_token`), the producer writes the partial's large accumulators straight into
files under ``/dev/shm`` (tmpfs: memory, not disk) and Dask carries only their names; the
consumer maps them and reads them in place.  This is the explicit shared memory
of dask/distributed#4497, kept inside qgemm's reduction: nothing else in Dask changes, and a
pair of workers on different hosts (or a machine without ``/dev/shm``) keeps Dask's transfer.

Ownership.  A segment belongs to the worker process that made it.  Each hand-off stamps a
random tag in the segment's header; the consumer checks it before and after reading and
then clears it, and from then on the producer may write its next partial there (also
before Dask releases the first result; when it does, the segment goes to a small
per-process pool, :data:`POOL_BYTES`): the next reduction of the same size writes into pages
that are already there (a fresh tmpfs page costs more to fault in than the copy it
replaces).  A segment recycled under a reader (the producer's result spilled to disk by
Dask, then released, then read) fails the tag check and raises instead of averaging someone
else's numbers.  Space is reserved
with ``posix_fallocate`` (a full ``/dev/shm`` -- Docker's default is 64 MiB -- falls back to
the ordinary transfer; writing into an unreserved tmpfs page would kill the process with
SIGBUS).  A worker killed before its segment was released leaves the file behind: the next
segment made on that host (or ``release_shared_memory``) removes files of processes that no
longer exist.
"""

from __future__ import annotations

import atexit
import contextlib
import mmap
import os
import secrets
import socket
import threading
import weakref
from collections import OrderedDict
from typing import Any

import numpy as np

__all__ = [
    "SHM_DIR",
    "MIN_BYTES",
    "POOL_BYTES",
    "host_token",
    "SharedPartial",
    "share_partial",
    "open_partial",
    "release_pool",
]

SHM_DIR = "/dev/shm"
PREFIX = "qgemm-handoff-"
MIN_BYTES = 1 << 20
"""Accumulators smaller than this travel inside the pickled partial, as before."""
POOL_BYTES = 4 << 30
"""At most this many bytes of released segments stay mapped per process for reuse (beyond
it, the least recently released are unlinked); a new hand-off also unlinks those it did
not take.  In the steady state a producer keeps one partial's segments, its consumer their
mappings (the same pages: counted in both processes' RSS, held once).
``qgemm.distributed.release_shared_memory`` lets them go on every worker."""
_HEADER = 4096  # the tag (one uint64) at the start; the data page-aligned after it
_MAPS_MAX = 64  # consumer side: mappings kept open (those of the last hand-off read)

_LOCK = threading.Lock()
_POOL: list[_Segment] = []  # released segments of this process, oldest first
_MAPS: OrderedDict[str, tuple[int, mmap.mmap]] = OrderedDict()  # path -> (inode, mapping)
_TOKEN: list[str | None] = []
_SWEPT: list[bool] = []


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def host_token() -> str | None:
    """What two processes must share for one to map the other's segments: host name, boot,
    the ``/dev/shm`` file system and the pid namespace (whose ids the stale-file sweep
    reads); None where there is no writable ``/dev/shm`` (then partials travel by Dask)."""
    if _TOKEN:
        return _TOKEN[0]
    token = None
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        st = os.stat(SHM_DIR)
        if os.access(SHM_DIR, os.W_OK | os.X_OK):
            token = f"{socket.gethostname()}|{boot}|{st.st_dev}:{st.st_ino}|{_pid_namespace()}"
    except OSError:
        token = None
    _TOKEN.append(token)
    return token


def _sweep_stale() -> None:
    """Remove segments left by dead processes of this pid namespace (once per process)."""
    if _SWEPT:
        return
    _SWEPT.append(True)
    ns = str(_pid_namespace())
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return
    for name in names:
        if not name.startswith(PREFIX):
            continue
        parts = name[len(PREFIX) :].split("-")
        if len(parts) != 3 or parts[1] != ns or not parts[0].isdigit():
            continue
        try:
            os.kill(int(parts[0]), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(SHM_DIR, name))
        except OSError:
            pass  # alive (another user's), or not ours to judge


class _Segment:
    """One tmpfs file of ``nbytes`` data bytes after a header page, mapped read-write.

    ``header[0]`` is the tag of the hand-off it carries (0: none); the consumer clears it
    once it has read the data, so the producer may write the next partial into it before
    Dask gets round to releasing the first (``gen`` counts the lendings: only the current
    one's owner returns it to the pool)."""

    __slots__ = ("path", "nbytes", "inode", "mm", "header", "gen")

    def __init__(self, nbytes: int) -> None:
        _sweep_stale()
        name = f"{PREFIX}{os.getpid()}-{_pid_namespace()}-{secrets.token_hex(8)}"
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, _HEADER + nbytes)  # ENOSPC here, never SIGBUS later
            self.mm = mmap.mmap(fd, _HEADER + nbytes, mmap.MAP_SHARED)
            self.inode = os.fstat(fd).st_ino
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        finally:
            os.close(fd)
        self.path, self.nbytes, self.gen = path, nbytes, 0
        self.header: np.ndarray | None = np.frombuffer(self.mm, np.uint64, 1)

    def view(self, shape: tuple, dtype: Any) -> np.ndarray:
        return np.frombuffer(self.mm, dtype, int(np.prod(shape)), _HEADER).reshape(shape)

    def destroy(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        self.header = None
        with contextlib.suppress(BufferError):  # views still alive: closed when they go
            self.mm.close()


_LENT: list[_Segment] = []  # segments of this process carrying a hand-off


def _take(nbytes: int) -> _Segment | None:
    """A segment of exactly ``nbytes`` data bytes: a pooled one, or a lent one its consumer
    has finished reading, else a new one; None when ``/dev/shm`` has no room (the caller
    keeps the ordinary path)."""
    seg = None
    with _LOCK:
        for j, s in enumerate(_POOL):
            if s.nbytes == nbytes:
                seg = _POOL.pop(j)
                break
        else:
            for j, s in enumerate(_LENT):
                if s.nbytes == nbytes and s.header is not None and int(s.header[0]) == 0:
                    seg = _LENT.pop(j)
                    break
    if seg is None:
        try:
            seg = _Segment(nbytes)
        except OSError:
            return None
    seg.gen += 1
    return seg


def _lend(seg: _Segment, tag: int) -> int:
    """Mark ``seg`` as carrying hand-off ``tag``; returns the lending's generation."""
    assert seg.header is not None, "a segment taken for a hand-off is mapped"
    seg.header[0] = tag
    with _LOCK:
        _LENT.append(seg)
    return seg.gen


def _give(segments: list[tuple[_Segment, int]]) -> None:
    """Segments whose hand-off is over (``(segment, generation)``: skipped if lent again
    since) back to the pool (tag cleared), trimmed to :data:`POOL_BYTES`."""
    drop = []
    with _LOCK:
        for seg, gen in segments:
            if seg.header is None or seg.gen != gen:
                continue
            seg.header[0] = 0
            if seg in _LENT:
                _LENT.remove(seg)
            _POOL.append(seg)
        while _POOL and sum(s.nbytes for s in _POOL) > POOL_BYTES:
            drop.append(_POOL.pop(0))
    for seg in drop:
        seg.destroy()


def _trim_pool() -> None:
    """Unlink the pooled segments (kept only while a workload of their size runs)."""
    with _LOCK:
        drop, _POOL[:] = list(_POOL), []
    for seg in drop:
        seg.destroy()


def _at_exit() -> None:
    """Unlink every segment of this process (consumers' mappings stay valid)."""
    with _LOCK:
        drop = list(_POOL) + list(_LENT)
        _POOL[:], _LENT[:] = [], []
    for seg in drop:
        seg.destroy()


atexit.register(_at_exit)


def _return_unused(segments: list[_Segment]) -> None:
    """Segments taken but not lent (a wrap that kept none of them) back to the pool."""
    _give([(seg, seg.gen) for seg in segments])


def release_pool() -> int:
    """Unlink this process's pooled segments and drop its cached mappings, and remove the
    segments dead processes of this host left behind; returns the bytes released (run it
    on every worker with ``client.run``)."""
    _SWEPT.clear()
    _sweep_stale()
    with _LOCK:
        segs, _POOL[:] = list(_POOL), []
        segs += [s for s in _LENT if s.header is not None and int(s.header[0]) == 0]
        _LENT[:] = [s for s in _LENT if s not in segs]
        _MAPS.clear()
    for seg in segs:
        seg.destroy()
    return sum(s.nbytes for s in segs)


class SharedPartial:
    """A :class:`~qgemm.training.reduction.Partial` whose large accumulators live in
    shared-memory segments of the process that made it.

    Pickled (Dask sending it to another worker), it is the partial without those arrays
    plus the segments' names; unpickled, an :class:`_AttachedPartial` mapping them.  When
    this object goes (Dask released the result), the segments go back to the pool."""

    def __init__(self, partial: Any, segments: dict[int, _Segment], token: str) -> None:
        self.partial, self._segments, self._token = partial, segments, token
        self._tag = secrets.randbits(63) | 1
        lent = [(seg, _lend(seg, self._tag)) for seg in segments.values()]
        _trim_pool()  # what this hand-off did not take is not this workload's size
        weakref.finalize(self, _give, lent)

    def __reduce__(self) -> tuple:
        p = self.partial
        skeleton = object.__new__(type(p))
        skeleton.__dict__.update(p.__dict__)
        skeleton.acc = list(p.acc)
        refs = {}
        for i, seg in self._segments.items():
            a = p.acc[i]
            refs[i] = (seg.path, seg.inode, a.shape, a.dtype.str)
            skeleton.acc[i] = None
        return (_AttachedPartial, (skeleton, refs, self._tag, self._token))

    def resolve(self) -> tuple[Any, Any]:
        """``(partial, check)`` in the producer's own process (Dask passed the object)."""
        return self.partial, lambda where: None


class _AttachedPartial:
    """The consumer's side of a :class:`SharedPartial`: the accumulators as views of the
    producer's segments (read, never written), and the tag check."""

    def __init__(self, skeleton: Any, refs: dict, tag: int, token: str) -> None:
        self._skeleton, self._refs, self._tag, self._token = skeleton, refs, tag, token

    def resolve(self) -> tuple[Any, Any]:
        if host_token() != self._token:
            raise RuntimeError(
                "a shared-memory partial reached a worker on another host (worker addresses "
                "re-used?): run the reduction again"
            )
        headers = []
        p = self._skeleton
        for i, (path, inode, shape, dt) in self._refs.items():
            mm = _map(path, inode)
            headers.append(np.frombuffer(mm, np.uint64, 1))
            n = int(np.prod(shape))
            p.acc[i] = np.frombuffer(mm, np.dtype(dt), n, _HEADER).reshape(shape)
        tag = self._tag

        def check(where: str) -> None:
            if any(int(h[0]) != tag for h in headers):
                raise RuntimeError(
                    f"{where}: its shared memory was recycled before it was read (the "
                    f"producing worker released its result: spilled or lost); run the "
                    f"reduction again"
                )

        with _LOCK:  # mappings of other segments: not this workload's (their pages may go)
            for path in [q for q in _MAPS if all(q != r[0] for r in self._refs.values())]:
                del _MAPS[path]
        check("the partial")

        def check_and_release(where: str) -> None:
            check(where)
            for h in headers:  # read: the producer may write its next partial here
                h[0] = 0

        return p, check_and_release


def _map(path: str, inode: int) -> mmap.mmap:
    """A mapping of ``path`` (cached: a pooled segment re-used by its producer is
    mapped once here and its pages stay mapped)."""
    with _LOCK:
        hit = _MAPS.get(path)
        if hit is not None and hit[0] == inode:
            _MAPS.move_to_end(path)
            return hit[1]
    try:
        fd = os.open(path, os.O_RDWR)  # (Numba's kernels take writable arrays; never written)
    except FileNotFoundError:
        raise RuntimeError(
            f"{path}: the shared-memory partial is gone (its worker exited or released it)"
        ) from None
    try:
        if os.fstat(fd).st_ino != inode:
            raise RuntimeError(f"{path}: the shared-memory partial was replaced")
        mm = mmap.mmap(fd, 0, mmap.MAP_SHARED)
    finally:
        os.close(fd)
    with _LOCK:
        _MAPS[path] = (inode, mm)
        while len(_MAPS) > _MAPS_MAX:
            _MAPS.popitem(last=False)
    return mm


class Allocator:
    """``alloc(shape, dtype)`` for a producer's accumulators: large arrays in fresh or
    pooled segments (when ``/dev/shm`` has room), the rest ordinary arrays; then
    :meth:`wrap` the finished partial."""

    def __init__(self) -> None:
        self.segments: dict[int, _Segment] = {}  # id(array) -> segment, until wrap
        self._arrays: list[np.ndarray] = []  # those arrays, alive: their ids stay theirs

    def __call__(self, shape: Any, dtype: Any) -> np.ndarray:
        shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(s) for s in shape)
        dt = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dt.itemsize
        if nbytes >= MIN_BYTES:
            seg = _take(nbytes)
            if seg is not None:
                a = seg.view(shape, dt)
                self.segments[id(a)] = seg
                self._arrays.append(a)
                return a
        return np.empty(shape, dt)

    def wrap(self, partial: Any, token: str) -> Any:
        """``partial`` as a :class:`SharedPartial` (its large accumulators copied into
        segments unless they were made by this allocator), or ``partial`` itself when none
        is in shared memory."""
        segs: dict[int, _Segment] = {}
        used = set()
        for i, a in enumerate(partial.acc):
            if not isinstance(a, np.ndarray):
                continue
            seg = self.segments.get(id(a))
            if seg is None and a.nbytes >= MIN_BYTES and a.dtype.kind in "fiub":
                seg = _take(int(a.nbytes))
                if seg is not None:
                    v = seg.view(a.shape, a.dtype)
                    v[...] = a
                    partial.acc[i] = v
            if seg is not None:
                segs[i] = seg
                used.add(id(seg))
        _return_unused([s for s in self.segments.values() if id(s) not in used])
        self.segments, self._arrays = {}, []
        return SharedPartial(partial, segs, token) if segs else partial


def share_partial(partial: Any, alloc: Allocator | None = None) -> Any:
    """``partial`` ready to cross to another worker of this host (:class:`SharedPartial`),
    or as it is where this process has no shared memory."""
    token = host_token()
    if token is None:
        return partial
    return (alloc or Allocator()).wrap(partial, token)


def open_partial(p: Any) -> tuple[Any, Any]:
    """``(partial, check)`` for any input of a combine: a plain partial (``check`` does
    nothing), or a shared one (``check(where)`` raises if its memory was recycled)."""
    if isinstance(p, (SharedPartial, _AttachedPartial)):
        return p.resolve()
    return p, lambda where: None
