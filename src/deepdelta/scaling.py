"""DDP scaling through the real CLI: the same per-GPU micro-batch on 1 GPU and on N GPUs.

    python -m deepdelta.scaling --gpus 2 --steps 120 --repeat 3    # or: make bench-ddp ARGS="--repeat 3"

Both runs train the same global batch (N × micro-batch sequences a step: the 1-GPU run
accumulates N micro-batches), so they see the same windows in the same order; tokens/s is
the ThroughputMonitor's global figure. ``--repeat R`` runs each configuration R times (a
1-GPU run, then a DDP run, R times over; at least two 1-GPU runs) and reports the speed-up
and the final validation-loss gap as the median over the R pairs, beside the spread between
two 1-GPU runs of the same configuration: the loss gap means something only against it
(compiled bf16 training is not bitwise reproducible, docs/benchmarks.md). ``--profile`` also
profiles steps 3–7 of each run (`deepdelta.callbacks.profile`) and prints where a micro-batch's GPU
time goes: compute, optimizer, communication and the part of it no kernel hides, idle.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

TRAIN = Path(__file__).resolve().parents[1] / "train.py"
# --profile: (first step, steps). Compiled by then; and out of the rates the table reads when --steps >= 96:
# those are over the last 5 logged points (every 10 steps) at or after the second half, so from step steps/2 - 40 on
PROFILED = (3, 5)


def run_cli(overrides: list[str]) -> None:
    print("$ python src/train.py " + " ".join(overrides), flush=True)
    subprocess.run([sys.executable, str(TRAIN), *overrides], check=True)


def throughput(run_dir: Path, world: int) -> tuple[float, pd.Series]:
    """(median global tok/s over the second half of training, val loss by step)."""
    m = pd.read_csv(run_dir / "csv" / "metrics.csv")
    col = "train/items_per_sec" if world > 1 else "train/device/items_per_sec"
    val = m[["step", "val/loss"]].dropna().set_index("step")["val/loss"]
    if col not in m:  # fewer steps than the monitor's window: no rate logged
        return math.nan, val
    tps = m[["step", col]].dropna()
    tps = tps[tps["step"] >= tps["step"].max() / 2][col]
    return float(tps.median()), val


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--micro", type=int, default=16, help="sequences per GPU per micro-batch")
    p.add_argument("--model", default="small")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", type=Path, help="a new directory (default: outputs/scaling/<date_time>)")
    p.add_argument(
        "--repeat", type=int, nargs="?", const=1, default=1, metavar="R",
        help="runs of each configuration (medians over R; at least two 1-GPU runs give the spread)",
    )  # fmt: skip
    p.add_argument(
        "--diagnose",
        action="store_true",
        help="also: 1 GPU without accumulation, and both runs not compiled (finds where losses part)",
    )
    p.add_argument(
        "--profile", action="store_true", help="profile a few steps of each run: where a micro-batch's GPU time goes"
    )
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for both runs")
    a = p.parse_args(argv)
    if a.profile and a.steps < sum(PROFILED):
        p.exit(2, f"error: --profile needs --steps of at least {sum(PROFILED)} (got {a.steps}): it profiles steps "
                  f"{PROFILED[0]}–{sum(PROFILED) - 1}\n")  # fmt: skip
    if a.profile and a.steps < 96:
        print(f"note: with --steps {a.steps} (< 96) the tok/s read include the profiled steps", flush=True)
    import torch

    # a missing GPU is the user's setup, not a crash: say so before any run (trainer.accelerator=cpu: the CPU test)
    visible = torch.cuda.device_count()
    if "trainer.accelerator=cpu" not in a.overrides and visible < a.gpus:
        fewer = f"make bench-ddp GPUS={visible}" if visible >= 2 else "run it on a machine with 2 or more GPUs"
        p.exit(2, f"error: --gpus {a.gpus}: {visible} CUDA GPU(s) visible here, DDP scaling needs {a.gpus} GPUs of "
                  f"one node; {fewer}\n")  # fmt: skip
    common = [
        f"model={a.model}", f"compile={str(a.compile).lower()}", f"global_batch={a.micro * a.gpus}",
        f"data.batch_size={a.micro}",
        f"trainer.max_steps={a.steps}", f"trainer.val_check_interval={a.steps // 4}", "trainer.limit_val_batches=1.0",
        "data.val_batches=4", "logger=csv", "trainer.log_every_n_steps=10", "callbacks.beta.every_n_steps=1000000",
        f"callbacks.model_checkpoint.every_n_train_steps={10 * a.steps}", "~callbacks.progress_bar", *a.overrides,
    ]  # fmt: skip
    a.out = a.out or Path("outputs/scaling") / time.strftime("%Y-%m-%d_%H-%M-%S")
    results = []  # (label, kind, tok/s, val loss by step)
    profiled = []  # (label, run directory)
    for name, label, extra, world, kind in plan(a.gpus, a.micro, a.repeat, a.diagnose):
        prof = []
        if a.profile:
            prof = [f"+callbacks.step_profile.{k}={v}" for k, v in
                    [("_target_", "deepdelta.callbacks.profile.StepProfile"), ("start", PROFILED[0]),
                     ("steps", PROFILED[1]), ("path", a.out / name / "profile")]]  # fmt: skip
            profiled.append((label, a.out / name / "profile"))
        run_cli([*common, *extra, *prof, f"hydra.run.dir={a.out / name}"])
        results.append((label, kind, *throughput(a.out / name, world)))
        print(f"-> {label}: {results[-1][2]:,.0f} tok/s, final val loss {_final(results[-1][3]):.4f}", flush=True)
    print_tables(results)
    if profiled:
        print_profiles(profiled)


def plan(n: int, m: int, repeat: int = 1, diagnose: bool = False) -> list[tuple[str, str, list[str], int, str]]:
    """The runs, in order: (directory, label, overrides, world size, kind), kind one | ddp | diagnose.
    Each repeat is a 1-GPU run, then a DDP run; with one repeat, a second 1-GPU run gives the spread."""
    one = ["trainer=gpu"]
    ddp = ["trainer=ddp", f"trainer.devices={n}"]
    runs = []
    for i in range(repeat):
        tag = "" if i == 0 else f"-{i + 1}"
        again = "" if i == 0 else f" (run {i + 1})"
        runs.append((f"gpu1{tag}", f"1 GPU, {n} × {m} accumulated{again}", one, 1, "one"))
        runs.append((f"gpu{n}{tag}", f"{n} GPUs DDP, {n} × {m}{again}", ddp, n, "ddp"))
    if repeat < 2:
        runs.append(("gpu1-repeat", "1 GPU again", one, 1, "one"))
    # where does a loss gap come from: accumulation, DDP, or compiled kernels? (a batch of n·m takes the
    # same windows as n micro-batches of m, computed with other kernels)
    if diagnose:
        runs += [
            ("gpu1-whole", f"1 GPU, one batch of {n * m}", [*one, f"data.batch_size={n * m}"], 1, "diagnose"),
            ("gpu1-eager", "1 GPU, not compiled", [*one, "compile=false"], 1, "diagnose"),
            (f"gpu{n}-eager", f"{n} GPUs DDP, not compiled", [*ddp, "compile=false"], n, "diagnose"),
        ]
    return runs


def _final(val: pd.Series) -> float:
    return float(val.iloc[-1]) if len(val) else math.nan


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.4g}" if values else "n/a"


def summary(results: list[tuple[str, str, float, pd.Series]]) -> dict[str, list[float]]:
    """Per repeat: the DDP/1-GPU speed-up and final-loss gap (each DDP run against the 1-GPU run
    before it); and the final-loss differences between consecutive 1-GPU runs (the spread)."""
    ones = [r for r in results if r[1] == "one"]
    pairs = list(zip(ones, [r for r in results if r[1] == "ddp"], strict=False))  # the extra 1-GPU run has no pair
    return {
        "speedup": [d[2] / o[2] for o, d in pairs],
        "gap": [_final(d[3]) - _final(o[3]) for o, d in pairs],
        "spread": [abs(_final(b[3]) - _final(a[3])) for a, b in zip(ones, ones[1:], strict=False)],
    }


def print_tables(results: list[tuple[str, str, float, pd.Series]]) -> None:
    base = results[0][2]
    last_one = base
    print("\n| run | tok/s | vs 1 GPU | final val loss |\n| --- | --- | --- | --- |")
    for label, kind, tps, val in results:
        if kind == "one":
            last_one = tps
        ref = last_one if kind == "ddp" else base
        print(f"| {label} | {tps:,.0f} | {tps / ref:.2f}× | {_final(val):.4f} |")
    s = summary(results)
    each = {k: ", ".join(f"{v:.4g}" for v in vals) for k, vals in s.items()}
    print(f"\n| over {len(s['speedup'])} repeat(s) | median | each |\n| --- | --- | --- |")
    print(f"| speed-up, DDP / 1 GPU | {_median(s['speedup'])}× | {each['speedup']} |")
    print(f"| final val loss, DDP − 1 GPU | {_median(s['gap'])} | {each['gap']} |")
    print(f"| final val loss, \\|1 GPU − 1 GPU\\| (the spread) | {_median(s['spread'])} | {each['spread']} |")
    print("\n| step | " + " | ".join(r[0] for r in results) + " |\n|" + " --- |" * (len(results) + 1))
    for step in results[0][3].index:
        print(f"| {step} | " + " | ".join(f"{r[3].get(step, float('nan')):.4f}" for r in results) + " |")


PROFILE_COLUMNS = ("wall", "busy", "compute", "optimizer", "communication", "communication_exposed", "idle")


def print_profiles(profiled: list[tuple[str, Path]]) -> None:
    """Each run's (and each DDP rank's) milliseconds per micro-batch, from its `StepProfile` files."""
    head = " | ".join(c.replace("_", " ") for c in PROFILE_COLUMNS)
    rule = " --- |" * (len(PROFILE_COLUMNS) + 1)
    print(f"\n| ms per micro-batch, steps {PROFILED[0]}–{sum(PROFILED) - 1} | {head} |\n|{rule}")
    for label, path in profiled:
        for f in sorted(path.glob("profile_rank*.json")):
            r = json.loads(f.read_text())
            who = f"{label}, rank {r['rank']}" if r["world"] > 1 else label
            cells = [f"{r[c + '_ms']:.2f}" if r["kernels"] or c == "wall" else "–" for c in PROFILE_COLUMNS]
            print(f"| {who} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
