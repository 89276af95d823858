"""Plain statements of what a sweep's numbers support, generated from them: one sentence per
configuration about its validation loss against its baseline (from the paired interval), one
about its throughput and peak memory, and the limits of the design (scale, seeds, number of
comparisons). Also the command that re-runs each configuration, from its runs'
``.hydra/overrides.yaml``.

The baseline of a configuration is `runs.baseline_for`'s: the additive configuration closest
in config (so ``variant=ddl_cc`` is compared with ``variant=additive_cc``, not ``additive``).
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Sequence
from typing import Any

import pandas as pd

from deepdelta.analysis.runs import Group, Run, baseline_for
from deepdelta.analysis.stats import t_quantile

TRAIN = "python src/train.py"

WORSE, BETTER, NO_DIFFERENCE, NO_INTERVAL, NOT_COMPARED = (
    "worse",
    "better",
    "no difference",
    "no interval",
    "not compared",
)


def _is_seed(override: str) -> bool:
    return re.split(r"[=@]", override.lstrip("+~"), maxsplit=1)[0] == "seed"


def _command(overrides: Sequence[str], multirun: bool = False) -> str:
    return " ".join([TRAIN, *(["-m"] if multirun else []), *(shlex.quote(o) for o in overrides)])


def rerun_commands(group: Group) -> tuple[str, str]:
    """``(one run, every seed)``: the first run's overrides as they are in its
    ``.hydra/overrides.yaml`` (``python src/train.py seed=0 variant=ddl sweep=replication``),
    and the same with the seed override listing the group's seeds as a Hydra multirun
    (``python src/train.py -m seed=0,1,2 ...``). Runs whose overrides differ other than in
    the seed, or that set no seed, get one command each, joined by ``;``."""
    runs = group.runs
    one = _command(runs[0].overrides)
    templates = {tuple("seed=" if _is_seed(o) else o for o in r.overrides) for r in runs}
    if len(runs) == 1:
        return one, one
    if len(templates) == 1 and "seed=" in next(iter(templates)):
        seeds = ",".join(str(s) for s in sorted({r.seed for r in runs}))
        template = next(iter(templates))
        return one, _command([f"seed={seeds}" if o == "seed=" else o for o in template], multirun=True)
    return one, "; ".join(_command(r.overrides) for r in runs)


def rerun_table(groups: Sequence[Group]) -> pd.DataFrame:
    """One row per configuration: its baseline, seeds, and the commands that re-run it
    (as markdown code spans, ``|`` escaped for a table)."""
    rows = []
    for group in groups:
        base = baseline_for(group, list(groups))
        one, every = rerun_commands(group)
        rows.append(
            {
                "model": group.label,
                "compared with": base.label if base is not None and base is not group else "– (baseline)",
                "seeds": ", ".join(str(s) for s in group.seeds),
                "re-run one seed (the first; change `seed=` for another)": _code(one),
                "re-run every seed (Hydra multirun)": _code(every),
            }
        )
    return pd.DataFrame(rows)


def _code(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`"


def verdict(row: dict[str, Any]) -> str:
    """What a `tables.results_table` row's paired Δ val loss says: worse / better (the
    interval excludes 0), no difference (it includes 0), no interval (one shared seed),
    not compared (a baseline itself, or no shared seeds)."""
    if not row["baseline"] or row["delta_pairs"] == 0:
        return NOT_COMPARED
    if math.isnan(row["delta_low"]):
        return NO_INTERVAL
    if row["delta_low"] > 0:
        return WORSE
    if row["delta_high"] < 0:
        return BETTER
    return NO_DIFFERENCE


def _signed(x: float) -> str:
    return f"{x:+.3f}" if x == 0 or abs(x) >= 5e-4 else f"{x:+.1e}"


def _size(x: float) -> str:
    return f"{abs(x):.3f}" if x == 0 or abs(x) >= 5e-4 else f"{abs(x):.1e}"


def loss_sentence(row: dict[str, Any], confidence: float = 0.95) -> str:
    """One sentence on a configuration's val loss against its baseline, from the interval."""
    model, base, d, n = row["model"], row["baseline"], row["delta"], row["delta_pairs"]
    kind = verdict(row)
    if kind == NOT_COMPARED:
        if not base:
            return f"{model}: an additive baseline, compared with nothing."
        return f"{model}: no seed in common with {base}, so no paired comparison."
    direction = "higher than" if d > 0 else "lower than" if d < 0 else "equal to"
    by = f" by {_size(d)}" if d != 0 else ""
    if kind == NO_INTERVAL:
        return (
            f"{model}: val loss {direction} {base}{by} on the one shared seed; one seed gives no interval, "
            "so nothing can be concluded."
        )
    ci = f"{confidence:.0%} CI {_signed(row['delta_low'])} to {_signed(row['delta_high'])}, {n} paired seeds"
    if kind == WORSE:
        return f"{model}: val loss higher than {base} by {_size(d)} ({ci}): worse at this scale."
    if kind == BETTER:
        return f"{model}: val loss lower than {base} by {_size(d)} ({ci}): better at this scale."
    mean = f"{direction} {base}{by} on average" if d != 0 else f"equal to {base} on average"
    return f"{model}: val loss {mean}, but the interval includes 0 ({ci}): no difference detectable with {n} seeds."


def _paired_ratios(group: Group, base: Group, value: str) -> list[float]:
    """Per shared seed (finished runs): the group's ``value`` over the baseline's."""
    mine = {r.seed: getattr(r, value) for r in group.runs if r.status == "finished"}
    theirs = {r.seed: getattr(r, value) for r in base.runs if r.status == "finished"}
    out = [mine[s] / theirs[s] for s in sorted(set(mine) & set(theirs)) if theirs[s]]
    return [x for x in out if not math.isnan(x)]


def cost_sentence(row: dict[str, Any], group: Group, base: Group) -> str:
    """One sentence on training throughput and peak memory against the baseline."""
    parts = []
    if not math.isnan(row["tok_ratio"]):
        ratios = _paired_ratios(group, base, "tokens_per_s")
        base_tok = row["tok_per_s"] / row["tok_ratio"]
        text = (
            f"trains at {row['tok_ratio']:.2f}× the tok/s of {row['baseline']} "
            f"({row['tok_per_s'] / 1e3:,.0f}K vs {base_tok / 1e3:,.0f}K tok/s, mean over seeds"
        )
        if len(ratios) > 1:
            spread = f"; per seed {min(ratios):.2f}×–{max(ratios):.2f}×"
            if max(ratios) < 1:
                spread += ": slower on every seed"
            elif min(ratios) > 1:
                spread += ": faster on every seed"
            else:
                spread += ": not consistently slower or faster"
            text += spread
        parts.append(text + ")")
    if not math.isnan(row["mem_ratio"]):
        base_mem = row["peak_mem_gb"] / row["mem_ratio"]
        parts.append(f"peak memory {row['mem_ratio']:.2f}× ({row['peak_mem_gb']:.2f} vs {base_mem:.2f} GB)")
    if not parts:
        return f"{row['model']}: no throughput or memory recorded."
    return f"{row['model']}: " + "; ".join(parts) + "."


def loss_summary(table: pd.DataFrame, confidence: float = 0.95) -> str:
    """How many compared configurations came out worse, better, indistinguishable."""
    kinds = [verdict(r) for r in table.to_dict("records")]
    compared = [k for k in kinds if k != NOT_COMPARED]
    if not compared:
        return "No configuration has an additive baseline with shared seeds: there is nothing to compare."
    return (
        f"Of {len(compared)} configurations compared with their baseline (paired by seed, {confidence:.0%} "
        f"Student-t interval of the mean difference in final validation loss): {kinds.count(WORSE)} worse "
        f"(interval above 0), {kinds.count(BETTER)} better (interval below 0), {kinds.count(NO_DIFFERENCE)} "
        f"not distinguishable (interval includes 0)"
        + (f", {kinds.count(NO_INTERVAL)} with one shared seed and no interval" if NO_INTERVAL in kinds else "")
        + "."
    )


def _millions(values: Sequence[float]) -> str:
    values = sorted({round(v / 1e6, 2) for v in values if not math.isnan(v)})
    if not values:
        return "an unrecorded number of"
    return f"{values[0]:g}M" if len(values) == 1 else f"{values[0]:g}M–{values[-1]:g}M"


def limits(table: pd.DataFrame, groups: Sequence[Group], confidence: float = 0.95) -> list[str]:
    """What the data does not support: scale, seeds, multiplicity, cost measurements, failures."""
    runs: list[Run] = [r for g in groups for r in g.runs]
    done = [r for r in runs if r.status == "finished"]
    rows = table.to_dict("records")
    out = []
    data = done[0].config.get("data", {}) if done else {}
    corpus = ", ".join(
        f"{k} `{data[k]}`" for k in ("source", "tokenizer") if isinstance(data, dict) and data.get(k) is not None
    )
    tokens = [float(r.summary.get("tokens") or math.nan) for r in done]
    out.append(
        f"Scale: {_millions([r.params for r in done])} parameters, {_millions(tokens)} training tokens per run"
        + (f" ({corpus})" if corpus else "")
        + ". The differences above hold at this scale and on this data; whether they shrink, grow or reverse "
        "with larger models, longer training or other data is not tested here."
    )
    pairs = sorted({r["delta_pairs"] for r in rows if verdict(r) not in (NOT_COMPARED, NO_INTERVAL)})
    if pairs:
        n = pairs[0]
        t = t_quantile(0.5 + confidence / 2, n - 1)
        seeds = f"{n}" if len(pairs) == 1 else f"{pairs[0]} to {pairs[-1]}"
        out.append(
            f"Seeds: {seeds} paired seeds per comparison, so the {confidence:.0%} interval is the mean difference "
            f"± {t:.2f} standard errors (t with {n - 1} degrees of freedom"
            + (f" for {n} pairs" if len(pairs) > 1 else "")
            + "). An interval that includes 0 means no difference was detected with these seeds, "
            "not that the configurations are equal."
        )
    compared = [r for r in rows if verdict(r) not in (NOT_COMPARED, NO_INTERVAL)]
    if len(compared) > 1:
        out.append(
            f"Multiple comparisons: {len(compared)} intervals, each at {confidence:.0%} with no correction; "
            f"if no configuration differed from its baseline, {len(compared) * (1 - confidence):.2f} of them "
            "would exclude 0 by chance on average."
        )
    compile_ = {str(r.config.get("compile")) for r in done if "compile" in r.config}
    out.append(
        "Throughput and memory: one measurement per run on the sweep's own hardware"
        + (f" (compile={', '.join(sorted(compile_))})" if compile_ else "")
        + ", with no interval; they measure this implementation there, not the lowest cost the method "
        "could reach."
    )
    out.append(
        "Only final validation loss is compared: no downstream task was evaluated, and the gate statistics "
        "describe what β did in these runs, not why a configuration is better or worse."
    )
    failed = [r for r in runs if r.status != "finished"]
    if failed:
        jobs = ", ".join(r.path.name for r in failed)
        out.append(f"Failed or unfinished runs ({len(failed)}: jobs {jobs}) are left out of every number above.")
    return out
