"""A 2-seed tiny sweep (ddl and additive) through the real CLI, once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import QUIET_ENV, ROOT

SWEEP = ["seed=0,1", "residual=ddl,additive", "debug=fast", "model.n_layer=2", "data.batch_size=4",
         "model.block_size=64"]  # fmt: skip


def env(cache_dir: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, **QUIET_ENV, "DEEPDELTA_CACHE": str(cache_dir), **extra}


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """The sweep directory: jobs 0..3 = seed 0 (ddl, additive), seed 1 (ddl, additive)."""
    sweep = tmp_path_factory.mktemp("tiny") / "sweep"
    args = [sys.executable, str(ROOT / "src" / "train.py"), "-m", *SWEEP, f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(args, cwd=sweep.parent, env=env(cache_dir), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return sweep
