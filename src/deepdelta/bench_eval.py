"""Time downstream evaluation and sampling: ``python -m deepdelta.bench_eval`` (``make bench-eval``).

For each variant (or one trained run, ``--run RUN_DIR``):

- evaluation: a local multiple-choice task (``--examples`` synthetic questions with four
  choices, written as a harness YAML task over a JSON-lines file: ``write_mc_task``, as the
  tests use) scored end to end through lm-evaluation-harness by ``deepdelta.eval.evaluate``
  (bf16 autocast on a GPU), after an untimed warm-up pass over one batch; examples/s and the
  tokens the model scored per second;
- sampling: ``generate`` of ``--new-tokens`` greedy tokens after a ``--prompt-tokens`` prompt,
  batch 1, with the caches (``deepdelta.model.decode``) and without (a full forward over the
  whole context for every token), each after an untimed warm-up; tokens/s over generate's
  wall time (the prompt's prefill included) and the cache's speed-up.

Variants are ``deepdelta.bench``'s names (``additive``, ``ddl-dv1``, ``ddl-cc-ec-dv4``,
``hc-dv4``, ...), built with random weights at ``--preset`` (the paper's small
shape on a GPU, tiny on CPU) and read with the byte tokenizer (no download; the speed does
not depend on the weights). On CPU the defaults are a few examples and tokens, so that the
tests run it. Prints one table last; ``--out`` writes its rows as CSV (after every variant, so
that a run cut short keeps the rows it finished).
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from deepdelta.bench import format_table, variant_overrides, write_rows
from deepdelta.model import DeltaTransformer, ModelConfig

DEFAULT_VARIANTS = ("additive", "ddl-dv1", "ddl-cc-ec-dv4", "ddl-tc-ec-dv4", "hc-dv4", "mhc-dv4")
_WORDS = (
    "the a of to in is that for on with as by at from it this be are or an which was not has "
    "energy water plant light heat animal cell earth moon rock force mass motion sound sun "
    "because when most likely best would could grows falls changes moves stays"
).split()


def synthetic_docs(n: int, context_chars: int = 300, seed: int = 0, n_choices: int = 4) -> list[dict[str, Any]]:
    """``n`` multiple-choice documents of pseudo-prose (``question``, ``choices``, ``answer``):
    a question of about ``context_chars`` characters (300: a 1-shot ARC prompt's bytes) and
    choices an eighth of that; deterministic in ``seed``."""
    choice_chars = max(8, context_chars // 8)
    rng = random.Random(seed)

    def text(chars: int) -> str:
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < chars:
            words.append(rng.choice(_WORDS))
        return " ".join(words)

    return [
        {
            "question": f"Question: {text(context_chars)}?\nAnswer:",
            "choices": [" " + text(choice_chars) for _ in range(n_choices)],
            "answer": rng.randrange(n_choices),
        }
        for _ in range(n)
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_eval(
    model: DeltaTransformer, tokenizer: Any, docs: list[dict[str, Any]], batch_size: int, folder: Path
) -> dict[str, Any]:
    """Score ``docs`` through the harness as a local task; examples/s and scored tokens/s.
    (``evaluate`` returns after its last forward's result is on the host: no sync needed.)"""
    from deepdelta.eval.run import evaluate
    from deepdelta.eval.tasks import write_mc_task

    task = str(write_mc_task(folder, docs, name="dd_bench_mc"))
    device = next(model.parameters()).device
    evaluate(model, tokenizer, task, num_fewshot=0, limit=min(len(docs), batch_size), batch_size=batch_size)
    _sync(device)
    result = evaluate(model, tokenizer, task, num_fewshot=0, limit=len(docs), batch_size=batch_size)
    seconds = max(result["seconds"], 1e-3)  # the harness's run: requests, scoring, metrics (not loading the task)
    block = model.config.block_size
    tokens = sum(  # what the model reads: each choice after its question, cropped to block_size as lm.py does
        min(len(tokenizer.encode_batch([d["question"] + c])[0]) - 2, block) for d in docs for c in d["choices"]
    )
    row = result["tasks"]["dd_bench_mc"]
    return dict(
        eval_examples=row["n"],
        eval_s=seconds,
        eval_examples_s=row["n"] / seconds,
        eval_tok_s=tokens / seconds,
        eval_tokens_per_example=tokens / len(docs),
        eval_acc=row["metrics"]["acc"]["value"],
    )


def bench_sample(model: DeltaTransformer, prompt_tokens: int, new_tokens: int, use_cache: bool) -> dict[str, Any]:
    """Greedy ``generate`` of ``new_tokens`` after a random prompt (batch 1): tokens/s."""
    from deepdelta.model.decode import generate

    device = next(model.parameters()).device
    vocab = min(model.config.vocab_size, 256)  # ids the byte tokenizer would produce
    prompt = torch.randint(1, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with autocast:
        generate(model, prompt, min(new_tokens, 4), temperature=0.0, use_cache=use_cache)  # warm-up
        _sync(device)
        start = time.perf_counter()
        out = generate(model, prompt, new_tokens, temperature=0.0, use_cache=use_cache)
        _sync(device)
        seconds = time.perf_counter() - start
    n = out.shape[1] - prompt_tokens
    key = "cache" if use_cache else "nocache"
    return {f"sample_{key}_s": seconds, f"sample_{key}_tok_s": n / seconds}


def bench_model(
    name: str, model: DeltaTransformer, tokenizer: Any, args: argparse.Namespace, folder: Path
) -> dict[str, Any]:
    row: dict[str, Any] = dict(variant=name, params=sum(p.numel() for p in model.parameters()))
    row.update(bench_eval(model, tokenizer, synthetic_docs(args.examples, args.context_chars), args.batch_size, folder))
    row.update(bench_sample(model, args.prompt_tokens, args.new_tokens, use_cache=True))
    row.update(bench_sample(model, args.prompt_tokens, args.new_tokens, use_cache=False))
    row["cache_speedup"] = row["sample_cache_tok_s"] / row["sample_nocache_tok_s"]
    return row


COLUMNS = (
    ("variant", "variant", "{}"),
    ("params", "params", "{:.1f}M"),
    ("eval_examples_s", "eval ex/s", "{:,.1f}"),
    ("eval_tok_s", "eval tok/s", "{:,.0f}"),
    ("eval_acc", "acc", "{:.3f}"),
    ("sample_cache_tok_s", "sample tok/s cache", "{:,.1f}"),
    ("sample_nocache_tok_s", "sample tok/s no cache", "{:,.1f}"),
    ("cache_speedup", "× cache", "{:.2f}"),
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m deepdelta.bench_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated variant names")
    p.add_argument("--run", type=Path, help="a trained run directory or model file instead of the variants")
    p.add_argument("--tokenizer", help="with --run: override its tokenizer (byte | gpt2)")
    p.add_argument("--impl", choices=("reference", "paper"), default="reference", help="the variants' impl")
    p.add_argument("--preset", choices=("small", "tiny", "medium"), help="default: small on CUDA, tiny on CPU")
    p.add_argument("--examples", type=int, help="multiple-choice examples to score (default: 500 on CUDA, 8 on CPU)")
    p.add_argument("--context-chars", type=int, help="question length in characters (default: 300 on CUDA, 40 on CPU)")
    p.add_argument("--batch-size", type=int, default=16, help="the harness's batch size (default 16, as make eval)")
    p.add_argument("--prompt-tokens", type=int, help="prompt length for sampling (default: 128 on CUDA, 8 on CPU)")
    p.add_argument("--new-tokens", type=int, help="tokens to generate (default: 128 on CUDA, 8 on CPU)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", type=Path, help="also write the rows to this CSV file")
    args = p.parse_args(argv)
    for key in ("examples", "context_chars", "batch_size", "prompt_tokens", "new_tokens"):
        value = getattr(args, key)
        if value is not None and value < 1:
            p.error(f"--{key.replace('_', '-')}: got {value}, allowed: an integer >= 1")
    return args


def _models(args: argparse.Namespace, device: torch.device, preset: str):
    """(name, model, tokenizer) of the run, or of each variant in turn (one in memory at a time)."""
    from deepdelta.data.tokenizer import ByteTokenizer, tokenizer_for

    if args.run is not None:
        from deepdelta.convert import load_model

        model = load_model(args.run)
        yield args.run.name, model.to(device), tokenizer_for(args.run, model.config.vocab_size, args.tokenizer)
        return
    for name in args.variants.split(","):
        torch.manual_seed(0)
        cfg = ModelConfig.preset(preset, **variant_overrides(name.strip()), impl=args.impl)
        yield name.strip(), DeltaTransformer(cfg).to(device), ByteTokenizer()


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    preset = args.preset or ("small" if gpu else "tiny")
    args.examples = args.examples or (500 if gpu else 8)
    args.context_chars = args.context_chars or (300 if gpu else 40)
    args.prompt_tokens = args.prompt_tokens or (128 if gpu else 8)
    args.new_tokens = args.new_tokens or (128 if gpu else 8)
    if args.run is None:
        for name in args.variants.split(","):
            variant_overrides(name.strip())  # a bad name stops before any model is built
        block = ModelConfig.preset(preset).block_size
        if args.prompt_tokens + args.new_tokens > block:  # past it, decode_step re-forwards a window
            raise SystemExit(
                f"error: --prompt-tokens + --new-tokens = {args.prompt_tokens + args.new_tokens}, "
                f"allowed: at most the preset's block_size {block}"
            )
    where = torch.cuda.get_device_name(device) if gpu else "cpu"
    print(
        f"# deepdelta.bench_eval: {where}, torch {torch.__version__}, "
        + (f"run={args.run}" if args.run else f"preset={preset}, impl={args.impl}, random weights, byte tokens")
        + f", examples={args.examples} of ~{args.context_chars} characters, batch_size={args.batch_size}, "
        f"prompt={args.prompt_tokens}, new tokens={args.new_tokens}, dtype={'bf16 autocast' if gpu else 'fp32'}",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="dd_bench_eval_") as tmp:
        for name, model, tokenizer in _models(args, device, preset):
            try:
                row = bench_model(name, model.eval(), tokenizer, args, Path(tmp))
                print(
                    f"  {name}: eval {row['eval_examples_s']:,.1f} ex/s, sample {row['sample_cache_tok_s']:,.1f} "
                    f"tok/s with caches, {row['sample_nocache_tok_s']:,.1f} without",
                    flush=True,
                )
            except torch.OutOfMemoryError:
                row = dict(variant=name, error="OOM")
            except Exception as e:  # one broken variant must not lose the others' rows
                traceback.print_exc()
                row = dict(variant=name, error=type(e).__name__)
            rows.append(row)
            if args.out:  # after every row: a run cut short by a timeout keeps the rows it finished
                write_rows(args.out, rows)
            del model
            gc.collect()
            if gpu:
                torch.cuda.empty_cache()
    print(format_table(rows, COLUMNS), flush=True)
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
