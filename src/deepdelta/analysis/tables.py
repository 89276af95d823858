"""Result tables in the shape of the paper's Tables 3-4, with seed statistics, and a
summary of the mechanism probes at the end of training."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from deepdelta.analysis.figures import mean_over_seeds, regime_table
from deepdelta.analysis.runs import Group, baseline_for
from deepdelta.analysis.stats import estimate, paired_difference


def results_table(groups: Sequence[Group], confidence: float = 0.95) -> pd.DataFrame:
    """One row per configuration (finished runs only): validation loss and perplexity
    (mean, std over seeds), the paired difference to its additive baseline (by seed, with
    a ``confidence`` t interval), parameters, tok/s and peak memory with their ratios to
    the baseline's."""
    rows = []
    for group in groups:
        done = [r for r in group.runs if r.status == "finished"] or []
        base = baseline_for(group, list(groups))
        base_done = [r for r in base.runs if r.status == "finished"] if base is not None else []
        loss = estimate([r.val_loss for r in done], confidence)
        ppl = estimate([math.exp(r.val_loss) for r in done if not math.isnan(r.val_loss)], confidence)
        row = {
            "model": group.label,
            "residual": group.residual,
            "seeds": len(done),
            "failed": len(group.runs) - len(done),
            "val_loss": loss.mean,
            "val_loss_std": loss.std,
            "val_ppl": ppl.mean,
            "val_ppl_std": ppl.std,
            "baseline": base.label if base is not None and base is not group else "",
            "delta": math.nan,
            "delta_low": math.nan,
            "delta_high": math.nan,
            "delta_pairs": 0,
            "params": estimate([r.params for r in done]).mean,
            "tok_per_s": estimate([r.tokens_per_s for r in done]).mean,
            "peak_mem_gb": estimate([r.peak_memory_gb for r in done]).mean,
        }
        if base is not None and base is not group:
            diff = paired_difference(
                {r.seed: r.val_loss for r in done}, {r.seed: r.val_loss for r in base_done}, confidence
            )
            row.update(delta=diff.mean, delta_low=diff.low, delta_high=diff.high, delta_pairs=diff.n)
        base_tok = estimate([r.tokens_per_s for r in base_done]).mean if base is not None else math.nan
        base_mem = estimate([r.peak_memory_gb for r in base_done]).mean if base is not None else math.nan
        row["tok_ratio"] = row["tok_per_s"] / base_tok if base_tok else math.nan
        row["mem_ratio"] = row["peak_mem_gb"] / base_mem if base_mem else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _pm(mean: float, std: float, digits: int = 4) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _num(value: float, fmt: str, suffix: str = "") -> str:
    return "–" if value is None or math.isnan(value) else f"{value:{fmt}}{suffix}"


def format_results(table: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """`results_table` as strings for a report: mean ± std, the baseline each row is compared
    with, Δ [low, high], ratios ×."""
    ci = f"Δ val loss vs additive [{confidence:.0%} CI]"
    out = []
    for r in table.to_dict("records"):
        if r["baseline"] == "":
            delta = "baseline" if r["residual"] == "additive" else "–"
        elif r["delta_pairs"] == 0:
            delta = "no shared seeds"
        elif math.isnan(r["delta_low"]):
            delta = f"{r['delta']:+.4f} (1 seed)"
        else:
            delta = f"{r['delta']:+.4f} [{r['delta_low']:+.4f}, {r['delta_high']:+.4f}]"
        out.append(
            {
                "model": r["model"],
                "seeds": str(r["seeds"]) + (f" (+{r['failed']} failed)" if r["failed"] else ""),
                "val loss": _pm(r["val_loss"], r["val_loss_std"]),
                "val ppl": _pm(r["val_ppl"], r["val_ppl_std"], 2),
                ci: delta,
                "compared with": r["baseline"] or "–",
                "params": _num(r["params"] / 1e6, ".2f", "M"),
                "train K tok/s": _num(r["tok_per_s"] / 1e3, ".2f"),
                "tok/s ×": _num(r["tok_ratio"], ".2f", "×"),
                "peak mem (GB)": _num(r["peak_mem_gb"], ".2f"),
                "mem ×": _num(r["mem_ratio"], ".2f", "×"),
            }
        )
    return pd.DataFrame(out)


def mechanism_table(groups: Sequence[Group]) -> pd.DataFrame:
    """Per gated configuration, at its last probe (mean over sublayers and seeds): mean β,
    the regime shares, ‖k̃‖ and its share under 10·ε_k, ‖e_pre‖. Additive rows say "no gate"."""
    rows = []
    for group in groups:
        probes = mean_over_seeds(group.runs) if group.has_gate else pd.DataFrame()
        if probes.empty:
            rows.append({"model": group.label, "step": "no gate" if not group.has_gate else "no probes"})
            continue
        last = probes[probes["step"] == probes["step"].max()]
        shares = regime_table(last).mean()
        rows.append(
            {
                "model": group.label,
                "step": int(last["step"].iloc[0]),
                "mean β": round(float(last["beta_mean"].mean()), 3),
                **{k: round(float(v), 3) for k, v in shares.items()},
                "mean ‖k̃‖": round(float(last["k_norm"].mean()), 3),
                "min ‖k̃‖ (sublayer mean)": round(float(last["k_norm"].min()), 3),
                "‖k̃‖<10ε share": round(float(last["k_small"].max()), 4),
                "mean ‖e_pre‖": round(float(last["e_pre_norm"].mean()), 3),
            }
        )
    return pd.DataFrame(rows)


def mixing_table(groups: Sequence[Group]) -> pd.DataFrame:
    """Per hc/mhc configuration, at its last probe (sublayers averaged over seeds): the mean and
    largest ‖mixing − I‖_F over sublayers, the mean entropy of the read weights and the largest
    Sinkhorn residual (mhc). Empty when no configuration has Hyper-Connections."""
    rows = []
    for group in (g for g in groups if g.has_mixing):
        probes = mean_over_seeds(group.runs)
        if "mix_dist" not in probes:
            rows.append({"model": group.label, "step": "no probes"})
            continue
        last = probes[probes["step"] == probes["step"].max()]
        residual = last["mix_sinkhorn_residual"].max()
        rows.append(
            {
                "model": group.label,
                "step": int(last["step"].iloc[0]),
                "mean ‖mix − I‖": round(float(last["mix_dist"].mean()), 3),
                "max ‖mix − I‖ (sublayer)": round(float(last["mix_dist"].max()), 3),
                "mean read entropy": round(float(last["mix_read_entropy"].mean()), 3),
                "max Sinkhorn residual": float(f"{residual:.2g}") if pd.notna(residual) else None,
            }
        )
    return pd.DataFrame(rows)


def mixing_sublayer_table(probes: pd.DataFrame) -> pd.DataFrame:
    """hc/mhc: the last probe of one run, one row per sublayer (a Sinkhorn residual only for mhc)."""
    last = probes[probes["step"] == probes["step"].max()]
    cols = ["sublayer", "mix_dist", "mix_dist_std", "mix_read_entropy", "mix_sinkhorn_residual"]
    out = last[[c for c in cols if c in last]].reset_index(drop=True)
    out = out.drop(columns=[c for c in out.columns if out[c].isna().all()])  # hc: no Sinkhorn
    rounded = out.round(3)
    if "mix_sinkhorn_residual" in out:  # tiny by design: keep two significant digits
        rounded["mix_sinkhorn_residual"] = out["mix_sinkhorn_residual"].map(lambda v: float(f"{v:.2g}"))
    return rounded


def sublayer_table(probes: pd.DataFrame) -> pd.DataFrame:
    """The last probe of one run, one row per sublayer, the main columns rounded."""
    last = probes[probes["step"] == probes["step"].max()]
    cols = ["sublayer", "beta_mean", "beta_std", "beta_q05", "beta_q50", "beta_q95", "beta_skip", "beta_overwrite",
            "beta_over_relaxed", "beta_near_reflection", "k_norm", "k_small", "k_cos_prev", "k_drift", "e_pre_norm",
            "e_pre_channel_std"]  # fmt: skip
    return last[[c for c in cols if c in last]].round(3).reset_index(drop=True)


def eval_scores(run_dir: Path) -> dict[str, float]:
    """``{"task/metric": value}`` from a run's eval.json (``python -m deepdelta.eval``), plus
    ``"average/<metric>"`` when the preset has one; empty when the run was not evaluated."""
    path = run_dir / "eval.json"
    if not path.is_file():
        return {}
    result = json.loads(path.read_text())
    out = {f"{t}/{m}": v["value"] for t, row in result["tasks"].items() for m, v in row["metrics"].items()}
    if "average" in result:
        out[f"average/{result['average']['metric']}"] = result["average"]["value"]
    return out


def eval_table(groups: Sequence[Group], confidence: float = 0.95) -> pd.DataFrame:
    """Downstream scores, one row per configuration and task metric: mean ± std over the
    evaluated seeds and the paired difference (by seed, ``confidence`` t interval) to the
    configuration's additive baseline, as for validation loss. Empty if nothing was evaluated."""
    scores = {id(g): {r.seed: eval_scores(r.path) for r in g.runs if r.status == "finished"} for g in groups}
    metrics = sorted({k for per_seed in scores.values() for s in per_seed.values() for k in s})
    rows = []
    for group in groups:
        base = baseline_for(group, list(groups))
        for metric in metrics:
            mine = {seed: s[metric] for seed, s in scores[id(group)].items() if metric in s}
            if not mine:
                continue
            est = estimate(list(mine.values()), confidence)
            row = {"model": group.label, "metric": metric, "seeds": est.n, "score": _pm(est.mean, est.std)}
            if base is not None and base is not group:
                theirs = {seed: s[metric] for seed, s in scores[id(base)].items() if metric in s}
                diff = paired_difference(mine, theirs, confidence)
                if diff.n == 0:
                    row["Δ vs baseline"] = "no shared seeds"
                elif diff.n == 1:
                    row["Δ vs baseline"] = f"{diff.mean:+.4f} (1 seed)"
                else:
                    row["Δ vs baseline"] = f"{diff.mean:+.4f} [{diff.low:+.4f}, {diff.high:+.4f}]"
                row["compared with"] = base.label
            else:
                row["Δ vs baseline"], row["compared with"] = ("baseline" if group.residual == "additive" else "–"), "–"
            rows.append(row)
    return pd.DataFrame(rows)
