"""A sweep with one impossible member: the others finish, the rejection is recorded, the sweep exits non-zero."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow


def test_three_job_sweep_with_one_impossible_config(train, tmp_path):
    sweep = tmp_path / "sweep"
    rc, out = train("-m", f"hydra.sweep.dir={sweep}", "trainer.max_steps=10", "dv=1,0,2")
    assert rc == 2, out[-3000:]  # every job that did not finish was a rejected config
    assert "1 of 3 jobs did not finish: 1" in out
    assert "Traceback" not in out

    table = pd.read_csv(sweep / "summary.csv")
    assert list(table["status"]) == ["finished", "rejected", "finished"]
    rejected = table.iloc[1]
    assert "model.dv: got 0, allowed: an integer >= 1" in rejected["error"]
    assert Path(rejected["log"]) == sweep / "1" / "train.log"
    assert "model.dv: got 0" in Path(rejected["log"]).read_text()  # the message is in the job's log
    for job in (0, 2):
        summary = json.loads((sweep / str(job) / "summary.json").read_text())
        assert summary["tokens"] == 10 * 4 * 64 and summary["val_step"] == 10
    shown = (sweep / "summary.md").read_text()
    assert "rejected" in shown and "1/train.log" in shown and "not measured" in shown
    assert not re.search(r"\bnan\b", shown, re.IGNORECASE)  # a missing figure in words
