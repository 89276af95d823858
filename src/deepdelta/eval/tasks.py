"""Task presets: the paper's downstream suite, and perplexity tasks.

The paper (its Table 1) averages 8 multiple-choice tasks evaluated 1-shot with
lm-evaluation-harness; its zero-shot results it calls "mixed". Which metric of each task it
averaged is not stated: deepdelta's average is the mean of each task's ``acc`` (the harness's
first metric for all 8), and eval.json keeps every metric the harness reports (``acc_norm``
too, where a task has it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PAPER_TASKS = ("arc_challenge", "arc_easy", "hellaswag", "openbookqa", "piqa", "sciq", "siqa", "winogrande")
AVERAGE_METRIC = "acc"


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
