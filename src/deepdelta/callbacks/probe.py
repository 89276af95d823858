"""The mechanism probe: what the gate, the direction k and the discrepancy do, every N steps.

On a fixed probe batch (the first validation batch, so successive points differ only by
training) one `model.probe()` forward gives per sublayer β, ‖k̃‖, k̂ and e_pre;
`deepdelta.analysis.mechanism.probe_stats` turns them into numbers. They go

- to every Lightning logger as ``{beta|k|e_pre}/{layer}.{attn|mlp}/{stat}`` (so the CSV
  copy has them too), plus ``probe/seconds``, the callback's own cumulative cost;
- to W&B as β histograms per sublayer (``beta_hist/...``) and, at the end of training,
  a layer × step heatmap of mean β (``beta_heatmap``) and the table (``probes``);
- to ``probes.csv`` in the run directory: one row per step × sublayer.

For the Hyper-Connection rules (``residual=hc|mhc``, no gate) the probe is
`model.probe_mixing()` instead, and `deepdelta.analysis.mechanism.mixing_stats` gives per
sublayer the mixing matrix's distance from identity (mean and std over tokens), the entropy of
the read weights and mHC's Sinkhorn residual: logged as ``mix/{layer}.{attn|mlp}/{dist|dist_std|
read_entropy|sinkhorn_residual}``, written to ``probes.csv`` as the ``mix_*`` columns, and at the
end a layer × step heatmap of the distance (``mix_heatmap``) and the table go to W&B.

Rank 0 only. Additive runs have no gate and no mixing: the callback says so once and does nothing.

A run resumed from a checkpoint at step S replays the steps after it: ``probes.csv`` keeps the rows of
the steps before S and the probe of step S (taken just before the checkpoint, which Lightning saves after
every other callback) is done again at the start, with the state of the probe before it (the checkpoint
holds it), so the table and the logged metrics come out as in an uninterrupted run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.loggers import WandbLogger

from deepdelta.analysis.mechanism import COLUMNS, MIX_COLUMNS, mixing_stats, probe_stats, read_probes, rows_to_metrics
from deepdelta.loggers import keep_rows_before
from deepdelta.model.config import HYPER

log = logging.getLogger(__name__)


class MechanismProbe(L.Callback):
    """Every ``every_n_steps`` optimizer steps (and at step 0), probe the model on at most
    ``max_tokens`` tokens of the first validation batch; see the module docstring."""

    def __init__(
        self,
        every_n_steps: int = 25,
        max_tokens: int = 8192,
        histograms: bool = True,
        hist_bins: int = 64,
        filename: str = "probes.csv",
        dirpath: str | None = None,
    ):
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"callbacks.beta.every_n_steps: got {every_n_steps}, allowed: an integer >= 1")
        self.every_n_steps = every_n_steps
        self.max_tokens = max_tokens
        self.histograms = histograms
        self.hist_bins = hist_bins
        self.filename = filename
        self.dirpath = dirpath
        self.rows: list[dict[str, Any]] = []  # every probe of this fit, as written to probes.csv
        self.seconds = 0.0
        self._batch: torch.Tensor | None = None
        self._mean_k: dict[str, torch.Tensor] = {}
        self._previous_mean_k: dict[str, torch.Tensor] = {}  # the mean k̂ the last probe compared against
        self._last_step = -1

    # -- Lightning hooks ----------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._batch = None
        if not trainer.is_global_zero:
            return
        if pl_module.config.residual == "additive":
            log.info("MechanismProbe: residual=additive has no gate; nothing to probe")
            return
        self._batch = self._probe_batch(trainer)
        if self._batch is None:
            log.warning("MechanismProbe: no validation batch to probe with; probes are off")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step  # the start point: 0, or the step of the checkpoint resumed from
        if trainer.is_global_zero:
            keep_rows_before(self.path(trainer), step)  # the steps from here on are replayed
        redo = self._last_step == step  # the checkpoint was taken right after this step's probe: redo it
        if redo:
            self._mean_k, self._last_step = self._previous_mean_k, -1
        if redo or step % self.every_n_steps == 0:
            self.probe(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps == 0 and not trainer.fit_loop._should_accumulate():
            self.probe(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_summary(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._log_summary(trainer, pl_module)

    # -- state (in the checkpoint, so a resumed run continues k_drift and the cost) -------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step": self._last_step,
            "mean_k": {n: m.cpu() for n, m in self._mean_k.items()},
            "previous_mean_k": {n: m.cpu() for n, m in self._previous_mean_k.items()},
            "seconds": self.seconds,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict.get("last_step", -1))
        self._mean_k = dict(state_dict.get("mean_k", {}))
        self._previous_mean_k = dict(state_dict.get("previous_mean_k", {}))
        self.seconds = float(state_dict.get("seconds", 0.0))

    # -- the probe ------------------------------------------------------------------------
    def _probe_batch(self, trainer: L.Trainer) -> torch.Tensor | None:
        loader = None
        if trainer.datamodule is not None and hasattr(trainer.datamodule, "val_dataloader"):
            loader = trainer.datamodule.val_dataloader()
        if loader is None:
            return None
        x = next(iter(loader))[0]
        rows = max(1, self.max_tokens // x.shape[1])
        return x[:rows].clone()

    def path(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath or trainer.default_root_dir) / self.filename

    @torch.no_grad()
    def probe(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[dict[str, Any]]:
        """Probe now (rank 0), log and append to the table; returns this step's rows."""
        step = trainer.global_step
        if self._batch is None or not trainer.is_global_zero or step == self._last_step:
            return []
        start = time.perf_counter()
        self._last_step = step
        model = pl_module.model
        hyper = pl_module.config.residual in HYPER
        was_training = model.training
        model.eval()
        try:
            idx = self._batch.to(pl_module.device, non_blocking=True)
            with trainer.precision_plugin.forward_context():  # the training precision (bf16 on GPU)
                records = model.probe_mixing(idx) if hyper else model.probe(idx)
        finally:
            model.train(was_training)
        if hyper:
            rows = mixing_stats(records)
        else:
            self._previous_mean_k = self._mean_k
            rows, self._mean_k = probe_stats(records, pl_module.config.k_eps, self._mean_k)
        if not rows:
            self._batch = None  # a model without gates or mixing: nothing to come either
            return []
        rows = [{"step": step, **r} for r in rows]
        self.rows.extend(rows)
        self._append(trainer, rows, MIX_COLUMNS if hyper else COLUMNS)
        wandb_on = any(isinstance(lg, WandbLogger) for lg in trainer.loggers)
        # β histograms only: the mixing statistics are one number per token and sublayer, summarised in the rows
        want_hist = self.histograms and wandb_on and not hyper
        hist = self._histograms(records, pl_module.config.beta_max) if want_hist else {}
        # cumulative cost so far; this probe's own logging is counted in the next value
        metrics = {**rows_to_metrics(rows), "probe/seconds": self.seconds + time.perf_counter() - start}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if hist and isinstance(logger, WandbLogger):
                logger.experiment.log({**hist, "trainer/global_step": step})
        self.seconds += time.perf_counter() - start
        return rows

    def _append(self, trainer: L.Trainer, rows: list[dict[str, Any]], columns: list[str]) -> None:
        path = self.path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        frame = pd.DataFrame(rows, columns=["step", "sublayer", "layer", "part", *columns])
        frame.to_csv(path, mode="a", header=not path.exists(), index=False)

    def _histograms(self, records: dict[str, dict[str, torch.Tensor]], beta_max: float) -> dict[str, Any]:
        """β histograms binned on the device (only the counts travel)."""
        import wandb

        edges = torch.linspace(0.0, beta_max, self.hist_bins + 1).numpy()
        out = {}
        for name, rec in records.items():
            counts = torch.histc(rec["beta"].float(), bins=self.hist_bins, min=0.0, max=beta_max)
            out[f"beta_hist/{name}"] = wandb.Histogram(np_histogram=(counts.cpu().numpy(), edges))
        return out

    def _log_summary(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The β heatmap (hc/mhc: the mixing heatmap) and the probe table, once, to W&B
        (cumulative, so at the end)."""
        if not self.rows or not trainer.is_global_zero:
            return
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not wandb_loggers:
            return
        import wandb

        from deepdelta.analysis.figures import beta_heatmap, mix_heatmap

        path = self.path(trainer)  # the whole table: a resumed run's heatmap covers the steps before too
        frame = read_probes(path) if path.exists() else pd.DataFrame(self.rows)
        if pl_module.config.residual in HYPER:
            heatmap = {"mix_heatmap": wandb.Image(mix_heatmap(frame))}
        else:
            heatmap = {"beta_heatmap": wandb.Image(beta_heatmap(frame, pl_module.config.beta_max))}
        payload = {**heatmap, "probes": wandb.Table(dataframe=frame)}
        for logger in wandb_loggers:
            logger.experiment.log({**payload, "trainer/global_step": trainer.global_step})
