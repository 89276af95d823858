"""A run resumed in place keeps its curves: csv/metrics.csv and probes.csv hold every step once, as uninterrupted."""

from __future__ import annotations

import csv

import pandas as pd
import pytest

from deepdelta.loggers import ResumableCSVLogger
from tests.reliability.conftest import PROBED, assert_same_logs, last_step


@pytest.mark.slow
def test_killed_twice_then_resumed_logs_like_uninterrupted(train, tmp_path, reference):
    run = tmp_path / "killed"
    rc, out = train(*PROBED, run_dir=run, tiny=False, DEEPDELTA_FAULT_KILL="27")  # last checkpoint: step 20
    assert rc < 0 and "FAULT: SIGKILL at the start of step 27" in out, out[-3000:]
    assert last_step(run) == 20
    # logged after the checkpoint, so logged again by the resumed run: steps 20-25 (Lightning logs a step's
    # metrics under its 0-based index; the probe under the global step after it)
    assert pd.read_csv(run / "csv" / "metrics.csv")["train/loss"].count() == 26
    assert pd.read_csv(run / "probes.csv")["step"].max() == 25

    # resumed, killed again after the step-30 checkpoint, resumed to the end
    rc, out = train(f"resume={run}", tiny=False, DEEPDELTA_FAULT_KILL="36")
    assert rc < 0 and "FAULT: SIGKILL at the start of step 36" in out, out[-3000:]
    assert last_step(run) == 30
    rc, out = train(f"resume={run}", tiny=False)
    assert rc == 0, out[-3000:]
    assert_same_logs(reference, run)


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)


def test_csv_logger_keeps_rows_before_the_resume_step_and_adds_new_columns(tmp_path):
    path = tmp_path / "csv" / "metrics.csv"
    write(path, [{"step": s, "train/loss": 10.0 - s} for s in range(8)] + [{"step": 3, "val/loss": 1.5}])
    logger = ResumableCSVLogger(tmp_path, name="csv", version="", resume_step=5)
    logger.log_hyperparams({"a": 1})
    assert len(pd.read_csv(path)) == 9  # nothing dropped before the resumed run writes
    for s in range(5, 7):
        logger.log_metrics({"train/loss": 10.0 - s, "probe/new": float(s)}, step=s)
    logger.finalize("success")
    frame = pd.read_csv(path)
    assert sorted(frame.columns) == ["probe/new", "step", "train/loss", "val/loss"]
    assert list(frame["step"]) == [0, 1, 2, 3, 4, 3, 5, 6]
    assert list(frame["train/loss"].dropna()) == [10.0 - s for s in [0, 1, 2, 3, 4, 5, 6]]
    assert frame.loc[frame["step"] < 5, "probe/new"].isna().all() and list(frame["probe/new"].dropna()) == [5, 6]
    assert frame["val/loss"].dropna().tolist() == [1.5]


def test_csv_logger_of_a_new_run_starts_a_new_file(tmp_path):
    path = tmp_path / "csv" / "metrics.csv"
    write(path, [{"step": s, "train/loss": 1.0} for s in range(8)])
    logger = ResumableCSVLogger(tmp_path, name="csv", version="")  # resume_step None: Lightning's behaviour
    logger.log_metrics({"x": 2.0}, step=0)
    logger.finalize("success")
    frame = pd.read_csv(path)
    assert list(frame.columns) == ["step", "x"] and len(frame) == 1


def test_csv_logger_resumed_from_step_zero(tmp_path):
    path = tmp_path / "csv" / "metrics.csv"
    write(path, [{"step": s, "train/loss": 1.0} for s in range(8)])
    logger = ResumableCSVLogger(tmp_path, name="csv", version="", resume_step=0)
    logger.log_metrics({"train/loss": 2.0}, step=0)
    logger.save()
    frame = pd.read_csv(path)
    assert frame["step"].tolist() == [0] and frame["train/loss"].tolist() == [2.0]
