"""Figures of runs and sweeps, as matplotlib `Figure` objects (no pyplot state, so they
work headless, in the callback and in notebooks alike). `save` writes a PNG."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from deepdelta.analysis.mechanism import NEAR_REFLECTION_ABOVE, OVER_RELAXED_ABOVE, OVERWRITE_BAND, SKIP_BELOW
from deepdelta.analysis.runs import Group, Run

PART_ORDER = {"attn": 0, "mlp": 1}
REGIMES = [  # (label, colour): identity → projection → reflection, as the shares stack up
    (f"skip β<{SKIP_BELOW:g}", "#4575b4"),
    (f"partial {SKIP_BELOW:g}–{OVERWRITE_BAND[0]:g}", "#abd9e9"),
    (f"overwrite {OVERWRITE_BAND[0]:g}–{OVERWRITE_BAND[1]:g}", "#e0e0e0"),
    (f"over-relaxed {OVER_RELAXED_ABOVE:g}–{NEAR_REFLECTION_ABOVE:g}", "#fdae61"),
    (f"near-reflection >{NEAR_REFLECTION_ABOVE:g}", "#d73027"),
]


def save(fig: Figure, path: Path, dpi: int = 110) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def sublayer_order(probes: pd.DataFrame) -> list[str]:
    names = probes[["sublayer", "layer", "part"]].drop_duplicates()
    names = names.assign(o=names["part"].map(PART_ORDER).fillna(2)).sort_values(["layer", "o"])
    return list(names["sublayer"])


def mean_over_seeds(runs: Sequence[Run]) -> pd.DataFrame:
    """The probes of several runs averaged per step × sublayer (runs of one group)."""
    frames = [r.probes for r in runs if not r.probes.empty]
    if not frames:
        return pd.DataFrame()
    frame = pd.concat(frames)
    return frame.groupby(["step", "sublayer", "layer", "part"], as_index=False).mean(numeric_only=True)


def _edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges: each probe's cell runs from its step to the next probe's (the last one
    as wide as the one before), so the axis starts at the first probe, not before it."""
    gap = steps[-1] - steps[-2] if len(steps) > 1 else 1.0
    return np.concatenate([steps, [steps[-1] + gap]])


def _sublayer_heatmap(ax: Axes, probes: pd.DataFrame, column: str, **mesh: Any):
    """``column`` per sublayer (rows, layer 0 at the top) and probe step (columns)."""
    order = sublayer_order(probes)
    grid = probes.pivot_table(index="sublayer", columns="step", values=column).reindex(order)
    steps = grid.columns.to_numpy(dtype=float)
    out = ax.pcolormesh(_edges(steps), np.arange(len(order) + 1), grid.to_numpy(), **mesh)
    ax.set_yticks(np.arange(len(order)) + 0.5, order, fontsize=7 if len(order) > 16 else 8)
    ax.invert_yaxis()
    ax.set_xlabel("step (a cell runs from its probe to the next)")
    return out


def draw_beta_heatmap(ax: Axes, probes: pd.DataFrame, beta_max: float = 2.0, column: str = "beta_mean"):
    """Mean β per sublayer (rows, layer 0 at the top) and probe step (columns). The colour
    map is centred on β = β_max/2: blue leans to identity, red to reflection."""
    return _sublayer_heatmap(ax, probes, column, cmap="RdBu_r", vmin=0.0, vmax=beta_max)


def draw_mix_heatmap(ax: Axes, probes: pd.DataFrame, vmax: float | None = None, column: str = "mix_dist"):
    """hc/mhc: mean ‖mixing − I‖_F per sublayer and probe step; white is identity mixing."""
    return _sublayer_heatmap(ax, probes, column, cmap="Purples", vmin=0.0, vmax=vmax)


def beta_heatmap(probes: pd.DataFrame, beta_max: float = 2.0, title: str = "mean β per sublayer") -> Figure:
    """Layer × step heatmap of mean β."""
    n = probes["sublayer"].nunique()
    fig = Figure(figsize=(7.5, 1.6 + 0.28 * n), layout="constrained")
    ax = fig.add_subplot()
    mesh = draw_beta_heatmap(ax, probes, beta_max)
    fig.colorbar(mesh, ax=ax, label="mean β")
    ax.set_title(title)
    return fig


def mix_heatmap(probes: pd.DataFrame, title: str = "mean ‖mixing − I‖_F per sublayer") -> Figure:
    """hc/mhc: layer × step heatmap of the mixing matrix's distance from identity."""
    n = probes["sublayer"].nunique()
    fig = Figure(figsize=(7.5, 1.6 + 0.28 * n), layout="constrained")
    ax = fig.add_subplot()
    mesh = draw_mix_heatmap(ax, probes)
    fig.colorbar(mesh, ax=ax, label="‖mixing − I‖_F")
    ax.set_title(title)
    return fig


def mixing_panels(probes: pd.DataFrame, streams: int | None = None) -> Figure:
    """hc/mhc: the mixing matrix's distance from identity (mean and spread over tokens), the
    read weights' entropy (dotted: log n, all streams alike) and, for mhc, the Sinkhorn
    residual; one line per sublayer (colour: layer; solid: attention, dashed: MLP)."""
    panels = [
        ("mix_dist", "mean ‖mixing − I‖_F", False),
        ("mix_read_entropy", "entropy of the read weights (nats)", False),
    ]
    if (probes["mix_dist_std"].fillna(0) > 0).any():  # static connections have no spread
        panels.insert(1, ("mix_dist_std", "std of ‖mixing − I‖_F over tokens", False))
    if probes["mix_sinkhorn_residual"].notna().any():
        panels.append(("mix_sinkhorn_residual", "Sinkhorn residual max |column sum − 1|", True))
    fig, axes = _sublayer_panels(probes, panels, log_span=0)  # the residual spans decades as Sinkhorn converges
    if streams and streams > 1:
        axes["mix_read_entropy"].axhline(math.log(streams), color="grey", linestyle=":", linewidth=1)
    return fig


def regime_table(probes: pd.DataFrame) -> pd.DataFrame:
    """Share of tokens in each of the five disjoint regimes (`REGIMES`), per row of ``probes``."""
    skip, over, near = probes["beta_skip"], probes["beta_over_relaxed"], probes["beta_near_reflection"]
    overwrite = probes["beta_overwrite"]
    shares = np.stack([skip, 1 - skip - overwrite - over, overwrite, over - near, near], axis=1)
    return pd.DataFrame(np.clip(shares, 0, 1), columns=[r[0] for r in REGIMES], index=probes.index)


def draw_regime_bars(ax: Axes, probes: pd.DataFrame, legend: bool = True) -> None:
    """Stacked shares per sublayer at the last probe step."""
    last = probes[probes["step"] == probes["step"].max()].set_index("sublayer").loc[sublayer_order(probes)]
    shares = regime_table(last)
    left = np.zeros(len(shares))
    y = np.arange(len(shares))
    for (label, colour), col in zip(REGIMES, shares.columns, strict=True):
        ax.barh(y, shares[col], left=left, color=colour, label=label, edgecolor="white", linewidth=0.3)
        left += shares[col].to_numpy()
    ax.set_yticks(y, list(shares.index), fontsize=7 if len(y) > 16 else 8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"share of probe tokens (step {int(probes['step'].max())})")
    if legend:
        ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.01), ncol=3, frameon=False)


def regime_shares(probes: pd.DataFrame) -> Figure:
    """Left: regime shares per sublayer at the last probe. Right: each regime's share
    (mean over sublayers) across training."""
    n = probes["sublayer"].nunique()
    fig = Figure(figsize=(11, 2.2 + 0.28 * n), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1.2, 1])
    draw_regime_bars(left, probes)
    over_time = regime_table(probes).assign(step=probes["step"]).groupby("step").mean()
    for (label, colour), col in zip(REGIMES, over_time.columns, strict=True):
        right.plot(over_time.index, over_time[col], color=colour if colour != "#e0e0e0" else "#777777", label=label)
    right.set_ylim(-0.02, 1.02)
    right.set_xlabel("step")
    right.set_ylabel("share of tokens (mean over sublayers)")
    right.set_title("regimes across training", fontsize=10)
    return fig


def _sublayer_lines(ax: Axes, probes: pd.DataFrame, column: str) -> None:
    order = sublayer_order(probes)
    layers = probes["layer"].max() + 1
    cmap = colormaps["viridis"]
    for name in order:
        rows = probes[probes["sublayer"] == name].sort_values("step")
        if rows[column].notna().any():
            layer, part = rows["layer"].iloc[0], rows["part"].iloc[0]
            ax.plot(
                rows["step"], rows[column], color=cmap(layer / max(1, layers - 1) * 0.9),
                linestyle="-" if part == "attn" else "--", label=name, linewidth=1.2,
            )  # fmt: skip


def mechanism_panels(probes: pd.DataFrame) -> Figure:
    """‖k̃‖, ‖e_pre‖, k̂ alignment with the previous sublayer and k̂ drift between probes,
    one line per sublayer (colour: layer; solid: attention, dashed: MLP)."""
    panels = [
        ("k_norm", "mean ‖k̃‖", True),
        ("e_pre_norm", "mean ‖e_pre‖ = ‖k̂ᵀX − vᵀ‖", False),
        ("k_cos_prev", "cos(k̂, previous sublayer's k̂)", False),
        ("k_drift", "cos(mean k̂, at previous probe)", False),
    ]
    if probes["e_pre_channel_std"].notna().any():
        panels.append(("e_pre_channel_std", "std of e_pre across value channels", False))
    panels.append(("k_coherence", "‖mean k̂‖ (1: one shared direction)", False))
    return _sublayer_panels(probes, panels, log_span=20)[0]  # log: ‖k̃‖ spanning decades, e.g. heading for the ε guard


def _sublayer_panels(
    probes: pd.DataFrame, panels: list[tuple[str, str, bool]], log_span: float
) -> tuple[Figure, dict[str, Axes]]:
    """Two columns of panels (column, title, log), one line per sublayer in each, a shared
    legend; a log panel gets a log axis where its positive values span more than ``log_span``
    (max / min). Returns the figure and each column's axes."""
    fig = Figure(figsize=(11, 2.6 * math.ceil(len(panels) / 2)), layout="constrained")
    axes = fig.subplots(math.ceil(len(panels) / 2), 2, squeeze=False).flatten()
    for ax, (col, title, log) in zip(axes, panels, strict=False):
        _sublayer_lines(ax, probes, col)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        values = probes[col].dropna()
        if log and len(values) and values.min() > 0 and values.max() / values.min() > log_span:
            ax.set_yscale("log")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=7, title="sublayer", title_fontsize=8)
    return fig, {col: ax for ax, (col, _, _) in zip(axes, panels, strict=False)}


def _smooth(values: pd.Series, points: int) -> pd.Series:
    window = max(1, len(values) // points)
    return values.rolling(window, min_periods=1, center=True).mean()


def loss_curves(groups: Sequence[Group], points: int = 60) -> Figure:
    """Train loss (lines, lightly smoothed) and validation loss (dots) against tokens,
    FLOPs and training wall-clock, for every run; colour per configuration, one line per seed."""
    axes_spec = [("train/tokens", "tokens"), ("train/flops", "FLOPs"), ("train/time", "training wall-clock (s)")]
    fig = Figure(figsize=(13, 4), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    cmap = colormaps["tab10"]
    for gi, group in enumerate(groups):
        colour = cmap(gi % 10)
        for ri, run in enumerate(group.runs):
            m = run.metrics
            if m.empty or "train/loss" not in m:
                continue
            filled = m.set_index("step").sort_index()
            for ax, (col, _) in zip(axes, axes_spec, strict=True):
                if col not in filled or filled[col].isna().all():
                    continue
                x = filled[col].interpolate(limit_direction="both")  # x of validation-only steps
                train = filled["train/loss"].dropna()
                ax.plot(x.loc[train.index], _smooth(train, points), color=colour, linewidth=1.1, alpha=0.85,
                        label=group.label if ri == 0 else None)  # fmt: skip
                if "val/loss" in filled:
                    val = filled["val/loss"].dropna()
                    ax.plot(x.loc[val.index], val, "o", color=colour, markersize=4, markeredgecolor="black",
                            markeredgewidth=0.4)  # fmt: skip
    for ax, (_, label) in zip(axes, axes_spec, strict=True):
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (line: train, dots: validation)")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(3, len(handles)), fontsize=8, frameon=False)
    return fig


def _gated_probes(groups: Sequence[Group]) -> list[tuple[Group, pd.DataFrame]]:
    """(group, its probes averaged over seeds) for every configuration with a gate and probes."""
    gated = [(g, mean_over_seeds(g.runs)) for g in groups if g.has_gate]
    return [(g, p) for g, p in gated if not p.empty]


def _panel_grid(
    gated: list[tuple[Group, pd.DataFrame]], max_cols: int, width: float, row_height: float, extra_height: float = 0.0
) -> tuple[Figure, list]:
    """A figure with one panel per gated configuration, up to ``max_cols`` a row, rows as tall as the
    sublayer count needs; grid cells beyond the configurations are hidden."""
    n_sub = max(p["sublayer"].nunique() for _, p in gated)
    cols = min(max_cols, len(gated))
    rows = math.ceil(len(gated) / cols)
    fig = Figure(figsize=(width * cols, extra_height + rows * (row_height + 0.25 * n_sub)), layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).flatten())
    for ax in axes[len(gated) :]:
        ax.set_visible(False)
    return fig, axes


def group_beta_heatmaps(groups: Sequence[Group]) -> Figure | None:
    """One mean-β heatmap per gated configuration (averaged over its seeds); None without gates."""
    gated = _gated_probes(groups)
    if not gated:
        return None
    fig, axes = _panel_grid(gated, max_cols=2, width=6.5, row_height=1.4)
    beta_max = max(g.first.beta_max for g, _ in gated)
    mesh = None
    for ax, (group, probes) in zip(axes, gated, strict=False):
        mesh = draw_beta_heatmap(ax, probes, beta_max)
        seeds = f" ({len(group.runs)} seeds)" if len(group.runs) > 1 else ""
        ax.set_title(group.label + seeds, fontsize=9)
    fig.colorbar(mesh, ax=list(axes[: len(gated)]), label="mean β", shrink=0.8)
    return fig


def _mixing_probes(groups: Sequence[Group]) -> list[tuple[Group, pd.DataFrame]]:
    """(group, its probes averaged over seeds) for every hc/mhc configuration with mixing probes."""
    mixing = [(g, mean_over_seeds(g.runs)) for g in groups if g.has_mixing]
    return [(g, p) for g, p in mixing if "mix_dist" in p]


def group_mix_heatmaps(groups: Sequence[Group]) -> Figure | None:
    """One ‖mixing − I‖_F heatmap per hc/mhc configuration (averaged over its seeds), on one
    colour scale; None without such configurations."""
    mixing = _mixing_probes(groups)
    if not mixing:
        return None
    fig, axes = _panel_grid(mixing, max_cols=2, width=6.5, row_height=1.4)
    vmax = max(float(p["mix_dist"].max()) for _, p in mixing) or 1.0
    mesh = None
    for ax, (group, probes) in zip(axes, mixing, strict=False):
        mesh = draw_mix_heatmap(ax, probes, vmax=vmax)
        seeds = f" ({len(group.runs)} seeds)" if len(group.runs) > 1 else ""
        ax.set_title(group.label + seeds, fontsize=9)
    fig.colorbar(mesh, ax=list(axes[: len(mixing)]), label="‖mixing − I‖_F", shrink=0.8)
    return fig


def group_regime_bars(groups: Sequence[Group]) -> Figure | None:
    """Regime shares per sublayer at the last probe, one panel per gated configuration."""
    gated = _gated_probes(groups)
    if not gated:
        return None
    fig, axes = _panel_grid(gated, max_cols=3, width=4.5, row_height=1.2, extra_height=1.0)
    for i, (ax, (group, probes)) in enumerate(zip(axes, gated, strict=False)):
        draw_regime_bars(ax, probes, legend=False)
        ax.set_title(group.label, fontsize=9)
        if i:
            ax.set_xlabel("")
    handles, labels = axes[0].get_legend_handles_labels()
    ncol = 5 if len(gated) > 1 else 3  # one column of panels when there is one configuration
    fig.legend(handles, labels, loc="outside upper center", ncol=ncol, fontsize=8, frameon=False)
    return fig
