"""The LightningModule: next-token loss, validation metrics, AdamW + warmup/cosine."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric

from deepdelta.data.synthetic import AnswerAccuracy
from deepdelta.model import DeltaTransformer, ModelConfig, flops_per_token
from deepdelta.model.fastpath import compile_model, configure_torch, make_optimizer


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class DeltaLM(L.LightningModule):
    """Wraps a `DeltaTransformer`; ``model`` holds the ModelConfig fields, ``optim`` the
    optimiser and schedule settings (lr, weight_decay, betas, warmup_steps, min_lr_ratio)."""

    def __init__(self, model: dict[str, Any], optim: dict[str, Any], compile: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.config = ModelConfig(**model)
        self.model = DeltaTransformer(self.config)
        self.optim = dict(optim)
        self.compile = compile
        self._compiled = False
        self.val_loss = MeanMetric()
        self.val_answer_acc = AnswerAccuracy()  # whole answers right, for synthetic probes
        self.tokens_per_step = 0  # set on the first batch: micro-batch tokens × world × accumulation
        self.flops_per_token = 0  # analytic, at the training sequence length
        self.flops_per_batch = 0  # read by Lightning's ThroughputMonitor (per device)
        self.last_loss: Tensor | None = None

    def configure_model(self) -> None:
        # the bench's fast path (deepdelta.model.fastpath): each block compiled once, fullgraph
        if self.compile and not self._compiled:
            configure_torch()
            compile_model(self.model, regional=True)
            self._compiled = True

    def forward(self, idx: Tensor) -> Tensor:
        return self.model(idx)

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        if not self.tokens_per_step:
            self.flops_per_token = flops_per_token(self.config, x.shape[1])
            self.flops_per_batch = self.flops_per_token * x.numel()
            self.tokens_per_step = x.numel() * self.trainer.world_size * self.trainer.accumulate_grad_batches
        loss = self.model.loss(x, y)
        self.last_loss = loss.detach()  # read by DivergenceGuard before the optimizer step
        step = self.global_step + 1
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # the global batch's loss under DDP
        self.log("train/tokens", float(step * self.tokens_per_step))
        self.log("train/flops", float(step * self.tokens_per_step * self.flops_per_token))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Lightning validates every val_check_interval steps only, so a run of 150 steps at interval 100 ended
        # measured at step 100. Asking it to stop at the last step makes it validate there (once, also when
        # the step is a validation step anyway), whatever max_steps and the interval are.
        trainer = self.trainer
        if 0 < trainer.max_steps <= trainer.global_step and not trainer.fit_loop._should_accumulate():
            trainer.should_stop = True

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        if len(batch) > 2:  # synthetic probes: one forward for the loss and the exact-answer accuracy
            logits = self.model(x)
            self.val_loss.update(F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()), weight=y.numel())
            self.val_answer_acc.update(logits, y, batch[2])
            self.log("val/answer_acc", self.val_answer_acc, on_epoch=True)
        else:
            self.val_loss.update(self.model.loss(x, y), weight=y.numel())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log_dict({"val/loss": loss, "val/ppl": torch.exp(loss)}, prog_bar=True, sync_dist=False)
        self.val_loss.reset()

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:  # fmt: skip
        # Lightning refuses to clip for fused optimizers under mixed precision because fp16's
        # grad scaler would need unscaling first; bf16 and fp32 have no scaler, so clip directly.
        if self.trainer.precision.startswith("16"):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.optim
        fused = self.device.type == "cuda" and not self.trainer.precision.startswith("16")  # fp16: the scaler's path
        optimizer = make_optimizer(self.model, o["lr"], o["weight_decay"], tuple(o["betas"]), fused=fused)
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else o.get("total_steps", 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, o["warmup_steps"], total, o["min_lr_ratio"])
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
