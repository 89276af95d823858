"""One training job from a composed Hydra config: validate → build → fit → summarise."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from deepdelta import validate
from deepdelta.analysis.summary import run_summary, validation_text
from deepdelta.batching import plan_batch
from deepdelta.callbacks.checkpoint import AtomicCheckpointIO, stop_message
from deepdelta.callbacks.faults import fault_callbacks
from deepdelta.errors import CONFIG_EXIT, UserError
from deepdelta.loggers import ResumableCSVLogger
from deepdelta.model import ModelConfig, count_parameters, flops_per_token
from deepdelta.module import DeltaLM
from deepdelta.rundir import checkpoint_step, checkpoint_to_resume, wandb_run_id


def model_config(cfg: DictConfig) -> ModelConfig:
    """The validated ModelConfig of a composed config (raises ValueError listing every problem)."""
    return ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))


def build_loggers(
    cfg: DictConfig,
    run_dir: Path,
    name: str,
    group: str | None,
    resume_id: str | None = None,
    resume_step: int | None = None,
) -> list[Any]:
    """The configured loggers; ``resume_id``/``resume_step``: the run continues in place (its W&B run id,
    the global step of its checkpoint, from which on the CSV logger replaces the earlier rows)."""
    loggers = []
    for key, conf in (cfg.get("logger") or {}).items():
        extra: dict[str, Any] = {}
        factory = instantiate(conf, _partial_=True)
        if isinstance(factory.func, type) and issubclass(factory.func, ResumableCSVLogger):
            extra["resume_step"] = resume_step
        if key == "wandb":
            extra = dict(
                name=conf.get("name") or name or "default",
                group=conf.get("group") or group,
                config=OmegaConf.to_container(cfg, resolve=True),
                dir=str(run_dir),
            )
            if resume_id:  # a resumed run continues its W&B run
                extra.update(id=resume_id, resume="allow")
        loggers.append(factory(**extra))
    return loggers


def run(cfg: DictConfig, run_dir: Path, name: str = "", multirun: bool = False) -> float | None:
    """Train one configuration in ``run_dir``; returns the final validation loss.

    Whatever happens, the run leaves a summary.json (status, error) and closes its W&B run, so a failing
    sweep member is recorded and the next one starts clean. A config rejected before any compute raises
    its `UserError` with status "rejected" and, outside a multirun, writes nothing (the caller gives the
    directory back, `deepdelta.rundir.release`)."""
    status, error, params = "failed", "", 0
    loggers: list[Any] = []
    trainer: L.Trainer | None = None
    try:
        model_cfg = validate.check(cfg, run_dir, multirun)  # the whole config, every problem at once
        ckpt_path = checkpoint_to_resume(cfg, run_dir)
        L.seed_everything(cfg.seed, workers=True)
        datamodule = instantiate(cfg.data)
        if not cfg.dry_run and validate.single_process_launch():  # corpus vs block size, before any compute
            data_errors = validate.data_problems(datamodule)
            if data_errors:
                raise validate.ConfigError(data_errors)
        module = DeltaLM(model=model_cfg.to_dict(), optim=OmegaConf.to_container(cfg.optim), compile=cfg.compile)
        counts = count_parameters(module.model)
        params = counts["total"]
        print(
            f"model: {params / 1e6:.2f}M parameters ({counts['non_embedding'] / 1e6:.2f}M non-embedding), "
            f"{flops_per_token(model_cfg) / 1e6:.1f} MFLOPs per trained token at T={model_cfg.block_size}"
        )
        if cfg.dry_run:
            return None
        in_place = ckpt_path is not None and Path(ckpt_path).is_relative_to(run_dir)  # its own checkpoint
        resume_id = wandb_run_id(run_dir) if in_place else None
        resume_step = checkpoint_step(ckpt_path) if in_place else None
        # W&B group: the sweep directory's name (a multirun, or a job of deepdelta.gpusweep)
        group = run_dir.parent.name if multirun else os.environ.get("DEEPDELTA_SWEEP_GROUP")
        loggers = build_loggers(cfg, run_dir, name, group, resume_id, resume_step)
        callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
        callbacks += fault_callbacks()  # test-only, from DEEPDELTA_FAULT_* environment variables
        plugins = [AtomicCheckpointIO(), *(instantiate(p) for p in cfg.trainer.get("plugins") or [])]
        if SLURMEnvironment.detect() and not any(isinstance(p, SLURMEnvironment) for p in plugins):
            # Lightning's auto-requeue saves from inside the signal handler (maybe mid-step); our
            # Checkpoint callback saves at the next step boundary and requeues itself
            plugins.append(SLURMEnvironment(auto_requeue=False))
        trainer = instantiate(cfg.trainer, logger=loggers, callbacks=callbacks, plugins=plugins)
        plan = plan_batch(cfg.get("global_batch"), datamodule.batch_size, trainer.world_size,
                          trainer.accumulate_grad_batches)  # fmt: skip
        datamodule.batch_size, trainer.accumulate_grad_batches = plan.micro_batch, plan.accumulate
        if isinstance(trainer.val_check_interval, int):  # Lightning counts micro-batches; we mean steps
            trainer.val_check_interval *= plan.accumulate
        for logger in loggers:
            logger.log_hyperparams(plan.as_dict())
        if trainer.is_global_zero:
            print(f"batch: {plan.global_batch} sequences/step = {plan.world_size} device(s) × "
                  f"{plan.micro_batch} micro-batch × {plan.accumulate} accumulation")  # fmt: skip
        if ckpt_path:
            print(f"resuming from {ckpt_path}")
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        status = "finished"
    except UserError as exc:
        if trainer is None and exc.exit_code == CONFIG_EXIT:  # refused before any compute
            status, error = "rejected", str(exc)
        else:
            status, error = _failure(trainer, exc)
        raise
    except SIGTERMException as exc:  # preempted or Ctrl-C: the checkpoint is on disk; exit 0 (a requeue may follow)
        # empty when Lightning raised it between validation batches; the checkpoint callback
        # has saved the last step by then, so say the same as a stop at a step boundary
        saved = getattr(getattr(trainer, "checkpoint_callback", None), "last_model_path", "")
        step = trainer.global_step if trainer is not None else 0
        reason = getattr(exc, "reason", "SIGTERM")
        status = "interrupted" if reason == "SIGINT" else "preempted"
        error = str(exc) or stop_message("SIGTERM", saved, step, run_dir)
        print(error)
        if multirun:
            raise  # stop the sweep too: the scheduler (or the user) wants this process gone
    except (KeyboardInterrupt, SystemExit) as exc:
        # Ctrl-C before training started, or a second one during it (Lightning turns that into SystemExit(1))
        if not (isinstance(exc, KeyboardInterrupt) or _interrupted(trainer)):
            status, error = _failure(trainer, exc)
            raise
        status, error = "interrupted", _interrupt_message(trainer, run_dir)
        print(error, file=sys.stderr)
        raise SystemExit(130) from None  # the shell's status for a Ctrl-C
    except BaseException as exc:
        status, error = _failure(trainer, exc)
        raise
    finally:
        for logger in loggers:
            logger.finalize("success" if status == "finished" else "failed")
        if any(isinstance(lg, WandbLogger) for lg in loggers):
            import wandb

            if wandb.run is not None:  # one W&B run per job, also in a multirun
                wandb.finish(exit_code=0 if status in ("finished", "preempted", "interrupted") else 1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # the next job of a multirun starts its own
        recorded = status != "rejected" or multirun  # a rejected single run leaves no directory behind
        if recorded and not cfg.dry_run and (trainer is None or trainer.is_global_zero):
            row = run_summary(run_dir, name or "default", status, params, error)
            print(f"run {status}: {run_dir} ({validation_text(row)})")
    if trainer is None or status != "finished":
        return None
    if (cfg.get("eval") or {}).get("tasks") and trainer.is_global_zero:
        evaluate_run(cfg, module.model, datamodule.tokenizer, run_dir)
    val = trainer.callback_metrics.get("val/loss")
    return None if val is None or math.isnan(float(val)) else float(val)


def evaluate_run(cfg: DictConfig, model: torch.nn.Module, tokenizer: Any, run_dir: Path) -> None:
    """Downstream tasks of the trained model (``eval.tasks``) into eval.json and the run's W&B run. A
    failure here (say, an offline hub) is reported and leaves the finished training as it is: the
    same evaluation runs later with ``python -m deepdelta.eval RUN_DIR``."""
    from deepdelta.eval.run import EvalError, evaluate, log_to_wandb, write

    e = cfg.eval
    try:
        result = evaluate(model, tokenizer, str(e.tasks), num_fewshot=e.get("num_fewshot"), limit=e.get("limit"),
                          batch_size=int(e.get("batch_size") or 16), seed=int(cfg.seed))  # fmt: skip
        result["source"] = str(run_dir)
        print(f"evaluation: wrote {write(run_dir, result)}")
        log_to_wandb(run_dir, result)
    except EvalError as exc:
        print(f"evaluation failed, the training run is kept: {exc}; later: python -m deepdelta.eval {run_dir} "
              f"tasks={e.tasks}", file=sys.stderr)  # fmt: skip


def _failure(trainer: L.Trainer | None, exc: BaseException) -> tuple[str, str]:
    # e.g. submitit's requeue exit after our step-boundary save is a preemption, not a failure
    preempted = getattr(getattr(trainer, "checkpoint_callback", None), "preempted_by", None)
    return ("preempted" if preempted else "failed"), f"{type(exc).__name__}: {exc}"


def _interrupted(trainer: L.Trainer | None) -> bool:
    """A KeyboardInterrupt inside fit: Lightning tears down, marks the trainer interrupted and exits 1."""
    callback = getattr(trainer, "checkpoint_callback", None)
    return bool(getattr(callback, "hard_interrupt", False)) or (
        trainer is not None and trainer.interrupted and trainer.state.stage is not None
    )


def _interrupt_message(trainer: L.Trainer | None, run_dir: Path) -> str:
    """What a Ctrl-C that stopped the run at once says: the newest checkpoint, and how to go on."""
    callback = getattr(trainer, "checkpoint_callback", None)
    saved, step = getattr(callback, "last_model_path", ""), getattr(callback, "last_saved_step", None)
    if trainer is None or trainer.global_step == 0:
        return (f"Ctrl-C: stopped before training started, nothing trained; start again with: python src/train.py "
                f"resume={run_dir}")  # fmt: skip
    kept = f"the newest checkpoint is {saved} (step {step})" if saved else "no checkpoint was saved"
    return (f"Ctrl-C: stopped at step {trainer.global_step} without saving; {kept}; resume with: python "
            f"src/train.py resume={run_dir}")  # fmt: skip
