"""Task presets: the paper's downstream suite, and perplexity tasks.

The paper (its Table 1) averages 8 multiple-choice tasks evaluated 1-shot with
lm-evaluation-harness; its zero-shot results it calls "mixed". Which metric of each task it
averaged is not stated: deepdelta's average is the mean of each task's ``acc`` (the harness's
first metric for all 8), and eval.json keeps every metric the harness reports (``acc_norm``
too, where a task has it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# the harness's names (its Social IQA task is `social_iqa`; there is no `siqa`)
PAPER_TASKS = ("arc_challenge", "arc_easy", "hellaswag", "openbookqa", "piqa", "sciq", "social_iqa", "winogrande")
AVERAGE_METRIC = "acc"
# The hub dataset each preset task loads (the `dataset_path` of its YAML in the pinned harness;
# tests/analysis/test_eval.py checks them): offline, a missing one is reported before the harness
# spends ~10 s indexing its thousands of task YAMLs.
HUB_DATASETS = {
    "arc_challenge": "allenai/ai2_arc",
    "arc_easy": "allenai/ai2_arc",
    "hellaswag": "Rowan/hellaswag",
    "openbookqa": "allenai/openbookqa",
    "piqa": "baber/piqa",
    "sciq": "allenai/sciq",
    "social_iqa": "lighteval/siqa",
    "winogrande": "allenai/winogrande",
    "wikitext": "EleutherAI/wikitext_document_level",
    "lambada_openai": "EleutherAI/lambada_openai",
}


@dataclass(frozen=True)
class Preset:
    tasks: tuple[str, ...]
    num_fewshot: int | None  # None: each task's own default
    average: bool  # report the mean of AVERAGE_METRIC over the tasks


PRESETS: dict[str, Preset] = {
    "paper_1shot": Preset(PAPER_TASKS, 1, True),
    "paper_0shot": Preset(PAPER_TASKS, 0, True),
    "perplexity": Preset(("wikitext", "lambada_openai"), 0, False),
}


def resolve(spec: str, num_fewshot: int | None = None) -> tuple[list[str], int | None, bool, list[Path]]:
    """``tasks=`` as the user wrote it (a preset, or a comma list of harness task names and
    paths to local task YAMLs or folders of them) → (task names, num_fewshot, average?,
    folders of the local tasks)."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise ValueError("tasks: got an empty list, allowed: " + " | ".join(PRESETS) + " or harness task names")
    if len(items) == 1 and items[0] in PRESETS:
        preset = PRESETS[items[0]]
        return list(preset.tasks), preset.num_fewshot if num_fewshot is None else num_fewshot, preset.average, []
    names, paths = [], []
    for item in items:
        path = Path(item)
        if path.suffix in (".yaml", ".yml") and path.is_file():
            paths.append(path.parent)
            names.append(_task_name(path))
        elif path.is_dir():
            paths.append(path)
            names += [_task_name(p) for p in sorted(path.glob("*.y*ml"))]
        elif "/" in item or item.endswith((".yaml", ".yml")):
            raise ValueError(f"tasks: {item!r} is not a task YAML file or a folder of them")
        else:
            names.append(item)
    return names, num_fewshot, False, paths


def _task_name(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("task:"):
            return line.split(":", 1)[1].strip().strip("\"'")
    raise ValueError(f"tasks: {path} has no top-level 'task:' name")


def write_mc_task(
    folder: Path, docs: Sequence[dict[str, Any]], name: str = "dd_local_mc", dataset_path: str = "json"
) -> Path:
    """A harness YAML multiple-choice task over ``docs`` (``question``, ``choices``, ``answer``
    index) written as a local JSON-lines file, loaded by the harness's own ``json`` loader: no
    network. Another ``dataset_path`` makes the same task read a hub dataset instead (the tests
    use one that does not exist). Returns the YAML, which ``tasks=`` accepts."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    files = f"dataset_kwargs:\n  data_files:\n    test: {data}\n" if dataset_path == "json" else ""
    yaml = folder / f"{name}.yaml"
    yaml.write_text(
        f"task: {name}\ndataset_path: {dataset_path}\n{files}test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        'target_delimiter: ""\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n'
    )
    return yaml
