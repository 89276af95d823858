"""DDP scaling through the real CLI: the same per-GPU micro-batch on 1 GPU and on N GPUs.

    python -m deepdelta.scaling --gpus 2 --steps 120          # or: make bench-ddp

Both runs train the same global batch (N × micro-batch sequences a step: the 1-GPU run
accumulates N micro-batches), so they see the same windows and their validation losses
should agree step for step; tokens/s is the ThroughputMonitor's global figure.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
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
    tps = m[["step", col]].dropna()
    tps = tps[tps["step"] >= tps["step"].max() / 2][col]
    val = m[["step", "val/loss"]].dropna().set_index("step")["val/loss"]
    return float(tps.median()), val


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--micro", type=int, default=16, help="sequences per GPU per micro-batch")
    p.add_argument("--model", default="small")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", type=Path, default=Path("outputs/scaling"))
    p.add_argument("--repeat", action="store_true", help="run the 1-GPU config twice: shows run-to-run noise")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for both runs")
    a = p.parse_args(argv)
    common = [
        f"model={a.model}", f"compile={str(a.compile).lower()}", f"global_batch={a.micro * a.gpus}",
        f"data.batch_size={a.micro}",
        f"trainer.max_steps={a.steps}", f"trainer.val_check_interval={a.steps // 4}", "trainer.limit_val_batches=1.0",
        "data.val_batches=4", "logger=csv", "callbacks.beta.every_n_steps=1000000",
        f"callbacks.model_checkpoint.every_n_train_steps={10 * a.steps}", "~callbacks.progress_bar", *a.overrides,
    ]  # fmt: skip
    one, many = a.out / "gpu1", a.out / f"gpu{a.gpus}"
    run_cli(["trainer=gpu", *common, f"hydra.run.dir={one}"])
    run_cli(["trainer=ddp", f"trainer.devices={a.gpus}", *common, f"hydra.run.dir={many}"])
    tps1, val1 = throughput(one, 1)
    tpsn, valn = throughput(many, a.gpus)
    val1b = None
    if a.repeat:
        run_cli(["trainer=gpu", *common, f"hydra.run.dir={a.out / 'gpu1-repeat'}"])
        val1b = throughput(a.out / "gpu1-repeat", 1)[1]
    print("\n| GPUs | global batch | tok/s | speed-up |\n| --- | --- | --- | --- |")
    print(f"| 1 | {a.micro * a.gpus} ({a.gpus} × {a.micro}, accumulated) | {tps1:,.0f} | 1.00× |")
    print(f"| {a.gpus} | {a.micro * a.gpus} ({a.gpus} × {a.micro}) | {tpsn:,.0f} | {tpsn / tps1:.2f}× |")
    extra = " val loss, 1 GPU again |" if val1b is not None else ""
    print(f"\n| step | val loss, 1 GPU | val loss, DDP |{extra}\n| --- | --- | --- |{' --- |' if extra else ''}")
    for step in val1.index:
        again = f" {val1b.get(step, float('nan')):.4f} |" if val1b is not None else ""
        print(f"| {step} | {val1[step]:.4f} | {valn.get(step, float('nan')):.4f} |{again}")


if __name__ == "__main__":
    main()
