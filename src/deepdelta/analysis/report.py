"""Markdown + HTML reports of a run or a sweep, with PNG figures next to them.

    python -m deepdelta.analysis.report --run outputs/runs/<date_time>
    python -m deepdelta.analysis.report --sweep outputs/sweeps/<date_time>
    python -m deepdelta.analysis.report --sweep results/replication --out docs/results.md   # make results

Without ``--out``: writes ``report.md``, ``report.html``, ``results.csv`` and ``figures/*.png``
into the run or sweep directory. With ``--out PATH.md``: writes ``PATH.md`` and ``PATH.html``,
the results table as ``PATH.csv`` (next to it: ``docs/results.csv``) and the figures into
``<parent>/img/<stem>/`` (``docs/img/results/*.png``), linked relatively so that the markdown
renders on GitHub; the directory read is left as it is. Either way it prints the path of the
report. The text holds no timestamp and no path other than those given, so the same raw results
give the same markdown. A ``notes.md`` in the run or sweep directory is appended verbatim as the
section "Discussion".
"""

from __future__ import annotations

import argparse
import html
import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from deepdelta.analysis import figures, findings, tables
from deepdelta.analysis.runs import Group, Run, baseline_for, find_runs, group_runs, is_run_dir


@dataclass(frozen=True)
class Layout:
    """Where a report goes: the markdown (the HTML beside it, same stem), the figures, the CSV."""

    markdown: Path
    figures: Path
    csv: Path

    @classmethod
    def inside(cls, directory: Path) -> Layout:
        """``report.md``, ``figures/``, ``results.csv`` in the run or sweep directory."""
        return cls(directory / "report.md", directory / "figures", directory / "results.csv")

    @classmethod
    def at(cls, out: Path) -> Layout:
        """``PATH.md``, ``<parent>/img/<stem>/`` and ``PATH.csv``."""
        return cls(out, out.parent / "img" / out.stem, out.with_suffix(".csv"))

    def link(self, path: Path) -> str:
        """``path`` relative to the markdown's folder, with forward slashes."""
        return Path(os.path.relpath(path, self.markdown.parent)).as_posix()


@dataclass
class Report:
    """A report as a list of blocks: headings, paragraphs, lists, tables, figures, verbatim markdown."""

    layout: Layout
    title: str
    blocks: list[tuple[str, object]] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def text(self, text: str) -> None:
        self.blocks.append(("p", text))

    def bullets(self, items: list[str]) -> None:
        self.blocks.append(("ul", items))

    def table(self, frame: pd.DataFrame) -> None:
        self.blocks.append(("table", frame))

    def verbatim(self, text: str) -> None:
        """Markdown written by hand (a notes.md), copied as it is."""
        self.blocks.append(("md", text))

    def figure(self, fig: Figure | None, name: str, caption: str) -> None:
        """Save ``fig`` as NAME.png in the figure folder and embed it (nothing when ``fig`` is None)."""
        if fig is None:
            return
        path = figures.save(fig, self.layout.figures / f"{name}.png")
        self.blocks.append(("img", (self.layout.link(path), caption)))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, body in self.blocks:
            if kind == "h2":
                out += [f"## {body}", ""]
            elif kind == "p":
                out += [str(body), ""]
            elif kind == "ul":
                out += [f"- {item}" for item in body] + [""]
            elif kind == "table":
                out += [_blank_missing(body).to_markdown(index=False, disable_numparse=True), ""]
            elif kind == "md":
                out += [str(body).strip("\n"), ""]
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
            elif kind == "ul":
                out.append("<ul>" + "".join(f"<li>{html.escape(str(item))}</li>" for item in body) + "</ul>")
            elif kind == "table":
                out.append(_blank_missing(body).to_html(index=False, float_format=lambda v: f"{v:.4g}"))
            elif kind == "md":
                out.append(f"<pre style='white-space:pre-wrap'>{html.escape(str(body))}</pre>")
            else:
                src, caption = body
                out.append(f"<figure><img src='{src}'><figcaption>{html.escape(caption)}</figcaption></figure>")
        return "\n".join(out + ["</body></html>"])

    def write(self) -> Path:
        path = self.layout.markdown
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".html").write_text(self.html())
        path.write_text(self.markdown())
        return path

    def results_csv(self, table: pd.DataFrame) -> None:
        self.layout.csv.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(self.layout.csv, index=False)

    def provenance(self, source: Path, command: str | None) -> None:
        """Where the numbers come from and how to regenerate the report (with ``--out`` only)."""
        if command:
            csv = self.layout.csv
            self.text(
                f"Generated from the raw results in [`{source.as_posix()}`]({self.layout.link(source)}) by "
                f"`{command}`; the numbers are also in [`{csv.name}`]({self.layout.link(csv)}). "
                f"Edit the code or `{(source / 'notes.md').as_posix()}`, not this file."
            )

    def discussion(self, directory: Path) -> None:
        """``notes.md`` of the run or sweep directory, verbatim, as the last section."""
        notes = directory / "notes.md"
        if notes.is_file():
            self.heading("Discussion")
            self.verbatim(notes.read_text())


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


def _mixing_section(report: Report, probes: pd.DataFrame, streams: int | None, prefix: str = "") -> None:
    """hc/mhc: what the connections do, from the mixing columns of probes.csv."""
    report.figure(
        figures.mix_heatmap(probes),
        f"{prefix}mix_heatmap",
        "Distance of the stream-mixing matrix from identity per sublayer over training (white: identity).",
    )
    entropy = f" (dotted: log n = {math.log(streams):.3f}, every stream read alike)" if streams and streams > 1 else ""
    report.figure(
        figures.mixing_panels(probes, streams),
        f"{prefix}mixing",
        f"‖mixing − I‖_F and the entropy of the read weights{entropy}"
        + (", and mHC's Sinkhorn residual" if probes["mix_sinkhorn_residual"].notna().any() else "")
        + ", per sublayer.",
    )
    report.text("Last probe, per sublayer:")
    report.table(tables.mixing_sublayer_table(probes))


def run_report(run_dir: Path, out: Path | None = None, command: str | None = None) -> Path:
    """Report of one run: results, loss curves and the mechanism probes (β for ddl and
    write_only, the mixing for hc and mhc); into the run directory, or at ``out`` (see the
    module docstring)."""
    run = Run(Path(run_dir))
    group = Group(label=" ".join(run.named_overrides) or "default", runs=[run])
    layout = Layout.inside(run.path) if out is None else Layout.at(Path(out))
    report = Report(layout, f"Run report: {run.summary.get('name') or run.path.name}")
    report.provenance(run.path, command if out is not None else None)
    report.text(
        f"Directory `{run.path}`; status **{run.status}**; residual `{run.residual}`, seed {run.seed}; "
        f"{_validation_words(run)}."
    )
    report.heading("Results")
    table = tables.results_table([group])
    report.results_csv(table)
    report.table(tables.format_results(table))
    _eval_section(report, [group], 0.95)
    report.text(f"Re-run: `{findings.rerun_commands(group)[0]}`")
    report.heading("Loss")
    report.figure(figures.loss_curves([group]), "loss", "Loss against tokens, FLOPs and training wall-clock.")
    report.heading("Mechanism probes")
    if group.has_mixing:
        if "mix_dist" in run.probes:
            _mixing_section(report, run.probes, run.streams)
        else:
            report.text(
                f"No mixing probes recorded for residual `{run.residual}` (probes.csv is missing or has no mixing "
                "columns: the probe callback was off, the run stopped early or predates the mixing probes)."
            )
    elif not group.has_gate:
        report.text("Additive residual: there is no gate, so there are no β, k or discrepancy probes.")
    elif run.probes.empty:
        report.text("No probes recorded (probes.csv is missing: the probe callback was off or the run stopped early).")
    else:
        _mechanism_section(report, run.probes, run.beta_max)
    report.discussion(run.path)
    return report.write()


def sweep_report(
    sweep_dir: Path, confidence: float = 0.95, out: Path | None = None, command: str | None = None
) -> Path:
    """Report of a sweep: the results table with seed statistics, what they support, the
    command that re-runs each configuration, every run's loss against tokens, FLOPs and
    wall-clock, β per configuration, and the sweep's notes.md; into the sweep directory, or
    at ``out`` (see the module docstring)."""
    sweep_dir = Path(sweep_dir)
    runs = find_runs(sweep_dir)
    if not runs:
        raise SystemExit(f"no run directories under {sweep_dir}")
    groups = group_runs(runs)
    layout = Layout.inside(sweep_dir) if out is None else Layout.at(Path(out))
    report = Report(layout, f"Sweep report: {sweep_dir.name}")
    report.provenance(sweep_dir, command if out is not None else None)
    seeds = sorted({r.seed for r in runs})
    report.text(
        f"Directory `{sweep_dir}`: {len(runs)} runs, {len(groups)} configurations, seeds {seeds}. "
        f"Runs that differ only in `seed` are one configuration; Δ is paired by seed against the closest "
        f"additive configuration, with a {confidence:.0%} Student-t interval."
    )
    report.heading("Results")
    table = tables.results_table(groups, confidence)
    report.results_csv(table)
    report.table(tables.format_results(table, confidence))
    _supports_section(report, table, groups, confidence)
    _eval_section(report, groups, confidence)
    report.heading("Re-run")
    report.text(
        "Each configuration re-runs with the overrides its runs were started with (their "
        "`.hydra/overrides.yaml`), from the repository root; a run writes to `outputs/runs/`, a multirun "
        "to `outputs/sweeps/`. On a machine with several GPUs, `python -m deepdelta.gpusweep` takes the "
        "same overrides and runs one job per GPU."
    )
    report.table(findings.rerun_table(groups))
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
    mixing = tables.mixing_table(groups)
    if not mixing.empty:
        report.heading("The mixing (Hyper-Connections)")
        report.text(
            "hc and mhc have no gate; their probes measure the stream-mixing matrix's distance from identity "
            "(‖mixing − I‖_F), the entropy of the read weights (0: one stream read, log n: all alike) and mHC's "
            "Sinkhorn residual (largest |column sum − 1|), at the last probe."
        )
        report.table(_blank_missing(mixing))
        report.figure(figures.group_mix_heatmaps(groups), "mix_heatmaps", "‖mixing − I‖_F per sublayer over training.")
    report.heading("Runs")
    report.table(_runs_table(runs, groups))
    report.discussion(sweep_dir)
    return report.write()


def _supports_section(report: Report, table: pd.DataFrame, groups: list[Group], confidence: float) -> None:
    """The section "What the data supports": a sentence per configuration from its interval, one on
    its cost, and the limits of the design."""
    report.heading("What the data supports")
    report.text(
        findings.loss_summary(table, confidence)
        + " Each configuration is compared with the additive configuration closest to it in config "
        "(named in each sentence and in the results table's column “compared with”)."
    )
    rows = table.to_dict("records")
    report.bullets([findings.loss_sentence(r, confidence) for r in rows if r["baseline"]])
    by_label = {g.label: g for g in groups}
    costs = []
    for r in rows:
        if r["baseline"]:
            group = by_label[r["model"]]
            costs.append(findings.cost_sentence(r, group, baseline_for(group, groups)))
    if costs:
        report.text("Throughput (training tok/s) and peak memory, against the same baselines:")
        report.bullets(costs)
    report.text("What the data does not support:")
    report.bullets(findings.limits(table, groups, confidence))


def _eval_section(report: Report, groups: list[Group], confidence: float) -> None:
    """Downstream tasks (eval.json of each run, `python -m deepdelta.eval`), when any run has them."""
    frame = tables.eval_table(groups, confidence)
    if frame.empty:
        return
    report.heading("Downstream tasks")
    report.text(
        "Scores from lm-evaluation-harness (`python -m deepdelta.eval`, each run's `eval.json`): mean ± std over "
        f"the evaluated seeds, and the difference to the configuration's additive baseline paired by seed with a "
        f"{confidence:.0%} Student-t interval. `average/acc` is the mean `acc` over the preset's tasks."
    )
    report.table(frame)


def _validation_words(run: Run) -> str:
    """The run's last validation in words: its loss and the step it was measured at, or that there was none."""
    if math.isnan(run.val_loss):
        return "not validated"
    step = f" at step {run.val_step}" if run.val_step is not None else ""
    return f"validation loss {run.val_loss:.4f}{step}"


def _runs_table(runs: list[Run], groups: list[Group]) -> pd.DataFrame:
    label = {id(r): g.label for g in groups for r in g.runs}
    rows = []
    for r in runs:
        loss = r.val_loss
        validated = not math.isnan(loss)
        rows.append(
            {
                "job": r.path.name,
                "model": label[id(r)],
                "seed": r.seed,
                "status": r.status,
                "val loss": round(loss, 4) if validated else "not validated",
                "val step": r.val_step if validated and r.val_step is not None else "–",
                "val ppl": round(math.exp(loss), 2) if validated else "–",
                "tokens": int(r.summary.get("tokens") or 0),
                "tok/s": "not measured" if math.isnan(r.tokens_per_s) else round(r.tokens_per_s, 1),
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
    parser.add_argument(
        "--out",
        type=Path,
        help="write the report to this .md (and .html, .csv beside it, figures in <parent>/img/<stem>/) "
        "instead of into the directory",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.out is not None and args.out.suffix != ".md":
        parser.error(f"--out {args.out}: a markdown path ending in .md")
    command = f"{parser.prog} {shlex.join(sys.argv[1:] if argv is None else argv)}"
    if args.run is not None:
        if not is_run_dir(args.run):
            parser.error(f"--run {args.run}: not a run directory (no summary.json or .hydra/config.yaml)")
        path = run_report(args.run, args.out, command)
    else:
        if not args.sweep.is_dir():
            parser.error(f"--sweep {args.sweep}: not a directory")
        path = sweep_report(args.sweep, args.confidence, args.out, command)
    print(f"report: {path}")
    return path


if __name__ == "__main__":
    main()
