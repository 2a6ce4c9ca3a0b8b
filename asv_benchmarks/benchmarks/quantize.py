"""Quantization primitives: throughput of quantize / dequantize / quantize_rowwise.

Numbers to compare against: numpy's multi-pass equivalent (``np.clip(np.rint(x / s) + zp)``)
timed in the same run, and torch's ``quantize_per_tensor`` / rowwise prepack when installed.
"""

import numpy as np

import qgemm


class QuantizePerTensor:
    params = ([1 << 16, 1 << 22], ["qgemm", "numpy", "torch"])
    param_names = ["size", "impl"]

    def setup(self, size, impl):
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal(size).astype(np.float32)
        self.qp = qgemm.choose_qparams(self.x)
        s, z = float(self.qp.scale), int(self.qp.zero_point)
        if impl == "qgemm":
            self.fn = lambda: qgemm.quantize(self.x, self.qp)
        elif impl == "numpy":
            self.fn = lambda: np.clip(np.rint(self.x / np.float32(s)) + z, 0, 255).astype(np.uint8)
        else:
            try:
                import torch
            except ImportError:
                raise NotImplementedError("torch not installed") from None
            t = torch.from_numpy(self.x)
            self.fn = lambda: torch.quantize_per_tensor(t, s, z, torch.quint8)
        self.fn()  # compile / warm

    def time_quantize(self, size, impl):
        self.fn()

    def track_gbytes_per_s(self, size, impl):
        import timeit

        n, t = timeit.Timer(self.fn).autorange()
        return self.x.nbytes * 1.25 * n / t / 1e9

    track_gbytes_per_s.unit = "GB/s"


class Dequantize:
    params = [1 << 16, 1 << 22]
    param_names = ["size"]

    def setup(self, size):
        rng = np.random.default_rng(0)
        x = rng.standard_normal(size).astype(np.float32)
        self.qp = qgemm.choose_qparams(x, dtype="int8", symmetric=True)
        self.q = qgemm.quantize(x, self.qp)
        qgemm.dequantize(self.q, self.qp)

    def time_dequantize(self, size):
        qgemm.dequantize(self.q, self.qp)


class QuantizeRowwise:
    params = ([8, 4, 2], [32, 128])
    param_names = ["bits", "dim"]

    def setup(self, bits, dim):
        rng = np.random.default_rng(0)
        self.table = rng.standard_normal((100_000, dim), dtype=np.float32)

    def time_quantize_rowwise(self, bits, dim):
        qgemm.quantize_rowwise(self.table, bits=bits)


class CompileTime:
    """First call of a kernel in this process (Numba disk cache warm after the first run)."""

    timeout = 300

    def time_first_quantize_call(self):
        import subprocess
        import sys

        code = (
            "import numpy as np, qgemm\n"
            "x=np.ones(8,np.float32); qgemm.quantize(x, qgemm.choose_qparams(x))\n"
        )
        subprocess.check_call([sys.executable, "-c", code])
