"""The report from a real 2-seed tiny sweep (ddl, additive), through the CLI."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pandas as pd
import pytest

from deepdelta.analysis import report
from deepdelta.analysis.stats import t_quantile
from tests.analysis.conftest import env
from tests.conftest import ROOT
from tests.test_cli import wandb_summary

pytestmark = pytest.mark.slow


def test_sweep_report_has_seed_statistics(tiny_sweep, cache_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "deepdelta.analysis.report", "--sweep", str(tiny_sweep)],
        cwd=ROOT, env=env(cache_dir), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"report: {tiny_sweep / 'report.md'}" in proc.stdout
    text = (tiny_sweep / "report.md").read_text()
    ddl_row = next(line for line in text.splitlines() if line.startswith("| residual=ddl "))
    assert re.search(r"\| +2 +\| \d\.\d{4} ± \d\.\d{4} +\| [\d.]+ ± [\d.]+ +\| [+-]\d\.\d{4} \[", ddl_row), ddl_row
    for name in ["loss", "beta_heatmaps", "regimes"]:
        assert f"](figures/{name}.png)" in text and (tiny_sweep / "figures" / f"{name}.png").exists()
    # the paired difference and its interval, by hand from the two runs of each configuration
    summary = pd.read_csv(tiny_sweep / "summary.csv").set_index("job")
    diffs = [
        summary.loc[0, "val_loss"] - summary.loc[1, "val_loss"],
        summary.loc[2, "val_loss"] - summary.loc[3, "val_loss"],
    ]
    results = pd.read_csv(tiny_sweep / "results.csv").set_index("residual")
    mean, sd = sum(diffs) / 2, abs(diffs[0] - diffs[1]) / math.sqrt(2)
    assert results.loc["ddl", "delta"] == pytest.approx(mean, rel=1e-6)
    assert results.loc["ddl", "delta_high"] == pytest.approx(mean + t_quantile(0.975, 1) * sd / math.sqrt(2), rel=1e-6)
    assert results.loc["ddl", "seeds"] == 2 and results.loc["additive", "val_loss_std"] > 0


def test_run_reports_for_ddl_and_additive(tiny_sweep):
    ddl = report.main(["--run", str(tiny_sweep / "0")]).read_text()
    for name in ["loss", "beta_heatmap", "regimes", "mechanism"]:
        assert f"](figures/{name}.png)" in ddl
    assert "0.attn" in ddl and "1.mlp" in ddl  # the per-sublayer table
    additive = report.main(["--run", str(tiny_sweep / "1")]).read_text()
    assert "there is no gate" in additive and "beta_heatmap" not in additive


def test_probes_reach_csv_and_wandb(tiny_sweep):
    probes = pd.read_csv(tiny_sweep / "0" / "probes.csv")
    assert sorted(probes["step"].unique()) == [0, 5, 10] and probes["sublayer"].nunique() == 4
    assert not (tiny_sweep / "1" / "probes.csv").exists()  # additive: no gate, no probes, no failure
    metrics = pd.read_csv(tiny_sweep / "0" / "csv" / "metrics.csv")
    assert {"beta/0.attn/q05", "beta/1.mlp/near_reflection", "k/0.mlp/small", "e_pre/1.attn/norm"} <= set(metrics)
    wb = wandb_summary(tiny_sweep / "0")["summary"]
    assert "beta_heatmap" in wb and "beta_hist/1.mlp" in wb and "beta/1.mlp/skip" in wb
