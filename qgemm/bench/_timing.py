"""Timing helpers shared by ``python -m qgemm bench`` and the asv suite.

Rules they encode (see README, "Benchmarking"): medians, never means; peers timed in the same
run with their blocks *alternated* and a pause between blocks of different runtimes (torch's
OpenMP, ONNX Runtime's and Numba's worker threads spin-wait after a call and steal a core of
a 2-core machine); ratios taken from the same run.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

PAUSE_SECONDS = 0.15


def median_time(fn: Callable[[], Any], *, min_time: float = 0.02, repeat: int = 7) -> float:
    """Median seconds per call of ``fn()``: ``repeat`` samples, each long enough (``min_time``)
    to swamp the timer.  ``fn`` is called once first (warm-up, compile)."""
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    number = max(1, int(min_time / one))
    samples = []
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            samples.append((time.perf_counter() - t0) / number)
    finally:
        if gc_was:
            gc.enable()
    return statistics.median(samples)


def compare(
    contenders: dict[str, Callable[[], Any]],
    *,
    rounds: int = 3,
    min_time: float = 0.02,
    repeat: int = 5,
    pause: float = PAUSE_SECONDS,
) -> dict[str, float]:
    """Median seconds per call of each contender, timed in alternating rounds with a pause
    between blocks.  Returns ``{name: seconds}`` (median over all samples of all rounds)."""
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            time.sleep(pause)
            samples[name].append(median_time(fn, min_time=min_time, repeat=repeat))
    return {k: statistics.median(v) for k, v in samples.items()}


@dataclass
class Table:
    """One benchmark table: a title, column names and rows (lists of cells)."""

    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "columns": self.columns,
            "rows": [dict(zip(self.columns, r, strict=False)) for r in self.rows],
            "notes": self.notes,
        }

    def render(self) -> str:
        def fmt(v: Any) -> str:
            if isinstance(v, float):
                if v != v:  # NaN: peer missing
                    return "-"
                return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
            return "-" if v is None else str(v)

        cells = [[fmt(v) for v in r] for r in self.rows]
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(self.columns)]
        line = "  ".join(c.rjust(w) for c, w in zip(self.columns, widths, strict=True))
        out = [self.title, line, "-" * len(line)]
        out += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
        out += [f"  note: {n}" for n in self.notes]
        return "\n".join(out)


def geomean(values: Sequence[float]) -> float:
    vals = [v for v in values if v == v and v > 0]
    if not vals:
        return float("nan")
    return float(statistics.geometric_mean(vals))


class Progress:
    """A minimal progress bar on stderr (no dependency); silent when ``enabled`` is False."""

    def __init__(
        self, total: int, label: str = "", enabled: bool = True, stream: TextIO | None = None
    ):
        self.total = max(1, total)
        self.done = 0
        self.label = label
        self.enabled = enabled
        self.stream = stream or sys.stderr

    def close(self) -> None:
        """End the bar's line (for bars whose total was not known up front)."""
        if self.enabled and self.done and self.done != self.total:
            self.stream.write("\n")
            self.stream.flush()

    def step(self, what: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.total <= 1 and self.done > self.total:  # total unknown: a counter
            msg = f"\r{self.label} {self.done} done {what}"[:110]
        else:
            width = 28
            filled = int(width * min(self.done, self.total) / self.total)
            bar = "#" * filled + "." * (width - filled)
            msg = f"\r{self.label} [{bar}] {self.done}/{self.total} {what}"[:110]
        self.stream.write(msg.ljust(110))
        self.stream.flush()
        if self.done == self.total and self.total > 1:
            self.stream.write("\n")
            self.stream.flush()


def peer_torch() -> Any:
    """torch set up as the peer (engine ``fbgemm``, qgemm's thread count), or None when it is
    not installed."""
    try:
        import torch
    except ImportError:
        return None
    from .. import _config

    torch.backends.quantized.engine = "fbgemm"
    torch.set_num_threads(_config.get_num_threads())
    return torch
