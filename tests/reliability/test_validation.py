"""Bad configs are refused before any compute, every problem at once, each naming key, value and what is allowed.

The table runs in-process (Hydra compose + `deepdelta.validate.problems`, well under a second each); a few cases
go through the real CLI to show the same messages reach the user and that nothing was trained."""

from __future__ import annotations

import shutil
import time
from collections import namedtuple

import pytest
import torch
from hydra import compose, initialize_config_dir

import deepdelta.rundir  # noqa: F401  (the run-directory resolvers used by conf/hydra)
from deepdelta import validate
from tests.conftest import ROOT

NO_GPU = not torch.cuda.is_available()

BAD = [
    (["dv=0"], "model.dv: got 0, allowed: an integer >= 1"),
    (["model.n_head=3"], "model.n_head: got 3, allowed: a divisor of d_model=128"),
    (["model.beta_max=3"], "model.beta_max: got 3, allowed: a number in (0, 2]"),
    (["model.residual=gated"], "model.residual: got 'gated', allowed: additive | ddl | write_only"),
    (["trainer.max_steps=0"], "trainer.max_steps: got 0, allowed: an integer >= 1"),
    (["trainer.max_steps=ten"], "trainer.max_steps: got 'ten', allowed: an integer >= 1"),
    (["trainer.val_check_interval=0.5"], "trainer.val_check_interval: got 0.5, allowed: an integer >= 1"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches: got 0, allowed: an integer >= 1"),
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val: got -1, allowed: a number >= 0 or null"),
    (["trainer.precision=fp8"], "trainer.precision: got 'fp8', allowed: 32-true | 32 | bf16-mixed"),
    (["trainer.precision=16-mixed"], "trainer.precision: got '16-mixed', allowed: with trainer.accelerator=cpu"),
    (["trainer.limit_val_batches=-2"], "trainer.limit_val_batches: got -2, allowed: an integer >= 0 (batches)"),
    (["optim.lr=0"], "optim.lr: got 0, allowed: a number > 0"),
    (["optim.lr=fast"], "optim.lr: got 'fast', allowed: a number > 0"),
    (["optim.betas=[0.9]"], "optim.betas: got [0.9], allowed: two numbers in [0, 1)"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay: got -0.1, allowed: a number >= 0"),
    (["optim.min_lr_ratio=1.5"], "optim.min_lr_ratio: got 1.5, allowed: a number in [0, 1]"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps: got -1, allowed: an integer >= 0"),
    (["eval.tasks=nope/missing.yaml"], "eval.tasks: 'nope/missing.yaml' is not a task YAML file or a folder of them"),
    (["eval.tasks=paper_1shot", "eval.limit=0"], "eval.limit: got 0, allowed: an integer >= 1 or null"),
    (["seed=-1"], "seed: got -1, allowed: an integer >= 0"),
    (["data.batch_size=0"], "data.batch_size: got 0, allowed: an integer >= 1"),
    (["data.block_size=256"], "data.block_size: got 256, allowed: at most model.block_size=128"),
    (["data.tokenizer=gpt2"], "model.vocab_size: got 256, allowed: >= 50304 (the vocabulary of tokenizer 'gpt2')"),
    (["data.tokenizer=sentencepiece"], "data.tokenizer: got 'sentencepiece', allowed: byte | gpt2 | bpe"),
    (["data.val_fraction=1.5"], "data.val_fraction: got 1.5, allowed: a number in [0, 1)"),
    (["data.num_workers=-1"], "data.num_workers: got -1, allowed: an integer >= 0"),
    (["data=text"], "data.paths: got ??? (not set), allowed: a value on the command line"),
    (["data=text", "data.paths=[/nonexistent/*.txt]"], "data: source=text: the glob '/nonexistent/*.txt' matches no"),
    (["ckpt_path=/nonexistent.ckpt"], "ckpt_path: got '/nonexistent.ckpt', allowed: null, 'last'"),
    (["callbacks.divergence.max_skips=-1"], "callbacks.divergence.max_skips: got -1, allowed: an integer >= 0"),
    (["callbacks.divergence.sync=maybe"], "callbacks.divergence.sync: got 'maybe', allowed: true | false"),
    (
        ["callbacks.model_checkpoint.every_n_train_steps=-5"],
        "callbacks.model_checkpoint.every_n_train_steps: got -5, allowed: an integer >= 0",
    ),
    pytest.param(
        ["trainer=gpu"],
        "trainer.accelerator: got 'gpu', allowed: cpu (no CUDA GPU is visible here",
        marks=pytest.mark.skipif(not NO_GPU, reason="a GPU is visible"),
    ),
]


@pytest.fixture(scope="module")
def configs():
    """``configs(*overrides)``: the composed config, as `python src/train.py OVERRIDES` would see it."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        make = lambda *overrides: compose("train", overrides=["paths.output_dir=unused", *overrides])  # noqa: E731
        validate.problems(make())  # imports (data sources, tokenizers) once, outside the timed cases
        yield make


@pytest.mark.parametrize("overrides, message", BAD)
def test_bad_config_names_key_value_and_allowed(configs, tmp_path, overrides, message):
    start = time.monotonic()
    found = validate.problems(configs(*overrides), tmp_path)
    assert any(message in p for p in found), found
    assert len(found) == 1, found  # exactly the one problem, no knock-on noise
    assert time.monotonic() - start < 5


def test_every_problem_is_reported_at_once(configs, tmp_path):
    with pytest.raises(validate.ConfigError) as info:
        validate.check(configs("dv=0", "optim.lr=-1", "data.batch_size=0", "trainer.max_steps=0"), tmp_path)
    assert "invalid configuration (4 problems)" in str(info.value)
    for key in ("model.dv: got 0", "optim.lr: got -1", "data.batch_size: got 0", "trainer.max_steps: got 0"):
        assert key in str(info.value)


def test_default_config_is_valid(configs, tmp_path):
    assert validate.problems(configs(), tmp_path) == []
    assert validate.problems(configs("experiment=paper_small", "trainer=cpu", "data=pysource"), tmp_path) == []


def test_online_wandb_without_an_api_key_is_a_config_problem(configs, tmp_path, monkeypatch):
    """Online W&B without credentials would fail (or wait for a prompt) after data and model are built."""
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    (found,) = validate.problems(configs("logger.wandb.offline=false"), tmp_path)
    assert found.startswith("logger.wandb.offline: got false, allowed: true, or false once a W&B API key is set up")
    assert "wandb login" in found and "logger=csv" in found
    monkeypatch.setenv("WANDB_MODE", "online")
    (found,) = validate.problems(configs(), tmp_path)
    assert found.startswith("WANDB_MODE: got 'online', allowed: offline | disabled, or online once")
    assert validate.problems(configs("logger=csv"), tmp_path) == []  # no W&B, no key needed
    monkeypatch.setenv("WANDB_MODE", "onlin")
    (found,) = validate.problems(configs(), tmp_path)
    assert found.startswith("WANDB_MODE: got 'onlin', allowed: online | offline | disabled")
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert validate.problems(configs(), tmp_path) == []


def test_resume_is_a_single_run_option(configs, tmp_path):
    found = validate.problems(configs(f"resume={tmp_path}"), tmp_path, multirun=True)
    assert any("resume: got" in p and "null in a multirun" in p for p in found), found


def test_unwritable_output_directory(configs, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    found = validate.problems(configs(), blocker / "run")
    assert any(p.startswith("paths.output_dir: got") and "allowed: a writable directory" in p for p in found), found


def test_full_output_directory(configs, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, (10 << 30) - (5 << 20), 5 << 20))
    found = validate.problems(configs(), tmp_path)
    assert any("paths.output_dir" in p and "5 MiB free" in p and "two checkpoints" in p for p in found), found


# -- through the real CLI: the same messages, and nothing is built or trained -----------------------------


@pytest.mark.slow
def test_cli_reports_all_problems_before_any_compute(cli, tmp_path):
    """One report of every problem (the model's sizes are checked against the data even when another model
    field is bad), no traceback, exit status 2, and no run directory left behind."""
    proc = cli("dv=0", "trainer.max_steps=0", "optim.lr=-1", "data.block_size=512", "model.vocab_size=10", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "invalid configuration (5 problems)" in out
    assert "data.block_size: got 512, allowed: at most model.block_size=128" in out
    assert "model.vocab_size: got 10, allowed: >= 256 (the vocabulary of tokenizer 'byte')" in out
    assert "Traceback" not in out and "run failed" not in out and "val loss nan" not in out
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cli_ckpt_path_last_needs_a_checkpoint_of_this_run(cli, tmp_path):
    proc = cli("ckpt_path=last", check=False)
    assert proc.returncode == 2 and not (tmp_path / "run").exists()
    assert "ckpt_path: got 'last', but" in proc.stderr + proc.stdout
    assert "resume=<its run dir>" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_cli_never_reuses_another_runs_directory(cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("{}")
    proc = cli("trainer.max_steps=1", check=False)
    assert proc.returncode == 2
    assert f"error: output directory {run} is already used" in proc.stderr
    assert not (run / ".hydra").exists()  # refused before Hydra wrote anything into it


def test_corpus_shorter_than_a_window_is_reported_before_training(configs, tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("too short for one window\n")
    cfg = configs("data=text", f"data.paths=[{corpus}]", f"paths.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0")
    assert validate.problems(cfg, tmp_path / "run") == []  # the config itself is fine
    from hydra.utils import instantiate

    found = validate.data_problems(instantiate(cfg.data, progress=False))
    assert len(found) == 1 and "fewer than block_size + 1 = 129" in found[0], found
