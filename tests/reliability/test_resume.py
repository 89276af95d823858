"""Kill, preempt and interrupt checkpoint writes of real CLI runs; resumed runs must equal an uninterrupted one
(the session's `reference` run), in their weights and in their logs, probes included."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from deepdelta.callbacks.checkpoint import stale_temp_files
from tests.reliability.conftest import PROBED, assert_same_logs, assert_same_training, ckpt_step, last_step

pytestmark = pytest.mark.slow


def test_sigkill_mid_run_then_resume_equals_uninterrupted(train, tmp_path, reference):
    run = tmp_path / "killed"
    job = train(*PROBED, run_dir=run, background=True, tiny=False)
    job.wait_for(lambda: last_step(run) >= 20, "the step-20 checkpoint")
    job.send(signal.SIGKILL)
    assert job.wait() == -signal.SIGKILL
    killed_at = last_step(run)
    assert 20 <= killed_at < 40, killed_at
    assert not (run / "summary.json").exists()  # it really died mid-run

    # the documented one-command resume: the run's own overrides are replayed from its .hydra/
    rc, out = train(f"resume={run}", tiny=False)
    assert rc == 0, out[-3000:]
    assert f"resuming from {run / 'checkpoints' / 'last.ckpt'}" in out
    assert_same_training(reference, run)
    assert_same_logs(reference, run, validation=False)


def test_sigterm_saves_exits_zero_and_resume_continues(train, tmp_path, reference):
    run = tmp_path / "preempted"
    job = train(*PROBED, run_dir=run, background=True, tiny=False)
    job.wait_for(lambda: last_step(run) >= 10, "the first checkpoint")
    job.send(signal.SIGTERM)
    assert job.wait() == 0, job.output()[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "preempted", summary
    assert f"resume={run}" in summary["error"]
    saved = last_step(run)
    assert 10 <= saved < 40  # saved at the step boundary after the signal, not only at step 10
    assert "SIGTERM received: saved" in job.output()

    rc, out = train(f"resume={run}", tiny=False)
    assert rc == 0, out[-3000:]
    assert_same_training(reference, run)
    assert_same_logs(reference, run, validation=False)


def test_sigint_saves_exits_zero_with_the_resume_command(train, tmp_path):
    """Ctrl-C: saved at the next step boundary, status "interrupted", exit 0, the resume command printed (the
    resume itself is the SIGTERM test's: the same step-boundary checkpoint)."""
    run = tmp_path / "interrupted"
    job = train(run_dir=run, background=True)
    job.wait_for(lambda: last_step(run) >= 10, "the first checkpoint")
    job.send(signal.SIGINT)
    assert job.wait() == 0, job.output()[-3000:]
    saved = last_step(run)
    assert 10 <= saved < 40
    out = job.output()
    assert "Traceback" not in out
    assert f"Ctrl-C (SIGINT) received: saved {run / 'checkpoints' / 'last.ckpt'} at step {saved}" in out
    assert f"resume with: python src/train.py resume={run}" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and f"resume={run}" in summary["error"], summary


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(train, tmp_path, reference):
    run = tmp_path / "torn"
    stall = {"DEEPDELTA_FAULT_CKPT_STALL": "20"}  # the step-20 write stalls
    job = train(*PROBED, run_dir=run, background=True, tiny=False, **stall)
    job.wait_for(lambda: "checkpoint write stalled" in job.output(), "the stalled write")
    (partial,) = stale_temp_files(run / "checkpoints")
    assert partial.stat().st_size > 0
    job.send(signal.SIGKILL)
    job.wait()

    # the previous checkpoint is intact and loads with weights_only=True; the torn one never became last.ckpt
    assert ckpt_step(run / "checkpoints" / "last.ckpt") == 10
    with pytest.raises(Exception):  # noqa: B017 - any error: half a zip archive
        torch.load(partial, map_location="cpu", weights_only=True)

    rc, out = train(f"resume={run}", tiny=False)
    assert rc == 0, out[-3000:]
    assert not stale_temp_files(run / "checkpoints")  # cleaned up on resume
    assert_same_training(reference, run)
    assert_same_logs(reference, run, validation=False)
