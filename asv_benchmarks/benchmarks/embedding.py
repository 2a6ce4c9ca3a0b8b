"""Embedding bags: qgemm.embedding_bag vs torch (``F.embedding_bag`` for fp32 tables,
``quantized::embedding_bag_{byte,4bit}_rowwise_offsets`` on the same fused bytes), mode sum.

Configs (rows, dim, bags, pooling) from the issue; ``same`` reuses the indices every call
(rows stay cache-resident), ``fresh`` cycles through enough index sets that rows come from
DRAM.  Tables are built once per process (module cache).  ``python -m qgemm bench --only
embedding`` prints the same comparison as one table, with effective bandwidth.
"""

import numpy as np

import qgemm
from qgemm.bench.embedding import Tables, contenders, fresh_count, index_sets, row_bytes
from qgemm.embedding import embedding_bag

CONFIGS = {
    "r1M_d64_b512_p40": (1_000_000, 64, 512, 40),
    "r1M_d128_b2048_p20": (1_000_000, 128, 2048, 20),
    "r4M_d64_b1024_p30": (4_000_000, 64, 1024, 30),
    "r100k_d32_b128_p100": (100_000, 32, 128, 100),
}
_TABLES = {}


def _tables(rows, dim):
    key = (rows, dim)
    if key not in _TABLES:
        _TABLES.clear()  # keep one config's tables in memory at a time
        _TABLES[key] = Tables(rows, dim)
    return _TABLES[key]


def _torch():
    try:
        import torch
    except ImportError:
        raise NotImplementedError("torch is not installed") from None
    torch.set_num_threads(qgemm.get_num_threads())
    return torch


class EmbeddingBag:
    params = (list(CONFIGS), ["fp32", "8-bit", "4-bit"], ["qgemm", "torch"], ["same", "fresh"])
    param_names = ["config", "table", "impl", "indices"]
    timeout = 600

    def setup(self, config, table, impl, indices):
        rows, dim, bags, pooling = CONFIGS[config]
        torch = _torch() if impl == "torch" else None
        count = 1 if indices == "same" else fresh_count(table, dim, bags, pooling)
        sets = index_sets(rows, bags, pooling, count)
        fns = contenders(_tables(rows, dim), table, sets, bags, pooling, torch)
        self.fn = fns[impl]
        self.bytes = bags * pooling * row_bytes(table, dim)
        for _ in range(3):
            self.fn()  # compile / warm

    def time_embedding_bag(self, config, table, impl, indices):
        self.fn()

    def track_gbytes_per_s(self, config, table, impl, indices):
        import timeit

        n, t = timeit.Timer(self.fn).autorange()
        return self.bytes * n / t / 1e9

    track_gbytes_per_s.unit = "GB/s"


class EmbeddingBagLatency:
    """One bag of 40 rows: call overhead dominates."""

    params = (["fp32", "8-bit", "4-bit"], ["qgemm", "torch"])
    param_names = ["table", "impl"]

    def setup(self, table, impl):
        torch = _torch() if impl == "torch" else None
        sets = index_sets(200_000, 1, 40, 1)
        self.fn = contenders(_tables(200_000, 64), table, sets, 1, 40, torch)[impl]
        self.fn()

    def time_single_bag(self, table, impl):
        self.fn()


class EmbeddingBagModes:
    """mean and max (qgemm only: torch's quantized ops ignore mode) on a 4-bit table."""

    params = (["sum", "mean", "max"],)
    param_names = ["mode"]

    def setup(self, mode):
        rng = np.random.default_rng(0)
        self.q = qgemm.quantize_rowwise(rng.standard_normal((200_000, 64), np.float32), bits=4)
        self.idx = rng.integers(0, 200_000, 512 * 40)
        self.offsets = np.arange(512) * 40
        embedding_bag(self.q, self.idx, self.offsets, mode=mode)

    def time_mode(self, mode):
        embedding_bag(self.q, self.idx, self.offsets, mode=mode)


class EmbeddingCompileTime:
    """First embedding_bag call in a fresh process (kernel load from Numba's disk cache)."""

    timeout = 300

    def time_first_call(self):
        import subprocess
        import sys

        code = (
            "import numpy as np\n"
            "from qgemm.embedding import embedding_bag\n"
            "t=np.ones((10,64),np.float32)\n"
            "embedding_bag(t, np.arange(10), np.array([0, 5]))\n"
        )
        subprocess.check_call([sys.executable, "-c", code])
