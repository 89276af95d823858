"""Stop (or skip a bounded number of) optimizer steps whose loss or gradients are not finite."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


@dataclass
class _Verdict:
    """A step's check, computed on the device and read later (``sync=False``)."""

    step: int
    bad: torch.Tensor  # 0-dim; on CUDA a pinned host copy, complete once ``ready`` has passed
    ready: torch.cuda.Event | None
    loss: torch.Tensor | None
    norms: torch.Tensor  # each parameter's gradient norm, for the diagnosis
    names: list[str]
    batch: Any


class DivergenceGuard(Callback):
    """Checks the loss and the (all-reduced) gradients before every optimizer step.

    A bad step is skipped (parameters and AdamW moments stay as they were; the step and LR schedule
    still advance) while fewer than ``max_skips`` steps have been skipped over the run; otherwise
    training stops with `Diverged` naming the step, the loss, the layers whose β, ‖k̃‖ or activations
    are non-finite on the offending batch, and the last good checkpoint. Costs one norm per parameter
    tensor, no collective under DDP, and with ``sync=True`` one host sync per step.

    ``sync=False`` takes that sync off the step where the optimizer can skip a step by itself (a fused
    AdamW, as on GPU: the verdict goes to it as ``found_inf``, the way GradScaler skips fp16 steps) and
    reads the verdict at the next step, by when the device has long computed it; the skip is the same,
    the warning or the stop comes one step later and names the bad step. Other optimizers are checked
    synchronously either way."""

    def __init__(self, max_skips: int = 0, sync: bool = True):
        if isinstance(max_skips, bool) or not isinstance(max_skips, int) or max_skips < 0:
            raise ValueError(f"max_skips: got {max_skips!r}, allowed: an integer >= 0")
        if not isinstance(sync, bool):
            raise ValueError(f"sync: got {sync!r}, allowed: true or false")
        self.max_skips = max_skips
        self.sync = sync
        self.skipped = 0
        self._batch: Any = None
        self._pending: _Verdict | None = None
        self._host: torch.Tensor | None = None  # pinned, reused
        self._ready: torch.cuda.Event | None = None

    @property
    def state_key(self) -> str:
        return "deepdelta.DivergenceGuard"

    def state_dict(self) -> dict[str, Any]:
        # the budget counts over the whole run, across resumes; a verdict not yet acted on counts too
        return {"skipped": self.skipped + self._pending_bad()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self._batch = batch  # kept for the diagnosis; a reference, not a copy

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._batch = None

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._settle(trainer, log=True)  # the last step's verdict, computed long ago: no wait
        loss = getattr(pl_module, "last_loss", None)
        named = [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None]
        # fp16 with a GradScaler: inf gradients are the scaler's business (it skips those steps itself)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        lazy = not self.sync and scaler is None and bool(optimizer.defaults.get("fused"))
        if lazy:
            optimizer.found_inf = None  # set below, for this step only
        norms = list(torch._foreach_norm([g for _, g in named])) if named and scaler is None else []
        checked = norms + ([loss.float().reshape(())] if loss is not None and trainer.world_size == 1 else [])
        if not checked:
            return
        # No collective: under DDP the gradients are already all-reduced, so every rank sees the same values
        # and takes the same decision (a rank's non-finite loss reaches them all as non-finite gradients);
        # its own loss would differ from rank to rank.
        bad = ~torch.stack(checked).isfinite().all()
        step = trainer.global_step + 1  # the step being taken, 1-based like the logged train/tokens
        if not lazy:
            if bool(bad):  # the host sync
                names = [n for n, g in named if not bool(g.isfinite().all())]
                self._bad(trainer, step, loss, names, self._batch, optimizer, log=True)
            return
        optimizer.found_inf = bad.float()  # the fused step leaves parameters and moments as they were
        self._pending = _Verdict(step, *self._copy(bad), loss, torch.stack(norms) if norms else bad.new_zeros(0),
                                 [n for n, _ in named], self._batch)  # fmt: skip

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._settle(trainer, log=False)  # the last step's verdict (Lightning allows no logging here)

    def _copy(self, bad: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """The verdict on the host without waiting: a non-blocking copy into pinned memory, and its event."""
        if not bad.is_cuda:
            return bad, None
        if self._host is None:
            self._host, self._ready = torch.empty((), dtype=torch.bool, pin_memory=True), torch.cuda.Event()
        self._host.copy_(bad, non_blocking=True)
        self._ready.record()
        return self._host, self._ready

    def _pending_bad(self) -> bool:
        v = self._pending
        if v is None:
            return False
        if v.ready is not None:
            v.ready.synchronize()
        return bool(v.bad)

    def _settle(self, trainer: L.Trainer, log: bool) -> None:
        """Act on the pending verdict of ``sync=False``."""
        bad, v, self._pending = self._pending_bad(), self._pending, None
        if bad:  # the gradient norms are read only now, on the rare bad step
            names = [n for n, ok in zip(v.names, v.norms.isfinite().tolist(), strict=False) if not ok]
            self._bad(trainer, v.step, v.loss, names, v.batch, None, log)

    def _bad(self, trainer: L.Trainer, step: int, loss: torch.Tensor | None, bad_grads: list[str], batch: Any,
             optimizer: torch.optim.Optimizer | None, log: bool) -> None:  # fmt: skip
        """Skip (``optimizer``: drop its gradients; None: the fused optimizer skipped it already) or stop."""
        loss_text = "not recorded" if loss is None else f"{float(loss):.6g}"
        if self.skipped < self.max_skips:
            self.skipped += 1
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)  # AdamW skips parameters without gradients: a true no-op
            rank_zero_warn(
                f"step {step}: loss = {loss_text}, non-finite loss or gradient; skipped this optimizer step "
                f"({self.skipped} of callbacks.divergence.max_skips={self.max_skips})"
            )
            if log:
                trainer.lightning_module.log("train/skipped_steps", float(self.skipped))
            return
        raise Diverged(self.report(trainer, trainer.lightning_module, step, loss_text, bad_grads, batch))

    # -- diagnosis --------------------------------------------------------------------------------
    def report(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, loss_text: str,
               bad_grads: list[str], batch: Any) -> str:  # fmt: skip
        params = dict(pl_module.named_parameters())
        bad_weights = [n for n, p in params.items() if not bool(p.isfinite().all())]
        lines = [
            f"training diverged at step {step}: loss = {loss_text}; non-finite gradients in {len(bad_grads)} of "
            f"{len(params)} parameter tensors{_examples(bad_grads)}"
        ]
        model = getattr(pl_module, "model", None)
        if model is not None and hasattr(model, "probe") and batch is not None:
            lines += _probe_lines(trainer, model, batch[0])
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
