"""deepdelta training entry point: compose → validate → build → fit → summarise.

    python src/train.py                                   # tiny DDL on the embedded corpus
    python src/train.py -m residual=ddl,additive dv=1,2,4 # a sweep, one W&B run per job
    python src/train.py --help                            # every config group and choice
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `python src/train.py` without install

from deepdelta.runner import run  # noqa: E402


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        return run(cfg, Path(hydra_cfg.runtime.output_dir), name=hydra_cfg.job.override_dirname, multirun=multirun)
    except Exception:
        if not multirun:
            raise
        # a failing sweep member is recorded and the sweep goes on (see SweepSummary)
        traceback.print_exc()
        return None


if __name__ == "__main__":
    main()
