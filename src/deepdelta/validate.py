"""Check a whole composed config before anything is built, and report every problem at once.

Each problem reads ``<key>: got <value>, allowed: <what>``. `problems` is pure and fast (no data is read,
no model is built), so tests can run a table of bad configs through it in-process; `check` raises
`ConfigError` with all of them; `data_problems` runs after the config is valid and looks at the data
itself (corpus long enough for ``block_size``, validation windows), which may tokenise into the cache.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from deepdelta.errors import CONFIG_EXIT, UserError
from deepdelta.model import ModelConfig
from deepdelta.model.accounting import matmul_weights

PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true", "64")
CPU_PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "64-true", "64")
ACCELERATORS = ("cpu", "gpu", "cuda", "auto")
MIN_FREE_BYTES = 64 << 20  # logs, W&B files and CSVs besides the checkpoints
_UNSET = object()


class ConfigError(UserError, ValueError):
    """Every problem of a config, one per line; found before any compute (exit status 2)."""

    exit_code = CONFIG_EXIT

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        n = len(self.problems)
        super().__init__(f"invalid configuration ({n} problem{'s' * (n != 1)}):\n  " + "\n  ".join(self.problems))


class _Checker:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.errs: list[str] = []

    def get(self, key: str, default: Any = _UNSET) -> Any:
        """The resolved value at ``key`` (containers as plain lists/dicts); records unresolvable keys."""
        try:
            node = OmegaConf.select(self.cfg, key, default=default, throw_on_missing=True)
        except Exception as exc:  # missing mandatory value (???) or a broken interpolation
            self.errs.append(f"{key}: cannot be resolved ({type(exc).__name__}: {exc}), allowed: a value")
            return _UNSET
        if isinstance(node, (DictConfig, ListConfig)):
            return OmegaConf.to_container(node, resolve=True)
        return node

    def bad(self, key: str, value: Any, allowed: str) -> None:
        self.errs.append(f"{key}: got {value!r}, allowed: {allowed}")

    def integer(self, key: str, low: int, high: int | None = None, extra: str = "", optional: bool = False) -> Any:
        value = self.get(key, None if optional else _UNSET)
        if value is _UNSET or (optional and value is None):
            return value
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
        if not ok:
            what = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
            self.bad(key, value, what + extra + (" or null" if optional else ""))
            return _UNSET
        return value

    def number(self, key: str, test: Callable[[float], bool], allowed: str, optional: bool = False) -> Any:
        value = self.get(key, None if optional else _UNSET)
        if value is _UNSET or (optional and value is None):
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not test(value):
            self.bad(key, value, allowed + (" or null" if optional else ""))
            return _UNSET
        return value

    def choice(self, key: str, allowed: tuple[str, ...], optional: bool = False) -> Any:
        value = self.get(key, None if optional else _UNSET)
        if value is _UNSET or (optional and value is None):
            return value
        if value not in allowed:
            self.bad(key, value, " | ".join(allowed))
            return _UNSET
        return value

    def boolean(self, key: str) -> Any:
        value = self.get(key, False)
        if not isinstance(value, bool):
            self.bad(key, value, "true | false")
        return value


def model_problems(fields: dict[str, Any]) -> tuple[list[str], ModelConfig | None]:
    """ModelConfig's own problems (it lists them all), each prefixed with ``model.``."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        return [f"model.{k}: got {fields[k]!r}, allowed: no such model field" for k in unknown], None
    try:
        return [], ModelConfig(**fields)
    except ValueError as exc:
        lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()] or [str(exc)]
        return [f"model.{line}" for line in lines], None
    except TypeError as exc:  # e.g. a comparison between a string and a number in ModelConfig's checks
        return [f"model: {exc}"], None


def problems(cfg: DictConfig, run_dir: Path | None = None, multirun: bool = False) -> list[str]:
    """Every problem of ``cfg`` (empty: valid). ``run_dir`` enables the output-directory checks."""
    c = _Checker(cfg)
    for key in sorted(OmegaConf.missing_keys(cfg)):  # mandatory values (???) nobody set
        hint = " (files, folders or globs: data.paths=[corpus/*.txt])" if key == "data.paths" else ""
        c.errs.append(f"{key}: got ??? (not set), allowed: a value on the command line, {key}=...{hint}")
    c.integer("seed", 0)
    for key in ("compile", "dry_run"):
        c.boolean(key)

    fields = c.get("model")
    model_cfg = None
    if isinstance(fields, dict):
        errs, model_cfg = model_problems(fields)
        c.errs += errs

    # trainer
    c.integer("trainer.max_steps", 1, extra=" (the training stream is endless: max_steps ends a run)")
    c.integer("trainer.val_check_interval", 1, extra=" (optimizer steps between validations)")
    c.integer("trainer.accumulate_grad_batches", 1)
    c.integer("trainer.log_every_n_steps", 1)
    c.number("trainer.gradient_clip_val", lambda v: v >= 0, "a number >= 0", optional=True)
    limit = c.get("trainer.limit_val_batches", None)
    if limit is not None and limit is not _UNSET:
        is_int = isinstance(limit, int) and not isinstance(limit, bool)
        if not ((is_int and limit >= 0) or (isinstance(limit, float) and 0.0 <= limit <= 1.0)):
            c.bad("trainer.limit_val_batches", limit, "an integer >= 0 (batches) or a float in [0, 1]")
    accelerator = c.choice("trainer.accelerator", ACCELERATORS)
    precision = c.get("trainer.precision", "32-true")
    if precision is not _UNSET and str(precision) not in PRECISIONS:
        c.bad("trainer.precision", precision, " | ".join(PRECISIONS))
    elif accelerator == "cpu" and str(precision) not in CPU_PRECISIONS:
        c.bad("trainer.precision", precision, f"with trainer.accelerator=cpu: {' | '.join(CPU_PRECISIONS)}")
    dry_run = c.get("dry_run", False) is True  # builds the model and exits: GPU and disk are not needed
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available() and not dry_run:
        c.bad("trainer.accelerator", accelerator, "cpu (no CUDA GPU is visible here; use trainer=cpu)")
    devices = c.get("trainer.devices", 1)
    if devices is not _UNSET and not (
        devices == "auto"
        or (isinstance(devices, int) and not isinstance(devices, bool) and (devices >= 1 or devices == -1))
        or (isinstance(devices, list) and devices and all(isinstance(d, int) and d >= 0 for d in devices))
    ):
        c.bad("trainer.devices", devices, "an integer >= 1, -1 (all), 'auto' or a list of device indices")
    elif accelerator in ("gpu", "cuda") and isinstance(devices, int) and devices > torch.cuda.device_count() > 0:
        c.bad("trainer.devices", devices, f"at most {torch.cuda.device_count()} (GPUs visible here) or -1")

    # optimiser and schedule
    c.number("optim.lr", lambda v: v > 0, "a number > 0")
    c.number("optim.weight_decay", lambda v: v >= 0, "a number >= 0")
    c.number("optim.min_lr_ratio", lambda v: 0 <= v <= 1, "a number in [0, 1]")
    betas = c.get("optim.betas")
    if betas is not _UNSET and not (
        isinstance(betas, (list, tuple))
        and len(betas) == 2
        and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)
    ):
        c.bad("optim.betas", betas, "two numbers in [0, 1), e.g. [0.9, 0.95]")
    c.integer("optim.warmup_steps", 0)  # >= max_steps is fine: the LR just never leaves warmup

    # data
    data_ok = _data_problems_static(c, model_cfg)

    _wandb_problems(c)
    _eval_problems(c)

    # checkpointing, divergence, resume
    if c.get("callbacks.model_checkpoint", None) not in (None, _UNSET):
        c.integer("callbacks.model_checkpoint.every_n_train_steps", 0, extra=" (0: only at the end)", optional=True)
    if c.get("callbacks.divergence", None) not in (None, _UNSET):
        c.integer("callbacks.divergence.max_skips", 0)
        c.boolean("callbacks.divergence.sync")  # absent in configs from before the option: fine
    ckpt = c.get("ckpt_path", None)
    if ckpt not in (None, "last", _UNSET) and not Path(str(ckpt)).is_file():
        c.bad("ckpt_path", ckpt, "null, 'last' (the newest checkpoint of this run's directory) or an existing file")
    resume = c.get("resume", None)
    if resume not in (None, _UNSET):
        if multirun:
            c.bad("resume", resume, "null in a multirun (resume one job with resume=<sweep dir>/<job number>)")
        elif Path(str(resume)).exists() and not Path(str(resume)).is_dir():
            c.bad("resume", resume, "a run directory (outputs/runs/<date_time>_<id>), not a file")

    # outputs
    if run_dir is not None:
        ckpt_bytes = None if model_cfg is None or dry_run else checkpoint_bytes(model_cfg)
        c.errs += output_problems(Path(run_dir), ckpt_bytes)
        cache = c.get("paths.cache_dir", None)
        if isinstance(cache, str) and data_ok:
            c.errs += _writable_problems("paths.cache_dir", Path(cache))
    return c.errs


def _data_problems_static(c: _Checker, model_cfg: ModelConfig | None) -> bool:
    from deepdelta.data.errors import DataError
    from deepdelta.data.sources import SOURCES
    from deepdelta.data.tokenizer import TOKENIZERS, vocab_size_of

    n = len(c.errs)
    source = c.choice("data.source", SOURCES)
    tokenizer = c.choice("data.tokenizer", TOKENIZERS)
    c.integer("data.batch_size", 1)
    block = c.integer("data.block_size", 1)
    c.integer("data.num_workers", 0)
    c.integer("data.val_batches", 0)
    if c.get("data.val_fraction", None) is not None:
        c.number("data.val_fraction", lambda v: 0 <= v < 1, "a number in [0, 1)")
    if c.get("data.sampling", None) is not None:
        c.choice("data.sampling", ("random", "sequential"))
    c.integer("data.max_tokens", 1, optional=True)
    # the model's own sizes, also when another model field is invalid: every problem in one report
    model_block = model_cfg.block_size if model_cfg is not None else _plain_int(c.get("model.block_size", None))
    model_vocab = model_cfg.vocab_size if model_cfg is not None else _plain_int(c.get("model.vocab_size", None))
    if model_block is not None and isinstance(block, int) and block > model_block:
        c.bad("data.block_size", block, f"at most model.block_size={model_block} (RoPE tables, masks)")
    if tokenizer is not _UNSET and model_vocab is not None:
        try:
            vocab = vocab_size_of(tokenizer, c.get("data.bpe_vocab_size", 8192))
        except (DataError, TypeError, ValueError) as exc:
            c.errs.append(f"data.bpe_vocab_size: {exc}")
        else:
            if model_vocab < vocab:
                allowed = f">= {vocab} (the vocabulary of tokenizer {tokenizer!r})"
                c.bad("model.vocab_size", model_vocab, allowed)
    if "global_batch" in c.cfg:  # its split over devices is checked where the world size is known
        c.integer("global_batch", 1, optional=True)
    if len(c.errs) > n or source is _UNSET or any(e.startswith("data.") for e in c.errs):
        return False
    # the data layer's own checks (names, paths, globs): its constructor reads nothing
    from hydra.utils import instantiate

    try:
        instantiate(c.cfg.data)
    except Exception as exc:  # DataError, or a bad/unknown field wrapped by Hydra
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        c.errs.append(f"data: {cause}")
        return False
    return True


def _plain_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _eval_problems(c: _Checker) -> None:
    """``eval.tasks`` (downstream evaluation when the run finishes): a task list that resolves, and
    lm-evaluation-harness installed, found now rather than after training."""
    tasks = c.get("eval.tasks", None)
    if tasks in (None, _UNSET):
        return
    from deepdelta.eval import INSTALL_HINT
    from deepdelta.eval.tasks import PRESETS, resolve

    try:
        resolve(str(tasks))
    except ValueError as exc:
        c.errs.append(f"eval.{exc} (presets: {' | '.join(PRESETS)})")
        return
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        c.bad("eval.tasks", tasks, f"null, or install lm-evaluation-harness first: {INSTALL_HINT}")
    for key in ("eval.limit", "eval.num_fewshot"):
        c.integer(key, 0 if key.endswith("fewshot") else 1, optional=True)
    c.integer("eval.batch_size", 1)


def _wandb_problems(c: _Checker) -> None:
    """Online W&B needs an API key: without one wandb.init would fail (or prompt) only after the model and
    data are built; find that out now. Mode as `deepdelta.loggers.wandb_mode` decides it."""
    from deepdelta.loggers import WANDB_MODES, find_wandb_api_key, wandb_mode

    conf = c.get("logger.wandb", None)
    if not isinstance(conf, dict):
        return  # logger=csv: no W&B at all
    env = os.environ.get("WANDB_MODE", "")
    if env and env.strip().lower() not in WANDB_MODES:
        c.errs.append(f"WANDB_MODE: got {env!r}, allowed: online | offline | disabled, or unset (then logger.wandb."
                      "offline decides)")  # fmt: skip
        return
    offline = conf.get("offline", True)
    if not isinstance(offline, bool):
        c.bad("logger.wandb.offline", offline, "true | false")
        return
    if wandb_mode(offline) != "online" or find_wandb_api_key():
        return
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    setup = (f"once a W&B API key is set up, and none is here (WANDB_API_KEY is unset, ~/.netrc has no {host} "
             "entry): run `wandb login` (or set WANDB_API_KEY), or log offline and `wandb sync` later, or use "
             "logger=csv")  # fmt: skip
    if env:
        c.errs.append(f"WANDB_MODE: got {env!r}, allowed: offline | disabled, or online {setup}")
    else:
        c.errs.append(f"logger.wandb.offline: got false, allowed: true, or false {setup}")


def checkpoint_bytes(model_cfg: ModelConfig) -> int:
    """About the size of one checkpoint: fp32 weights plus AdamW's two moments (embedding counted once)."""
    params = matmul_weights(model_cfg) + 4 * model_cfg.n_layer * model_cfg.d_model * model_cfg.dv
    return 3 * 4 * params


def output_problems(run_dir: Path, ckpt_bytes: int | None = None) -> list[str]:
    """The run directory must be writable and hold two checkpoints (the kept one and the one being written)."""
    errs = _writable_problems("paths.output_dir", run_dir)
    if errs or ckpt_bytes is None:
        return errs
    need = 2 * ckpt_bytes + MIN_FREE_BYTES
    free = shutil.disk_usage(run_dir).free
    if free < need:
        errs.append(
            f"paths.output_dir: got {str(run_dir)!r} with {free / 2**20:.0f} MiB free, allowed: a location with "
            f">= {need / 2**20:.0f} MiB free (two checkpoints of {ckpt_bytes / 2**20:.0f} MiB + logs); free "
            "space or set hydra.run.dir"
        )
    return errs


def _writable_problems(key: str, directory: Path) -> list[str]:
    probe = directory / f".write-test-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        return [f"{key}: got {str(directory)!r}, allowed: a writable directory ({exc.strerror or exc})"]
    return []


def check(cfg: DictConfig, run_dir: Path | None = None, multirun: bool = False) -> ModelConfig:
    """Raise `ConfigError` listing every problem; return the validated ModelConfig."""
    errs = problems(cfg, run_dir, multirun)
    if errs:
        raise ConfigError(errs)
    return ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))


def data_problems(datamodule: Any) -> list[str]:
    """Problems that need the data itself: a corpus shorter than one training window, too few validation
    windows. Prepares the token cache (once; training reuses it). Single-process launches only."""
    from deepdelta.data.errors import DataError

    try:
        datamodule.prepare_data()
        datamodule.setup("fit")
        datamodule.train_dataset()
        datamodule.val_dataset()
    except DataError as exc:
        return [f"data: {exc}"]
    return []


def single_process_launch() -> bool:
    """True unless a distributed launcher started this process (every rank would prepare the data)."""
    env = os.environ
    return int(env.get("WORLD_SIZE", "1") or 1) == 1 and int(env.get("SLURM_NTASKS", "1") or 1) == 1


__all__ = ["ConfigError", "check", "checkpoint_bytes", "data_problems", "output_problems", "problems"]
