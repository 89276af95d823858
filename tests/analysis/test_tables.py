"""Grouping by config minus seed, baseline matching and the results table, on hand-made
run directories whose numbers are known."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from deepdelta.analysis import report, tables
from deepdelta.analysis.mechanism import COLUMNS
from deepdelta.analysis.runs import baseline_for, find_runs, group_runs, newest
from deepdelta.analysis.stats import t_quantile

# val loss of (residual, dv) at seeds 0, 1, 2; tok/s and peak memory per configuration
LOSS = {
    ("additive", 1): [3.00, 3.10, 3.05],
    ("ddl", 1): [2.95, 3.08, 3.00],
    ("additive", 4): [2.90, 3.00, 2.96],
    ("ddl", 4): [2.80, 2.85, 2.90],
}
TOK = {("additive", 1): 1000.0, ("ddl", 1): 880.0, ("additive", 4): 900.0, ("ddl", 4): 450.0}
MEM = {("additive", 1): 2.0, ("ddl", 1): 2.0, ("additive", 4): 2.5, ("ddl", 4): 3.0}


def make_run(path: Path, residual: str, dv: int, seed: int, steps: int = 4) -> None:
    """A run directory as the CLI leaves it: .hydra, summary.json, csv/metrics.csv, probes.csv."""
    (path / ".hydra").mkdir(parents=True)
    config = {
        "dv": dv, "seed": seed, "project": "deepdelta",
        "model": {"dv": "${dv}", "residual": residual, "n_layer": 2, "beta_max": 2.0},
        "data": {"seed": "${seed}", "batch_size": 4},
        "paths": {"output_dir": str(path)}, "trainer": {"default_root_dir": str(path), "max_steps": steps},
    }  # fmt: skip
    OmegaConf.save(OmegaConf.create(config), path / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create([f"seed={seed}", f"residual={residual}", f"dv={dv}", "debug=fast"]),
                   path / ".hydra" / "overrides.yaml")  # fmt: skip
    loss = LOSS[(residual, dv)][seed]
    summary = {"job": path.name, "name": f"dv={dv},residual={residual},seed={seed}", "status": "finished",
               "val_loss": loss, "params": 1e6 * dv, "tok_per_s": TOK[(residual, dv)],
               "tokens": 1000.0 * steps}  # fmt: skip
    (path / "summary.json").write_text(json.dumps(summary))
    rows = [{"step": s, "train/loss": loss + 1 - s / steps, "train/tokens": 1000.0 * (s + 1),
             "train/flops": 6e9 * (s + 1), "train/time": 0.5 * (s + 1), "train/peak_mem_gb": MEM[(residual, dv)],
             "val/loss": loss if s == steps - 1 else math.nan} for s in range(steps)]  # fmt: skip
    (path / "csv").mkdir()
    pd.DataFrame(rows).to_csv(path / "csv" / "metrics.csv", index=False)
    if residual != "additive":
        probes = []
        for s in (0, steps):
            for layer in range(2):
                for part in ("attn", "mlp"):
                    row = dict.fromkeys(COLUMNS, 0.0)
                    row.update(beta_mean=1.0 + 0.1 * layer * s / steps, beta_overwrite=0.75, beta_skip=0.25,
                               k_norm=0.9, e_pre_norm=0.5)  # fmt: skip
                    probes.append({"step": s, "sublayer": f"{layer}.{part}", "layer": layer, "part": part, **row})
        pd.DataFrame(probes).to_csv(path / "probes.csv", index=False)


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    job = 0
    for seed in range(3):
        for residual, dv in LOSS:
            make_run(tmp_path / "sweep" / str(job), residual, dv, seed)
            job += 1
    return tmp_path / "sweep"


def test_runs_group_by_config_minus_seed(sweep):
    runs = find_runs(sweep)
    assert [r.path.name for r in runs] == [str(i) for i in range(12)]
    groups = group_runs(runs)
    assert [g.label for g in groups] == ["residual=additive dv=1", "residual=ddl dv=1", "residual=additive dv=4",
                                         "residual=ddl dv=4"]  # fmt: skip
    assert all(g.seeds == [0, 1, 2] for g in groups)
    by_label = {g.label: g for g in groups}
    assert baseline_for(by_label["residual=ddl dv=4"], groups).label == "residual=additive dv=4"
    assert baseline_for(by_label["residual=ddl dv=1"], groups).label == "residual=additive dv=1"


def test_results_table_by_hand(sweep):
    table = tables.results_table(group_runs(find_runs(sweep))).set_index("model")
    ddl4 = table.loc["residual=ddl dv=4"]
    losses = LOSS[("ddl", 4)]
    assert ddl4["seeds"] == 3 and ddl4["val_loss"] == pytest.approx(sum(losses) / 3)
    assert ddl4["val_loss_std"] == pytest.approx(pd.Series(losses).std())
    assert ddl4["val_ppl"] == pytest.approx(sum(math.exp(v) for v in losses) / 3)
    diffs = pd.Series([a - b for a, b in zip(losses, LOSS[("additive", 4)], strict=True)])
    half = t_quantile(0.975, 2) * diffs.std() / math.sqrt(3)
    assert ddl4["delta"] == pytest.approx(diffs.mean())
    assert (ddl4["delta_low"], ddl4["delta_high"]) == pytest.approx((diffs.mean() - half, diffs.mean() + half))
    assert ddl4["tok_ratio"] == pytest.approx(450 / 900) and ddl4["mem_ratio"] == pytest.approx(3.0 / 2.5)
    assert ddl4["params"] == 4e6
    assert table.loc["residual=additive dv=1", "baseline"] == ""
    shown = tables.format_results(table.reset_index()).set_index("model")
    assert shown.loc["residual=ddl dv=4", "val loss"] == f"{sum(losses) / 3:.4f} ± {pd.Series(losses).std():.4f}"
    assert shown.loc["residual=additive dv=1", "Δ val loss vs additive [95% CI]"] == "baseline"
    assert shown.loc["residual=ddl dv=4", "tok/s ×"] == "0.50×"


def test_sweep_report_in_process(sweep):
    path = report.main(["--sweep", str(sweep)])
    text = path.read_text()
    assert "residual=ddl dv=4" in text and " ± " in text and "Δ val loss vs additive [95% CI]" in text
    for name in ["loss", "beta_heatmaps", "regimes"]:
        assert f"](figures/{name}.png)" in text and (sweep / "figures" / f"{name}.png").stat().st_size > 10_000
    assert (sweep / "report.html").exists() and "<img src='figures/loss.png'>" in (sweep / "report.html").read_text()
    mechanism = tables.mechanism_table(group_runs(find_runs(sweep))).set_index("model")
    assert mechanism.loc["residual=additive dv=1", "step"] == "no gate"
    assert mechanism.loc["residual=ddl dv=1", "mean β"] == pytest.approx(1.05)  # (1.0 + 1.1) / 2 at the last step


def test_single_seed_has_no_interval(tmp_path):
    make_run(tmp_path / "s" / "0", "additive", 1, 0)
    make_run(tmp_path / "s" / "1", "ddl", 1, 0)
    table = tables.format_results(tables.results_table(group_runs(find_runs(tmp_path / "s"))))
    assert table.loc[1, "Δ val loss vs additive [95% CI]"] == "-0.0500 (1 seed)"
    assert table.loc[1, "val loss"] == "2.9500"


def test_newest_finds_outputs_from_a_subdirectory(tmp_path):
    for name in ["2026-11-20_10-00-00", "2026-11-22_09-00-00"]:
        (tmp_path / "outputs" / "runs" / name).mkdir(parents=True)
    (tmp_path / "notebooks").mkdir()
    assert newest("runs", tmp_path / "notebooks").name == "2026-11-22_09-00-00"
    with pytest.raises(FileNotFoundError):
        newest("sweeps", tmp_path / "notebooks")


def test_a_model_field_added_later_counts_as_its_default(tmp_path):
    """Runs saved before a model field existed group with runs that spell out its default."""
    make_run(tmp_path / "old", "ddl", 1, 0)
    make_run(tmp_path / "new", "ddl", 1, 1)
    cfg = OmegaConf.load(tmp_path / "new" / ".hydra" / "config.yaml")
    cfg.model.kernel = "plain"
    OmegaConf.save(cfg, tmp_path / "new" / ".hydra" / "config.yaml")
    assert len(group_runs(find_runs(tmp_path))) == 1
    cfg.model.kernel = "fused"
    OmegaConf.save(cfg, tmp_path / "new" / ".hydra" / "config.yaml")
    assert len(group_runs(find_runs(tmp_path))) == 2
