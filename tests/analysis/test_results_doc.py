"""`report --out`: the results document (docs/results.md from results/replication), on a
fabricated sweep whose answers are known, and on the committed raw results."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from deepdelta.analysis import findings, report
from deepdelta.analysis.mechanism import COLUMNS
from deepdelta.analysis.runs import Run, find_runs, group_runs
from tests.conftest import ROOT

# variant: (residual, dv, val loss at seeds 0, 1, 2, tok/s, peak GB). Against `additive`: `worse` is
# higher on every seed (interval above 0), `better` lower on every seed, `same` flips sign (interval
# includes 0); `cc` is compared with `additive_cc` (dv=4, the closest additive), and is better.
SWEEP = {
    "additive": ("additive", 1, [3.00, 3.10, 3.05], 1000.0, 2.0),
    "worse": ("ddl", 1, [3.10, 3.21, 3.14], 500.0, 3.0),
    "better": ("write_only", 1, [2.90, 2.98, 2.97], 1200.0, 2.0),
    "same": ("ddl_v", 1, [3.06, 3.04, 3.06], 900.0, 2.2),
    "additive_cc": ("additive", 4, [2.50, 2.60, 2.55], 800.0, 2.5),
    "cc": ("ddl", 4, [2.42, 2.52, 2.47], 400.0, 3.0),
}
EXTRA = {"same": "model.tags=[a,b]"}  # an override that needs shell quoting


def make_run(path: Path, variant: str, seed: int, steps: int = 4) -> None:
    residual, dv, losses, tok, mem = SWEEP[variant]
    (path / ".hydra").mkdir(parents=True)
    config = {"seed": seed, "model": {"residual": residual, "dv": dv, "variant": variant, "beta_max": 2.0},
              "data": {"source": "fake", "tokenizer": "byte", "seed": "${seed}"}, "compile": False,
              "paths": {"output_dir": str(path)}}  # fmt: skip
    OmegaConf.save(OmegaConf.create(config), path / ".hydra" / "config.yaml")
    overrides = [f"seed={seed}", f"variant={variant}", "sweep=replication"] + (
        [EXTRA[variant]] if variant in EXTRA else []
    )
    OmegaConf.save(OmegaConf.create(overrides), path / ".hydra" / "overrides.yaml")
    summary = {"job": path.name, "status": "finished", "val_loss": losses[seed], "params": 1e6 * dv,
               "tok_per_s": tok * (1 + 0.01 * seed), "tokens": 4000.0}  # fmt: skip
    (path / "summary.json").write_text(json.dumps(summary))
    rows = [{"step": s, "train/loss": losses[seed] + 1 - s / steps, "train/tokens": 1000.0 * (s + 1),
             "train/flops": 6e9 * (s + 1), "train/time": 0.5 * (s + 1), "train/peak_mem_gb": mem,
             "val/loss": losses[seed] if s == steps - 1 else math.nan} for s in range(steps)]  # fmt: skip
    (path / "csv").mkdir()
    pd.DataFrame(rows).to_csv(path / "csv" / "metrics.csv", index=False)
    if residual != "additive":
        probes = [{"step": s, "sublayer": f"{layer}.mlp", "layer": layer, "part": "mlp",
                   **{**dict.fromkeys(COLUMNS, 0.0), "beta_mean": 0.5 + 0.1 * layer, "k_norm": 1.0}}
                  for s in (0, steps) for layer in range(2)]  # fmt: skip
        pd.DataFrame(probes).to_csv(path / "probes.csv", index=False)


def make_sweep(root: Path) -> Path:
    job = 0
    for seed in range(3):
        for variant in SWEEP:
            make_run(root / "results" / "fake" / str(job), variant, seed)
            job += 1
    return root / "results" / "fake"


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    return make_sweep(tmp_path)


@pytest.fixture(scope="module")
def doc(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``(root, markdown)``: ``report --sweep results/fake --out docs/results.md`` run in ``root``."""
    root = tmp_path_factory.mktemp("doc")
    make_sweep(root)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        path = report.main(["--sweep", "results/fake", "--out", "docs/results.md"])
    finally:
        os.chdir(cwd)
    assert path == Path("docs/results.md")
    return root, (root / path).read_text()


def section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_out_writes_where_asked_with_working_relative_links(doc, monkeypatch):
    root, text = doc
    assert (root / "docs" / "results.html").exists() and (root / "docs" / "results.csv").exists()
    sweep = root / "results" / "fake"
    assert not (sweep / "report.md").exists() and not (sweep / "figures").exists()  # the sweep is only read
    links = re.findall(r"\]\(([^)]+)\)", text)
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert set(images) == {"img/results/loss.png", "img/results/beta_heatmaps.png", "img/results/regimes.png"}
    for link in links:
        assert not Path(link).is_absolute() and (root / "docs" / link).exists(), link
    assert "../results/fake" in links and "results.csv" in links
    assert str(root) not in text  # no machine path: only the relative ones given
    assert "`python -m deepdelta.analysis.report --sweep results/fake --out docs/results.md`" in text
    assert "Directory `results/fake`" in text
    assert "<img src='img/results/loss.png'>" in (root / "docs" / "results.html").read_text()
    monkeypatch.chdir(root)  # the same raw results give the same markdown
    assert report.main(["--sweep", "results/fake", "--out", "docs/results.md"]).read_text() == text


def test_out_must_be_markdown(sweep):
    with pytest.raises(SystemExit):
        report.main(["--sweep", str(sweep), "--out", str(sweep.parent / "results.txt")])


def test_run_report_out(sweep, tmp_path):
    path = report.main(["--run", str(sweep / "1"), "--out", str(tmp_path / "doc" / "run.md")])
    text = path.read_text()
    assert "](img/run/beta_heatmap.png)" in text and (tmp_path / "doc" / "img" / "run" / "beta_heatmap.png").exists()
    assert "Re-run: `python src/train.py seed=0 variant=worse sweep=replication`" in text


def test_rerun_commands_reflect_overrides(doc):
    root, text = doc
    rerun = section(text, "Re-run")
    for group in group_runs(find_runs(root / "results" / "fake")):
        row = next(line for line in rerun.splitlines() if line.startswith(f"| {group.label} "))
        one, every = re.findall(r"`(python src/train\.py [^`]*)`", row)
        overrides = list(OmegaConf.load(group.runs[0].path / ".hydra" / "overrides.yaml"))
        assert shlex.split(one) == ["python", "src/train.py", *overrides]
        assert overrides[0] == "seed=0" and group.seeds == [0, 1, 2]
        assert shlex.split(every) == ["python", "src/train.py", "-m", "seed=0,1,2", *overrides[1:]]
    assert "'model.tags=[a,b]'" in rerun  # quoted for the shell
    cc = next(line for line in rerun.splitlines() if line.startswith("| variant=cc "))
    assert "| variant=additive_cc " in cc  # compared with the closest additive configuration


def test_supports_section_says_worse_better_same(doc):
    supports = section(doc[1], "What the data supports")
    compared = [m for m in SWEEP if not m.startswith("additive")]
    sentence = {m: re.search(rf"^- variant={m}[^:]*: val loss .*$", supports, re.M).group(0) for m in compared}
    assert sentence["worse"].startswith("- variant=worse: val loss higher than variant=additive by 0.100 (95% CI +")
    assert sentence["worse"].endswith("3 paired seeds): worse at this scale.")
    assert "lower than variant=additive by 0.100" in sentence["better"] and sentence["better"].endswith(
        "better at this scale."
    )
    assert "interval includes 0 (95% CI -" in sentence["same"]
    assert sentence["same"].endswith("no difference detectable with 3 seeds.")
    assert "lower than variant=additive_cc by 0.080" in sentence["cc"] and "better at this scale" in sentence["cc"]
    assert "Of 4 configurations compared with their baseline" in supports and "1 worse" in supports
    assert "2 better" in supports and "1 not distinguishable" in supports
    assert "- variant=worse: trains at 0.50× the tok/s of variant=additive" in supports
    assert "slower on every seed); peak memory 1.50× (3.00 vs 2.00 GB)." in supports
    assert "- variant=cc: trains at 0.50× the tok/s of variant=additive_cc" in supports
    assert "What the data does not support:" in supports and "3 paired seeds per comparison" in supports
    assert "± 4.30 standard errors" in supports and "4 intervals" in supports


def test_verdict_on_the_interval():
    row = {"model": "m", "baseline": "b", "delta": 0.05, "delta_low": 0.01, "delta_high": 0.09, "delta_pairs": 3}
    assert findings.verdict(row) == findings.WORSE
    assert findings.verdict({**row, "delta": -0.05, "delta_low": -0.09, "delta_high": -0.01}) == findings.BETTER
    assert findings.verdict({**row, "delta_low": -0.01}) == findings.NO_DIFFERENCE
    one = {**row, "delta_low": math.nan, "delta_high": math.nan, "delta_pairs": 1}
    assert findings.verdict(one) == findings.NO_INTERVAL and "one shared seed" in findings.loss_sentence(one)
    assert findings.verdict({**row, "delta_pairs": 0}) == findings.NOT_COMPARED
    assert findings.verdict({**row, "baseline": ""}) == findings.NOT_COMPARED


def test_notes_become_the_discussion(sweep, tmp_path):
    notes = "Placeholder notes.\n\n- a *point* with [a link](https://example.org)\n"
    (sweep / "notes.md").write_text(notes)
    text = report.main(["--sweep", str(sweep), "--out", str(tmp_path / "out.md")]).read_text()
    assert text.rstrip().endswith("## Discussion\n\n" + notes.strip())
    (sweep / "notes.md").unlink()
    assert "## Discussion" not in report.main(["--sweep", str(sweep), "--out", str(tmp_path / "out.md")]).read_text()


REPLICATION = ROOT / "results" / "replication"


@pytest.mark.skipif(not REPLICATION.is_dir(), reason="no committed raw results")
def test_committed_rerun_commands_compose_the_committed_configs():
    """Every configuration's re-run command composes (Hydra) the configuration its runs had."""
    runs = find_runs(REPLICATION)
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        for group in group_runs(runs):
            one, _ = findings.rerun_commands(group)
            cfg = compose("train", overrides=shlex.split(one)[2:])
            OmegaConf.set_struct(cfg, False)
            cfg.pop("hydra", None)
            composed = Run(Path("unused"))
            composed.__dict__["config"] = OmegaConf.to_container(cfg, resolve=False)
            assert composed.key == group.first.key, group.label
            assert composed.seed == group.first.seed


@pytest.mark.skipif(not (ROOT / "docs" / "results.md").exists(), reason="docs/results.md not generated")
def test_docs_results_is_up_to_date(tmp_path, monkeypatch):
    """docs/results.md is what `make results` gives from the committed raw results."""
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "replication").symlink_to(REPLICATION)
    monkeypatch.chdir(tmp_path)
    report.main(["--sweep", "results/replication", "--out", "docs/results.md"])
    assert (tmp_path / "docs" / "results.md").read_text() == (ROOT / "docs" / "results.md").read_text(), (
        "docs/results.md is stale: run `make results`"
    )
