"""Markdown + HTML reports of a run or a sweep, with PNG figures next to them.

    python -m deepdelta.analysis.report --run outputs/runs/<date_time>
    python -m deepdelta.analysis.report --sweep outputs/sweeps/<date_time>

Writes ``report.md``, ``report.html``, ``results.csv`` and ``figures/*.png`` into the
directory and prints the path of the report.
"""

from __future__ import annotations

import argparse
import html
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from deepdelta.analysis import figures, tables
from deepdelta.analysis.runs import Group, Run, find_runs, group_runs, is_run_dir


@dataclass
class Report:
    """A report as a list of blocks: headings, paragraphs, tables and figures."""

    root: Path
    title: str
    blocks: list[tuple[str, object]] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def text(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, frame: pd.DataFrame) -> None:
        self.blocks.append(("table", frame))

    def figure(self, fig: Figure | None, name: str, caption: str) -> None:
        """Save ``fig`` as figures/NAME.png and embed it (nothing when ``fig`` is None)."""
        if fig is None:
            return
        path = figures.save(fig, self.root / "figures" / f"{name}.png")
        self.blocks.append(("img", (path.relative_to(self.root).as_posix(), caption)))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, body in self.blocks:
            if kind == "h2":
                out += [f"## {body}", ""]
            elif kind == "p":
                out += [str(body), ""]
            elif kind == "table":
                out += [_blank_missing(body).to_markdown(index=False, disable_numparse=True), ""]
            else:
                src, caption = body
                out += [f"![{caption}]({src})", "", f"*{caption}*", ""]
        return "\n".join(out)

    def html(self) -> str:
        out = [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>{html.escape(self.title)}</title><style>body{{font-family:sans-serif;max-width:1200px;"
            "margin:auto}table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
            "padding:3px 6px}img{max-width:100%}</style></head><body>",
            f"<h1>{html.escape(self.title)}</h1>",
        ]
        for kind, body in self.blocks:
            if kind == "h2":
                out.append(f"<h2>{html.escape(str(body))}</h2>")
            elif kind == "p":
                out.append(f"<p>{html.escape(str(body))}</p>")
            elif kind == "table":
                out.append(_blank_missing(body).to_html(index=False, float_format=lambda v: f"{v:.4g}"))
            else:
                src, caption = body
                out.append(f"<figure><img src='{src}'><figcaption>{html.escape(caption)}</figcaption></figure>")
        return "\n".join(out + ["</body></html>"])

    def write(self) -> Path:
        (self.root / "report.html").write_text(self.html())
        path = self.root / "report.md"
        path.write_text(self.markdown())
        return path


def _blank_missing(frame: pd.DataFrame) -> pd.DataFrame:
    """Missing cells (an additive row's gate columns, a first probe's drift) shown as "–"."""
    out = frame.copy()
    for col in out.columns[out.isna().any()]:
        out[col] = out[col].astype(object).where(out[col].notna(), "–")
    return out


def _mechanism_section(report: Report, probes: pd.DataFrame, beta_max: float, prefix: str = "") -> None:
    report.figure(
        figures.beta_heatmap(probes, beta_max),
        f"{prefix}beta_heatmap",
        "Mean β per sublayer over training (blue: towards identity β=0, white: projection β=1, red: reflection β=2).",
    )
    report.figure(
        figures.regime_shares(probes),
        f"{prefix}regimes",
        "Share of probe tokens in each gate regime: per sublayer at the last probe, and over training.",
    )
    report.figure(
        figures.mechanism_panels(probes),
        f"{prefix}mechanism",
        "Direction and discrepancy: ‖k̃‖, ‖e_pre‖, k̂ alignment across sublayers and its drift between probes.",
    )
    report.text("Last probe, per sublayer:")
    report.table(tables.sublayer_table(probes))


def run_report(run_dir: Path) -> Path:
    """Report of one run: results, loss curves and (DDL) the mechanism probes."""
    run = Run(Path(run_dir))
    group = Group(label=" ".join(run.named_overrides) or "default", runs=[run])
    report = Report(run.path, f"Run report: {run.summary.get('name') or run.path.name}")
    report.text(f"Directory `{run.path}`; status **{run.status}**; residual `{run.residual}`, seed {run.seed}.")
    report.heading("Results")
    table = tables.results_table([group])
    table.to_csv(run.path / "results.csv", index=False)
    report.table(tables.format_results(table))
    report.heading("Loss")
    report.figure(figures.loss_curves([group]), "loss", "Loss against tokens, FLOPs and training wall-clock.")
    report.heading("Mechanism probes")
    if not group.has_gate:
        report.text("Additive residual: there is no gate, so there are no β, k or discrepancy probes.")
    elif run.probes.empty:
        report.text("No probes recorded (probes.csv is missing: the probe callback was off or the run stopped early).")
    else:
        _mechanism_section(report, run.probes, run.beta_max)
    return report.write()


def sweep_report(sweep_dir: Path, confidence: float = 0.95) -> Path:
    """Report of a sweep: the results table with seed statistics, every run's loss against
    tokens, FLOPs and wall-clock, and β per configuration."""
    sweep_dir = Path(sweep_dir)
    runs = find_runs(sweep_dir)
    if not runs:
        raise SystemExit(f"no run directories under {sweep_dir}")
    groups = group_runs(runs)
    report = Report(sweep_dir, f"Sweep report: {sweep_dir.name}")
    seeds = sorted({r.seed for r in runs})
    report.text(
        f"Directory `{sweep_dir}`: {len(runs)} runs, {len(groups)} configurations, seeds {seeds}. "
        f"Runs that differ only in `seed` are one configuration; Δ is paired by seed against the closest "
        f"additive configuration, with a {confidence:.0%} Student-t interval."
    )
    report.heading("Results")
    table = tables.results_table(groups, confidence)
    table.to_csv(sweep_dir / "results.csv", index=False)
    report.table(tables.format_results(table, confidence))
    report.heading("Loss against tokens, FLOPs and wall-clock")
    report.figure(
        figures.loss_curves(groups),
        "loss",
        "Every run: train loss (lines) and validation loss (dots); one colour per configuration.",
    )
    report.heading("The gate")
    report.table(tables.mechanism_table(groups))
    report.figure(figures.group_beta_heatmaps(groups), "beta_heatmaps", "Mean β per sublayer over training.")
    report.figure(figures.group_regime_bars(groups), "regimes", "Gate regimes per sublayer at the last probe.")
    report.heading("Runs")
    report.table(_runs_table(runs, groups))
    return report.write()


def _runs_table(runs: list[Run], groups: list[Group]) -> pd.DataFrame:
    label = {id(r): g.label for g in groups for r in g.runs}
    rows = []
    for r in runs:
        loss = r.val_loss
        rows.append(
            {
                "job": r.path.name,
                "model": label[id(r)],
                "seed": r.seed,
                "status": r.status,
                "val loss": round(loss, 4),
                "val ppl": round(math.exp(loss), 2) if not math.isnan(loss) else math.nan,
                "tokens": int(r.summary.get("tokens") or 0),
                "tok/s": round(r.tokens_per_s, 1),
                "error": str(r.summary.get("error") or "")[:60],
            }
        )
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m deepdelta.analysis.report", description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--run", type=Path, help="a run directory (outputs/runs/<date_time> or a sweep job)")
    where.add_argument("--sweep", type=Path, help="a sweep directory (outputs/sweeps/<date_time>)")
    parser.add_argument("--confidence", type=float, default=0.95, help="level of the intervals (default 0.95)")
    args = parser.parse_args(argv)
    if args.run is not None:
        if not is_run_dir(args.run):
            parser.error(f"--run {args.run}: not a run directory (no summary.json or .hydra/config.yaml)")
        path = run_report(args.run)
    else:
        if not args.sweep.is_dir():
            parser.error(f"--sweep {args.sweep}: not a directory")
        path = sweep_report(args.sweep, args.confidence)
    print(f"report: {path}")
    return path


if __name__ == "__main__":
    main()
