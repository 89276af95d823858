"""Peak memory of training, for the cost columns of the report (the paper's Table 4)."""

from __future__ import annotations

import resource
import sys
from typing import Any

import lightning as L
import torch


class PeakMemory(L.Callback):
    """Logs ``train/peak_mem_gb``: the peak CUDA memory allocated by this process on its
    device (what the paper reports), or on CPU the process's peak resident set size."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        pl_module.log("train/peak_mem_gb", peak_memory_gb(pl_module.device))


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9
