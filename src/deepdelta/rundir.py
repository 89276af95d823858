"""Run directories: unique names, ownership (no run overwrites another), and resuming a run in place.

Scheme (README "Resume, preemption, divergence"):
- a new run gets ``outputs/runs/<date_time>_<id>`` (``<id>``: the SLURM job id, else 4 random hex digits), a
  sweep ``outputs/sweeps/<date_time>_<id>``; the directory is claimed (``.deepdelta-run``, created with
  O_EXCL before Hydra writes anything) and a second run pointed at it stops with an error;
- ``resume=<run dir>`` continues that run in that directory: its original overrides are replayed
  (``<run dir>/.hydra/overrides.yaml``, new ones on the command line win) and training restarts from its
  newest checkpoint (none yet: it starts there from scratch); a directory that holds no run is refused, so a
  mistyped path never trains a new model;
- ``ckpt_path=last`` means the newest checkpoint of the run directory, and fails when it has none;
- a requeued SLURM job (``SLURM_RESTART_COUNT`` >= 1) resumes from its own directory's newest checkpoint;
- a run rejected before it started (a config error) leaves its directory as it found it (`release`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from deepdelta.errors import CONFIG_EXIT, UserError

CLAIM = ".deepdelta-run"
_UID: str | None = None


class RunDirError(UserError, RuntimeError):
    """An output directory that cannot be used: not writable, or owned by another run."""

    exit_code = CONFIG_EXIT


@dataclass
class _Before:
    """A run directory as it was before this process claimed it and Hydra wrote into it."""

    existed: bool
    new_root: Path | None = None  # the outermost directory the claim creates (outputs/, outputs/runs/, ...)
    entries: set[str] = field(default_factory=set)
    hydra_files: dict[str, bytes] = field(default_factory=dict)


_BEFORE: dict[Path, _Before] = {}  # run directories this process claimed, as they were before


def run_uid() -> str:
    """Suffix that keeps runs started in the same second apart: shared by every task of a SLURM job,
    random otherwise, and fixed for this process (and its children, through the environment)."""
    global _UID
    if _UID is None:
        slurm = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
        if slurm:
            task = os.environ.get("SLURM_ARRAY_TASK_ID")
            _UID = f"j{slurm}" + (f"_{task}" if os.environ.get("SLURM_ARRAY_JOB_ID") and task else "")
        else:
            _UID = os.environ.get("DEEPDELTA_RUN_UID") or secrets.token_hex(2)
        os.environ["DEEPDELTA_RUN_UID"] = _UID
    return _UID


def _run_dir(resume: Any, default: str) -> str:
    return str(resume) if resume not in (None, "") else default


# cached: Hydra reads hydra.run.dir several times and copies the cache to sweep jobs
OmegaConf.register_new_resolver("dd.uid", run_uid, use_cache=True, replace=True)
OmegaConf.register_new_resolver("dd.run_dir", _run_dir, replace=True)


def is_rank_zero() -> bool:
    """False in the extra processes of a distributed launch (they share rank 0's directory)."""
    return not any(int(os.environ.get(k, "0") or 0) > 0 for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "NODE_RANK"))


def slurm_requeued() -> bool:
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def is_resuming(cfg: DictConfig) -> bool:
    return bool(cfg.get("resume")) or cfg.get("ckpt_path") == "last" or slurm_requeued()


def occupied(directory: Path) -> str | None:
    """Why ``directory`` already belongs to a run, or None if it is free."""
    directory = Path(directory)
    claim = directory / CLAIM
    if claim.exists():
        try:
            who = json.loads(claim.read_text())
            return f"claimed by pid {who.get('pid')} on {who.get('host')} at {who.get('started')}"
        except (OSError, ValueError):
            return "claimed by another run"
    if (directory / "summary.json").exists():
        return "it holds a finished run (summary.json)"
    if any((directory / "checkpoints").glob("*.ckpt")):
        return "it holds checkpoints"
    return None


def claim(directory: Path, resuming: bool) -> None:
    """Create ``directory`` and take ownership, atomically; fail clearly when it is unusable or taken."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(
            f"output directory {directory} cannot be created: {exc.strerror or exc}; choose a writable "
            "location with hydra.run.dir=... (hydra.sweep.dir=... for -m)"
        ) from exc
    reason = occupied(directory)
    alive = _live_owner(directory / CLAIM)
    if alive:  # also when resuming: two processes must never train into one directory
        raise RunDirError(
            f"output directory {directory} belongs to a run that is still running ({alive}); if it is not, "
            f"delete {directory / CLAIM}"
        )
    if reason and not resuming:
        raise RunDirError(
            f"output directory {directory} is already used ({reason}); runs never share a directory: "
            f"continue that run with resume={directory}, or drop hydra.run.dir to get a new one"
        )
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%F %T")})
    path = directory / CLAIM
    try:
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if resuming else os.O_EXCL)
        fd = os.open(path, flags, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(record + "\n")
    except FileExistsError as exc:  # lost a race with a run started at the same moment
        raise RunDirError(f"output directory {directory} was claimed by another run just now") from exc
    except OSError as exc:
        raise RunDirError(
            f"output directory {directory} is not writable: {exc.strerror or exc}; choose another with "
            "hydra.run.dir=... (hydra.sweep.dir=... for -m)"
        ) from exc


def _live_owner(path: Path) -> str | None:
    """``pid N on HOST`` if the claim's process is alive on this host (and is not us)."""
    try:
        who = json.loads(path.read_text())
        pid = int(who["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if who.get("host") != socket.gethostname() or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, owned by someone else
    return f"pid {pid} on {who.get('host')}"


def _snapshot(directory: Path) -> _Before:
    if not directory.is_dir():
        root = directory.resolve()
        while not root.parent.exists():
            root = root.parent
        return _Before(existed=False, new_root=root)
    hydra = directory / ".hydra"
    files = {p.name: p.read_bytes() for p in hydra.glob("*.yaml")} if hydra.is_dir() else {}
    return _Before(existed=True, entries={p.name for p in directory.iterdir()}, hydra_files=files)


def release(run_dir: Path) -> None:
    """Leave ``run_dir`` as it was before this process claimed it, for a run rejected before it started:
    a new directory goes; in an existing one (``resume=``) what Hydra added goes and the run's own
    ``.hydra/*.yaml`` come back, so the next ``resume=`` replays the run's overrides, not the rejected ones."""
    run_dir = Path(run_dir)
    before = _BEFORE.pop(run_dir.resolve(), None)
    if before is None or not run_dir.is_dir():
        return
    if not before.existed:
        shutil.rmtree(run_dir, ignore_errors=True)
        # then the parents it created, while empty (another run may have started in them meanwhile)
        parent, root = run_dir.resolve().parent, before.new_root
        while root is not None and parent.is_relative_to(root):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent
        return
    for entry in run_dir.iterdir():
        if entry.name not in before.entries:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
    for name, data in before.hydra_files.items():
        (run_dir / ".hydra" / name).write_bytes(data)


def slurm_launcher_problem(config: DictConfig) -> str | None:
    """Why the sweep's launcher cannot work on this machine (submitit's SLURM launcher needs `srun`)."""
    target = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
    if target.endswith("SlurmLauncher") and shutil.which("srun") is None:
        return (
            "hydra/launcher=slurm: this machine has no `srun`, so it cannot submit SLURM jobs; run the command "
            "on a login node of your SLURM cluster, or run the sweep here without hydra/launcher=slurm (one job "
            "after another) or with hydra/launcher=submitit_local (jobs in parallel)"
        )
    return None


class RunDirGuard(Callback):
    """Hydra callback: claims the run (or sweep) directory before Hydra writes anything into it.
    Hydra turns exceptions raised by callbacks into warnings, so refusals exit through SystemExit."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if is_rank_zero():
            run_dir = Path(str(config.hydra.run.dir))
            before = _snapshot(run_dir)
            _or_exit(claim, run_dir, is_resuming(config))
            _BEFORE[run_dir.resolve()] = before

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        problem = slurm_launcher_problem(config)
        if problem:
            _exit(problem)
        _or_exit(claim, Path(str(config.hydra.sweep.dir)), False)


def _exit(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(CONFIG_EXIT)


def _or_exit(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except RunDirError as exc:
        _exit(str(exc))


def resume_argv(argv: list[str]) -> list[str]:
    """``resume=DIR`` on the command line: put DIR's original overrides first (later ones win in Hydra)."""
    given = [a for a in argv[1:] if a.startswith("resume=")]
    if not given or "-m" in argv or "--multirun" in argv:
        return argv
    run_dir = given[-1].split("=", 1)[1]
    saved = Path(run_dir) / ".hydra" / "overrides.yaml"
    if run_dir not in ("", "null") and not saved.is_file():  # a mistyped path must not train a new model
        _exit(
            f"resume: got {run_dir!r}, but no run is there (no {saved}), so there is nothing to resume; "
            f"check the path (runs are in outputs/runs/, sweep jobs in outputs/sweeps/<sweep>/<job>), or start a new "
            f"run in that directory with hydra.run.dir={run_dir} instead of resume="
        )
    skip = ("resume=", "ckpt_path=", "hydra.")
    replay = [o for o in (yaml.safe_load(saved.read_text()) or []) if not str(o).lstrip("+~").startswith(skip)]
    if replay:
        print(f"resume: replaying the run's overrides: {' '.join(replay)}", file=sys.stderr)
    return [argv[0], *replay, *argv[1:]]


def checkpoint_to_resume(cfg: DictConfig, run_dir: Path) -> str | None:
    """The checkpoint ``trainer.fit`` should start from (None: from scratch); see the module docstring."""
    from deepdelta.callbacks.checkpoint import find_last_checkpoint

    ckpt = cfg.get("ckpt_path")
    resume = cfg.get("resume")
    if resume and Path(str(resume)).resolve() != Path(run_dir).resolve():
        raise RunDirError(
            f"resume: got {resume!r}, but this run's directory is {run_dir} (hydra.run.dir given too?); "
            "resume=<run dir> alone continues that run in its own directory"
        )
    if ckpt not in (None, "last"):
        return str(ckpt)
    lenient = ckpt is None  # resume= / requeue: a run killed before its first checkpoint starts over
    if ckpt is None and not (cfg.get("resume") or slurm_requeued()):
        return None
    last = find_last_checkpoint(run_dir)
    if last is None and not lenient:
        raise RunDirError(
            f"ckpt_path: got 'last', but {run_dir}/checkpoints holds no checkpoint; 'last' is the newest "
            f"checkpoint of this run's own directory: continue an earlier run with resume=<its run dir>"
        )
    if last is None:
        print(f"resume: no checkpoint in {run_dir} yet, starting from scratch there", file=sys.stderr)
    return None if last is None else str(last)


def checkpoint_step(path: str | Path) -> int:
    """The global step of a checkpoint, read without loading its tensors (memory-mapped)."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not the zip format mmap needs
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return int(ckpt["global_step"])


def wandb_run_id(run_dir: Path) -> str | None:
    """The W&B run id of an earlier attempt of this run (``wandb/<mode>-run-<time>-<id>``), to continue it."""
    runs = sorted(Path(run_dir, "wandb").glob("*run-*-*"), key=lambda p: p.stat().st_mtime_ns)
    return runs[-1].name.rsplit("-", 1)[-1] if runs else None
