"""Stop (or skip a bounded number of) optimizer steps whose loss or gradients are not finite."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from deepdelta.errors import UserError


class Diverged(UserError, RuntimeError):
    """A non-finite loss or gradient with no skips left; the message says where and what to do (the CLI prints
    it without a traceback: the cause is the run's settings, not the code)."""


class DivergenceGuard(Callback):
    """Checks the loss and the (all-reduced) gradients before every optimizer step.

    A bad step is skipped (gradients dropped, so parameters and AdamW moments stay as they were; the step
    and LR schedule still advance) while fewer than ``max_skips`` steps have been skipped over the run;
    otherwise training stops with `Diverged` naming the step, the loss, the layers whose β, ‖k̃‖ or
    activations are non-finite on the offending batch, and the last good checkpoint. Costs one norm
    per parameter tensor and one host sync per step, and no collective under DDP."""

    def __init__(self, max_skips: int = 0):
        if isinstance(max_skips, bool) or not isinstance(max_skips, int) or max_skips < 0:
            raise ValueError(f"max_skips: got {max_skips!r}, allowed: an integer >= 0")
        self.max_skips = max_skips
        self.skipped = 0
        self._batch: Any = None

    @property
    def state_key(self) -> str:
        return "deepdelta.DivergenceGuard"

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}  # the budget counts over the whole run, across resumes

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self._batch = batch  # kept for the diagnosis; a reference, not a copy

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._batch = None

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        loss = getattr(pl_module, "last_loss", None)
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        # fp16 with a GradScaler: inf gradients are the scaler's business (it skips those steps itself)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        checked = list(torch._foreach_norm(grads)) if grads and scaler is None else []
        if loss is not None and trainer.world_size == 1:
            checked.append(loss.float().reshape(()))
        # One host sync and no collective: under DDP the gradients are already all-reduced, so every
        # rank sees the same values and takes the same decision (a rank's non-finite loss reaches them
        # all as non-finite gradients); its own loss would differ from rank to rank.
        bad = bool(checked) and not bool(torch.stack(checked).isfinite().all())
        if not bad:
            return
        step = trainer.global_step + 1  # the step being taken, 1-based like the logged train/tokens
        loss_text = "not recorded" if loss is None else f"{float(loss):.6g}"
        if self.skipped < self.max_skips:
            self.skipped += 1
            optimizer.zero_grad(set_to_none=True)  # AdamW skips parameters without gradients: a true no-op
            rank_zero_warn(
                f"step {step}: loss = {loss_text}, non-finite loss or gradient; skipped this optimizer step "
                f"({self.skipped} of callbacks.divergence.max_skips={self.max_skips})"
            )
            pl_module.log("train/skipped_steps", float(self.skipped))
            return
        raise Diverged(self.report(trainer, pl_module, step, loss_text))

    # -- diagnosis --------------------------------------------------------------------------------
    def report(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, loss_text: str) -> str:
        params = dict(pl_module.named_parameters())
        bad_grads = [n for n, p in params.items() if p.grad is not None and not bool(p.grad.isfinite().all())]
        bad_weights = [n for n, p in params.items() if not bool(p.isfinite().all())]
        lines = [
            f"training diverged at step {step}: loss = {loss_text}; non-finite gradients in {len(bad_grads)} of "
            f"{len(params)} parameter tensors{_examples(bad_grads)}"
        ]
        model = getattr(pl_module, "model", None)
        if model is not None and hasattr(model, "probe") and self._batch is not None:
            lines += _probe_lines(trainer, model, self._batch[0])
        if bad_weights:
            lines.append(f"non-finite weights before this step: {_names(bad_weights)}")
        ckpt = trainer.checkpoint_callback
        last = getattr(ckpt, "last_model_path", "") if ckpt is not None else ""
        saved = getattr(ckpt, "last_saved_step", None)
        if last and os.path.exists(last):
            lines.append(f"last good checkpoint: {last}" + (f" (step {saved})" if saved is not None else ""))
        else:
            lines.append("last good checkpoint: none saved yet")
        run_dir = trainer.default_root_dir
        lines.append(
            f"to go on from it: lower optim.lr or raise optim.warmup_steps and pass resume={run_dir}; "
            f"or skip up to N bad steps with callbacks.divergence.max_skips=N (now {self.max_skips})"
        )
        return "\n  ".join(lines)


def _probe_lines(trainer: L.Trainer, model: nn.Module, idx: torch.Tensor) -> list[str]:
    """Re-run the offending batch with recording on (same precision context as training)."""
    was_training = model.training
    try:
        with _first_nonfinite(model) as seen, trainer.precision_plugin.forward_context():
            probes = model.probe(idx)
    except Exception as exc:  # the diagnosis must not hide the divergence itself
        return [f"(probe failed: {type(exc).__name__}: {exc})"]
    finally:
        model.train(was_training)
    lines = []
    for key, label in (("beta", "β"), ("k_norm", "‖k̃‖")):
        bad = [name for name, rec in probes.items() if key in rec and not bool(rec[key].isfinite().all())]
        if probes:
            lines.append(f"non-finite {label} in sublayers: {_names(bad) if bad else 'none'}")
    if not probes:
        lines.append("β and ‖k̃‖: none recorded (additive residual has no gate)")
    lines.append(
        f"non-finite activations, first in execution order: {_names(seen, limit=3)}"
        if seen
        else "activations: all finite when the batch is re-run (a transient fault, or the backward pass)"
    )
    return lines


@contextmanager
def _first_nonfinite(model: nn.Module) -> Iterator[list[str]]:
    """Forward hooks (only while diagnosing) that list modules with a non-finite output, in call order."""
    seen: list[str] = []

    def hook(name: str):
        def check(module: nn.Module, args: Any, output: Any) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(out, torch.Tensor) and out.is_floating_point() and not bool(out.isfinite().all()):
                if name not in seen:
                    seen.append(name)

        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _examples(names: list[str]) -> str:
    return f": {_names(names, limit=3)}" if names else ""
