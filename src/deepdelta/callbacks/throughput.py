"""Tokens/s, FLOPs/s and MFU through Lightning's ThroughputMonitor."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ThroughputMonitor


class TokenThroughput(ThroughputMonitor):
    """ThroughputMonitor that counts tokens: ``train/items_per_sec`` is global tokens/s,
    ``train/device/items_per_sec`` per device; FLOPs come from the module's
    ``flops_per_batch`` (the analytic estimate of `deepdelta.model.accounting`)."""

    def __init__(self, **kwargs: Any):
        super().__init__(batch_size_fn=_rows, length_fn=_tokens, **kwargs)


def _rows(batch: Any) -> int:
    return batch[0].shape[0]


def _tokens(batch: Any) -> int:
    return batch[0].numel()
