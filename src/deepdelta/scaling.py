"""DDP scaling through the real CLI: the same per-GPU micro-batch on 1 GPU and on N GPUs.

    python -m deepdelta.scaling --gpus 2 --steps 120          # or: make bench-ddp

Both runs train the same global batch (N × micro-batch sequences a step: the 1-GPU run
accumulates N micro-batches), so they see the same windows and their validation losses
should agree step for step; tokens/s is the ThroughputMonitor's global figure.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

TRAIN = Path(__file__).resolve().parents[1] / "train.py"


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
    p.add_argument("--repeat", action="store_true", help="run the 1-GPU config twice: shows run-to-run noise")
    p.add_argument(
        "--diagnose",
        action="store_true",
        help="also: 1 GPU without accumulation, and both runs not compiled (finds where losses part)",
    )
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for both runs")
    a = p.parse_args(argv)
    common = [
        f"model={a.model}", f"compile={str(a.compile).lower()}", f"global_batch={a.micro * a.gpus}",
        f"data.batch_size={a.micro}",
        f"trainer.max_steps={a.steps}", f"trainer.val_check_interval={a.steps // 4}", "trainer.limit_val_batches=1.0",
        "data.val_batches=4", "logger=csv", "trainer.log_every_n_steps=10", "callbacks.beta.every_n_steps=1000000",
        f"callbacks.model_checkpoint.every_n_train_steps={10 * a.steps}", "~callbacks.progress_bar", *a.overrides,
    ]  # fmt: skip
    a.out = a.out or Path("outputs/scaling") / time.strftime("%Y-%m-%d_%H-%M-%S")
    n, m = a.gpus, a.micro
    runs = [  # (directory, label, overrides, world size)
        ("gpu1", f"1 GPU, {n} × {m} accumulated", ["trainer=gpu"], 1),
        (f"gpu{n}", f"{n} GPUs DDP, {n} × {m}", ["trainer=ddp", f"trainer.devices={n}"], n),
    ]
    if a.repeat:
        runs.append(("gpu1-repeat", "1 GPU again", ["trainer=gpu"], 1))
    # where does a loss gap come from: accumulation, DDP, or compiled kernels? (one batch of n·m draws
    # other windows than n micro-batches of m: its curve is a reference for noise, not an exact match)
    if a.diagnose:
        runs += [
            ("gpu1-whole", f"1 GPU, one batch of {n * m}", ["trainer=gpu", f"data.batch_size={n * m}"], 1),
            ("gpu1-eager", "1 GPU, not compiled", ["trainer=gpu", "compile=false"], 1),
            (
                f"gpu{n}-eager",
                f"{n} GPUs DDP, not compiled",
                ["trainer=ddp", f"trainer.devices={n}", "compile=false"],
                n,
            ),
        ]
    results = []
    for name, label, extra, world in runs:
        run_cli([*common, *extra, f"hydra.run.dir={a.out / name}"])
        results.append((label, world, *throughput(a.out / name, world)))
    base = results[0][2]
    print("\n| run | tok/s | vs 1 GPU |\n| --- | --- | --- |")
    for label, _, tps, _ in results:
        print(f"| {label} | {tps:,.0f} | {tps / base:.2f}× |")
    print("\n| step | " + " | ".join(r[0] for r in results) + " |\n|" + " --- |" * (len(results) + 1))
    for step in results[0][3].index:
        print(f"| {step} | " + " | ".join(f"{r[3].get(step, float('nan')):.4f}" for r in results) + " |")


if __name__ == "__main__":
    main()
