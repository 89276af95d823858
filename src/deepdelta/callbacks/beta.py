"""β per layer and sublayer, every N steps, on a fixed probe batch."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only


class BetaMonitor(L.Callback):
    """Logs ``beta/{layer}.{attn|mlp}/mean`` and ``/std`` as metrics (every logger, the
    CSV copy included) and the per-token β distribution as W&B histograms.

    The probe batch is the first validation batch, fixed for the whole run, so successive
    points differ only by training. Additive runs have no gate and log nothing.
    """

    def __init__(self, every_n_steps: int = 50, max_tokens: int = 8192):
        super().__init__()
        self.every_n_steps = every_n_steps
        self.max_tokens = max_tokens
        self._probe: torch.Tensor | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.config.residual == "additive":
            return
        loader = trainer.datamodule.val_dataloader() if trainer.datamodule else None
        if loader is None:
            return
        x = next(iter(loader))[0]
        rows = max(1, self.max_tokens // x.shape[1])
        self._probe = x[:rows]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self._probe is None or step % self.every_n_steps or trainer.fit_loop._should_accumulate():
            return
        self.log_probe(trainer, pl_module, step)

    @rank_zero_only
    def log_probe(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        was_training = pl_module.training
        pl_module.eval()
        try:
            probes = pl_module.model.probe(self._probe.to(pl_module.device))
        finally:
            pl_module.train(was_training)
        metrics = {}
        for name, rec in probes.items():
            beta = rec["beta"]
            metrics[f"beta/{name}/mean"] = beta.mean().item()
            metrics[f"beta/{name}/std"] = beta.std().item()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if isinstance(logger, WandbLogger):
                import wandb

                hist = {f"beta_hist/{n}": wandb.Histogram(r["beta"].flatten().cpu().numpy()) for n, r in probes.items()}
                logger.experiment.log({**hist, "trainer/global_step": step})
