"""Loggers: ``csv/metrics.csv`` safe across kills and in-place resumes, and W&B modes as W&B users expect.

W&B (`WandbLogger`): offline by default (``logger.wandb.offline=true``); ``WANDB_MODE``, when set, decides
(``online``, ``offline``, ``disabled``), as it does for any W&B program. Lightning's own logger overwrote
``WANDB_MODE=online`` with offline whenever ``offline=True``.

CSV (`ResumableCSVLogger`):

Lightning's writer deletes an existing ``metrics.csv`` when it starts, so a run resumed in its own
directory (``resume=<run dir>``, a SLURM requeue) kept only the rows logged from the resume on. This
logger is told the global step of the checkpoint the run resumes from (``resume_step``, by the runner);
it then keeps the earlier attempt's rows and drops those from ``resume_step`` on, which the resumed run
logs again (it replays every step after the checkpoint). Lightning logs a step's training and validation
metrics under the step's 0-based index (``global_step`` before it), so the rows of the checkpoint's own
step and earlier have ``step < resume_step``; the mechanism probe logs under ``global_step`` and redoes
the probe of the checkpoint's step on resume (see ``MechanismProbe.on_train_start``). The trim happens
when the resumed run first writes, so resuming a finished run changes nothing.

When a new column appears the file is rewritten (with the union of the columns, as Lightning does),
here atomically, so a kill mid-rewrite cannot truncate the run's history.
"""

from __future__ import annotations

import csv
import math
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from typing_extensions import override


def row_step(row: dict[str, Any]) -> float:
    """The ``step`` of a CSV row (-inf where missing or not a number: such a row is kept)."""
    try:
        return float(row.get("step") or "")
    except ValueError:
        return -math.inf


def write_csv(path: Path, fieldnames: list[str], rows: list[dict[str, Any]]) -> None:
    """Replace the local CSV ``path`` atomically: readers, and a kill at any moment, see the old file or the new."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def keep_rows_before(path: Path, step: int) -> None:
    """Drop the rows of ``step`` and later from the local CSV ``path`` (an earlier attempt's rows that a
    run resumed at ``step`` logs again), atomically; the file goes when no row is left."""
    if not path.exists():
        return
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        rows = list(reader)
        header = list(reader.fieldnames or [])
    kept = [row for row in rows if row_step(row) < step]
    if len(kept) == len(rows):
        return
    if kept:
        write_csv(path, header, kept)
    else:
        path.unlink()


class ResumableWriter(ExperimentWriter):
    """Lightning's CSV writer; with ``resume_step`` set it continues an existing ``metrics.csv``."""

    def __init__(self, log_dir: str, resume_step: int | None = None) -> None:
        self.resume_step = resume_step
        self._carried = False  # an earlier attempt's file is here, still to be trimmed at the first write
        super().__init__(log_dir=log_dir)

    @override
    def _check_log_dir_exists(self) -> None:
        if self.resume_step is None:
            super()._check_log_dir_exists()  # a new run: Lightning's behaviour, a new file
        else:
            self._carried = self._fs.isfile(self.metrics_file_path)

    @override
    def save(self) -> None:
        if self.metrics and self._carried:
            self._trim()
        super().save()

    def _trim(self) -> None:
        """Keep the earlier attempt's rows up to the checkpoint; the resumed run logs the rest again."""
        assert self.resume_step is not None
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            rows = [row for row in reader if row_step(row) < self.resume_step]
            header = list(reader.fieldnames or [])
        if rows:
            self.metrics_keys = sorted(set(self.metrics_keys) | set(header))
            self._write(self.metrics_keys, rows)
        else:  # resumed from step 0: nothing to keep
            self._fs.rm_file(self.metrics_file_path)
        self._carried = False

    @override
    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            rows = list(csv.DictReader(file))
        self._write(fieldnames, rows)

    def _write(self, fieldnames: list[str], rows: list[dict[str, Any]]) -> None:
        """The whole file, replaced atomically on a local disk (readers and a kill see old or new)."""
        if "://" in self.metrics_file_path:  # a remote store: fsspec, as Lightning does
            with self._fs.open(self.metrics_file_path, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=fieldnames)
                writer.writeheader()
                writer.writerows(rows)
            return
        write_csv(Path(self.metrics_file_path), fieldnames, rows)


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger that continues the run's ``metrics.csv`` when resumed from a checkpoint at
    global step ``resume_step`` (None: a new run, a new file, as Lightning's)."""

    def __init__(
        self,
        save_dir: _PATH,
        name: str | None = "lightning_logs",
        version: int | str | None = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
        resume_step: int | None = None,
    ):
        super().__init__(save_dir, name, version, prefix, flush_logs_every_n_steps)
        self.resume_step = resume_step

    @property
    @override
    @rank_zero_experiment
    def experiment(self) -> ResumableWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = ResumableWriter(log_dir=self.log_dir, resume_step=self.resume_step)
        return self._experiment


# WANDB_MODE values wandb accepts, by what they do
WANDB_MODES = {"online": "online", "run": "online", "shared": "online", "offline": "offline", "dryrun": "offline",
               "disabled": "disabled"}  # fmt: skip


def wandb_mode(offline: bool) -> str:
    """online | offline | disabled: ``WANDB_MODE`` when it is set, else ``logger.wandb.offline``."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    return WANDB_MODES.get(env) or ("offline" if offline else "online")


def find_wandb_api_key() -> str | None:
    """Where wandb.init would find credentials (``WANDB_API_KEY``, an identity token file, the netrc entry of
    ``WANDB_BASE_URL``'s host), or None: without any, online logging fails or waits for a prompt."""
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        if os.environ.get(var):
            return var
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc").expanduser()
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return None
    return str(path) if entry and entry[2] else None


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger with W&B's meaning of ``WANDB_MODE`` (see the module docstring)."""

    def __init__(self, *args: Any, offline: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, offline=wandb_mode(offline) == "offline", **kwargs)
        # Lightning always passes `anonymous` (None here), which wandb deprecated: one warning per run for nothing
        self._wandb_init.pop("anonymous", None)
