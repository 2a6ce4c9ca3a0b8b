"""qgemm beyond one machine, on Dask distributed.

- :func:`average`: weighted averages of parameter sets computed where the models live (a
  tree of partial sums on the workers; the reduction core of :mod:`qgemm.training.reduction`);
  between workers of one host a partial goes through shared memory
  (:func:`release_shared_memory` frees what is kept for the next reduction).
- :func:`train_decentralized` with :class:`Site`: decentralised training, each site's data
  made and kept on its own worker, only models travel; per-round bytes moved.
- :class:`ShardedDLRM`: a DLRM served with its tables sharded over workers (table-wise, and
  row-wise for a table too big for one worker).
- :func:`predict`: batch inference over a dask array or data frame, model broadcast once.
- :func:`run_main_job_inference`: the main job's throughput per worker count.
- :func:`local_cluster` / :func:`worker_environ`: a ``LocalCluster`` (or the environment for
  workers started by hand) with qgemm's thread count and glibc's default heap trimming.

Importing :mod:`qgemm` never imports this package (nor Dask); this package imports qgemm.
Install with ``pip install 'qgemm[distributed]'``.
"""

from __future__ import annotations

try:
    import distributed as _distributed  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised without dask installed
    raise ImportError(
        "qgemm.distributed needs Dask distributed: pip install 'qgemm[distributed]'"
    ) from e

from ._average import average, release_shared_memory
from ._common import local_cluster, worker_environ
from ._predict import predict, run_main_job_inference
from ._sharded import ShardedDLRM, row_ranges, shard_contents
from ._training import Site, SiteLostWarning, train_decentralized

__all__ = [
    "average",
    "release_shared_memory",
    "train_decentralized",
    "Site",
    "SiteLostWarning",
    "ShardedDLRM",
    "row_ranges",
    "shard_contents",
    "predict",
    "run_main_job_inference",
    "local_cluster",
    "worker_environ",
]
