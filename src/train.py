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

from deepdelta import errors  # noqa: E402
from deepdelta.quiet import silence_noise  # noqa: E402
from deepdelta.rundir import release, resume_argv  # noqa: E402  (also registers the run-directory resolvers)

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
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        # imported here: Lightning takes seconds to import, and --help, Hydra's own errors and refused
        # directories need none of it
        from deepdelta.runner import run

        result = run(cfg, run_dir, name=hydra_cfg.job.override_dirname, multirun=multirun)
        if cfg.get("dry_run") is True and not multirun:
            release(run_dir)  # it built the model, printed its size and trained nothing: no run to keep
        return result
    except errors.UserError as exc:  # the user's mistake: its message and the way out, no traceback
        if not multirun and exc.exit_code == errors.CONFIG_EXIT:
            release(run_dir)  # it never started: leave no run directory behind
        if errors.show_tracebacks():
            raise
        if multirun:  # recorded in the job's summary.json and the sweep table; the sweep goes on
            log.error("error: %s", exc)
            return None
        errors.report(exc)
        raise SystemExit(exc.exit_code) from None
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


def cli() -> None:
    """``python src/train.py``: Hydra's errors in composing the config (an unknown group choice or key, an
    override that does not parse) exit with status 2 like every other config error."""
    from hydra.errors import CompactHydraException

    silence_noise()
    sys.argv = resume_argv(sys.argv)  # resume=DIR replays DIR's original overrides
    try:
        main()
    except SystemExit as exc:
        # Hydra prints such an error compactly and exits 1 from inside its handler: the error is the context
        if exc.code == 1 and isinstance(exc.__context__, CompactHydraException):
            raise SystemExit(errors.CONFIG_EXIT) from None
        raise


if __name__ == "__main__":
    cli()
