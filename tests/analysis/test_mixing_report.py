"""`make report` for Hyper-Connection runs (hc, mhc): the mixing probes of probes.csv in the run
and sweep reports, on hand-made run directories whose numbers are known."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from deepdelta.analysis import report, tables
from deepdelta.analysis.mechanism import MIX_COLUMNS
from deepdelta.analysis.runs import baseline_for, find_runs, group_runs

LOSS = {"additive": [3.00, 3.10], "hc": [2.95, 3.02], "mhc": [2.90, 3.04]}


def mix_dist(residual: str, seed: int, step: int, layer: int) -> float:
    """The made-up distance from identity: grows with the step and the layer, differs by seed."""
    return 0.1 * (step + 1) * (layer + 1) + 0.01 * seed + (0.05 if residual == "mhc" else 0.0)


def make_run(path: Path, residual: str, seed: int, steps: int = 4, probes: bool = True) -> None:
    """A run directory as the CLI leaves it (.hydra, summary.json, csv/metrics.csv, probes.csv) at dv = 2."""
    (path / ".hydra").mkdir(parents=True)
    config = {
        "dv": 2, "seed": seed, "project": "deepdelta",
        "model": {"dv": "${dv}", "residual": residual, "n_layer": 2, "expand": "repeat"},
        "data": {"seed": "${seed}", "batch_size": 4},
        "paths": {"output_dir": str(path)}, "trainer": {"default_root_dir": str(path), "max_steps": steps},
    }  # fmt: skip
    OmegaConf.save(OmegaConf.create(config), path / ".hydra" / "config.yaml")
    OmegaConf.save(
        OmegaConf.create([f"seed={seed}", f"residual={residual}", "dv=2"]), path / ".hydra" / "overrides.yaml"
    )
    loss = LOSS[residual][seed]
    summary = {"job": path.name, "status": "finished", "val_loss": loss, "params": 1e6, "tok_per_s": 1000.0,
               "tokens": 1000.0 * steps}  # fmt: skip
    (path / "summary.json").write_text(json.dumps(summary))
    rows = [{"step": s, "train/loss": loss + 1 - s / steps, "train/tokens": 1000.0 * (s + 1),
             "train/time": 0.5 * (s + 1), "val/loss": loss if s == steps - 1 else math.nan}
            for s in range(steps)]  # fmt: skip
    (path / "csv").mkdir()
    pd.DataFrame(rows).to_csv(path / "csv" / "metrics.csv", index=False)
    if residual == "additive" or not probes:
        return
    frame = []
    for step in (0, steps):
        for layer in range(2):
            for part in ("attn", "mlp"):
                frame.append({
                    "step": step, "sublayer": f"{layer}.{part}", "layer": layer, "part": part,
                    "mix_dist": mix_dist(residual, seed, step, layer), "mix_dist_std": 0.02 * step,
                    "mix_read_entropy": 0.3 + 0.1 * layer,
                    "mix_sinkhorn_residual": 1e-7 * (layer + 1) if residual == "mhc" else math.nan,
                })  # fmt: skip
    pd.DataFrame(frame, columns=["step", "sublayer", "layer", "part", *MIX_COLUMNS]).to_csv(
        path / "probes.csv", index=False
    )


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    job = 0
    for seed in range(2):
        for residual in LOSS:
            make_run(tmp_path / "sweep" / str(job), residual, seed)
            job += 1
    return tmp_path / "sweep"


def test_run_report_shows_the_mixing_of_mhc_and_hc(sweep):
    mhc = report.main(["--run", str(sweep / "2")]).read_text()
    for name in ["loss", "mix_heatmap", "mixing"]:
        assert f"](figures/{name}.png)" in mhc and (sweep / "2" / "figures" / f"{name}.png").stat().st_size > 5_000
    assert "beta_heatmap" not in mhc and "there is no gate" not in mhc
    assert f"log n = {math.log(2):.3f}" in mhc  # the entropy's ceiling at n = dv = 2
    table = next(line for line in mhc.splitlines() if line.startswith("| 1.mlp "))
    assert f"{mix_dist('mhc', 0, 4, 1):.3f}".rstrip("0") in table and "2e-07" in table  # the last probe
    assert "mix_sinkhorn_residual" in mhc
    hc = report.main(["--run", str(sweep / "1")]).read_text()
    assert "](figures/mix_heatmap.png)" in hc and "mix_sinkhorn_residual" not in hc  # hc has no Sinkhorn
    assert "Sinkhorn residual, per sublayer" not in hc


def test_run_report_of_an_hc_run_without_mixing_probes(tmp_path):
    make_run(tmp_path / "run", "hc", 0, probes=False)
    text = report.main(["--run", str(tmp_path / "run")]).read_text()
    assert "No mixing probes recorded for residual `hc`" in text and "mix_heatmap" not in text


def test_sweep_report_has_a_mixing_section(sweep):
    text = report.main(["--sweep", str(sweep)]).read_text()
    assert "## The mixing (Hyper-Connections)" in text
    assert "](figures/mix_heatmaps.png)" in text and (sweep / "figures" / "mix_heatmaps.png").exists()
    assert "beta_heatmaps.png" not in text  # no configuration has a gate
    groups = group_runs(find_runs(sweep))
    by_label = {g.label: g for g in groups}
    mixing = tables.mixing_table(groups).set_index("model")
    assert list(mixing.index) == ["residual=hc", "residual=mhc"]
    # last probe (step 4), sublayers averaged over seeds 0 and 1, then over sublayers / their max
    want = [sum(mix_dist("mhc", s, 4, layer) for s in range(2)) / 2 for layer in (0, 0, 1, 1)]
    assert mixing.loc["residual=mhc", "mean ‖mix − I‖"] == pytest.approx(sum(want) / 4, abs=1e-3)
    assert mixing.loc["residual=mhc", "max ‖mix − I‖ (sublayer)"] == pytest.approx(max(want), abs=1e-3)
    assert mixing.loc["residual=mhc", "mean read entropy"] == pytest.approx(0.35)
    assert mixing.loc["residual=mhc", "max Sinkhorn residual"] == pytest.approx(2e-7)
    assert pd.isna(mixing.loc["residual=hc", "max Sinkhorn residual"])
    # hc and mhc are compared with the additive configuration, never with each other
    assert baseline_for(by_label["residual=mhc"], groups).label == "residual=additive"
    assert tables.mechanism_table(groups).set_index("model").loc["residual=hc", "step"] == "no gate"
