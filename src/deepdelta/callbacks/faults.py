"""Test-only fault injection, switched on by environment variables (never by config), read by the runner.

DEEPDELTA_FAULT_NAN=STEP:LAYER   during optimizer step STEP (1-based) the output of layer LAYER's attention
                                 norm is multiplied by NaN, so β, ‖k̃‖, the loss and the gradients go
                                 non-finite from that layer on; the weights are untouched (a transient fault).
DEEPDELTA_FAULT_CKPT_STALL=STEP  a checkpoint write at step >= STEP stalls half-way (see checkpoint.py).
DEEPDELTA_FAULT_KILL=STEP        the process SIGKILLs itself as optimizer step STEP (1-based) starts: a hard
                                 crash at a known point, after the steps since the last checkpoint were logged.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


def fault_callbacks() -> list[Callback]:
    """The fault injectors requested by the environment (none in normal use)."""
    faults: list[Callback] = []
    spec = os.environ.get("DEEPDELTA_FAULT_NAN")
    if spec:
        step, _, layer = spec.partition(":")
        faults.append(InjectNaN(int(step), int(layer or 0)))
    kill = os.environ.get("DEEPDELTA_FAULT_KILL")
    if kill:
        faults.append(KillAt(int(kill)))
    return faults


class KillAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step + 1 == self.step:
            print(f"FAULT: SIGKILL at the start of step {self.step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


class InjectNaN(Callback):
    def __init__(self, step: int, layer: int = 0):
        self.step, self.layer = step, layer
        self._handle: Any = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step + 1 == self.step:
            norm = pl_module.model.blocks[self.layer].norm_attn
            self._handle = norm.register_forward_hook(lambda module, args, out: out * float("nan"))
            print(f"FAULT: NaN injected at step {self.step}, layer {self.layer}", flush=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._remove()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._remove()

    def _remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
