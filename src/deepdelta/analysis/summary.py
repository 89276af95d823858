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
    "job", "name", "status", "train_loss", "val_loss", "val_ppl", "params", "tokens", "tok_per_s", "error", "log",
    "run_dir",
]  # fmt: skip


def last_metrics(metrics_csv: Path) -> dict[str, float]:
    """The last logged value of every column of a Lightning CSVLogger file."""
    if not metrics_csv.exists():
        return {}
    frame = pd.read_csv(metrics_csv)
    return {col: float(frame[col].dropna().iloc[-1]) for col in frame.columns if frame[col].notna().any()}


def run_summary(run_dir: Path, name: str, status: str, params: int, error: str = "") -> dict[str, Any]:
    """Summarise a finished (or failed) run from its CSV metrics and write summary.json."""
    m = last_metrics(run_dir / "csv" / "metrics.csv")
    val_loss = m.get("val/loss", math.nan)
    row = {
        "job": run_dir.name,
        "name": name,
        "status": status,
        "train_loss": m.get("train/loss", math.nan),
        "val_loss": val_loss,
        "val_ppl": m.get("val/ppl", math.exp(val_loss) if not math.isnan(val_loss) else math.nan),
        "params": params,
        "tokens": m.get("train/tokens", 0.0),
        "tok_per_s": m.get("train/items_per_sec", m.get("train/device/items_per_sec", math.nan)),
        "error": error,
        "log": str(run_dir / "train.log"),  # Hydra's job log; a failed job's traceback is in it
        "run_dir": str(run_dir),
    }
    tmp = run_dir / ".summary.json.tmp"  # atomic: a kill mid-write must not leave a broken table row
    tmp.write_text(json.dumps(row, indent=2))
    os.replace(tmp, run_dir / "summary.json")
    return row


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
    shown["error"] = shown["error"].fillna("").astype(str).str.slice(0, 80)
    shown["log"] = [_relative(p, sweep_dir) for p in shown["log"]]
    formats = {"train_loss": ".4f", "val_loss": ".4f", "val_ppl": ".2f", "tokens": ",.0f", "tok_per_s": ",.0f"}
    floatfmt = tuple(formats.get(col, "g") for col in shown.columns)
    (sweep_dir / "summary.md").write_text(shown.to_markdown(index=False, floatfmt=floatfmt) + "\n")
    return frame


def _relative(path: Any, root: Path) -> str:
    if not isinstance(path, str) or not path:
        return ""
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, tabulate every job and print the table.
    Failed jobs are listed with their error; the process then exits non-zero."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        frame = write_sweep_summary(sweep_dir)
        print(f"\nSweep summary ({sweep_dir / 'summary.md'}):\n")
        print((sweep_dir / "summary.md").read_text())
        failed = frame[frame["status"] != "finished"]
        if len(failed):
            print(f"{len(failed)} of {len(frame)} jobs failed: " + ", ".join(map(str, failed["job"])))
            raise SystemExit(1)
