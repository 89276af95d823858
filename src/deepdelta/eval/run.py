"""Evaluate one run (or model file): build the tasks, score them, write eval.json, log to W&B."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from deepdelta.eval import INSTALL_HINT, LM_EVAL_VERSION
from deepdelta.eval.tasks import AVERAGE_METRIC, HUB_DATASETS, _task_name, resolve

log = logging.getLogger(__name__)


class EvalError(RuntimeError):
    """A user-facing problem: the message says what is wrong and the way out."""


def require_harness() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise EvalError(f"lm-evaluation-harness is not installed; install it with: {INSTALL_HINT}") from None


def _hub_reachable() -> bool:
    from deepdelta.data.network import hf_endpoint, hf_offline, url_reachable

    return not hf_offline() and url_reachable(hf_endpoint())


def _hub_cached(repo: str) -> bool:
    """Whether anything of the hub dataset ``repo`` is in the local caches (the ``datasets``
    cache or the hub's): when not, an offline load cannot succeed."""
    import datasets.config
    import huggingface_hub.constants as hub

    return (Path(datasets.config.HF_DATASETS_CACHE) / repo.replace("/", "___")).exists() or (
        Path(hub.HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}"
    ).exists()


def _not_loadable(name: str, why: str) -> EvalError:
    return EvalError(
        f"task {name!r} could not be loaded: {why}. Fetch it once on a machine with network "
        "(the same command; the datasets cache is HF_HOME), then run with HF_DATASETS_OFFLINE=1, "
        "or point tasks= at a local task YAML (see the README's Evaluate section)"
    )


def build_tasks(names: list[str], paths: list[Path]) -> tuple[dict[str, Any], Any]:
    """The harness's Task objects, one name at a time so that a failure names its task. With
    the hub unreachable, the datasets libraries are put offline first: a cached copy is used
    and a missing one fails at once instead of retrying (a preset task's missing data before
    the harness indexes its tasks). Returns them and the TaskManager (indexing the harness's
    own tasks takes ~10 s: it is built once, and only when needed)."""
    from lm_eval.tasks import TaskManager, get_task_dict

    from deepdelta.data.network import honour_hf_offline

    local = {_task_name(y) for p in paths for y in p.glob("*.y*ml")}
    hub_needed = any(n not in local for n in names)
    if hub_needed and not _hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
        for name in names:
            repo = HUB_DATASETS.get(name) if name not in local else None
            if repo is not None and not _hub_cached(repo):
                raise _not_loadable(name, f"the Hugging Face hub is not reachable and its data ({repo}) is not cached")
    manager = TaskManager(include_path=[str(p) for p in paths] or None, include_defaults=hub_needed)
    tasks: dict[str, Any] = {}
    with honour_hf_offline():
        for name in names:
            try:
                tasks.update(get_task_dict([name], manager))
            except Exception as exc:  # the harness and datasets raise many kinds; the way out is the same
                offline = os.environ.get("HF_DATASETS_OFFLINE") == "1"
                why = (
                    "the Hugging Face hub is not reachable and its data is not cached"
                    if offline
                    else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                )
                raise _not_loadable(name, why) from None
    return tasks, manager


def _metrics(results: dict[str, Any], n_samples: dict[str, Any], n_shot: dict[str, Any]) -> dict[str, Any]:
    """{task: {"metrics": {name: {"value", "stderr"}}, "n", "num_fewshot"}} from the harness's results."""
    out: dict[str, Any] = {}
    for task, row in results.items():
        metrics: dict[str, dict[str, float | None]] = {}
        for key, value in row.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            name, flt = key.split(",", 1)
            stderr = row.get(f"{name}_stderr,{flt}")
            label = name if flt == "none" else f"{name}[{flt}]"
            finite = isinstance(stderr, (int, float)) and math.isfinite(stderr)
            metrics[label] = {"value": float(value), "stderr": float(stderr) if finite else None}
        n = n_samples.get(task, {})
        out[task] = {
            "metrics": metrics,
            "n": int(n.get("effective", 0)) if n else None,
            "num_fewshot": n_shot.get(task),
        }
    return out


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    spec: str,
    *,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """Score ``model`` on the tasks of ``spec`` (a preset, harness names, local YAMLs)."""
    require_harness()
    from lm_eval import simple_evaluate

    from deepdelta.eval.lm import DeepDeltaLM

    names, shots, average, paths = resolve(spec, num_fewshot)
    tasks, manager = build_tasks(names, paths)
    start = time.time()
    lm = DeepDeltaLM(model, tokenizer, batch_size=batch_size)
    raw = simple_evaluate(
        lm,
        tasks=list(tasks.values()),
        task_manager=manager,
        num_fewshot=shots,
        limit=limit,
        bootstrap_iters=1000,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    per_task = _metrics(raw["results"], raw.get("n-samples", {}), raw.get("n-shot", {}))
    out: dict[str, Any] = {
        "tasks_spec": spec,
        "tasks": per_task,
        "limit": limit,
        "seconds": round(time.time() - start, 3),
        "lm_eval_version": raw.get("lm_eval_version", LM_EVAL_VERSION),
    }
    if average:
        values = [t["metrics"].get(AVERAGE_METRIC, {}).get("value") for t in per_task.values()]
        if values and all(v is not None for v in values):
            out["average"] = {"metric": AVERAGE_METRIC, "value": sum(values) / len(values), "tasks": len(values)}
    return out


def log_to_wandb(run_dir: Path, result: dict[str, Any]) -> str | None:
    """Log ``eval/<task>/<metric>`` (and ``eval/average``) into the run's own W&B run, which
    ``RUN_DIR/wandb/`` holds; None when the run has no W&B run (logger=csv)."""
    runs = sorted((run_dir / "wandb").glob("*run-*-*"))
    if not runs:
        return None
    import wandb

    run_id = runs[-1].name.rsplit("-", 1)[-1]
    mode = os.environ.get("WANDB_MODE") or ("offline" if runs[-1].name.startswith("offline-") else "online")
    values = {
        f"eval/{task}/{metric}": m["value"]
        for task, row in result["tasks"].items()
        for metric, m in row["metrics"].items()
    }
    if "average" in result:
        values["eval/average"] = result["average"]["value"]
    with wandb.init(
        id=run_id, resume="allow", dir=str(run_dir), mode=mode, settings=wandb.Settings(silent=True)
    ) as run:
        run.summary.update(values)
    return run_id


def write(where: Path, result: dict[str, Any]) -> Path:
    """``where/eval.json`` for a run directory, else ``where.json``; written atomically."""
    path = where / "eval.json" if where.is_dir() else where.with_name(where.name + ".json")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    return path
