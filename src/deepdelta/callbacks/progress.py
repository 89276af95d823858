"""The progress bar in optimizer steps: ``step 120/300``, not Lightning's ``Epoch 0/-2``."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar counting optimizer steps up to ``trainer.max_steps``. The training stream
    is endless (one epoch, ``max_epochs=-1``), so Lightning's epoch counter read ``Epoch 0/-2`` and its batch
    counter counted micro-batches from wherever a resumed run started."""

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self.trainer.max_steps > 0 else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{'step':{len(self.validation_description)}}"  # as wide as "Validation": the bars line up

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
