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

# `make test` runs the suite on two xdist workers (``-n 2``), one module at a time each, so a module's fixtures are
# built once; modules that read one session fixture (a trained run or sweep) go to the same worker together.
XDIST_GROUPS = {
    "tests/reliability/test_resume.py": "reference",
    "tests/reliability/test_resume_logs.py": "reference",
    "tests/analysis/test_eval.py": "tiny_sweep",
    "tests/analysis/test_notebooks.py": "tiny_sweep",
    "tests/analysis/test_report_cli.py": "tiny_sweep",
}


def pytest_configure(config: pytest.Config) -> None:
    """An xdist worker computes on one thread, unless OMP_NUM_THREADS says otherwise: two workers of two threads
    each on two cores spin-wait for each other's cores."""
    if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist, the slow tests (marked, or running the CLI) first, in a stable sort (each module keeps its
    order): the modules that hold them are handed out first and short ones fill the end, so the two workers
    finish close together."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: not (item.get_closest_marker("slow") or {"cli", "train"} & set(item.fixturenames)))


try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # plain pytest: no workers to schedule
    pass
else:

    class ModuleScheduling(LoadScopeScheduling):
        """A work unit is a module (or an `XDIST_GROUPS` group), handed out in collection order."""

        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return XDIST_GROUPS.get(module, module)

    @pytest.hookimpl(optionalhook=True)  # `-p no:xdist` must still run the suite
    def pytest_xdist_make_scheduler(config: pytest.Config, log):
        config.option.loadscopereorder = False  # collection order (slow modules first), not the largest first
        return ModuleScheduling(config, log)


@pytest.fixture(scope="session", autouse=True)
def wandb_offline():
    """Tests never log to W&B online, whatever WANDB_MODE the shell has (tests of the modes set their own);
    children run on one thread unless OMP_NUM_THREADS is set."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        # the CLI, sampler and benchmark children compute on one thread each, as QUIET_ENV's do
        mp.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
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
