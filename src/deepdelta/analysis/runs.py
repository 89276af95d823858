"""Read run and sweep directories back: config, metrics, probes, summary; group by seed.

A run directory holds ``.hydra/config.yaml`` and ``overrides.yaml`` (what was asked),
``csv/metrics.csv`` (every metric), ``probes.csv`` (the mechanism probes, DDL runs) and
``summary.json``. A sweep directory holds numbered run directories. Runs that differ only
in ``seed`` form one group; a group's label is the overrides that set it apart.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from deepdelta.analysis.mechanism import read_probes
from deepdelta.model.config import HYPER, IMPLS, ModelConfig

# Config keys that do not change what is trained (where outputs go, how it is logged).
IGNORED_PREFIXES = ("seed", "data.seed", "paths.", "logger.", "callbacks.", "hydra.", "tags", "project", "ckpt_path",
                    "eval.")  # fmt: skip
IGNORED_KEYS = {"trainer.default_root_dir", "dry_run"}
# Overrides that never name a configuration (as in conf/hydra/default.yaml's override_dirname).
IGNORED_OVERRIDES = {
    "seed",
    "sweep",
    "experiment",
    "debug",
    "trainer",
    "logger",
    "callbacks",
    "paths",
    "tags",
    "project",
}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, list):
        return {prefix[:-1]: tuple(tree)}
    return {prefix[:-1]: tree}


def metrics_by_step(metrics_csv: Path) -> pd.DataFrame:
    """Lightning's CSV (one row per log call) folded into one row per training step: the
    last non-empty value of every column. Validation-loop rows (``validate/*``) are dropped."""
    if not metrics_csv.exists():
        return pd.DataFrame()
    frame = pd.read_csv(metrics_csv)
    frame = frame.drop(columns=[c for c in frame.columns if c.startswith("validate/")])
    frame = frame.dropna(how="all", subset=[c for c in frame.columns if c not in ("step", "epoch")])
    if frame.empty or "step" not in frame:
        return pd.DataFrame()
    with warnings.catch_warnings():  # hundreds of probe columns: pandas warns about fragmentation, harmlessly
        warnings.simplefilter("ignore", pd.errors.PerformanceWarning)
        return frame.copy().groupby("step", sort=True).last().reset_index()


@dataclass
class Run:
    """One run directory, read lazily."""

    path: Path

    @cached_property
    def config(self) -> dict[str, Any]:
        """The composed config as Hydra saved it (interpolations left as written)."""
        file = self.path / ".hydra" / "config.yaml"
        return OmegaConf.to_container(OmegaConf.load(file), resolve=False) if file.exists() else {}

    @cached_property
    def overrides(self) -> list[str]:
        file = self.path / ".hydra" / "overrides.yaml"
        return list(OmegaConf.load(file)) if file.exists() else []

    @cached_property
    def summary(self) -> dict[str, Any]:
        file = self.path / "summary.json"
        return json.loads(file.read_text()) if file.exists() else {}

    @cached_property
    def metrics(self) -> pd.DataFrame:
        return metrics_by_step(self.path / "csv" / "metrics.csv")

    @cached_property
    def probes(self) -> pd.DataFrame:
        """The mechanism probes (one row per step × sublayer: β columns for ddl/write_only,
        mixing columns for hc/mhc); empty for additive runs."""
        file = self.path / "probes.csv"
        return read_probes(file) if file.exists() else pd.DataFrame()

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def residual(self) -> str:
        return str(self.config.get("model", {}).get("residual", "ddl"))

    @property
    def beta_max(self) -> float:
        return float(self.config.get("model", {}).get("beta_max", 2.0))

    @property
    def streams(self) -> int | None:
        """dv (hc/mhc: the number of streams n), where the saved config states it as a number
        (``model.dv`` is usually the interpolation ``${dv}`` of the top-level ``dv``)."""
        for value in (self.config.get("model", {}).get("dv"), self.config.get("dv")):
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    @property
    def status(self) -> str:
        return str(self.summary.get("status", "unknown"))

    @property
    def key(self) -> tuple[tuple[str, Any], ...]:
        """The config minus seed and bookkeeping: equal keys mean the same configuration.
        Model fields a run's saved config lacks (added to the config after it ran) count as
        the values the run had: their ModelConfig defaults, and for a run from before `impl`
        existed (2026-11-29) the fields of what is now impl=paper."""
        config = dict(self.config)
        if "model" in config:
            defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
            if "impl" not in config["model"]:
                defaults.update(IMPLS["paper"], impl="paper")
            config["model"] = {**defaults, **config["model"]}
        flat = _flatten(config)
        kept = {k: v for k, v in flat.items() if k not in IGNORED_KEYS and not k.startswith(IGNORED_PREFIXES)}
        return tuple(sorted((k, repr(v)) for k, v in kept.items()))

    @property
    def named_overrides(self) -> list[str]:
        """The overrides that name this configuration (no seed, no hydra.*, no logging)."""
        out = []
        for item in self.overrides:
            name = re.split(r"[=@]", item.lstrip("+~"), maxsplit=1)[0]
            if name.startswith("hydra.") or name.split(".")[0] in IGNORED_OVERRIDES:
                continue
            out.append(item)
        return out

    @property
    def val_loss(self) -> float:
        value = self.summary.get("val_loss")
        if value is None and "val/loss" in self.metrics:
            value = self.metrics["val/loss"].dropna().iloc[-1]
        return float(value) if value is not None else math.nan

    @property
    def val_step(self) -> int | None:
        """The optimizer step after which `val_loss` was measured (None: never validated, or not recorded)."""
        value = self.summary.get("val_step")
        if value is None and "val/loss" in self.metrics and self.metrics["val/loss"].notna().any():
            value = int(self.metrics.loc[self.metrics["val/loss"].notna(), "step"].iloc[-1]) + 1  # logged at N - 1
        return None if value is None else int(value)

    @property
    def params(self) -> float:
        return float(self.summary.get("params") or math.nan)

    @property
    def tokens_per_s(self) -> float:
        """Steady-state training tok/s (ThroughputMonitor's window), else tokens / training time."""
        value = float(self.summary.get("tok_per_s") or math.nan)
        if math.isnan(value) and {"train/tokens", "train/time"} <= set(self.metrics.columns):
            tokens, seconds = self.metrics["train/tokens"].dropna(), self.metrics["train/time"].dropna()
            if len(tokens) and len(seconds) and seconds.iloc[-1] > 0:
                value = float(tokens.iloc[-1] / seconds.iloc[-1])
        return value

    @property
    def peak_memory_gb(self) -> float:
        """Peak memory if a callback logged it (``train/peak_mem_gb``), else NaN."""
        for col in ("train/peak_mem_gb", "peak_mem_gb"):
            if col in self.metrics and self.metrics[col].notna().any():
                return float(self.metrics[col].dropna().max())
        return math.nan


@dataclass
class Group:
    """Runs of one configuration (several seeds)."""

    label: str
    runs: list[Run] = field(default_factory=list)

    @property
    def first(self) -> Run:
        return self.runs[0]

    @property
    def residual(self) -> str:
        return self.first.residual

    @property
    def has_gate(self) -> bool:
        """ddl and write_only: a gate β and a direction k (the β probes); additive and the
        Hyper-Connection rules have neither."""
        return self.residual not in ("additive", *HYPER)

    @property
    def has_mixing(self) -> bool:
        """hc and mhc: mixing matrices and read weights (the mixing probes)."""
        return self.residual in HYPER

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "summary.json").exists() or (path / ".hydra" / "config.yaml").exists())


def find_runs(sweep_dir: Path) -> list[Run]:
    """The run directories of a sweep, in job order (numbered directories first)."""
    dirs = [p for p in Path(sweep_dir).iterdir() if is_run_dir(p)]
    dirs.sort(key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))
    return [Run(p) for p in dirs]


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs that differ only in seed, in order of first appearance, each labelled by the
    overrides that are not shared by every run (``"default"`` if none)."""
    by_key: dict[tuple, list[Run]] = {}
    for run in runs:
        by_key.setdefault(run.key, []).append(run)
    shared = set.intersection(*(set(r.named_overrides) for r in runs)) if runs else set()
    groups = []
    for members in by_key.values():
        members.sort(key=lambda r: r.seed)
        own = [o for o in members[0].named_overrides if o not in shared]
        groups.append(Group(label=" ".join(own) or " ".join(members[0].named_overrides) or "default", runs=members))
    _disambiguate(groups)
    return groups


def _disambiguate(groups: list[Group]) -> None:
    """Same label, different config (e.g. a key set in a config file): append the job."""
    seen: dict[str, int] = {}
    for g in groups:
        seen[g.label] = seen.get(g.label, 0) + 1
    for g in groups:
        if seen[g.label] > 1:
            g.label = f"{g.label} [{g.first.path.name}]"


def baseline_for(group: Group, groups: list[Group]) -> Group | None:
    """The additive group closest to ``group`` in config (fewest differing keys), so DDL
    dv=4 is compared with additive dv=4 when the sweep has one, else with the additive run."""
    candidates = [g for g in groups if g.residual == "additive"]
    if not candidates:
        return None
    mine = dict(group.first.key)

    def distance(g: Group) -> int:
        theirs = dict(g.first.key)
        return sum(mine.get(k) != theirs.get(k) for k in set(mine) | set(theirs))

    return min(candidates, key=distance)


REPO_ROOT = Path(__file__).resolve().parents[3]  # src/deepdelta/analysis/runs.py -> the checkout


def locate(path: str | Path, start: Path | None = None) -> Path:
    """A run or sweep directory given as on the command line: a relative path is taken from the repository
    root (as ``make report RUN=...`` takes it), so a notebook whose kernel runs in ``notebooks/`` finds
    ``outputs/runs/<run>``; then from ``start`` (default: the working directory)."""
    path = Path(path).expanduser()
    here = Path(start or Path.cwd()).resolve()
    checkout = next((p for p in (here, *here.parents) if (p / "pyproject.toml").is_file()), REPO_ROOT)
    tried = [path] if path.is_absolute() else list(dict.fromkeys([checkout / path, REPO_ROOT / path, here / path]))
    for candidate in tried:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"{path}: no such directory (looked for {', '.join(map(str, tried))})")


def newest(kind: str, start: Path | None = None) -> Path:
    """The newest directory under ``outputs/{kind}`` (kind: ``runs`` or ``sweeps``), looked
    for from ``start`` (default: the working directory) upwards, so a notebook opened in
    ``notebooks/`` finds the repository's outputs."""
    start = Path(start or Path.cwd()).resolve()
    for base in [start, *start.parents]:
        root = base / "outputs" / kind
        if root.is_dir():
            dirs = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name)
            if dirs:
                return dirs[-1]
    raise FileNotFoundError(f"no outputs/{kind}/* directory above {start}: pass the directory explicitly")
