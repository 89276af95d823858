"""Fault-injection helpers: start the real CLI as a child process, watch its checkpoints, kill it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.conftest import ROOT

# ~40 tiny steps, a checkpoint every 10, validation every 20; one thread so reruns are bit-identical
# and the suite is gentle on a 2-core machine. No progress bar or β probe: not what these tests are about.
TINY = [
    "debug=fast", "model.n_layer=2", "data.batch_size=4", "model.block_size=64", "logger=csv",
    "trainer.max_steps=40", "callbacks.model_checkpoint.every_n_train_steps=10", "trainer.val_check_interval=20",
    "trainer.limit_val_batches=2", "~callbacks.progress_bar", "~callbacks.beta",
]  # fmt: skip


# TINY with the mechanism probe every 5 steps (checkpoints every 10): a kill leaves probes after the checkpoint
PROBED = [*(a for a in TINY if a != "~callbacks.beta"), "callbacks.beta.every_n_steps=5"]


def env(cache_dir: Path, **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DEEPDELTA_FAULT_")}
    return {**base, "DEEPDELTA_CACHE": str(cache_dir), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}  # fmt: skip


def _terminal_sigint() -> None:
    """Ctrl-C as in a terminal: a suite started in the background (``make test &``) hands its children
    SIGINT ignored, and Python keeps it so."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Train:
    """``python src/train.py ARGS`` in the background; stdout+stderr go to ``log``."""

    def __init__(self, args: list[str], cwd: Path, environ: dict[str, str], log: Path):
        self.log = log
        self._out = open(log, "w")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "src" / "train.py"), *args],
            cwd=cwd, env=environ, stdout=self._out, stderr=subprocess.STDOUT, preexec_fn=_terminal_sigint,
        )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"process exited ({self.proc.returncode}) before {what}\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"timed out waiting for {what}\n{self.output()[-3000:]}")
            time.sleep(0.02)

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.wait()

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._out.close()


@pytest.fixture
def train(cache_dir: Path, tmp_path: Path):
    """``train(*args, run_dir=..., background=False, **env)``: the CLI with TINY settings in ``run_dir``."""
    started: list[Train] = []

    def start(*args: str, run_dir: Path | None = None, background: bool = False, tiny: bool = True, **extra: str):
        where = [f"hydra.run.dir={run_dir}"] if run_dir is not None else []
        flags = [a for a in args if a.startswith("-")]  # Hydra wants -m before the overrides
        args = tuple(a for a in args if not a.startswith("-"))
        log = tmp_path / f"log{len(started)}.txt"
        job = Train([*flags, *(TINY if tiny else []), *where, *args], tmp_path, env(cache_dir, **extra), log)
        started.append(job)
        if background:
            return job
        rc = job.wait()
        return rc, job.output()

    yield start
    for job in started:  # never leave a child behind
        if job.proc.poll() is None:
            job.kill()


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """One uninterrupted 40-step PROBED run, shared by every test that compares a resumed run with it."""
    tmp = tmp_path_factory.mktemp("reference")
    job = Train([*PROBED, f"hydra.run.dir={tmp / 'run'}"], tmp, env(cache_dir), tmp / "log.txt")
    assert job.wait() == 0, job.output()[-3000:]
    return tmp / "run"


def ckpt_step(path: Path) -> int:
    """The global step of a checkpoint, read the way resume reads it (weights_only)."""
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def last_step(run_dir: Path) -> int:
    last = run_dir / "checkpoints" / "last.ckpt"
    try:
        return ckpt_step(last) if last.exists() else -1
    except Exception:  # noqa: BLE001 - replaced atomically, so this would itself be a failure; keep polling
        return -1


def assert_same_training(a: Path, b: Path) -> None:
    """Two runs ended in the same state: weights, optimizer moments, schedule, data position, losses."""
    ca = torch.load(a / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    cb = torch.load(b / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ca["global_step"] == cb["global_step"]
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    for key, value in ca["state_dict"].items():
        assert torch.equal(value, cb["state_dict"][key]), f"weights differ: {key}"
    states_a, states_b = ca["optimizer_states"][0]["state"], cb["optimizer_states"][0]["state"]
    for sa, sb in zip(states_a.values(), states_b.values(), strict=True):
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), f"optimizer state differs: {k}"
    assert ca["lr_schedulers"] == cb["lr_schedulers"]
    assert ca["TokenDataModule"]["windows"] == cb["TokenDataModule"]["windows"]
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["status"] == sb["status"] == "finished", (sa, sb)
    assert sa["train_loss"] == sb["train_loss"] and sa["val_loss"] == sb["val_loss"], (sa, sb)


# wall-clock columns differ between any two runs; Lightning's ThroughputMonitor counts from each process's start
PER_ATTEMPT = ("time", "per_sec", "seconds", "peak_mem")


def assert_same_logs(a: Path, b: Path, validation: bool = True) -> None:
    """Two runs logged the same: in ``csv/metrics.csv`` every column at the same steps, as often (train/loss
    once per step, from the first to the last), with the same values (`PER_ATTEMPT`: at no step twice);
    the same ``probes.csv``. ``validation=False``: leave out the validation columns (and ``epoch``, logged
    with them), for a run killed at a random time: the validation that follows a checkpoint is lost if the
    kill comes before it ends, as Lightning does not validate the checkpoint's step again on resume."""
    ma, mb = (pd.read_csv(d / "csv" / "metrics.csv") for d in (a, b))
    if not validation:
        ma, mb = (m.drop(columns=[c for c in m if c.startswith(("val/", "validate/", "epoch"))]) for m in (ma, mb))
    assert set(ma.columns) == set(mb.columns), set(ma.columns) ^ set(mb.columns)
    steps = int(torch.load(a / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"])
    assert list(mb.loc[mb["train/loss"].notna(), "step"]) == list(range(steps)), "train/loss: not once per step"
    for col in ma.columns.drop("step"):
        if any(w in col for w in PER_ATTEMPT):  # no step twice (a rate waits for its window after a restart)
            got, want = (Counter(m.loc[m[col].notna(), "step"]) for m in (mb, ma))
            assert got <= want, f"{col}: {sorted((got - want).elements())[:10]}"
        else:
            got, want = (sorted(m.loc[m[col].notna(), ["step", col]].itertuples(index=False)) for m in (mb, ma))
            assert got == want, f"{col}: {sorted(set(got) ^ set(want))[:10]}"
    # the resumed run's training clock goes on from the checkpoint's: never back, across every resume
    if "train/time" in mb:
        clock = mb.loc[mb["train/time"].notna()].sort_values("step")["train/time"]
        assert clock.is_monotonic_increasing, "train/time went back"
    if (a / "probes.csv").exists() or (b / "probes.csv").exists():
        pa, pb = (pd.read_csv(d / "probes.csv") for d in (a, b))
        assert not pb.duplicated(["step", "sublayer"]).any()
        pd.testing.assert_frame_equal(pb, pa)
