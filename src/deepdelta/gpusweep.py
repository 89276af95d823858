"""Run a sweep's jobs over this machine's GPUs: one job per GPU at a time, a queue.

    python -m deepdelta.gpusweep sweep=replication              # every visible GPU
    python -m deepdelta.gpusweep --gpus 0,1 sweep=grid seed=0,1  # or: make sweep SWEEP=grid GPUS=2
    python -m deepdelta.gpusweep --dir outputs/sweeps/<dir> sweep=replication   # go on with a sweep

Hydra's own launchers run a multirun's jobs one after another (basic) or all on the same GPUs
(submitit_local), so a 4-GPU box would idle three GPUs or crowd one. Here each job is the plain
single-run CLI (``python src/train.py <its overrides>``) with ``CUDA_VISIBLE_DEVICES`` set to a
free GPU and ``hydra.run.dir`` set to ``<sweep dir>/<job number>``, numbered as ``-m`` numbers
them, so the sweep directory reads back like a multirun's (``make report SWEEP_DIR=...``).
Every job's config is validated before the first starts. A failing job is recorded and the queue
goes on; run again with ``--dir`` and finished jobs are kept, interrupted ones resume from their
last checkpoint, and the rest start.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, open_dict

from deepdelta import validate
from deepdelta.analysis.summary import write_sweep_summary
from deepdelta.rundir import run_uid

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "src" / "train.py"
CONF = ROOT / "conf"


@dataclass
class Job:
    num: int
    overrides: list[str]
    run_dir: Path

    @property
    def status(self) -> str:
        """finished / started (a directory, maybe a checkpoint) / new."""
        summary = self.run_dir / "summary.json"
        if summary.exists() and json.loads(summary.read_text()).get("status") == "finished":
            return "finished"
        return "started" if (self.run_dir / ".hydra").exists() else "new"

    def argv(self) -> list[str]:
        if self.status == "started":  # same overrides, same directory, from its newest checkpoint
            return [sys.executable, str(TRAIN), f"resume={self.run_dir}"]
        return [sys.executable, str(TRAIN), *self.overrides, f"hydra.run.dir={self.run_dir}"]


def expand(overrides: list[str]) -> list[list[str]]:
    """The jobs of ``python src/train.py -m <overrides>``, in Hydra's order: the sweep's
    ``hydra.sweeper.params`` first, then the command line's, as a cartesian product."""
    parser = OverridesParser.create()
    fixed = [o for o in parser.parse_overrides(overrides) if not o.is_sweep_override()]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[o.input_line for o in fixed], return_hydra_config=True)
    params = cfg.hydra.sweeper.get("params") or {}
    lines = [f"{k}={v}" for k, v in params.items()] + overrides
    # a command-line value replaces the sweep file's value for the same key, as in Hydra
    by_key: dict[str, list[str]] = {}
    for o in parser.parse_overrides(lines):
        key = o.get_key_element()
        values = o.sweep_string_iterator() if o.is_sweep_override() else [o.get_value_element_as_str()]
        by_key[key] = [f"{key}={v}" for v in values]
    return [list(combo) for combo in itertools.product(*by_key.values())]


def job_config(overrides: list[str], run_dir: Path) -> DictConfig:
    """The job's config as its run will see it (``${hydra:...}`` pointing at ``run_dir``)."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        HydraConfig.instance().set_config(cfg)
        del cfg["hydra"]
    return cfg


def check_all(jobs: list[Job]) -> None:
    """Every problem of every job, before any GPU time is spent."""
    errors = []
    for job in jobs:
        try:
            cfg = job_config(job.overrides, job.run_dir)
            found = validate.problems(cfg)
            devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
            if devices not in (1, -1, "auto") or nodes != 1:  # the queue gives each job one GPU
                found.append(
                    f"trainer.devices={devices}, trainer.num_nodes={nodes}: got a multi-GPU job, allowed: one GPU "
                    "per job here (for DDP jobs use python src/train.py -m ... trainer=ddp, or hydra/launcher=slurm)"
                )
        except HydraException as exc:  # no such option or key (residual=nope, nokey=1): Hydra's message, one line
            found = [_one_line(exc)]
        errors += [f"job {job.num} ({' '.join(job.overrides)}): {p}" for p in found]
    if errors:
        raise SystemExit("invalid sweep, nothing was started:\n  " + "\n  ".join(errors))


def _one_line(exc: HydraException) -> str:
    """Hydra's composition error on one line, without its config search path."""
    return " ".join(str(exc).split("Config search path")[0].split())


def parse_gpus(text: str | None) -> list[str]:
    if text is None:
        import torch

        count = torch.cuda.device_count()
        if count == 0:
            raise SystemExit("--gpus: no CUDA GPU is visible; pass --gpus N or --gpus 0,1 on a GPU machine")
        return [str(i) for i in range(count)]
    if text.isdigit() and "," not in text:
        if int(text) < 1:
            raise SystemExit(f"--gpus: got {text!r}, allowed: a count ≥ 1 or a list of device ids like 0,1")
        return [str(i) for i in range(int(text))]
    ids = [g.strip() for g in text.split(",") if g.strip()]
    if not ids or not all(g.isdigit() for g in ids) or len(set(ids)) != len(ids):
        raise SystemExit(f"--gpus: got {text!r}, allowed: a count ≥ 1 or a list of distinct device ids like 0,1")
    return ids


T = TypeVar("T")


def over_gpus(items: list[T], gpus: list[str], work: Callable[[T, str], None]) -> None:
    """``work(item, gpu)`` for every item, one item per GPU at a time, in order, until none is left.
    Ctrl-C starts no new item: the running ones (whose processes got the same SIGINT and save at
    their next step) are waited for, then KeyboardInterrupt is raised; a second Ctrl-C stops waiting."""
    todo, lock, stop = list(items), threading.Lock(), threading.Event()
    done = [threading.Event() for _ in gpus]

    def worker(gpu: str, finished: threading.Event) -> None:
        try:
            while True:
                with lock:
                    if not todo or stop.is_set():
                        return
                    item = todo.pop(0)
                work(item, gpu)
        finally:
            finished.set()

    # Waited for through events, not Thread.join: a join interrupted by Ctrl-C marks a thread that is
    # still running as stopped (CPython before 3.13), and a second join then returns at once. And with a
    # timeout: the kernel may hand SIGINT to a worker thread, and a main thread blocked without one
    # would run Python's handler only when its wait ends (after the next jobs had started).
    threads = [threading.Thread(target=worker, args=(g, e), daemon=True) for g, e in zip(gpus, done, strict=True)]
    try:  # the first job can be interrupted while the last thread starts
        for t in threads:
            t.start()
        for e in done:
            while not e.wait(0.05):
                pass
    except KeyboardInterrupt:
        stop.set()
        print("\nCtrl-C: no new job starts; waiting for the running ones to save (Ctrl-C again stops at once)",
              file=sys.stderr, flush=True)  # fmt: skip
        for t, e in zip(threads, done, strict=True):
            if t.ident is not None:  # started
                e.wait()
        raise


def run_queue(jobs: list[Job], gpus: list[str], logs: Path) -> dict[int, int]:
    """Run the jobs, one per GPU at a time; return each job's exit code."""
    codes: dict[int, int] = {}

    def run(job: Job, gpu: str) -> None:
        # the job's W&B run joins the sweep's group, as in a multirun
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu, DEEPDELTA_SWEEP_GROUP=job.run_dir.parent.name)
        env.pop("DEEPDELTA_RUN_UID", None)
        start = time.time()
        print(f"[gpu {gpu}] job {job.num} starts: {' '.join(job.overrides)}", flush=True)
        with open(logs / f"{job.num}.log", "a") as out:
            code = subprocess.run(job.argv(), env=env, stdout=out, stderr=subprocess.STDOUT).returncode
        codes[job.num] = code
        state = "finished" if code == 0 else f"FAILED (exit {code}, see {logs / f'{job.num}.log'})"
        print(f"[gpu {gpu}] job {job.num} {state} in {time.time() - start:.0f} s", flush=True)

    over_gpus([j for j in jobs if j.status != "finished"], gpus, run)
    return codes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", help="a count (the first N devices) or device ids like 0,2,3; default: every GPU")
    p.add_argument("--dir", type=Path, help="sweep directory; an existing one goes on where it stopped")
    p.add_argument("overrides", nargs="*", help="Hydra overrides as for `python src/train.py -m`")
    a = p.parse_args(argv)
    gpus = parse_gpus(a.gpus)
    sweep_dir = a.dir or Path("outputs/sweeps") / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{run_uid()}"
    try:
        jobs = [Job(i, o, sweep_dir / str(i)) for i, o in enumerate(expand(a.overrides))]
    except HydraException as exc:  # an override that does not parse or compose for any job
        raise SystemExit(f"invalid sweep, nothing was started: {_one_line(exc)}") from None
    check_all(jobs)
    logs = sweep_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    done = sum(j.status == "finished" for j in jobs)
    print(f"sweep {sweep_dir}: {len(jobs)} jobs ({done} finished before) on GPUs {','.join(gpus)}", flush=True)
    gpus_flag = ["--gpus", a.gpus] if a.gpus is not None else []  # the same GPUs (or CPU slots) again
    again = shlex.join(["python", "-m", "deepdelta.gpusweep", *gpus_flag, "--dir", str(sweep_dir), *a.overrides])
    try:
        codes = run_queue(jobs, gpus, logs)
    except KeyboardInterrupt:
        write_sweep_summary(sweep_dir)
        print(f"sweep interrupted; table: {sweep_dir / 'summary.md'}; go on with: {again}", file=sys.stderr)
        raise SystemExit(130) from None
    frame = write_sweep_summary(sweep_dir)
    print(f"\nSweep summary ({sweep_dir / 'summary.md'}):\n\n{(sweep_dir / 'summary.md').read_text()}")
    failed = sorted(n for n, c in codes.items() if c != 0)
    if failed or (frame["status"] != "finished").any():
        print(f"failed jobs: {failed}; go on with: {again}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
