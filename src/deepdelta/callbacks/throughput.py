"""Tokens/s, FLOPs/s and MFU through Lightning's ThroughputMonitor."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.rank_zero import rank_zero_only


class TokenThroughput(ThroughputMonitor):
    """ThroughputMonitor that counts tokens: ``train/items_per_sec`` is global tokens/s,
    ``train/device/items_per_sec`` per device; FLOPs come from the module's
    ``flops_per_batch`` (the analytic estimate of `deepdelta.model.accounting`).

    Lightning's monitor synchronises the GPU after every training batch so that each
    timestamp is exact; that stalls the host's kernel launches once a step. Here batches
    are only counted, and the clock is read (after a synchronise) on the steps that log:
    rates over ``window_size`` logged steps are as exact, at one sync per logging interval.

    Its counters (``train/time``, ``train/samples``, ...) are kept in checkpoints, so a resumed
    run goes on counting where it stopped (training time only: the time it was down is not in it)."""

    def __init__(self, **kwargs: Any):
        super().__init__(batch_size_fn=_rows, length_fn=_tokens, **kwargs)
        self._resumed: dict[str, float] = {}

    @property
    def state_key(self) -> str:
        return "deepdelta.TokenThroughput"

    def state_dict(self) -> dict[str, float]:
        stage = RunningStage.TRAINING
        if stage not in self._t0s:  # ranks > 0 keep no counters (the monitor is rank-zero only)
            return {}
        return {
            "elapsed": time.perf_counter() - self._t0s[stage],
            "samples": self._samples[stage],
            "lengths": self._lengths[stage],
            "batches": self._batches[stage],
        }

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self._resumed = dict(state_dict)

    @rank_zero_only
    def on_train_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_start(trainer, *args)
        if self._resumed:
            stage = trainer.state.stage
            self._t0s[stage] -= self._resumed["elapsed"]
            self._samples[stage] = int(self._resumed["samples"])
            self._lengths[stage] = int(self._resumed["lengths"])
            self._batches[stage] = int(self._resumed["batches"])

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
