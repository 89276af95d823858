"""Tokens/s, FLOPs/s and MFU through Lightning's ThroughputMonitor."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.utilities.rank_zero import rank_zero_only


class TokenThroughput(ThroughputMonitor):
    """ThroughputMonitor that counts tokens: ``train/items_per_sec`` is global tokens/s,
    ``train/device/items_per_sec`` per device; FLOPs come from the module's
    ``flops_per_batch`` (the analytic estimate of `deepdelta.model.accounting`).

    Lightning's monitor synchronises the GPU after every training batch so that each
    timestamp is exact; that stalls the host's kernel launches once a step. Here batches
    are only counted, and the clock is read (after a synchronise) on the steps that log:
    rates over ``window_size`` logged steps are as exact, at one sync per logging interval."""

    def __init__(self, **kwargs: Any):
        super().__init__(batch_size_fn=_rows, length_fn=_tokens, **kwargs)

    @rank_zero_only
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           *args: Any) -> None:  # fmt: skip
        if trainer.fit_loop._should_accumulate() or not trainer._logger_connector.should_update_logs:
            stage = trainer.state.stage
            self._lengths[stage] += _tokens(batch)
            self._samples[stage] += _rows(batch)
            self._batches[stage] += 1
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, *args)


def _rows(batch: Any) -> int:
    return batch[0].shape[0]


def _tokens(batch: Any) -> int:
    return batch[0].numel()
