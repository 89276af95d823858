"""The CLI end to end: real Hydra, real Lightning, real wandb (offline)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from deepdelta.model import ModelConfig
from tests.conftest import QUIET_ENV, ROOT

pytestmark = pytest.mark.slow
FAST = ["debug=fast", "model.n_layer=2", "data.batch_size=4", "model.block_size=64"]


def wandb_summary(run_dir: Path) -> dict:
    """What W&B recorded for the offline run under ``run_dir`` (via `wandb leet inspect`)."""
    (wandb_dir,) = (run_dir / "wandb").glob("offline-run-*")
    assert list(wandb_dir.glob("run-*.wandb")), "no .wandb transaction log"
    out = subprocess.run(
        [Path(sys.executable).parent / "wandb", "leet", "inspect", "--summary", "--json", str(wandb_dir)],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return json.loads(out.stdout)


def test_help_lists_every_group_and_choice(cli):
    out = cli("--help").stdout
    groups = {
        "residual": ["additive", "ddl", "write_only"], "map": ["k", "v"], "compressor": ["cc", "tc", "ec"],
        "expand": ["conv", "repeat"], "beta": ["reflect", "project"], "model": ["tiny", "small", "medium"],
        "trainer": ["cpu", "gpu", "ddp"], "data": ["pysource"], "logger": ["wandb", "csv"],
        "callbacks": ["default"], "experiment": ["paper_small"], "debug": ["fast"], "sweep": ["grid", "paper_six"],
    }  # fmt: skip
    for group, choices in groups.items():
        assert f"{group}: " in out, group
        line = next(line for line in out.splitlines() if line.startswith(f"{group}: "))
        for choice in choices:
            assert choice in line, (group, choice, line)


def test_default_run_trains_and_logs(cli, tmp_path):
    cli(*FAST)
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["tokens"] == 10 * 4 * 64
    metrics = pd.read_csv(run / "csv" / "metrics.csv")
    for col in ["train/loss", "val/loss", "val/ppl", "train/tokens", "train/flops", "train/device/items_per_sec"]:
        assert metrics[col].notna().any(), col
    assert any(c.startswith("lr-AdamW") for c in metrics.columns)
    wb = wandb_summary(run)
    assert wb["state"] == "finished" and wb["config"]["model"]["residual"] == "ddl"
    assert "beta/1.mlp/mean" in wb["summary"]


def test_multirun_two_jobs_one_wandb_run_each(cli, tmp_path):
    proc = cli(*FAST, "residual=ddl,additive", multirun=True)
    sweep = tmp_path / "sweep"
    table = pd.read_csv(sweep / "summary.csv")
    assert list(table["status"]) == ["finished", "finished"]
    assert (sweep / "summary.md").exists() and "Sweep summary" in proc.stdout
    ddl, additive = (wandb_summary(sweep / str(i)) for i in (0, 1))
    assert ddl["run_id"] != additive["run_id"]
    assert "residual=ddl" in ddl["name"] and "residual=additive" in additive["name"]
    assert any(k.startswith("beta/") for k in ddl["summary"])
    assert not any(k.startswith("beta/") for k in additive["summary"])  # additive has no gate


def test_failing_sweep_member_is_recorded_and_others_finish(cli, tmp_path):
    proc = cli(*FAST, "logger=csv", "model.n_head=3,4", multirun=True, check=False)
    assert proc.returncode != 0
    table = pd.read_csv(tmp_path / "sweep" / "summary.csv")
    assert list(table["status"]) == ["rejected", "finished"]  # refused before any compute
    assert "n_head" in table["error"][0]


@pytest.fixture(scope="module")
def kernel_sweep(cache_dir, tmp_path_factory) -> pd.DataFrame:
    """One multirun (one process) for the kernel and state-precision tests: dv=2, {plain, fused} kernel ×
    {fp32, bf16} state × {ddl, write_only}; its summary table, one column per override."""
    sweep = tmp_path_factory.mktemp("kernels") / "sweep"
    env = {**os.environ, **QUIET_ENV, "DEEPDELTA_CACHE": str(cache_dir)}
    grid = ["logger=csv", "dv=2", "model.kernel=plain,fused", "model.state_dtype=float32,bfloat16",
            "residual=ddl,write_only"]  # fmt: skip
    args = [sys.executable, str(ROOT / "src" / "train.py"), "-m", f"hydra.sweep.dir={sweep}", *FAST, *grid]
    proc = subprocess.run(args, cwd=sweep.parent, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = pd.read_csv(sweep / "summary.csv")
    assert list(table["status"]) == ["finished"] * 8
    for key in ("model.kernel", "model.state_dtype", "residual"):
        table[key] = table["name"].str.extract(rf"(?:^|,){re.escape(key)}=([^,]+)", expand=False)
    return table


def test_fused_kernel_trains_like_the_plain_ops(kernel_sweep):
    """``model.kernel=fused`` through Hydra and Lightning (on the CPU: the op's torch
    formulas and hand-written backward) gives the plain ops' losses."""
    fp32 = kernel_sweep[kernel_sweep["model.state_dtype"] == "float32"].set_index(["residual", "model.kernel"])
    for residual in ("ddl", "write_only"):
        fused, plain = fp32.loc[(residual, "fused"), "val_loss"], fp32.loc[(residual, "plain"), "val_loss"]
        assert fused == pytest.approx(plain, rel=1e-4), residual


def test_bf16_state_trains_like_the_fp32_state(kernel_sweep):
    """``model.state_dtype=bfloat16`` through Hydra and Lightning, with both kernels: the
    runs finish with the fp32 state's validation loss up to bf16 rounding."""
    for residual in ("ddl", "write_only"):
        runs = kernel_sweep[kernel_sweep["residual"] == residual]
        assert sorted(runs["model.state_dtype"]) == ["bfloat16", "bfloat16", "float32", "float32"]
        assert runs["val_loss"].max() - runs["val_loss"].min() < 0.02 * runs["val_loss"].min(), residual


def test_paper_small_experiment_builds_124m_model(cli, tmp_path):
    out = cli("experiment=paper_small", "dry_run=true").stdout
    assert "123.6" in out or "123.7" in out, out  # ~124M parameters, as in the paper
    assert not (tmp_path / "run").exists()  # a dry run trains nothing and leaves no run directory


def test_bad_value_fails_before_training(cli, tmp_path):
    """A config error: the message (as the README shows it), no traceback, exit status 2, no run directory."""
    proc = cli("dv=0", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: invalid configuration (1 problem):\n  model.dv: got 0, allowed: an integer")
    assert "model.dv: got 0, allowed: an integer >= 1" in (ROOT / "README.md").read_text()
    assert "Traceback" not in proc.stderr + proc.stdout and "Error executing job" not in proc.stderr
    assert not (tmp_path / "run").exists()
    # Hydra's own composition errors (an unknown choice) are config errors too
    proc = cli("residual=gated", check=False)
    assert proc.returncode == 2 and "Could not find 'residual/gated'" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize(
    "name, params",
    [("grid", {"residual": "ddl,additive", "dv": "1,2,4"}),
     ("paper_six", {"variant": "additive,ddl,ddl_tc_repeat,ddl_cc_repeat,ddl_tc,ddl_cc"}),
     ("replication", {"variant": "additive,ddl,write_only,additive_cc,ddl_cc,write_only_cc,ddl_cc_project,ddl_cc_vmap,"
                                 "hc_dynamic_n4,mhc_n4",
                      "seed": "0,1,2"})],
)  # fmt: skip
def test_named_sweeps_define_their_grid(name, params):
    """`make sweep SWEEP=name` runs `python src/train.py -m sweep=name`: the file sets the grid."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"sweep={name}"], return_hydra_config=True)
    assert dict(cfg.hydra.sweeper.params) == params
    for variant in params.get("variant", "").split(","):
        if variant:
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                composed = compose("train", overrides=[f"variant={variant}"])
            expected_dv = 1 if variant in ("additive", "ddl", "write_only") else 4
            assert composed.dv == expected_dv and composed.model.dv == expected_dv
            ModelConfig(**OmegaConf.to_container(composed.model, resolve=True))  # every variant is valid


GROUPS = sorted(p.name for p in (ROOT / "conf").iterdir() if p.is_dir() and p.name not in ("hydra", "paths"))


@pytest.mark.parametrize(
    "group, option",
    [(g, f.stem) for g in GROUPS for f in sorted((ROOT / "conf" / g).glob("*.yaml"))],
)
def test_every_group_option_composes_to_a_valid_model(group, option):
    from hydra import compose, initialize_config_dir

    overrides = [f"{group}={option}"] + (["data.paths=[x.txt]"] if (group, option) == ("data", "text") else [])
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))
    assert cfg.data._target_ == "deepdelta.data.TokenDataModule"
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"


def test_every_model_field_can_be_overridden_with_its_default():
    """`model.<field>=...` works for every ModelConfig field (no `+`), and the config's
    values are ModelConfig's defaults, so the YAML cannot drift from the code."""
    import dataclasses

    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        model = OmegaConf.to_container(compose("train").model, resolve=True)
    raw = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    resolved = ModelConfig().to_dict()  # None fields filled in (beta_init, the impl=reference items)
    assert set(model) == set(raw)
    preset = {"dv", "n_layer", "n_head", "head_dim", "d_model", "vocab_size", "block_size"}  # conf/model, dv
    drift = {k: v for k, v in model.items() if k not in preset and v != raw[k] and v != resolved[k]}
    assert drift == {}


def test_every_run_validates_after_its_last_step(cli, tmp_path):
    """150 steps with validation every 100: the run also validates after step 150 and reports that one,
    in summary.json, in its last line and in csv/metrics.csv; the bar counts steps, and the noise is gone."""
    # a 1-layer d=32 model: what is checked is when the run validates, not what it learns
    proc = cli(*FAST, "model.n_layer=1", "model.d_model=32", "model.n_head=1", "logger=csv", "~callbacks.beta",
               "trainer.max_steps=150", "trainer.val_check_interval=100", "trainer.log_every_n_steps=10",
               "callbacks.model_checkpoint.every_n_train_steps=0")  # fmt: skip
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["val_step"] == 150, summary
    metrics = pd.read_csv(run / "csv" / "metrics.csv")
    val = metrics.dropna(subset=["val/loss"])
    assert list(val["step"]) == [99, 149]  # Lightning logs the validation after step N under N - 1
    assert summary["val_loss"] == pytest.approx(val["val/loss"].iloc[-1])
    assert f"run finished: {run} (val loss {summary['val_loss']:.4f} at step 150)" in proc.stdout
    out = proc.stdout + proc.stderr
    assert "150/150" in out and "Epoch 0/-2" not in out  # the progress bar counts optimizer steps
    for noise in ("litlogger", "isinstance(treespec, LeafSpec)"):
        assert noise not in out, noise
    assert not re.search(r"\bnan\b", out), "a missing figure printed as nan"


def test_wandb_online_without_an_api_key_fails_at_once(tmp_path):
    """WANDB_MODE=online means online: with no key anywhere (no WANDB_API_KEY, an empty HOME, no network
    needed) the run stops before building anything, saying how to log in or log offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "NETRC"))}
    env.update(HOME=str(tmp_path / "home"), WANDB_MODE="online", DEEPDELTA_CACHE=str(tmp_path / "cache"))
    args = [sys.executable, str(ROOT / "src" / "train.py"), f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    allowed = "WANDB_MODE: got 'online', allowed: offline | disabled, or online once a W&B API key is set up"
    assert allowed in proc.stderr
    assert "wandb login" in proc.stderr and "logger=csv" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before the run started
