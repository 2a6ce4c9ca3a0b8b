"""Tools around the library: the suites of ``python -m qgemm bench`` and the main job's report.

Nothing in the library imports this package (``import qgemm`` never loads it); the command
line (:mod:`qgemm.cli`) and the asv suite (``asv_benchmarks/``) do.

* :mod:`qgemm.bench._timing` -- medians, alternating rounds, tables, the progress bar;
* :mod:`qgemm.bench.gemm`, :mod:`~qgemm.bench.embedding`, :mod:`~qgemm.bench.averaging`,
  :mod:`~qgemm.bench.models` -- one suite each, a ``run(quick=..., progress=...)`` returning
  a list of :class:`~qgemm.bench._timing.Table`;
* :mod:`qgemm.bench.main_job` -- the DLRM-style int8 inference report of ``python -m qgemm``.

A suite is added by writing its module (with that ``run``) and one line in :data:`SUITES`.
"""

from __future__ import annotations

SUITES: dict[str, str] = {
    "gemm": "qgemm.bench.gemm",
    "embedding": "qgemm.bench.embedding",
    "averaging": "qgemm.bench.averaging",
    "models": "qgemm.bench.models",
    "gemm_half": "qgemm.bench.gemm_half",
    "distributed": "qgemm.bench.distributed",
    "uncertainty": "qgemm.bench.uncertainty",
    "first_call": "qgemm.bench.first_call",
}
"""``python -m qgemm bench --only NAME`` -> the module whose ``run`` builds that suite's tables
(imported only when the suite runs, so a suite's optional peers cost nothing elsewhere)."""

__all__ = ["SUITES"]
