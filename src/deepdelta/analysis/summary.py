"""One row per run (summary.json) and one table per sweep (summary.md / summary.csv)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

COLUMNS = [
    "job", "name", "status", "train_loss", "val_loss", "val_ppl", "val_step", "params", "tokens", "tok_per_s",
    "error", "log", "run_dir",
]  # fmt: skip
MISSING = "not measured"  # what the sweep table shows for a figure a job never produced


def last_metrics(metrics_csv: Path) -> dict[str, float]:
    """The last logged value of every column of a Lightning CSVLogger file."""
    if not metrics_csv.exists():
        return {}
    frame = pd.read_csv(metrics_csv)
    return {col: float(frame[col].dropna().iloc[-1]) for col in frame.columns if frame[col].notna().any()}


def last_validation(metrics_csv: Path) -> tuple[float | None, float | None, int | None]:
    """(val loss, val perplexity, step) of the run's last validation, or Nones. Lightning logs a validation
    run after optimizer step N under ``step`` N - 1 (the index of the step it follows)."""
    if not metrics_csv.exists():
        return None, None, None
    frame = pd.read_csv(metrics_csv)
    if "val/loss" not in frame or not frame["val/loss"].notna().any():
        return None, None, None
    row = frame[frame["val/loss"].notna()].iloc[-1]
    loss = float(row["val/loss"])
    ppl = float(row["val/ppl"]) if "val/ppl" in row and pd.notna(row["val/ppl"]) else math.exp(loss)
    return loss, ppl, int(row["step"]) + 1


def tokens_per_second(metrics: dict[str, float]) -> float | None:
    """Steady-state training tok/s (the ThroughputMonitor's window), else all tokens over the training time
    (a run shorter than the monitor's window logs no rate; `Run.tokens_per_s` reads it the same way)."""
    rate = metrics.get("train/items_per_sec", metrics.get("train/device/items_per_sec"))
    if rate is None and metrics.get("train/time", 0) > 0 and "train/tokens" in metrics:
        rate = metrics["train/tokens"] / metrics["train/time"]
    return rate


def _finite(value: float | None) -> float | None:
    """JSON has no NaN: a figure that is not there is null."""
    return None if value is None or not math.isfinite(value) else value


def run_summary(run_dir: Path, name: str, status: str, params: int, error: str = "") -> dict[str, Any]:
    """Summarise a finished (or failed) run from its CSV metrics and write summary.json; ``val_loss`` is the
    last validation's, measured after step ``val_step`` (null when the run never validated)."""
    metrics_csv = run_dir / "csv" / "metrics.csv"
    m = last_metrics(metrics_csv)
    val_loss, val_ppl, val_step = last_validation(metrics_csv)
    row = {
        "job": run_dir.name,
        "name": name,
        "status": status,
        "train_loss": _finite(m.get("train/loss")),
        "val_loss": _finite(val_loss),
        "val_ppl": _finite(val_ppl),
        "val_step": val_step,
        "params": params or None,  # 0: the model was never built
        "tokens": m.get("train/tokens", 0.0),
        "tok_per_s": _finite(tokens_per_second(m)),
        "error": error,
        "log": str(run_dir / "train.log"),  # Hydra's job log; a failed job's traceback is in it
        "run_dir": str(run_dir),
    }
    tmp = run_dir / ".summary.json.tmp"  # atomic: a kill mid-write must not leave a broken table row
    tmp.write_text(json.dumps(row, indent=2))
    os.replace(tmp, run_dir / "summary.json")
    return row


def validation_text(row: dict[str, Any]) -> str:
    """The last validation in words: ``val loss 2.0123 at step 300``, or that there was none."""
    loss, step = row.get("val_loss"), row.get("val_step")
    if loss is None or (isinstance(loss, float) and math.isnan(loss)):
        return "not validated"
    return f"val loss {loss:.4f} at step {step}" if step is not None else f"val loss {loss:.4f}"


def sweep_table(sweep_dir: Path) -> pd.DataFrame:
    rows = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/summary.json"))]
    # a job killed outright (OOM, SIGKILL) leaves its directory but no summary: list it, not hide it
    seen = {Path(r["run_dir"]).name for r in rows}
    for job in sorted(p.parent for p in sweep_dir.glob("*/.hydra")):
        if job.name not in seen:
            rows.append({"job": job.name, "status": "killed", "error": "no summary.json: the process died",
                         "log": str(job / "train.log"), "run_dir": str(job)})  # fmt: skip
    frame = pd.DataFrame(rows, columns=COLUMNS)
    if not frame.empty:
        frame = frame.sort_values("job", key=lambda s: s.map(lambda j: int(j) if str(j).isdigit() else 1 << 30))
    return frame


def write_sweep_summary(sweep_dir: Path) -> pd.DataFrame:
    """Write summary.csv and summary.md in the sweep directory and return the table."""
    frame = sweep_table(sweep_dir)
    frame.to_csv(sweep_dir / "summary.csv", index=False)
    shown = frame.drop(columns=["run_dir"]).copy()
    # one line per job: a multi-line error (every problem of a rejected config) would break the table
    shown["error"] = shown["error"].fillna("").astype(str).str.replace(r"\s+", " ", regex=True).str.slice(0, 120)
    shown["log"] = [_relative(p, sweep_dir) for p in shown["log"]]
    formats = {"train_loss": ".4f", "val_loss": ".4f", "val_ppl": ".2f", "val_step": ".0f", "params": ",.0f",
               "tokens": ",.0f", "tok_per_s": ",.0f"}  # fmt: skip
    for col, fmt in formats.items():  # a missing figure in words, never "nan"
        shown[col] = [MISSING if _missing(v) else format(float(v), fmt) for v in shown[col]]
    (sweep_dir / "summary.md").write_text(shown.to_markdown(index=False, disable_numparse=True) + "\n")
    return frame


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _relative(path: Any, root: Path) -> str:
    if not isinstance(path, str) or not path:
        return ""
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, tabulate every job and print the table. Failed jobs are
    listed with their error; the process then exits non-zero (2 when every one was a rejected config)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        frame = write_sweep_summary(sweep_dir)
        print(f"\nSweep summary ({sweep_dir / 'summary.md'}):\n")
        print((sweep_dir / "summary.md").read_text())
        failed = frame[frame["status"] != "finished"]
        if len(failed):
            print(f"{len(failed)} of {len(frame)} jobs did not finish: " + ", ".join(map(str, failed["job"])))
            raise SystemExit(2 if (failed["status"] == "rejected").all() else 1)
