"""In-process checks of the pieces: atomic writes, RNG-exact resume, run-directory ownership, resume argv."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from deepdelta.callbacks import checkpoint as ckpt_mod
from deepdelta.callbacks.checkpoint import (
    AtomicCheckpointIO,
    Checkpoint,
    Preempted,
    find_last_checkpoint,
    stale_temp_files,
)
from deepdelta.rundir import CLAIM, RunDirError, claim, resume_argv
from tests.conftest import ROOT


def test_atomic_write_failure_keeps_previous_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, target)

    def torn(obj, f, *args, **kwargs):  # half a file, then the "process" dies
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.torch, "save", torn)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, target)
    monkeypatch.undo()
    loaded = torch.load(target, weights_only=True)
    assert loaded["global_step"] == 1 and torch.equal(loaded["w"], torch.ones(3))
    assert not stale_temp_files(tmp_path)  # an interrupted writer cleans up after itself


def test_last_checkpoint_ignores_partial_files(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    assert find_last_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (tmp_path / "checkpoints" / f".last.ckpt{ckpt_mod.TMP_MARK}123").write_bytes(b"x")
    assert find_last_checkpoint(tmp_path) == tmp_path / "checkpoints" / "last.ckpt"


# -- RNG: a run whose every input is random resumes bit for bit -----------------------------------------------


class Zeros(IterableDataset):
    def __iter__(self):
        while True:
            yield torch.zeros(1)


class Noisy(L.LightningModule):
    """Inputs from the global RNG and dropout: the trajectory depends on nothing but the RNG state."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x = torch.randn(8, 4)
        return (self.net(x) - x.sum(-1, keepdim=True)).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val", self.net(torch.randn(8, 4)).mean())  # validation draws too: must not shift training

    def train_dataloader(self):
        return DataLoader(Zeros(), batch_size=None)

    def val_dataloader(self):
        return DataLoader(Zeros(), batch_size=None)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class CrashAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise RuntimeError("crash")


def _fit(root, steps=12, ckpt_path=None, crash=None, accumulate=1, extra=()):
    L.seed_everything(0)
    model = Noisy()
    callbacks = [Checkpoint(dirpath=root / "checkpoints", save_top_k=0, every_n_train_steps=5), *extra]
    callbacks += [CrashAt(crash)] if crash else []
    trainer = L.Trainer(
        max_steps=steps, val_check_interval=5 * accumulate, limit_val_batches=2, check_val_every_n_epoch=None,
        logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        plugins=[AtomicCheckpointIO()], default_root_dir=root, num_sanity_val_steps=0,
        accumulate_grad_batches=accumulate,
    )  # fmt: skip
    try:
        trainer.fit(model, ckpt_path=ckpt_path, weights_only=True)
    except (RuntimeError, Preempted):
        pass
    return model.net.state_dict()


def test_resume_restores_rng_streams_exactly(tmp_path, monkeypatch):
    reference = _fit(tmp_path / "a")
    _fit(tmp_path / "b", crash=8)  # dies 3 steps after the step-5 checkpoint
    resumed = _fit(tmp_path / "b", ckpt_path=str(tmp_path / "b" / "checkpoints" / "last.ckpt"))
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key

    monkeypatch.setattr(ckpt_mod, "set_rng_state", lambda state: None)  # the test can tell a wrong RNG apart
    _fit(tmp_path / "c", crash=8)
    wrong = _fit(tmp_path / "c", ckpt_path=str(tmp_path / "c" / "checkpoints" / "last.ckpt"))
    assert not all(torch.equal(reference[k], wrong[k]) for k in reference)


# -- run directories ----------------------------------------------------------------------------------------


def test_claim_refuses_used_or_unwritable_directories(tmp_path):
    run = tmp_path / "run"
    claim(run, resuming=False)
    assert (run / CLAIM).exists()
    with pytest.raises(RunDirError, match="is already used .* continue that run with resume="):
        claim(run, resuming=False)
    claim(run, resuming=True)  # the same run, continued
    owner = subprocess.Popen(["sleep", "60"])
    try:  # ... but never while its process is still alive
        (run / CLAIM).write_text(json.dumps({"pid": owner.pid, "host": socket.gethostname(), "started": "now"}))
        with pytest.raises(RunDirError, match="belongs to a run that is still running"):
            claim(run, resuming=True)
    finally:
        owner.kill()
        owner.wait()
    claim(run, resuming=True)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RunDirError, match="cannot be created: Not a directory; choose a writable location"):
        claim(blocker / "run", resuming=False)


def test_resume_replays_the_runs_overrides(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- dv=2\n- model.n_layer=2\n- resume=/old\n- ckpt_path=last\n")
    argv = resume_argv(["train.py", f"resume={tmp_path}", "trainer.max_steps=50"])
    assert argv == ["train.py", "dv=2", "model.n_layer=2", f"resume={tmp_path}", "trainer.max_steps=50"]
    assert os.path.basename(resume_argv(["train.py", "dv=1"])[0]) == "train.py"


def test_resume_of_a_directory_without_a_run_is_refused(tmp_path, capsys):
    """A mistyped ``resume=`` must not train a new model from scratch: it stops with status 2, naming the path."""
    typo = tmp_path / "not_a_run"
    with pytest.raises(SystemExit) as info:
        resume_argv(["train.py", f"resume={typo}", "trainer.max_steps=50"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: resume: got '{typo}', but no run is there") and "nothing to resume" in err
    assert not typo.exists()


# -- preemption by SIGUSR1 (SLURM's requeue signal), in-process -------------------------------------------------


class SignalAt(L.Callback):
    """Sends ``sig`` to this process at the start of optimizer step ``at`` (or of micro-batch ``at``)."""

    def __init__(self, at: int, sig: int, micro: bool = False):
        self.at, self.sig, self.micro = at, sig, micro
        self.sent = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = batch_idx + 1 if self.micro else trainer.global_step + 1
        if now == self.at and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.sig)


def test_sigusr1_saves_at_step_boundary_requeues_and_exits_zero(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "scontrol.args"}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)

    L.seed_everything(0)
    checkpoint = Checkpoint(dirpath=tmp_path / "checkpoints", save_top_k=0, every_n_train_steps=5)
    trainer = L.Trainer(
        max_steps=12, logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[checkpoint, SignalAt(7, signal.SIGUSR1)], plugins=[AtomicCheckpointIO()], default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.raises(Preempted) as info:
        trainer.fit(Noisy())
    assert info.value.code == 0  # a clean exit for the scheduler
    assert "SIGUSR1 received: saved" in str(info.value) and "resume=" in str(info.value)
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 7
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    assert signal.getsignal(signal.SIGUSR1) is not checkpoint._on_signal  # handler restored after fit


def test_sigint_saves_at_step_boundary_and_exits_zero(tmp_path):
    """Ctrl-C: the same step-boundary save as SIGTERM, a clean exit with the resume command, reason SIGINT
    (the runner records it as "interrupted"), and Python's Ctrl-C handler back after fit."""
    checkpoint = Checkpoint(dirpath=tmp_path / "checkpoints", save_top_k=0, every_n_train_steps=5)
    trainer = L.Trainer(
        max_steps=12, logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[checkpoint, SignalAt(7, signal.SIGINT)], plugins=[AtomicCheckpointIO()], default_root_dir=tmp_path,
    )  # fmt: skip
    # Python's own Ctrl-C handler, as in a terminal (a suite started in the background inherits SIGINT ignored)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(Preempted) as info:
            trainer.fit(Noisy())
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)
    assert info.value.code == 0 and info.value.reason == "SIGINT"
    assert str(info.value).startswith("Ctrl-C (SIGINT) received: saved") and f"resume={tmp_path}" in str(info.value)
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 7


class CtrlCTwice(L.Callback):
    """Ctrl-C at the start of optimizer step ``at``, and again before that step's optimizer update."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 == self.at:
            os.kill(os.getpid(), signal.SIGINT)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step + 1 == self.at:
            os.kill(os.getpid(), signal.SIGINT)


def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path):
    checkpoint = Checkpoint(dirpath=tmp_path / "checkpoints", save_top_k=0, every_n_train_steps=5)
    trainer = L.Trainer(
        max_steps=12, logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[checkpoint, CtrlCTwice(7)], plugins=[AtomicCheckpointIO()], default_root_dir=tmp_path,
    )  # fmt: skip
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit) as info:  # Lightning's way out of a KeyboardInterrupt
            trainer.fit(Noisy())
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)
    assert info.value.code == 1 and checkpoint.hard_interrupt  # the runner reports it as "interrupted", exit 130
    assert trainer.global_step == 6  # step 7's update never happened
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5


def test_run_directories_are_unique(tmp_path):
    """Two runs started in the same second: different directories (the suffix is per process)."""
    code = (
        "import sys; sys.path.insert(0, 'src'); import deepdelta.rundir\n"
        "from hydra import compose, initialize_config_dir\n"
        "from omegaconf import OmegaConf\n"
        "with initialize_config_dir(config_dir=sys.argv[1], version_base='1.3'):\n"
        "    cfg = compose('train', return_hydra_config=True)\n"
        "    print(cfg.hydra.run.dir, cfg.hydra.sweep.dir)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DEEPDELTA_RUN_UID"))}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(ROOT / "conf")], cwd=ROOT, env=env, stdout=subprocess.PIPE)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].decode().split() for p in procs]
    for run_dir, sweep_dir in outs:
        assert re.fullmatch(r"outputs/runs/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_[0-9a-f]{4}", run_dir), run_dir
        assert re.fullmatch(r"outputs/sweeps/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_[0-9a-f]{4}", sweep_dir), sweep_dir
    assert outs[0][0] != outs[1][0]


def test_preemption_mid_accumulation_waits_for_the_optimizer_step(tmp_path):
    """With gradient accumulation a signal between micro-batches is honoured after the step: nothing is lost."""
    reference = _fit(tmp_path / "a", accumulate=2)
    _fit(tmp_path / "b", accumulate=2, extra=[SignalAt(13, signal.SIGTERM, micro=True)])  # 1st micro-batch of step 7
    saved = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 7  # saved once micro-batch 14 completed step 7, not half-way
    resumed = _fit(tmp_path / "b", accumulate=2, ckpt_path=str(tmp_path / "b" / "checkpoints" / "last.ckpt"))
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key


def test_resume_and_a_different_run_dir_conflict(tmp_path):
    from omegaconf import OmegaConf

    from deepdelta.rundir import checkpoint_to_resume

    cfg = OmegaConf.create({"resume": str(tmp_path / "old"), "ckpt_path": None})
    with pytest.raises(RunDirError, match="resume: got .* but this run's directory is"):
        checkpoint_to_resume(cfg, tmp_path / "new")
    assert checkpoint_to_resume(cfg, tmp_path / "old") is None  # nothing saved there yet: start from scratch


def test_a_sigterm_lightning_raises_reports_the_saved_checkpoint(tmp_path):
    """A SIGTERM between validation batches stops the run through Lightning's own exception;
    the run then prints the same words as a stop at a step boundary (``Preempted``): what was
    saved, and the command that resumes."""
    from deepdelta.callbacks.checkpoint import stop_message

    last = tmp_path / "checkpoints" / "last.ckpt"
    resume = f"resume with: python src/train.py resume={tmp_path}"
    saved = stop_message("SIGTERM", str(last), 12, tmp_path)
    assert saved == f"SIGTERM received: saved {last} at step 12 and stopped; {resume}"
    assert stop_message("SIGTERM", "", 0, tmp_path) == f"SIGTERM received: stopped; {resume}"
