"""Continue a prompt with a trained model: ``python -m deepdelta.sample RUN_DIR --prompt "..."``.

    python -m deepdelta.sample outputs/runs/<run> --prompt "def main(" --max-new-tokens 200 \\
        --temperature 0.8 --top-k 50 [--seed 0] [--no-cache] [--device cuda] [--tokenizer byte|gpt2]

RUN_DIR is a run directory (its newest checkpoint and its own tokenizer: byte, gpt2 or the
run's BPE), a Lightning ``.ckpt`` inside one, or a deepdelta model file (its vocabulary implies
the tokenizer: 256 byte, 50257/50304 gpt2; ``--tokenizer`` overrides). The rule is
``deepdelta.data.tokenizer.tokenizer_for``, which ``python -m deepdelta.eval`` shares.
Prints the prompt and its continuation (up to the end-of-text token) on stdout, and the
number of new tokens and tokens/s on stderr. On a GPU the model runs in bf16 autocast.
Bad input prints one ``error:`` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise _Usage(message)


class _Usage(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m deepdelta.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, metavar="RUN_DIR", help="run directory, Lightning .ckpt or deepdelta model file")
    p.add_argument("--prompt", required=True, help="text to continue (not empty)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: all)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling (default: unseeded)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context every token (reference)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument(
        "--tokenizer",
        metavar="byte|gpt2",
        help="override the run's tokenizer (default: the run's, or a model file's vocabulary)",
    )
    return p


def _check(args: argparse.Namespace) -> None:
    if args.prompt == "":
        raise _Usage("--prompt is empty: give the text to continue")
    if args.max_new_tokens < 1:
        raise _Usage(f"--max-new-tokens: got {args.max_new_tokens}, allowed: an integer >= 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise _Usage(f"--temperature: got {args.temperature}, allowed: a number >= 0 (0: greedy)")
    if args.top_k is not None and args.top_k < 1:
        raise _Usage(f"--top-k: got {args.top_k}, allowed: an integer >= 1")
    if not args.run.exists():
        raise _Usage(f"{args.run}: no such run directory or file")
    if args.tokenizer is not None:  # a bad name stops before the model loads
        from deepdelta.data.tokenizer import TOKENIZER_OVERRIDES

        if args.tokenizer not in TOKENIZER_OVERRIDES:
            raise _Usage(f"--tokenizer: got {args.tokenizer!r}, allowed: {' | '.join(TOKENIZER_OVERRIDES)}")


def run(args: argparse.Namespace) -> int:
    from deepdelta.convert import load_model
    from deepdelta.data.tokenizer import tokenizer_for
    from deepdelta.model.decode import generate

    _check(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        model = load_model(args.run)
    except Exception as e:  # a missing checkpoint, or a file that is not a model: say which, no traceback
        raise _Usage(f"{args.run}: cannot load a model: {e}") from e
    tok = tokenizer_for(args.run, model.config.vocab_size, args.tokenizer, option="--tokenizer")
    model.to(device)
    idx = torch.as_tensor(tok.encode_batch([args.prompt])[0].astype("int64"), device=device)[None]  # eot first
    generator = torch.Generator(device).manual_seed(args.seed) if args.seed is not None else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with autocast:
        sync()
        start = time.perf_counter()
        out = generate(
            model, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            stop_token_ids={tok.eot_id}, generator=generator, use_cache=not args.no_cache,
        )  # fmt: skip
        sync()
        seconds = time.perf_counter() - start
    new = out[0, idx.shape[1] :].tolist()
    n = len(new)
    if tok.eot_id in new:  # the document ended
        new = new[: new.index(tok.eot_id)]
    print(args.prompt + tok.decode(new), flush=True)
    cache = "no cache" if args.no_cache else "cache"
    print(f"{n} tokens in {seconds:.2f} s: {n / seconds:.1f} tokens/s ({cache}, {device})", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    from deepdelta.data.errors import DataError

    try:
        return run(_parser().parse_args(argv))
    except (_Usage, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
