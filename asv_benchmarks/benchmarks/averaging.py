"""Model averaging: ``qgemm.average`` vs the plain numpy loop over dicts.

The issue's case: 8 models x 50M float32 parameters.  ``time_average`` streams the models
through a generator (peak memory: one float64 accumulator + one model) or passes them as an
in-memory list (one pass over all models, no accumulator); ``peakmem_average`` makes each
model inside the generator, so the peak is what the averaging itself holds.  The GB/s
``track_`` benchmarks compare against this machine's read bandwidth, measured in the same
process (a sum over a 1 GiB array).
"""

import numpy as np

import qgemm.averaging as qa
from qgemm.bench import averaging as B

N_MODELS = B.N_MODELS
LAYOUT = B.layout(B.N_PARAMS)
N_PARAMS = B.n_params_of(LAYOUT)
WEIGHTS = [float(i + 1) for i in range(N_MODELS)]


def _warm():
    small = [{"a": np.ones(300_000, np.float32), "b": np.ones(3, np.float32)} for _ in range(8)]
    qa.average(iter(small), WEIGHTS)
    qa.average(small, WEIGHTS)


def _impl(impl, models):
    if impl == "qgemm":
        return qa.average(models, WEIGHTS)
    return B.numpy_average(models, WEIGHTS)


class Average8x50M:
    params = (["qgemm", "numpy"], ["generator", "list"])
    param_names = ["impl", "source"]
    timeout = 900
    number = 1
    repeat = (3, 7, 120.0)
    warmup_time = 0

    def setup(self, impl, source):
        _warm()
        self.pool = [B.make_model(LAYOUT, i) for i in range(N_MODELS)]

    def _models(self, source):
        return B.pooled_models(self.pool, N_MODELS) if source == "generator" else self.pool

    def time_average(self, impl, source):
        _impl(impl, self._models(source))

    def track_model_gbytes_per_s(self, impl, source):
        import time

        _impl(impl, self._models(source))
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            _impl(impl, self._models(source))
            ts.append(time.perf_counter() - t0)
        return N_MODELS * N_PARAMS * 4 / float(np.median(ts)) / 1e9

    track_model_gbytes_per_s.unit = "GB/s"

    def track_fraction_of_read_bandwidth(self, impl, source):
        bw = B.measure_read_bandwidth()["best"]
        return self.track_model_gbytes_per_s(impl, source) / bw

    track_fraction_of_read_bandwidth.unit = "fraction"


class AveragePeakMemory:
    """Models made one at a time inside the generator: the peak is the averaging's own."""

    params = ["qgemm", "numpy"]
    param_names = ["impl"]
    timeout = 900

    def setup(self, impl):
        _warm()

    def peakmem_average_generator(self, impl):
        _impl(impl, B.fresh_models(LAYOUT, N_MODELS))

    def track_peak_over_accumulator_plus_model(self, impl):
        """Peak added memory / (float64 accumulator + one float32 model); 1.0 is the design."""
        peak = B.measure_peak_bytes(lambda: _impl(impl, B.fresh_models(LAYOUT, N_MODELS)))
        if peak is None:
            raise NotImplementedError("needs Linux /proc/self/clear_refs")
        return peak / (3 * N_PARAMS * 4)

    track_peak_over_accumulator_plus_model.unit = "ratio"


class ReadBandwidth:
    timeout = 300

    def track_read_gbytes_per_s(self):
        return B.measure_read_bandwidth()["best"]

    track_read_gbytes_per_s.unit = "GB/s"


class CompileTime:
    """First averaging call in a fresh process (Numba disk cache warm after the first run)."""

    timeout = 300

    def time_first_average_call(self):
        import subprocess
        import sys

        code = (
            "import numpy as np, qgemm.averaging as a;"
            "a.average([{'w': np.ones(10, np.float32)}] * 2)"
        )
        subprocess.run([sys.executable, "-c", code], check=True)
