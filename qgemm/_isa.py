"""The one table of instruction-set paths: which exist, how each is detected, and which GEMM
microkernel variant and register tile each runs.

Everything else asks this module: :mod:`qgemm._config` (``get_isa`` / ``set_isa`` /
``supported_isas`` and ``QGEMM_ISA``), the GEMM dispatch in :mod:`qgemm.gemm`, the int8-ceiling
measurement of the bench, the half-weight GEMM.  Nothing here imports the rest of qgemm but
its tuning constants (:mod:`qgemm._tuning`).

Vocabulary
----------
*path*
    What the user chooses (``QGEMM_ISA``, :func:`qgemm.set_isa`): ``portable``, ``avx2``,
    ``avxvnni``, ``avx512vnni``.  A path is supported when the host's CPU has every feature it
    ``requires`` (llvmlite's feature names) on one of its ``machines``.
*variant*
    A microkernel of :mod:`qgemm._kernels.gemm` (``vnni`` = 512-bit ``vpdpbusd``, ``vnni256``
    = AVX-VNNI's 256-bit ``vpdpbusd``, ``avx2`` = ``vpmaddubsw``, ``avx2v`` = exact ``vpmaddwd``
    on the int8 panel widened in registers (the AVX2 default's exact variant), ``avx2w`` =
    ``vpmaddwd`` on an int16 twin of the panel and ``avx2x`` = activation split (both exact,
    slower, kept for measurement), ``avx2s`` = saturating, ``portable``, ``portables`` =
    saturating portable).
*panel width*
    Output columns per packed weight panel (:func:`panel_width`): a packing fact, the same on
    every path, so one packed weight serves every path.
*tile*
    ``MR`` rows x ``NV`` vectors per row; ``NR`` output columns (a divisor of the panel width).

Each path names two :class:`Kernel` choices: ``default`` (exact int32 results) and
``saturating`` (FBGEMM's AVX2 numbers bit for bit, ``saturate=True``).  A kernel whose ``fast``
and ``exact`` variants differ picks between them per call by the int16 saturation bound
(``255 * max pair sum of |w|``, known at pack time, times the activations' maximum).

Adding a path is one more :class:`IsaPath` entry in :data:`PATHS` (in priority order) plus its
microkernel variant in :mod:`qgemm._kernels.gemm_ukernel`; nothing else branches on path names
(``avxvnni`` -- 256-bit ``vpdpbusd`` on CPUs with VNNI but without AVX-512 -- was added so).

Which paths ran on real hardware: ``portable``, ``avx2`` (AMD Zen 3) and ``avx512vnni`` (AMD
Zen 4).  ``avxvnni`` is detected and its microkernel is compiled for a ``+avxvnni`` target in
the tests (the instruction selected, not executed): no CPU with AVX-VNNI was available.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType

from ._tuning import (
    GEMM_PARALLEL_MIN_MACS,
    GEMM_PARALLEL_MIN_MACS_AVX2,
    GEMM_PARALLEL_MIN_WEIGHT_BYTES,
    GEMM_PARALLEL_MIN_WEIGHT_BYTES_AVX2,
    HALF_MR_AVX2,
    HALF_MR_AVX512,
)

__all__ = [
    "Tile",
    "Kernel",
    "IsaPath",
    "PATHS",
    "ISA_PATHS",
    "PANEL_WIDTHS",
    "panel_width",
    "path",
    "detect",
    "cpu_features",
    "cpu_name",
    "host_paths",
]


@dataclass(frozen=True)
class Tile:
    """A register tile: ``mr`` rows x ``nv`` vector registers per row = ``nr`` columns."""

    mr: int
    nv: int
    nr: int


@dataclass(frozen=True)
class Kernel:
    """One microkernel choice: the ``fast`` and ``exact`` variants (equal when the fast one is
    exact for every input) and the tile per panel width."""

    fast: str
    exact: str
    tiles: Mapping[int, Tile]

    @property
    def chooses(self) -> bool:
        """Whether the variant is chosen per call by the int16 saturation bound."""
        return self.fast != self.exact


@dataclass(frozen=True)
class IsaPath:
    """One instruction-set path (a row of the table)."""

    name: str
    requires: tuple[str, ...]
    """CPU features (llvmlite names) the path needs, all of them."""
    machines: tuple[str, ...] | None
    """``platform.machine()`` values (lower case) it runs on; ``None``: any."""
    default: Kernel
    """Exact int32 results."""
    saturating: Kernel
    """FBGEMM's AVX2 ``vpmaddubsw`` numbers (int16 pair saturation), bit for bit."""
    ceiling_panel: int
    """Panel width whose ``default.fast`` tile the bench's int8 ceiling measures."""
    parallel_min_macs: int
    """Int8 GEMM calls with fewer multiply-adds (M*N*K) run serially (the measured break-even
    of a parallel region on this path, :mod:`qgemm._tuning`) -- unless their weights reach
    ``parallel_min_weight_bytes``."""
    parallel_min_weight_bytes: int
    """GEMM calls whose packed weights have at least this many bytes run in parallel whatever
    their M: a few-row call streams its weights from L3/DRAM, and two cores stream more than
    one (:mod:`qgemm._tuning`)."""
    half: Tile
    """Register tile of the float16/bfloat16-weight GEMM (:mod:`qgemm._kernels.gemm_half`):
    ``mr`` rows x ``nv`` vectors = ``nr`` (the 16-column half panel); lanes = ``nr // nv``."""

    def parallel(self, macs: int, weight_bytes: int) -> bool:
        """Whether a GEMM call of ``macs`` multiply-adds over ``weight_bytes`` bytes of packed
        weights pays for a parallel region on this path (given more than one thread)."""
        return macs >= self.parallel_min_macs or weight_bytes >= self.parallel_min_weight_bytes

    def kernel(self, saturate: bool) -> Kernel:
        return self.saturating if saturate else self.default

    def tile(self, saturate: bool, npw: int) -> tuple[str, str, Tile]:
        """``(fast variant, exact variant, tile)`` for weights packed ``npw`` columns wide."""
        k = self.saturating if saturate else self.default
        return k.fast, k.exact, k.tiles[npw]

    @property
    def int16_pairs(self) -> bool:
        """Whether the default kernel's fast variant adds ``u8 x s8`` pairs in int16 (so 8-bit
        activations may need its slower exact variant; ``linear(reduce_range=None)`` then
        uses 7-bit activations when the weights could saturate)."""
        return self.default.chooses

    @property
    def ceiling(self) -> tuple[str, Tile]:
        """``(variant, tile)`` of the int8 ceiling measurement (bench)."""
        return self.default.fast, self.default.tiles[self.ceiling_panel]


PANEL_WIDTHS = (16, 64)
"""Packed panel widths: 64 output columns, or 16 for narrow layers (less zero padding)."""


def panel_width(n: int) -> int:
    """Output columns per packed panel for a weight with ``n`` output columns."""
    return 64 if n > 16 else 16


def _frozen(d: dict[int, Tile]) -> Mapping[int, Tile]:
    return MappingProxyType(d)


_X86 = ("x86_64", "amd64")
# AVX2: 4 rows x 2 ymm (16 columns); every panel width is walked 16 columns at a time.
_AVX2_TILES = _frozen({16: Tile(4, 2, 16), 64: Tile(4, 2, 16)})
# Portable: 4 rows x one 16-column block per 16 columns of the panel (LLVM vectorises).
_PORTABLE_TILES = _frozen({16: Tile(4, 1, 16), 64: Tile(4, 4, 64)})
_AVX2_SATURATING = Kernel("avx2s", "avx2s", _AVX2_TILES)

PATHS: tuple[IsaPath, ...] = (
    IsaPath(
        name="portable",
        requires=(),
        machines=None,
        default=Kernel("portable", "portable", _PORTABLE_TILES),
        saturating=Kernel("portables", "portables", _PORTABLE_TILES),
        ceiling_panel=16,
        parallel_min_macs=GEMM_PARALLEL_MIN_MACS_AVX2,
        parallel_min_weight_bytes=GEMM_PARALLEL_MIN_WEIGHT_BYTES_AVX2,
        half=Tile(HALF_MR_AVX2, 2, 16),  # MR only sets the task granularity on this path
    ),
    IsaPath(
        name="avx2",
        requires=("avx2", "fma"),
        machines=_X86,
        # exact: vpmaddwd on the int8 panel widened in registers x int16 activations
        # (measured on Zen 3, one thread, full-range activations, vs the saturating
        # vpmaddubsw: 0.83x at 1024^3, 0.78-0.95x at M <= 6; the int16 twin "avx2w" 0.65x and
        # 0.1-0.4x at M <= 6; the activation split "avx2x" 0.42-0.5x)
        default=Kernel("avx2", "avx2v", _AVX2_TILES),
        saturating=_AVX2_SATURATING,
        ceiling_panel=64,
        parallel_min_macs=GEMM_PARALLEL_MIN_MACS_AVX2,
        parallel_min_weight_bytes=GEMM_PARALLEL_MIN_WEIGHT_BYTES_AVX2,
        half=Tile(HALF_MR_AVX2, 2, 16),
    ),
    IsaPath(
        name="avxvnni",
        requires=("avx2", "fma", "avxvnni"),
        machines=_X86,
        # 6 rows x 2 ymm (16 columns): 12 accumulators + 2 weight vectors + 1 broadcast
        default=Kernel("vnni256", "vnni256", _frozen({16: Tile(6, 2, 16), 64: Tile(6, 2, 16)})),
        saturating=_AVX2_SATURATING,
        ceiling_panel=64,
        parallel_min_macs=GEMM_PARALLEL_MIN_MACS_AVX2,
        parallel_min_weight_bytes=GEMM_PARALLEL_MIN_WEIGHT_BYTES_AVX2,
        half=Tile(HALF_MR_AVX2, 2, 16),
    ),
    IsaPath(
        name="avx512vnni",
        requires=("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512vnni"),
        machines=_X86,
        # 6 rows x 4 zmm (64 columns) for wide panels, 8 rows x 1 zmm for 16-wide ones
        default=Kernel("vnni", "vnni", _frozen({64: Tile(6, 4, 64), 16: Tile(8, 1, 16)})),
        saturating=_AVX2_SATURATING,
        ceiling_panel=64,
        parallel_min_macs=GEMM_PARALLEL_MIN_MACS,
        parallel_min_weight_bytes=GEMM_PARALLEL_MIN_WEIGHT_BYTES,
        half=Tile(HALF_MR_AVX512, 1, 16),
    ),
)
"""Every path, from the most portable to the most specialised (the default is the last one
the host supports)."""

ISA_PATHS: tuple[str, ...] = tuple(p.name for p in PATHS)
_BY_NAME = {p.name: p for p in PATHS}


def path(name: str) -> IsaPath:
    """The table row of path ``name`` (``KeyError`` for an unknown name)."""
    return _BY_NAME[name]


def detect(features: Mapping[str, bool], machine: str) -> tuple[str, ...]:
    """The paths a CPU with ``features`` on ``machine`` can run, most portable first.

    Examples
    --------
    >>> detect({"avx2": True, "fma": True}, "x86_64")
    ('portable', 'avx2')
    >>> detect({"avx2": True, "fma": True}, "aarch64")
    ('portable',)
    """
    m = machine.lower()
    return tuple(
        p.name
        for p in PATHS
        if (p.machines is None or m in p.machines) and all(features.get(f) for f in p.requires)
    )


@lru_cache(maxsize=1)
def cpu_features() -> dict[str, bool]:
    """Host CPU features as llvmlite reports them (``{"avx2": True, ...}``)."""
    import llvmlite.binding as llvm

    try:
        feats = llvm.get_host_cpu_features()
    except RuntimeError:  # pragma: no cover - llvmlite cannot read features on some hosts
        return {}
    return {str(k): bool(v) for k, v in feats.items()}


@lru_cache(maxsize=1)
def cpu_name() -> str:
    """The host CPU's name as LLVM knows it (e.g. ``"znver3"``)."""
    import llvmlite.binding as llvm

    return str(llvm.get_host_cpu_name())


@lru_cache(maxsize=1)
def host_paths() -> tuple[str, ...]:
    """The paths this host supports, most portable first."""
    return detect(cpu_features(), platform.machine())
