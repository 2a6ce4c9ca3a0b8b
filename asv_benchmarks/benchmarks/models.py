"""DLRM inference end to end: qgemm int8 vs the numpy float32 model, torch float32 and torch
int8 (FBGEMM's ``linear_dynamic`` + ``embedding_bag_byte_rowwise_offsets``) on the same
weights and requests (helpers in ``qgemm.bench.models``).

Tables are 8 x 1M rows x dim 64 as in the main job (``python -m qgemm``); bottom MLP
13-512-256-64, top MLP 100-512-256-1, ~20 lookups per bag, fresh indices per call (a cycle of
16 batches).  ``time_build`` measures model creation and int8 conversion.
"""

from qgemm.bench import models as B
from qgemm.models import DLRM

IMPLS = ["qgemm int8", "numpy fp32", "torch fp32", "torch int8"]


class DLRMInference:
    params = ([1, 128], IMPLS)
    param_names = ["batch", "impl"]
    timeout = 600

    def setup(self, batch, impl):
        torch = B._torch()
        if impl.startswith("torch") and torch is None:
            raise NotImplementedError("torch not installed")
        if not hasattr(DLRMInference, "_models"):  # built once per benchmark process
            DLRMInference._models = B.build(B.ROWS)
        model, qmodel = DLRMInference._models
        log = B.requests(model, batch)
        tf = tq = None
        if impl.startswith("torch"):
            tf = B.TorchDLRM(torch, model)
            tq = B.TorchDLRM(torch, model, qmodel)
        self.fn = B.contenders(model, qmodel, log, torch, tf, tq)[impl]
        self.fn()  # warm (compile / load kernels)

    def time_predict(self, batch, impl):
        self.fn()


class DLRMBuild:
    timeout = 300
    number = 1
    repeat = (1, 3, 60.0)

    def time_build_and_quantize(self):
        DLRM.random(tables=8, rows=B.ROWS, dim=64).quantize(bits=8)
