"""An injected NaN (test-only hook DEEPDELTA_FAULT_NAN=STEP:LAYER) stops the run with a diagnosis, or is skipped."""

from __future__ import annotations

import json

import pandas as pd
import pytest

pytestmark = pytest.mark.slow


def test_nan_stops_with_step_loss_layers_and_last_checkpoint(train, tmp_path):
    run = tmp_path / "nan"
    rc, out = train(run_dir=run, DEEPDELTA_FAULT_NAN="13:1")
    assert rc != 0
    assert "training diverged at step 13: loss = nan" in out
    assert "non-finite β in sublayers: 1.attn, 1.mlp" in out  # layer 0 stays finite: the fault is in layer 1
    assert "non-finite ‖k̃‖ in sublayers: 1.attn, 1.mlp" in out
    assert "non-finite activations, first in execution order: blocks.1.norm_attn," in out
    assert f"last good checkpoint: {run / 'checkpoints' / 'last.ckpt'} (step 10)" in out
    assert "callbacks.divergence.max_skips=N" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "Diverged: training diverged at step 13" in summary["error"]


def test_nan_step_is_skipped_within_budget(train, tmp_path):
    run = tmp_path / "skip"
    rc, out = train("callbacks.divergence.max_skips=1", run_dir=run, DEEPDELTA_FAULT_NAN="13:1")
    assert rc == 0, out[-3000:]
    assert "step 13: loss = nan, non-finite loss or gradient; skipped this optimizer step (1 of" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished"
    metrics = pd.read_csv(run / "csv" / "metrics.csv")
    assert metrics["train/skipped_steps"].max() == 1
    assert pd.notna(summary["val_loss"]) and summary["val_loss"] < 6  # the weights survived the bad step
