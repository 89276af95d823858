"""Crash-safe checkpoints: atomic writes, a save at the end and on preemption, RNG state, and `last` lookup.

Lightning's own writer (``_atomic_save``) goes through an fsspec transaction that stages the file with
``tempfile.mkstemp()`` in the system temp dir and then ``shutil.move``s it: when /tmp is another filesystem
(tmpfs, node-local disk under a shared run dir) the move is a copy, so a kill mid-copy leaves a truncated
``last.ckpt``, and a killed write leaves a checkpoint-sized orphan in /tmp. `AtomicCheckpointIO` stages the
file next to its target, fsyncs it and ``os.replace``s it, so readers see the old file or the new one.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

TMP_MARK = ".tmp-"  # staged files are ".{name}.tmp-{pid}" next to their target


class Preempted(SIGTERMException):
    """Raised at a step boundary after SIGTERM/SIGUSR1/SIGINT once the checkpoint is on disk; exits with status 0.
    ``reason``: the signal's name (SIGINT: the user's Ctrl-C, recorded as "interrupted", not "preempted")."""

    def __init__(self, message: str, reason: str = "SIGTERM"):
        super().__init__(0)  # SystemExit(0): a clean exit, the scheduler may requeue
        self.message = message
        self.reason = reason

    def __str__(self) -> str:
        return self.message


def stop_message(reason: str, saved: str, step: int, run_dir: Path) -> str:
    """What a run stopped by a signal prints: what it saved at which step (if anything), and
    the command that resumes it."""
    where = f"saved {saved} at step {step} and stopped" if saved else "stopped"
    what = "Ctrl-C (SIGINT)" if reason == "SIGINT" else reason
    return f"{what} received: {where}; resume with: python src/train.py resume={run_dir}"


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a hidden temp file in the target's directory, fsync, then ``os.replace``: a kill at any
    moment leaves either the previous checkpoint or the new one, never a partial file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote stores: fsspec's transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                stall = _fault_stall_step()
                if stall is not None and int(checkpoint.get("global_step", 0)) >= stall:
                    _write_then_stall(checkpoint, f)  # test hook: never returns
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)  # make the rename itself durable
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def _fault_stall_step() -> int | None:
    """Test-only (DEEPDELTA_FAULT_CKPT_STALL=STEP): writes of checkpoints at step >= STEP stall half-way."""
    value = os.environ.get("DEEPDELTA_FAULT_CKPT_STALL")
    return int(value) if value else None


def _write_then_stall(checkpoint: dict[str, Any], f: Any) -> None:
    import io

    buf = io.BytesIO()
    torch.save(checkpoint, buf)
    data = buf.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    os.fsync(f.fileno())
    print(f"FAULT: checkpoint write stalled after {len(data) // 2} of {len(data)} bytes", file=sys.stderr, flush=True)
    time.sleep(3600)


def stale_temp_files(directory: Path) -> list[Path]:
    return sorted(p for p in Path(directory).glob(f".*{TMP_MARK}*") if p.is_file())


def find_last_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run: ``checkpoints/*.ckpt`` or a SLURM ``hpc_ckpt_*.ckpt``."""
    run_dir = Path(run_dir)
    found = [p for p in (run_dir / "checkpoints").glob("*.ckpt") if p.is_file()]
    found += [p for p in run_dir.glob("hpc_ckpt_*.ckpt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


STOP_CHECK_EVERY = 10  # steps between the ranks' agreement on a pending preemption signal


def rng_state() -> dict[str, Any]:
    """Every RNG the training step may draw from, as plain types (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, torch.as_tensor(keys).numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


class Checkpoint(ModelCheckpoint):
    """ModelCheckpoint that saves ``last.ckpt`` every N steps *and* at the final step, saves and stops on
    SIGTERM/SIGUSR1/SIGINT at the next step boundary (requeueing the job under SLURM on SIGUSR1), and keeps the
    RNG state so a resumed run continues bit for bit. Validation is made RNG-neutral so it cannot shift the
    training stream between a save and the next step. A second Ctrl-C stops at once, without saving."""

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("save_last", True)
        kwargs.setdefault("enable_version_counter", False)  # always last.ckpt, replaced atomically
        super().__init__(**kwargs)
        self._signal: str | None = None
        self._previous: dict[int, Any] = {}  # signal -> the handler we displaced (submitit's, ...)
        self.preempted_by: str | None = None  # read by the runner: "preempted", not "failed"
        self.hard_interrupt = False  # a second Ctrl-C stopped the run where it was, without saving
        self.last_saved_step: int | None = None  # the step of last_model_path, also after a resume
        self._pending_rng: dict[str, Any] | None = None
        self._val_rng: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "deepdelta.Checkpoint"  # stable across every_n_train_steps changes, so RNG state is restored

    # -- lifecycle ----------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath and "://" not in str(self.dirpath):
            for stale in stale_temp_files(Path(self.dirpath)):  # left by a process killed mid-write
                stale.unlink(missing_ok=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Installed after Lightning registered its handlers, whose teardown (also after an exception) puts back
        # what was there before fit, ours included. SIGUSR2 is submitit's requeue signal: taken over only when
        # a handler is installed, and that handler is called after our save.
        # SIGINT (Ctrl-C) only where Python's default handler is in place (not under a launcher's own).
        super().on_train_start(trainer, pl_module)
        self._previous = {}
        for sig in (signal.SIGINT, getattr(signal, "SIGUSR1", None), getattr(signal, "SIGUSR2", None)):
            if sig is None:
                continue
            previous = signal.getsignal(sig)
            if sig == signal.SIGINT and previous not in (signal.default_int_handler, signal.SIG_DFL):
                continue  # SIG_IGN (nohup, a background job) or a launcher's own handler: theirs
            if sig == getattr(signal, "SIGUSR2", None) and not callable(previous):
                continue
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: leave signals alone
                return

    def _on_signal(self, signum: int, frame: Any) -> None:
        # only set a flag: saving inside a signal handler could capture a half-applied optimizer step
        name = signal.Signals(signum).name
        if name == "SIGINT" and self._signal == "SIGINT":  # the second Ctrl-C: stop now, as Ctrl-C always does
            self.hard_interrupt = True
            raise KeyboardInterrupt
        if name == "SIGINT":  # os.write: print() here could re-enter a stream the main thread is writing to
            os.write(2, b"\nCtrl-C: saving at the end of this step, then stopping (Ctrl-C again: stop now, unsaved)\n")
        self._signal = name

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rng": self._val_rng or rng_state(), "saved_step": self.last_saved_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self._pending_rng = state_dict.pop("rng", None)
        self.last_saved_step = state_dict.pop("saved_step", None)
        super().load_state_dict(state_dict)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if self._pending_rng is not None:  # restore right before the first resumed step, after loader setup
            set_rng_state(self._pending_rng)
            self._pending_rng = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._val_rng is not None and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            set_rng_state(self._val_rng)  # back to where the last training step left it
        self._val_rng = None

    # -- saving ---------------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Validation may follow this step; its dataloader draws a seed from the global RNG *before* any
        # validation hook runs, so snapshot here (a few µs) and restore at on_validation_end. Saves taken
        # from now until then (periodic, final, on SIGTERM mid-validation) store this snapshot.
        self._val_rng = rng_state()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        reason = self._stop_reason(trainer)
        final = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        if (reason or final) and self._last_global_step_saved != trainer.global_step:
            self.save_last_now(trainer)
        if reason:
            self.preempted_by = reason
            # Lightning logs this step's training metrics after on_train_batch_end, which the stop skips; the
            # resumed run starts at the next step: log them now, or csv/metrics.csv never has this step
            trainer._logger_connector.update_train_step_metrics()
            for logger in trainer.loggers:
                logger.save()
            rank_zero_info(f"{reason}: saved {self.last_model_path} at step {trainer.global_step}")
            previous = self._previous.get(getattr(signal, reason, None))
            if callable(previous) and reason != "SIGINT":  # e.g. submitit: it requeues the job, exits its own way
                previous(getattr(signal, reason), None)
            elif reason == "SIGUSR1":
                _slurm_requeue(trainer)
            run_dir = Path(self.dirpath or ".").parent
            raise Preempted(stop_message(reason, self.last_model_path, trainer.global_step, run_dir), reason)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_global_step_saved != trainer.global_step:  # stopped early (max_epochs, should_stop, ...)
            self.save_last_now(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):  # Ctrl-C outside our handler, or the second one
            self.hard_interrupt = True
        # SIGTERM during validation: Lightning stops between validation batches; keep the progress
        if isinstance(exception, SIGTERMException) and not isinstance(exception, Preempted):
            self.preempted_by = "SIGTERM"
            if self._last_global_step_saved != trainer.global_step and not trainer.sanity_checking:
                self.save_last_now(trainer)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        for logger in trainer.loggers:  # the CSV logger buffers 100 steps: make metrics up to here survive a kill
            logger.save()
        self.last_saved_step = trainer.global_step  # part of the state being saved
        super()._save_checkpoint(trainer, filepath)

    def save_last_now(self, trainer: L.Trainer) -> None:
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_global_step_saved = trainer.global_step

    def _stop_reason(self, trainer: L.Trainer) -> str | None:
        """The signal to stop for, once at an optimizer-step boundary (None: keep training)."""
        if trainer.received_sigterm and self._signal is None:
            self._signal = "SIGTERM"
            # take over from Lightning, which would stop right after this micro-batch, mid-accumulation too,
            # and lose the gradients accumulated so far
            trainer._signal_connector.received_sigterm = False
        reason = self._signal
        if trainer.world_size > 1:  # every rank must take the collective save together
            if trainer.global_step % STOP_CHECK_EVERY:  # the same steps on every rank; a per-step all-reduce
                return None  # would stall the GPU pipeline (preemption waits at most this many steps)
            stop = trainer.strategy.reduce_boolean_decision(reason is not None, all=False)
            reason = (reason or "SIGTERM") if stop else None
        if reason and trainer.fit_loop.epoch_loop._should_accumulate():
            return None  # the optimizer step of this accumulation window is still to come
        return reason


def _slurm_requeue(trainer: L.Trainer) -> None:
    """Requeue this SLURM job (rank 0), as Lightning's auto-requeue does, but after a step-boundary save."""
    job = os.environ.get("SLURM_JOB_ID")
    if not trainer.is_global_zero or not job:
        return
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not re.fullmatch(r"[0-9_]+", job):
        rank_zero_warn(f"not requeueing: unexpected SLURM job id {job!r}")
        return
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        rank_zero_info(f"requeued SLURM job {job}" if result.returncode == 0 else f"requeue failed: {result.stderr}")
    except (OSError, subprocess.TimeoutExpired) as exc:
        rank_zero_warn(f"requeue of SLURM job {job} failed: {exc}")
