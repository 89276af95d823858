"""Shared fixtures: run the real CLI in a subprocess with outputs and caches under tmp."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# The CLI's children: W&B offline and quiet, and one CPU thread. Two threads a process on two cores that
# other work also wants spin-wait in every parallel region: a tiny run took 10x longer under load.
QUIET_ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session", autouse=True)
def wandb_offline():
    """Tests never log to W&B online, whatever WANDB_MODE the shell has (tests of the modes set their own)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        yield


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One token cache for the whole session, so the embedded corpus is tokenised once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def cli(cache_dir: Path, tmp_path: Path):
    """``cli(*overrides, multirun=False)`` runs ``python src/train.py`` and returns the
    completed process; runs land in ``tmp_path/run`` (or ``tmp_path/sweep``)."""

    def run(*overrides: str, multirun: bool = False, check: bool = True, timeout: int = 600):
        env = {**os.environ, **QUIET_ENV, "DEEPDELTA_CACHE": str(cache_dir)}
        args = [sys.executable, str(ROOT / "src" / "train.py")]
        if multirun:
            args += ["-m", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
        else:
            args += [f"hydra.run.dir={tmp_path / 'run'}"]
        proc = subprocess.run(
            args + list(overrides), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            out, err = proc.stdout[-4000:], proc.stderr[-4000:]
            raise AssertionError(f"exit {proc.returncode}\n--- stdout\n{out}\n--- stderr\n{err}")
        return proc

    return run
