"""python -m deepdelta.eval RUN_DIR [tasks=paper_1shot] [limit=N] [batch_size=N] [num_fewshot=K] [tokenizer=byte|gpt2]

Evaluates a run's newest checkpoint (or a model file from ``python -m deepdelta.convert``) with
lm-evaluation-harness and writes RUN_DIR/eval.json (for a model file: FILE.eval.json). The
tokenizer is the run's own, or for a model file the one its vocabulary implies; ``tokenizer=``
overrides (``deepdelta.data.tokenizer.tokenizer_for``, shared with ``deepdelta.sample``). Several
run directories, or ``--sweep DIR``, are evaluated one after another; ``--gpus N`` spreads them
over this machine's GPUs, one run per GPU at a time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from deepdelta.eval.run import EvalError, evaluate, log_to_wandb, require_harness, write
from deepdelta.eval.tasks import resolve

if TYPE_CHECKING:
    from deepdelta.data.tokenizer import Tokenizer

KEYS = ("tasks", "limit", "batch_size", "num_fewshot", "device", "tokenizer")


def _targets(paths: list[Path], sweep: Path | None) -> list[Path]:
    if sweep is not None:
        if not sweep.is_dir():
            raise EvalError(f"--sweep {sweep}: no such directory")
        paths = paths + sorted((p.parent for p in sweep.glob("*/summary.json")), key=lambda p: p.name)
        if not paths:
            raise EvalError(f"--sweep {sweep}: no run directories (*/summary.json) in it")
    if not paths:
        raise EvalError("give a run directory, a model file or --sweep DIR")
    for p in paths:
        if not p.exists():
            raise EvalError(f"{p}: no such run directory or model file")
    return paths


def _one(target: Path, opts: dict[str, str]) -> None:
    import torch

    from deepdelta.convert import load_model

    device = opts.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(target).to(device)
    tokenizer = _tokenizer(target, model.config.vocab_size, opts.get("tokenizer"))
    print(f"evaluating {target} on {opts['tasks']} ({device})", flush=True)
    result = evaluate(
        model,
        tokenizer,
        opts["tasks"],
        num_fewshot=int(opts["num_fewshot"]) if opts.get("num_fewshot") else None,
        limit=int(opts["limit"]) if opts.get("limit") else None,
        batch_size=int(opts.get("batch_size") or 16),
    )
    result["source"] = str(target)
    out = write(target if target.is_dir() else target.with_name(target.name + ".eval"), result)
    run_id = log_to_wandb(target, result) if target.is_dir() else None
    for task, row in result["tasks"].items():
        shown = ", ".join(
            f"{m} {v['value']:.4f}" + (f" ± {v['stderr']:.4f}" if v["stderr"] is not None else "")
            for m, v in row["metrics"].items()
        )
        print(f"  {task} (n={row['n']}, {row['num_fewshot']}-shot): {shown}")
    if "average" in result:
        avg = result["average"]
        print(f"  average {avg['metric']} over {avg['tasks']} tasks: {avg['value']:.4f}")
    print(f"wrote {out}" + (f"; logged to W&B run {run_id}" if run_id else ""))


def _tokenizer(target: Path, vocab_size: int, override: str | None = None) -> Tokenizer:
    """The shared rule (``tokenizer_for``); its DataError becomes this command's EvalError."""
    from deepdelta.data.errors import DataError
    from deepdelta.data.tokenizer import tokenizer_for

    try:
        return tokenizer_for(target, vocab_size, override, option="tokenizer=")
    except DataError as err:
        raise EvalError(str(err)) from None


def _parse(argv: list[str]) -> tuple[argparse.Namespace, dict[str, str]]:
    p = argparse.ArgumentParser(prog="python -m deepdelta.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("targets", nargs="*", help="run directories or model files, and key=value settings")
    p.add_argument("--sweep", type=Path, help="evaluate every run of this sweep directory")
    p.add_argument("--gpus", help="a count or device ids like 0,1: one run per GPU at a time")
    args = p.parse_args(argv)
    opts = {"tasks": "paper_1shot"}
    paths = []
    for item in args.targets:
        key, eq, value = item.partition("=")
        if eq and key in KEYS:
            opts[key] = value
        elif eq and not Path(item).exists():
            raise EvalError(f"{key}: unknown setting, allowed: {', '.join(KEYS)}")
        else:
            paths.append(Path(item))
    from deepdelta.data.tokenizer import TOKENIZER_OVERRIDES  # (deepdelta.data imports Lightning: not at the top)

    if opts.get("tokenizer") is not None and opts["tokenizer"] not in TOKENIZER_OVERRIDES:
        raise EvalError(f"tokenizer: got {opts['tokenizer']!r}, allowed: {' | '.join(TOKENIZER_OVERRIDES)}")
    for key in ("limit", "batch_size", "num_fewshot"):
        if opts.get(key) and not (opts[key].isdigit() and (key == "num_fewshot" or int(opts[key]) > 0)):
            raise EvalError(f"{key}: got {opts[key]!r}, allowed: an integer >= {0 if key == 'num_fewshot' else 1}")
    args.paths = paths
    return args, opts


def _queue(targets: list[Path], gpus: list[str], opts: dict[str, str]) -> list[Path]:
    """Each target in its own process, one per GPU at a time; returns the failed ones."""
    from deepdelta.gpusweep import over_gpus

    settings = [f"{k}={v}" for k, v in opts.items()]
    failed: list[Path] = []

    def run(target: Path, gpu: str) -> None:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu)
        if subprocess.run([sys.executable, "-m", "deepdelta.eval", str(target), *settings], env=env).returncode:
            failed.append(target)  # list.append is atomic under the GIL

    over_gpus(targets, gpus, run)
    return failed


def main(argv: list[str] | None = None) -> int:
    try:
        args, opts = _parse(sys.argv[1:] if argv is None else argv)
        resolve(opts["tasks"])  # a bad task list stops here, before any model is loaded
        require_harness()
        targets = _targets(args.paths, args.sweep)
        if args.gpus:
            from deepdelta.gpusweep import parse_gpus

            failed = _queue(targets, parse_gpus(args.gpus), opts)
        else:
            failed = []
            for target in targets:
                try:
                    _one(target, opts)
                except EvalError as err:
                    if len(targets) == 1:
                        raise
                    print(f"error: {target}: {err}", file=sys.stderr)
                    failed.append(target)
        if failed:
            print(
                f"error: {len(failed)} of {len(targets)} evaluations failed: {', '.join(map(str, failed))}",
                file=sys.stderr,
            )
            return 1
    except (EvalError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # eval.json is written whole or not at all (write: tmp + replace)
        print("interrupted: a run has eval.json only if its evaluation completed", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
