"""deepdelta.gpusweep: a sweep's jobs as a queue over GPU slots (CPU slots here), and the throughput clock."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage, TrainerFn

from deepdelta import gpusweep
from deepdelta.callbacks import TokenThroughput
from deepdelta.gpusweep import expand, parse_gpus

# Tiny and short: 10 steps of a 2-layer d=64 model, a checkpoint at step 5, logged every 2nd step, one
# validation batch at the end. `tags` has a space, so the printed go-on command must quote it.
CHEAP = [
    "debug=fast", "model.n_layer=2", "model.d_model=64", "model.n_head=2", "data.batch_size=4",
    "model.block_size=64", "logger=csv", "trainer.log_every_n_steps=2", "trainer.val_check_interval=10",
    "trainer.limit_val_batches=1", "~callbacks.progress_bar", "~callbacks.beta", "tags=[gs, test]",
]  # fmt: skip
# job 1 cannot skip the NaN injected at step 8 (DEEPDELTA_FAULT_NAN, set for all jobs) and fails; 0 and 2 skip it
SWEEP = [*CHEAP, "callbacks.divergence.max_skips=1,0,2"]
TOKENS = 10 * 4 * 64


# -- expand: the job list of `python src/train.py -m` ---------------------------------------------------


def hydra_jobs(overrides: list[str]) -> list[list[str]]:
    """The jobs Hydra's BasicSweeper makes of ``hydra.sweeper.params`` + the command line."""
    from hydra import compose, initialize_config_dir

    fixed = [o for o in overrides if "," not in o]
    with initialize_config_dir(str(gpusweep.CONF), version_base="1.3"):
        cfg = compose("train", overrides=fixed, return_hydra_config=True)
    params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.get("params") or {}).items()]
    (batch,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params + overrides), None)
    return batch


def test_expand_named_sweep_is_seed_major_like_hydra():
    jobs = expand(["sweep=replication"])
    assert len(jobs) == 30
    assert jobs == hydra_jobs(["sweep=replication"])
    assert {"seed=0", "variant=additive"} <= set(jobs[0])
    assert {"seed=0", "variant=ddl"} <= set(jobs[1])  # variants vary fastest
    assert {"seed=1", "variant=additive"} <= set(jobs[10])
    assert {"seed=2", "variant=mhc_n4"} <= set(jobs[29])
    assert all("sweep=replication" in job for job in jobs)


def test_expand_command_line_value_replaces_the_sweep_files():
    jobs = expand(["sweep=replication", "seed=5"])
    assert len(jobs) == 10
    assert all("seed=5" in job and sum(o.startswith("seed=") for o in job) == 1 for job in jobs)
    assert [next(o for o in job if o.startswith("variant=")) for job in jobs][:2] == [
        "variant=additive",
        "variant=ddl",
    ]
    assert jobs == hydra_jobs(["sweep=replication", "seed=5"])


def test_expand_combines_command_line_sweeps_with_the_sweep_file():
    overrides = ["sweep=grid", "seed=0,1", "residual=additive"]  # grid: residual=ddl,additive × dv=1,2,4
    jobs = expand(overrides)
    assert len(jobs) == 6  # residual replaced (1) × dv (3) × seed (2)
    assert jobs[0][:2] == ["residual=additive", "dv=1"] and "seed=0" in jobs[0]
    assert "dv=1" in jobs[1] and "seed=1" in jobs[1]  # the last key varies fastest
    assert "dv=4" in jobs[5] and "seed=1" in jobs[5]
    assert jobs == hydra_jobs(overrides)


def test_expand_no_sweep_is_one_job():
    assert expand(["dv=2", "seed=3"]) == [["dv=2", "seed=3"]]


@pytest.mark.slow
def test_expand_matches_a_real_multirun(cli, tmp_path):
    """The oracle: the jobs a real ``-m`` launches, read back from each job's .hydra/overrides.yaml."""
    overrides = ["sweep=grid", "seed=0,1", "residual=additive", "dry_run=true", "logger=csv"]
    cli(*overrides, multirun=True, check=False)  # dry runs write no summary.json: the sweep exits non-zero
    sweep = tmp_path / "sweep"
    launched = [yaml.safe_load((sweep / str(i) / ".hydra" / "overrides.yaml").read_text()) for i in range(6)]
    assert not (sweep / "6").exists()
    assert expand(overrides) == launched


# -- validation before anything starts -------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["dv=1,0"], ["job 1 (dv=0): model.dv: got 0, allowed: an integer >= 1"]),
        (["residual=ddl,nope"], ["job 1 (residual=nope): In 'train': Could not find 'residual/nope'", "write_only"]),
        (["residual=ddl,additive", "nokey=1"], ["Could not override 'nokey'"]),
        (["seed=0,1", "trainer.devices=1,2"], ["job 1 (seed=0 trainer.devices=2): trainer.devices=2", "one GPU"]),
    ],
)
def test_invalid_job_stops_the_sweep_before_any_job_runs(tmp_path, monkeypatch, overrides, expected):
    def no_jobs(*args, **kwargs):
        raise AssertionError(f"a job was started: {args}")

    monkeypatch.setattr(gpusweep.subprocess, "run", no_jobs)
    sweep = tmp_path / "sweep"
    with pytest.raises(SystemExit) as exc:
        gpusweep.main(["--gpus", "2", "--dir", str(sweep), *overrides])
    message = str(exc.value.code)
    assert message.startswith("invalid sweep, nothing was started:"), message
    for text in expected:
        assert text in message, message
    assert "job 0" not in message and "Config search path" not in message
    assert not sweep.exists()  # no job directory, no logs


# -- --gpus ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, ids", [("2", ["0", "1"]), ("1", ["0"]), ("0,2", ["0", "2"]), ("3", ["0", "1", "2"])])
def test_parse_gpus(text, ids):
    assert parse_gpus(text) == ids


@pytest.mark.parametrize("text", ["0", "a,b", "", "-1", "1,x", "0,0"])
def test_parse_gpus_rejects_with_the_value(text):
    with pytest.raises(SystemExit) as exc:
        parse_gpus(text)
    message = str(exc.value.code)
    assert message.startswith(f"--gpus: got {text!r}, allowed:"), message


def test_parse_gpus_default_is_every_visible_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert parse_gpus(None) == ["0", "1", "2"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(SystemExit, match="no CUDA GPU is visible; pass --gpus N"):
        parse_gpus(None)


# -- end to end on CPU slots -----------------------------------------------------------------------------


@dataclass
class Launch:
    num: int
    argv: list[str]
    env: dict[str, str]
    start: float
    end: float
    code: int


@dataclass
class SweepRun:
    dir: Path
    code: int | str | None
    out: str
    launches: list[Launch]
    files: dict[str, str]  # the sweep's files as main() left them (a later test goes on with the sweep)

    def json(self, name: str) -> dict:
        return json.loads(self.files[name])


def run_main(argv: list[str], cache_dir: Path, cwd: Path, **extra_env: str) -> SweepRun:
    """``gpusweep.main(argv)`` in this process, recording how each job was started."""
    launches: list[Launch] = []
    real_run = subprocess.run

    def recording_run(args, **kwargs):
        start = time.monotonic()
        proc = real_run(args, **kwargs)
        where = next(a for a in args if a.startswith(("hydra.run.dir=", "resume=")))
        launches.append(Launch(int(Path(where.split("=", 1)[1]).name), list(args), kwargs["env"], start,
                               time.monotonic(), proc.returncode))  # fmt: skip
        return proc

    out, code = io.StringIO(), None
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.chdir(cwd)
        for key in [k for k in os.environ if k.startswith("DEEPDELTA_FAULT_")]:
            mp.delenv(key)
        env = {"DEEPDELTA_CACHE": str(cache_dir), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
               "OMP_NUM_THREADS": "1", "DEEPDELTA_RUN_UID": "parent", **extra_env}  # fmt: skip
        for key, value in env.items():
            mp.setenv(key, value)
        mp.setattr(gpusweep.subprocess, "run", recording_run)
        try:
            gpusweep.main(argv)
        except SystemExit as exc:
            code = exc.code
    sweep = Path(argv[argv.index("--dir") + 1])
    files = {
        str(p.relative_to(sweep)): p.read_text() for p in [*sweep.glob("*.*"), *sweep.glob("*/*.*")] if p.is_file()
    }
    return SweepRun(sweep, code, out.getvalue(), sorted(launches, key=lambda launch: launch.start), files)


@pytest.fixture(scope="module")
def failed_sweep(cache_dir, tmp_path_factory) -> SweepRun:
    """Three jobs on two CPU slots; job 1 diverges at step 8 (after its step-5 checkpoint)."""
    root = tmp_path_factory.mktemp("gpusweep")
    return run_main(["--gpus", "2", "--dir", str(root / "sweep"), *SWEEP], cache_dir, root, DEEPDELTA_FAULT_NAN="8:0")


def md_rows(text: str) -> list[dict[str, str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]]


@pytest.mark.slow
def test_queue_runs_every_job_records_the_failure_and_goes_on(failed_sweep):
    run, sweep = failed_sweep, failed_sweep.dir
    assert run.code == 1, run.out[-3000:]
    assert [launch.num for launch in sorted(run.launches, key=lambda launch: launch.num)] == [0, 1, 2]
    for launch in run.launches:  # the single-run CLI, in <sweep>/<num>, with this job's overrides
        job = expand(SWEEP)[launch.num]
        assert launch.argv == [sys.executable, str(gpusweep.TRAIN), *job, f"hydra.run.dir={sweep / str(launch.num)}"]
        assert launch.env["DEEPDELTA_SWEEP_GROUP"] == sweep.name
        assert "DEEPDELTA_RUN_UID" not in launch.env  # each job picks its own
        assert launch.env["DEEPDELTA_FAULT_NAN"] == "8:0"
    assert [launch.code != 0 for launch in sorted(run.launches, key=lambda launch: launch.num)] == [0, 1, 0]

    # one job per slot at a time: the first two ran side by side on the two slots, the third reused one
    gpus = {launch.num: launch.env["CUDA_VISIBLE_DEVICES"] for launch in run.launches}
    assert {gpus[0], gpus[1]} == {"0", "1"}, gpus
    assert gpus[2] in ("0", "1")
    for a in run.launches:
        for b in run.launches:
            if a.num < b.num and a.start < b.end and b.start < a.end:
                assert gpus[a.num] != gpus[b.num], f"jobs {a.num} and {b.num} shared slot {gpus[a.num]}"
        assert f"[gpu {gpus[a.num]}] job {a.num} starts: " in run.out
    assert f"[gpu {gpus[1]}] job 1 FAILED (exit 1, see {sweep / 'logs' / '1.log'})" in run.out

    for num, status in ((0, "finished"), (1, "failed"), (2, "finished")):
        summary = run.json(f"{num}/summary.json")
        assert summary["status"] == status
        assert summary["tokens"] == TOKENS if status == "finished" else 0 < summary["tokens"] < TOKENS
    assert "error: training diverged at step 8" in run.files["logs/1.log"]  # the message, no traceback
    assert "Traceback" not in run.files["logs/1.log"]
    table = pd.read_csv(io.StringIO(run.files["summary.csv"]))
    assert list(table["job"]) == [0, 1, 2] and list(table["status"]) == ["finished", "failed", "finished"]
    assert "Diverged: training diverged at step 8" in table["error"][1]
    rows = md_rows(run.files["summary.md"])
    assert [(r["job"], r["status"]) for r in rows] == [("0", "finished"), ("1", "failed"), ("2", "finished")]
    assert f"Sweep summary ({sweep / 'summary.md'})" in run.out


@pytest.mark.slow
def test_throughput_is_logged_on_logging_steps_with_every_batch_counted(failed_sweep):
    """log_every_n_steps=2, window_size=3 (debug=fast): the clock is read on steps 2, 4, 6, ...; the rate needs
    3 readings, so it first appears at step 6 (Lightning's own monitor, reading it every step: at step 4)."""
    metrics = pd.read_csv(failed_sweep.dir / "0" / "csv" / "metrics.csv")
    counted = metrics.dropna(subset=["train/batches"])
    assert list(counted["train/batches"]) == [2, 4, 6, 8, 10]
    assert list(counted["train/samples"]) == [4 * b for b in counted["train/batches"]]  # skipped batches counted
    assert list(counted["train/lengths"]) == [4 * 64 * b for b in counted["train/batches"]]
    rated = counted.dropna(subset=["train/device/items_per_sec"])
    assert list(rated["train/batches"]) == [6, 8, 10]
    assert (rated["train/device/items_per_sec"] > 0).all()


@pytest.mark.slow
def test_go_on_with_dir_resumes_the_failed_job_and_keeps_finished_ones(failed_sweep, cache_dir):
    sweep = failed_sweep.dir
    (printed,) = [line for line in failed_sweep.out.splitlines() if line.startswith("failed jobs: [1]; go on with: ")]
    again = shlex.split(printed.split("go on with: ", 1)[1])
    assert again[:3] == ["python", "-m", "deepdelta.gpusweep"]
    assert again[3:] == ["--gpus", "2", "--dir", str(sweep), *SWEEP]  # the same slots and overrides, quoted

    kept = {n: (sweep / str(n) / "summary.json").stat().st_mtime_ns for n in (0, 2)}
    logs = {n: (sweep / "logs" / f"{n}.log").read_text() for n in (0, 2)}
    run = run_main(again[3:], cache_dir, sweep.parent)  # the NaN is gone: job 1 can finish now
    assert run.code is None, run.out[-3000:]
    assert [(launch.num, launch.argv[1:]) for launch in run.launches] == [
        (1, [str(gpusweep.TRAIN), f"resume={sweep / '1'}"])
    ]
    assert "3 jobs (2 finished before)" in run.out
    for n in (0, 2):  # finished jobs are not run again
        assert (sweep / str(n) / "summary.json").stat().st_mtime_ns == kept[n]
        assert (sweep / "logs" / f"{n}.log").read_text() == logs[n]
    log1 = (sweep / "logs" / "1.log").read_text()
    assert "training diverged" in log1  # the first attempt's log, appended to
    assert f"resuming from {sweep / '1' / 'checkpoints' / 'last.ckpt'}" in log1
    summary = json.loads((sweep / "1" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["tokens"] == TOKENS
    assert list(pd.read_csv(sweep / "summary.csv")["status"]) == ["finished"] * 3
    assert "go on with" not in run.out


# -- TokenThroughput: the clock (and the GPU sync) only on logging steps ---------------------------------


def fake_trainer() -> SimpleNamespace:
    trainer = SimpleNamespace(
        state=SimpleNamespace(stage=RunningStage.TRAINING, fn=TrainerFn.FITTING),
        strategy=SimpleNamespace(root_device=torch.device("cuda", 0)),  # so the parent would synchronise
        accumulating=False,
        logged=[],
    )
    trainer.fit_loop = SimpleNamespace(_should_accumulate=lambda: trainer.accumulating, total_batch_idx=0)
    trainer._logger_connector = SimpleNamespace(
        should_update_logs=False, log_metrics=lambda metrics, step=None: trainer.logged.append(metrics)
    )
    return trainer


def test_token_throughput_syncs_and_reads_the_clock_only_on_logging_steps(monkeypatch):
    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(1))
    cb = TokenThroughput(window_size=2)
    trainer, module = fake_trainer(), SimpleNamespace(flops_per_batch=1000.0)
    cb._throughputs[RunningStage.TRAINING] = Throughput(window_size=2)
    cb._start(trainer)
    batch = (torch.zeros(4, 8, dtype=torch.long), torch.zeros(4, 8, dtype=torch.long))
    for i in range(9):  # every 3rd batch logs; batch 5 (index 4) is a micro-batch of an accumulation
        trainer.fit_loop.total_batch_idx = i
        trainer.accumulating = i == 4
        trainer._logger_connector.should_update_logs = (i + 1) % 3 == 0 or i == 4
        cb.on_train_batch_end(trainer, module, None, batch)
        assert len(syncs) == (i + 1) // 3, f"batch {i}: {len(syncs)} syncs"
    assert len(trainer.logged) == 3
    assert [m["train/batches"] for m in trainer.logged] == [3, 6, 9]
    assert [m["train/samples"] for m in trainer.logged] == [12, 24, 36]
    assert [m["train/lengths"] for m in trainer.logged] == [96, 192, 288]
    assert "train/device/items_per_sec" not in trainer.logged[0]  # one reading: no rate yet
    assert trainer.logged[1]["train/device/items_per_sec"] > 0


def test_token_throughput_skips_the_parent_update_off_logging_steps(monkeypatch):
    calls = []
    monkeypatch.setattr(
        ThroughputMonitor, "_update", lambda self, trainer, module, batch, iter_num: calls.append(iter_num)
    )
    monkeypatch.setattr(ThroughputMonitor, "_compute", lambda self, trainer, iter_num=None: None)
    cb = TokenThroughput(window_size=2)
    trainer = fake_trainer()
    cb._throughputs[RunningStage.TRAINING] = Throughput(window_size=2)
    cb._start(trainer)
    batch = (torch.zeros(2, 5, dtype=torch.long),)
    for i in range(4):
        trainer.fit_loop.total_batch_idx = i
        trainer._logger_connector.should_update_logs = i == 3
        cb.on_train_batch_end(trainer, SimpleNamespace(), None, batch)
    assert calls == [4]  # only the logging batch, with Lightning's 1-based batch count
    assert cb._batches[RunningStage.TRAINING] == 3 and cb._samples[RunningStage.TRAINING] == 6
    assert cb._lengths[RunningStage.TRAINING] == 30


def test_ctrl_c_starts_no_new_job_and_waits_for_the_running_ones():
    """Ctrl-C while a sweep runs: the jobs already running (their processes got the same SIGINT and
    save at their next step) are waited for, no queued job starts, and KeyboardInterrupt reaches the
    caller, which then prints the `--dir` command that goes on."""
    import signal
    import threading

    started, finished = [], []
    both_running = threading.Barrier(2)

    def work(item: int, gpu: str) -> None:
        started.append(item)
        if item < 2:  # the first two run side by side; job 0 plays the user pressing Ctrl-C
            both_running.wait(timeout=10)
            if item == 0:
                os.kill(os.getpid(), signal.SIGINT)  # a real signal: it wakes the main thread's join
            time.sleep(1.5)  # still running when the interrupt arrives (a busy machine is slow to see it)
        finished.append(item)

    with pytest.raises(KeyboardInterrupt):
        gpusweep.over_gpus(list(range(6)), ["0", "1"], work)
    assert sorted(started) == [0, 1], started
    assert sorted(finished) == [0, 1], finished
