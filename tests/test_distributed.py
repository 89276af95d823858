"""Scale-out: the global batch plan, DDP jobs inside a multirun and sweeps through submitit, via the real CLI.
(DDP over 2 CPU processes against one process: tests/test_scaling.py.)"""

from __future__ import annotations

import pandas as pd
import pytest

from deepdelta.batching import plan_batch
from tests.conftest import ROOT

SMALL = [
    "model.n_layer=2",
    "model.block_size=64",
    "data.val_batches=4",
    "debug=fast",
    "trainer.max_steps=6",
    "trainer.limit_val_batches=1.0",
]


@pytest.mark.parametrize(
    "global_batch, micro, world, expected",
    [(480, 16, 1, (16, 30)), (480, 16, 4, (15, 8)), (480, 16, 8, (15, 4)), (8, 4, 2, (4, 1)), (8, 8, 1, (8, 1)),
     (12, 5, 1, (4, 3)), (None, 4, 2, (4, 1))],
)  # fmt: skip
def test_global_batch_plan(global_batch, micro, world, expected):
    plan = plan_batch(global_batch, micro, world)
    assert (plan.micro_batch, plan.accumulate) == expected
    assert plan.micro_batch * plan.accumulate * world == plan.global_batch


def test_global_batch_must_split_over_devices():
    with pytest.raises(ValueError, match="global_batch: got 7, allowed: a positive multiple of the world size 2"):
        plan_batch(7, 4, 2)


@pytest.mark.slow
def test_submitit_local_sweep_runs_both_jobs(cli, tmp_path):
    proc = cli(*SMALL, "logger=csv", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
               "residual=ddl,additive", multirun=True)  # fmt: skip
    table = pd.read_csv(tmp_path / "sweep" / "summary.csv")
    assert list(table["status"]) == ["finished", "finished"], proc.stdout[-2000:]
    for job in ("0", "1"):
        assert (tmp_path / "sweep" / job / "csv" / "metrics.csv").exists()
    assert list((tmp_path / "sweep" / ".submitit").iterdir())  # really went through submitit


@pytest.mark.slow
def test_multirun_of_ddp_jobs_runs_each_job_once(cli, tmp_path):
    """Lightning re-runs the script for rank 1; inside a multirun that must be this job only."""
    proc = cli(*SMALL, "logger=csv", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
               "trainer.precision=32-true", "data.batch_size=4", "residual=ddl,additive", multirun=True)  # fmt: skip
    assert proc.stdout.count("Launching 2 jobs") + proc.stderr.count("Launching 2 jobs") == 1
    table = pd.read_csv(tmp_path / "sweep" / "summary.csv")
    assert list(table["status"]) == ["finished", "finished"]
    for job in ("0", "1"):
        assert (tmp_path / "sweep" / job / "train_ddp_process_1.log").exists()  # rank 1 ran in the job's dir
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == ["0", "1"]


def test_slurm_launcher_config_resolves():
    from hydra import compose, initialize_config_dir

    overrides = ["hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2", "hydra.launcher.partition=gpu",
                 "hydra.launcher.account=proj", "hydra.launcher.gpus_per_node=8"]  # fmt: skip
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.account) == ("gpu", "proj")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 8, 8)
