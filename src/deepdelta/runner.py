"""One training job from a composed Hydra config: validate → build → fit → summarise."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from deepdelta.analysis.summary import run_summary
from deepdelta.model import ModelConfig, count_parameters, flops_per_token
from deepdelta.module import DeltaLM


def model_config(cfg: DictConfig) -> ModelConfig:
    """The validated ModelConfig of a composed config (raises ValueError listing every problem)."""
    return ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))


def build_loggers(cfg: DictConfig, run_dir: Path, name: str, group: str | None) -> list[Any]:
    loggers = []
    for key, conf in (cfg.get("logger") or {}).items():
        extra: dict[str, Any] = {}
        if key == "wandb":
            extra = dict(
                name=conf.get("name") or name or "default",
                group=conf.get("group") or group,
                config=OmegaConf.to_container(cfg, resolve=True),
                dir=str(run_dir),
            )
        loggers.append(instantiate(conf, _partial_=True)(**extra))
    return loggers


def run(cfg: DictConfig, run_dir: Path, name: str = "", multirun: bool = False) -> float | None:
    """Train one configuration in ``run_dir``; returns the final validation loss.

    Whatever happens, the run leaves a summary.json (status, error) and closes its W&B
    run, so a failing sweep member is recorded and the next one starts clean."""
    status, error, params = "failed", "", 0
    loggers: list[Any] = []
    trainer: L.Trainer | None = None
    try:
        model_cfg = model_config(cfg)  # validate before any data or compute
        L.seed_everything(cfg.seed, workers=True)
        datamodule = instantiate(cfg.data)
        if datamodule.vocab_size > model_cfg.vocab_size:
            raise ValueError(
                f"model.vocab_size: got {model_cfg.vocab_size}, allowed: >= {datamodule.vocab_size} "
                f"(the vocabulary of tokenizer {cfg.data.get('tokenizer')!r})"
            )
        module = DeltaLM(model=model_cfg.to_dict(), optim=OmegaConf.to_container(cfg.optim), compile=cfg.compile)
        counts = count_parameters(module.model)
        params = counts["total"]
        print(
            f"model: {params / 1e6:.2f}M parameters ({counts['non_embedding'] / 1e6:.2f}M non-embedding), "
            f"{flops_per_token(model_cfg) / 1e6:.1f} MFLOPs per trained token at T={model_cfg.block_size}"
        )
        if cfg.dry_run:
            return None
        loggers = build_loggers(cfg, run_dir, name, run_dir.parent.name if multirun else None)
        callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
        trainer = instantiate(cfg.trainer, logger=loggers, callbacks=callbacks)
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        status = "finished"
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        for logger in loggers:
            logger.finalize("success" if status == "finished" else "failed")
        if any(isinstance(lg, WandbLogger) for lg in loggers):
            import wandb

            if wandb.run is not None:  # one W&B run per job, also in a multirun
                wandb.finish(exit_code=0 if status == "finished" else 1)
        if not cfg.dry_run and (trainer is None or trainer.is_global_zero):
            row = run_summary(run_dir, name or "default", status, params, error)
            print(f"run {status}: {run_dir} (val loss {row['val_loss']:.4f})")
    val = trainer.callback_metrics.get("val/loss")
    return None if val is None or math.isnan(float(val)) else float(val)
