"""A sweep with one impossible member: the others finish, the failure is recorded, the sweep exits non-zero."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow


def test_three_job_sweep_with_one_impossible_config(train, tmp_path):
    sweep = tmp_path / "sweep"
    rc, out = train("-m", f"hydra.sweep.dir={sweep}", "trainer.max_steps=10", "dv=1,0,2")
    assert rc != 0, out[-3000:]
    assert "1 of 3 jobs failed: 1" in out

    table = pd.read_csv(sweep / "summary.csv")
    assert list(table["status"]) == ["finished", "failed", "finished"]
    failed = table.iloc[1]
    assert "model.dv: got 0, allowed: an integer >= 1" in failed["error"]
    assert Path(failed["log"]) == sweep / "1" / "train.log"
    assert "model.dv: got 0" in Path(failed["log"]).read_text()  # the traceback is in the job's log
    for job in (0, 2):
        assert json.loads((sweep / str(job) / "summary.json").read_text())["tokens"] == 10 * 4 * 64
    shown = (sweep / "summary.md").read_text()
    assert "failed" in shown and "1/train.log" in shown
