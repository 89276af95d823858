"""trainer=ddp: Lightning's DDP with DDP built on the training stream and whole compiled blocks
(deepdelta.distributed; measured in docs/benchmarks.md). The 2-process runs: test_scaling.py, test_distributed.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy as LightningDDP

from deepdelta.distributed import DDPStrategy

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture(autouse=True)
def dynamo_ddp_default():
    """The strategy sets a process-wide Dynamo flag: start each test from Dynamo's default."""
    with torch._dynamo.config.patch(optimize_ddp=True):
        yield


def test_trainer_ddp_uses_the_training_stream_and_whole_blocks():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["trainer=ddp"])
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, DDPStrategy) and isinstance(strategy, LightningDDP)
    assert strategy.side_stream is False
    assert torch._dynamo.config.optimize_ddp is False  # Dynamo does not split compiled blocks at buckets


def test_setup_model_builds_ddp_on_the_current_stream(monkeypatch):
    """Lightning enters ``torch.cuda.stream(torch.cuda.Stream())`` around DDP's constructor;
    ours must not (PyTorch's AccumulateGrad stream-mismatch warning and its syncs)."""
    built: list[dict] = []

    class FakeDDP:
        def __init__(self, module, device_ids, **kwargs):
            built.append({"device_ids": device_ids, **kwargs})

    def no_new_stream(*args, **kwargs):
        raise AssertionError("DDP must be built on the current stream, not a new one")

    monkeypatch.setattr("deepdelta.distributed.DistributedDataParallel", FakeDDP)
    monkeypatch.setattr(torch.cuda, "Stream", no_new_stream)
    strategy = DDPStrategy(find_unused_parameters=False)
    monkeypatch.setattr(strategy, "determine_ddp_device_ids", lambda: [0])
    strategy._setup_model(torch.nn.Linear(2, 2))
    assert built == [{"device_ids": [0], "find_unused_parameters": False}]
