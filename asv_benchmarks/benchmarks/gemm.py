"""int8 GEMM: qgemm vs FBGEMM (torch, engine fbgemm), ONNX Runtime (MLAS) and numpy float32
over FBGEMM's own benchmark shapes; packing, compile time and the machine's int8 ceiling.

The inputs and peers come from ``qgemm.bench.gemm`` (the same code as ``python -m qgemm
bench --only gemm``).  Peers that are not installed are skipped (``NotImplementedError``).
"""

from qgemm.bench import gemm as bg
from qgemm.gemm import pack_weight

SHAPES = {f"m{m}_n{n}_k{k}": (m, n, k) for m, n, k in bg.SHAPES}


def _peer_fn(case, impl, kind):
    if impl == "qgemm":
        return case.qgemm_static() if kind == "static" else case.qgemm_dynamic()
    if impl == "numpy":
        return case.numpy_f32()
    if impl == "fbgemm":
        torch = bg._torch()
        if torch is None:
            raise NotImplementedError("torch not installed")
        return case.torch_static(torch) if kind == "static" else case.torch_dynamic(torch)
    if impl == "ort":
        if not bg._ort():
            raise NotImplementedError("onnxruntime not installed")
        return case.ort_static() if kind == "static" else case.ort_dynamic()
    raise NotImplementedError(impl)


class QuantizedLinear:
    """Static: uint8 in, uint8 out (bias, ReLU); ORT's QLinearMatMul has no bias/ReLU."""

    params = (list(SHAPES), ["qgemm", "fbgemm", "ort"])
    param_names = ["shape", "impl"]
    timeout = 300

    def setup(self, shape, impl):
        self.case = bg.Case(*SHAPES[shape])
        self.fn = _peer_fn(self.case, impl, "static")
        self.fn()

    def time_quantized_linear(self, shape, impl):
        self.fn()

    def track_gops(self, shape, impl):
        import timeit

        n, t = timeit.Timer(self.fn).autorange()
        m, nn, k = SHAPES[shape]
        return 2.0 * m * nn * k * n / t / 1e9

    track_gops.unit = "GOPS"


class DynamicLinear:
    """Dynamic: float32 in/out (bias); numpy float32 ``x @ w.T + b`` for reference."""

    params = (list(SHAPES), ["qgemm", "fbgemm", "ort", "numpy"])
    param_names = ["shape", "impl"]
    timeout = 300

    def setup(self, shape, impl):
        self.case = bg.Case(*SHAPES[shape])
        self.fn = _peer_fn(self.case, impl, "dynamic")
        self.fn()

    def time_linear(self, shape, impl):
        self.fn()


class PackWeight:
    params = (["n128_k128", "n1024_k1024", "n4096_k2048"], ["qgemm", "fbgemm"])
    param_names = ["shape", "impl"]

    def setup(self, shape, impl):
        n, k = (int(p[1:]) for p in shape.split("_"))
        self.case = bg.Case(1, n, k)
        if impl == "qgemm":
            codes, qp = self.case.pw.unpack(), self.case.pw.qparams
            self.fn = lambda: pack_weight(codes, qparams=qp)
        else:
            torch = bg._torch()
            if torch is None:
                raise NotImplementedError("torch not installed")
            self.case.torch_packed(torch)
            qw, b = self.case._tqw, torch.from_numpy(self.case.bias)
            self.fn = lambda: torch.ops.quantized.linear_prepack(qw, b)
        self.fn()

    def time_pack(self, shape, impl):
        self.fn()


class Ceiling:
    """This machine's int8 ceiling (register tile on L1-resident data, all threads)."""

    def track_int8_ceiling(self):
        return bg.int8_ceiling()

    track_int8_ceiling.unit = "GOPS"


class Compile:
    """First call of a requant + a dynamic kernel in a fresh process: cold (empty Numba cache)
    and warm (on-disk cache filled by the cold run)."""

    def track_compile_cold_and_warm(self):
        t = bg.compile_times()
        return float(t.rows[0][1])

    track_compile_cold_and_warm.unit = "s (cold)"

    def track_load_warm(self):
        t = bg.compile_times()
        return float(t.rows[1][1])

    track_load_warm.unit = "s (warm)"
