"""Lightning's DDP strategy, set up the way the compiled fast path needs it."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy as LightningDDP
from torch.nn import Module
from torch.nn.parallel import DistributedDataParallel


class DDPStrategy(LightningDDP):
    """Lightning's ``DDPStrategy`` with two choices the fast path measured:

    ``side_stream`` (Lightning builds DDP under a fresh CUDA stream; ``False`` builds it on the
    stream that runs forward and backward, so that DDP's stashed AccumulateGrad nodes do not
    ask the autograd engine to synchronise streams every step: PyTorch warns "AccumulateGrad
    node's stream does not match"). ``split_graphs`` (TorchDynamo's DDP optimizer splits each
    compiled region at DDP's bucket boundaries so that all-reduces start inside it; with one
    compiled region per block the block boundaries already let them start).

    With both, the all-reduced gradients are the ones a plain all-reduce after a device
    synchronisation gives, bitwise, and no DDP option (static graph, bucket views, bucket size,
    comm hooks, buffer broadcast, unused-parameter search) changes them; on 2 × H200 they are
    0–6.6e-4 from one GPU's accumulated gradients, against 1.7–2.0e-3 between two one-GPU splits
    of the same batch (tests/test_ddp_parity.py, 10 runs; docs/benchmarks.md, issue 18).
    """

    def __init__(self, side_stream: bool = False, split_graphs: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        self.side_stream = side_stream
        torch._dynamo.config.optimize_ddp = bool(split_graphs)

    def _setup_model(self, model: Module) -> DistributedDataParallel:
        if self.side_stream:
            return super()._setup_model(model)
        return DistributedDataParallel(module=model, device_ids=self.determine_ddp_device_ids(), **self._ddp_kwargs)
