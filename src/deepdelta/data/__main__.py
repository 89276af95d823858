"""``python -m deepdelta.data {prepare,info,bench} [hydra overrides]``: work on the token cache outside training.

The overrides are the training CLI's own (``data=text data.paths=[corpus/*.txt] data.tokenizer=bpe``):
the config is composed from ``conf/train.yaml`` exactly as ``src/train.py`` does, so ``prepare`` fills
the very cache entry a later training run reuses.

    prepare   tokenise the configured corpus into the cache (no-op when already there)
    info      show the cache entry of the configured corpus, without building it
    bench     time batch assembly from the cache (tokens/s), directly and through the DataLoader
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from deepdelta.data.errors import DataError


def _conf_dir(explicit: str | None) -> Path | None:
    candidates = [Path(explicit)] if explicit else [Path.cwd() / "conf", Path(__file__).resolve().parents[3] / "conf"]
    return next((c.resolve() for c in candidates if (c / "data").is_dir()), None)


def compose_data_config(overrides: list[str], config_dir: str | None = None):
    """The ``data`` node of the training config after ``overrides`` (interpolations resolvable)."""
    from omegaconf import OmegaConf

    conf = _conf_dir(config_dir)
    if conf is not None and (conf / "train.yaml").is_file():
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            return compose(config_name="train", overrides=overrides).data
    # No training config (an installed package): the data group alone, with the keys it interpolates.
    choice = next((o.split("=", 1)[1] for o in overrides if o.startswith("data=")), "pysource")
    base = OmegaConf.create(
        {"seed": 0, "model": {"block_size": 128}, "paths": {"cache_dir": os.path.expanduser("~/.cache/deepdelta")}}
    )
    group = conf / "data" / f"{choice}.yaml" if conf is not None else None
    base.data = OmegaConf.load(group) if group is not None and group.is_file() else {"source": choice}
    base.data._target_ = "deepdelta.data.TokenDataModule"
    rest = [o.lstrip("+") for o in overrides if not o.startswith("data=")]
    return OmegaConf.merge(base, OmegaConf.from_dotlist(rest)).data


def build_datamodule(overrides: list[str], config_dir: str | None = None):
    from hydra.utils import instantiate

    return instantiate(compose_data_config(overrides, config_dir), _convert_="all")


def _summary(dm) -> dict:
    s = dm.shards
    return {
        "cache": str(s.path),
        "cache_hit": dm.cache_hit,
        "source": s.meta["source"],
        "tokenizer": s.meta["tokenizer"],
        "vocab_size": s.meta["vocab_size"],
        "dtype": s.meta["dtype"],
        "splits": s.meta["splits"],
        "build_seconds": s.meta["build_seconds"],
    }


def cmd_prepare(dm, args) -> None:
    if dm.source is None:
        print(f"source={dm.source_name} is generated on the fly: nothing to prepare")
        return
    dm.prepare_data()
    dm.setup("fit")
    print(json.dumps(_summary(dm), indent=2))


def cmd_info(dm, args) -> None:
    from deepdelta.data.shards import TokenShards, cache_path, cache_settings

    if dm.source is None:
        print(f"source={dm.source_name} has no cache")
        return
    settings = cache_settings(
        dm.source, dm.tokenizer_name, bpe_vocab_size=dm.bpe_vocab_size, bpe_train_bytes=dm.bpe_train_bytes,
        val_fraction=dm.val_fraction, max_tokens=dm.max_tokens,
    )  # fmt: skip
    path = cache_path(dm.cache_dir, dm.source_name, dm.tokenizer_name, settings)
    if not (path / "meta.json").is_file():
        print(f"not prepared yet: {path}\n(run: python -m deepdelta.data prepare <same overrides>)")
        return
    meta = TokenShards(path).meta
    print(json.dumps({k: v for k, v in meta.items() if k != "settings"} | {"cache": str(path)}, indent=2))


def cmd_bench(dm, args) -> None:
    import torch

    dm.prepare_data()
    dm.setup("fit")
    ds = dm.train_dataset()
    tokens_per_batch = dm.batch_size * dm.block_size
    ds.batch(0)  # open the memory map, warm the page cache
    t0 = time.perf_counter()
    for k in range(args.batches):
        ds.batch(k)
    direct = args.batches * tokens_per_batch / (time.perf_counter() - t0)
    loader = iter(dm.train_dataloader())
    next(loader)  # start workers before timing
    t0 = time.perf_counter()
    for _ in range(args.batches):
        next(loader)
    through = args.batches * tokens_per_batch / (time.perf_counter() - t0)
    print(
        f"batch assembly, source={dm.source_name} tokenizer={dm.tokenizer_name} batch={dm.batch_size} "
        f"block={dm.block_size} torch_threads={torch.get_num_threads()} workers={dm.num_workers}:\n"
        f"  direct (dataset.batch):  {direct / 1e6:8.2f} M tokens/s\n"
        f"  through the DataLoader:  {through / 1e6:8.2f} M tokens/s"
    )


COMMANDS = {"prepare": cmd_prepare, "info": cmd_info, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deepdelta.data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=text data.paths=[a.txt]")
    parser.add_argument("--config-dir", default=None, help="the conf/ folder (default: ./conf or the repo's)")
    parser.add_argument("--batches", type=int, default=2000, help="bench: batches to time")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    try:
        dm = build_datamodule(args.overrides, args.config_dir)
        COMMANDS[args.command](dm, args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # Hydra wraps constructor errors; surface a DataError's message plainly
        cause = e
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
