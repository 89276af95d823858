"""deepdelta training entry point: compose → validate → build → fit → summarise.

python src/train.py                                   # tiny DDL on the embedded corpus
python src/train.py -m residual=ddl,additive dv=1,2,4 # a sweep, one W&B run per job
python src/train.py --help                            # every config group and choice
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict, read_write

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `python src/train.py` without install

from deepdelta.rundir import resume_argv  # noqa: E402  (also registers the run-directory resolvers)
from deepdelta.runner import run  # noqa: E402

log = logging.getLogger(__name__)


def point_ddp_ranks_at_this_job(hydra_cfg: DictConfig) -> None:
    """Lightning's DDP launcher starts ranks > 0 by re-running ``sys.argv`` in ``hydra.run.dir``;
    inside a multirun that would start the whole sweep again (Lightning #11300). Make the
    re-run this job alone, as a single run in this job's directory."""
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if multirun:
        point_ddp_ranks_at_this_job(hydra_cfg)
    environ = dict(os.environ)  # Lightning's launcher leaves LOCAL_RANK etc.; the next job must not see them
    try:
        return run(cfg, Path(hydra_cfg.runtime.output_dir), name=hydra_cfg.job.override_dirname, multirun=multirun)
    except Exception:
        if not multirun:
            raise
        # a failing sweep member is recorded and the sweep goes on (see SweepSummary); the traceback
        # also goes to the job's train.log, the sweep table's log column
        traceback.print_exc()
        log.error("job failed:\n%s", traceback.format_exc())
        return None
    finally:
        os.environ.clear()
        os.environ.update(environ)


if __name__ == "__main__":
    sys.argv = resume_argv(sys.argv)  # resume=DIR replays DIR's original overrides
    main()
