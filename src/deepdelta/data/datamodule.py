"""``TokenDataModule``: one LightningDataModule for every source, tokenizer and sampling mode.

Life cycle under Lightning: ``__init__`` validates names and knows ``vocab_size`` (nothing is read);
``prepare_data`` (one process per node) tokenises into the shared cache unless it is there already;
``setup`` opens the cache on every rank; the dataloaders are built from pure functions of
``(seed, global window index, rank)``. The resume point is counted in ``on_before_batch_transfer``,
which Lightning calls once per batch *actually trained on* (prefetched batches do not count), and it
is saved in checkpoints through ``state_dict``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader

from deepdelta.data.errors import DataError, choose
from deepdelta.data.sampling import SAMPLINGS, TrainWindows, ValWindows, distributed_context
from deepdelta.data.shards import TokenShards, prepare_shards
from deepdelta.data.sources import SOURCES, Source, make_source
from deepdelta.data.synthetic import SyntheticTask, SyntheticTrain, SyntheticVal
from deepdelta.data.tokenizer import TOKENIZERS, Tokenizer, vocab_size_of

log = logging.getLogger(__name__)
STATE_VERSION = 1
# Our validation datasets split their batches across workers themselves, so their __len__ is exact.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise DataError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class TokenDataModule(pl.LightningDataModule):
    """Next-token batches ``(x, y)`` (int64, ``(batch_size, block_size)``, ``y`` = ``x`` shifted by one);
    the synthetic source adds ``answer_mask`` (bool, same shape).

    Common: ``source`` (pysource | text | hf | synthetic), ``tokenizer`` (byte | gpt2 | bpe),
    ``block_size``, ``batch_size`` (per device), ``cache_dir``, ``seed``, ``num_workers``,
    ``val_fraction`` (documents held out, by hash of their id), ``val_batches`` (validation =
    ``val_batches * batch_size`` fixed windows, shared by all ranks), ``sampling`` (random | sequential),
    ``max_tokens`` (token budget; None = all), ``bpe_vocab_size``, ``bpe_train_bytes``.
    pysource: ``include_site_packages``, ``max_files``. text: ``paths`` (files, folders, globs),
    ``text_field``. hf: ``name`` (hub id or save_to_disk folder), ``config``, ``split``, ``streaming``,
    ``revision``, ``text_field``. synthetic: ``task`` (rebind | recall | mix), ``num_vars``,
    ``min_ops``, ``max_ops``, ``num_values``, ``copy_prob``.
    """

    def __init__(
        self,
        source: str = "pysource",
        tokenizer: str = "byte",
        block_size: int = 128,
        batch_size: int = 16,
        cache_dir: str = ".cache/deepdelta",
        seed: int = 0,
        num_workers: int = 0,
        val_fraction: float = 0.05,
        val_batches: int = 8,
        sampling: str = "random",
        max_tokens: int | None = None,
        bpe_vocab_size: int = 8192,
        bpe_train_bytes: int = 200_000_000,
        include_site_packages: bool = False,
        max_files: int | None = None,
        paths: str | Sequence[str] | None = None,
        text_field: str = "text",
        name: str | None = None,
        config: str | None = None,
        split: str = "train",
        streaming: bool = True,
        revision: str | None = None,
        task: str = "mix",
        num_vars: int = 4,
        min_ops: int = 2,
        max_ops: int = 8,
        num_values: int = 10,
        copy_prob: float = 0.4,
        pin_memory: bool | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        self.source_name = choose("data source", source, SOURCES)
        self.tokenizer_name = choose("tokenizer", tokenizer, TOKENIZERS)
        self.sampling = choose("sampling", sampling, SAMPLINGS)
        self.block_size = _positive("block_size", block_size)
        self.batch_size = _positive("batch_size", batch_size)
        self.val_batches = int(val_batches)
        if self.val_batches < 0:
            raise DataError(f"val_batches must be >= 0, got {val_batches}")
        if int(num_workers) < 0:
            raise DataError(f"num_workers must be >= 0, got {num_workers}")
        if not 0.0 <= float(val_fraction) < 1.0:
            raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if max_tokens is not None:
            max_tokens = _positive("max_tokens", max_tokens)
        self.cache_dir, self.seed, self.num_workers = str(cache_dir), int(seed), int(num_workers)
        self.val_fraction, self.max_tokens = float(val_fraction), max_tokens
        self.bpe_vocab_size, self.bpe_train_bytes = int(bpe_vocab_size), int(bpe_train_bytes)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.progress = bool(progress)
        self.vocab_size: int = vocab_size_of(self.tokenizer_name, self.bpe_vocab_size)

        self.source: Source | None = None
        self.task: SyntheticTask | None = None
        if self.source_name == "synthetic":
            if self.tokenizer_name != "byte":
                raise DataError(f"the synthetic source is byte-tokenised; got tokenizer={tokenizer!r}, use byte")
            self.task = SyntheticTask(task, int(num_vars), int(min_ops), int(max_ops), int(num_values), copy_prob)
        else:  # resolves paths and globs now (missing files fail here); reads nothing
            self.source = make_source(
                self.source_name, paths=paths, text_field=text_field, name=name, config=config, split=split,
                streaming=streaming, revision=revision, include_site_packages=include_site_packages,
                max_files=max_files,
            )  # fmt: skip

        self.shards: TokenShards | None = None
        self.cache_hit: bool | None = None  # True: the token cache existed, nothing was tokenised
        self._built_here = False
        self._prepared: TokenShards | None = None
        # Resume bookkeeping: global windows consumed before the current train loader, and batches since.
        self._start_window = 0
        self._consumed = 0
        self._windows_per_batch = self.batch_size
        self._loaded_state: dict[str, Any] | None = None

    # ----------------------------------------------------------------- cache
    def _prepare(self) -> tuple[TokenShards, bool]:
        assert self.source is not None
        return prepare_shards(
            self.cache_dir, self.source, self.tokenizer_name, bpe_vocab_size=self.bpe_vocab_size,
            bpe_train_bytes=self.bpe_train_bytes, val_fraction=self.val_fraction, max_tokens=self.max_tokens,
            progress=self.progress,
        )  # fmt: skip

    def prepare_data(self) -> None:
        """Tokenise into the cache if needed (Lightning runs this on one process per node)."""
        if self.source is not None:
            shards, hit = self._prepare()
            self._built_here = self._built_here or not hit
            self._prepared = shards  # same-process setup() reuses it (other ranks open the cache themselves)

    def setup(self, stage: str | None = None) -> None:
        if self.source is None or self.shards is not None:
            return
        if self._prepared is not None:
            self.shards, self.cache_hit = self._prepared, not self._built_here
        else:  # other ranks find the entry prepare_data built; outside Lightning this builds it
            self.shards, self.cache_hit = self._prepare()

    @property
    def cache_path(self) -> str | None:
        return None if self.shards is None else str(self.shards.path)

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer of the prepared corpus (decode samples with ``dm.tokenizer.decode(ids)``)."""
        if self.shards is None:
            if self.source is None:
                from deepdelta.data.tokenizer import ByteTokenizer

                return ByteTokenizer()
            self.setup()
        assert self.shards is not None
        return self.shards.tokenizer

    def _require_shards(self) -> TokenShards:
        if self.shards is None:
            self.setup()
        assert self.shards is not None
        return self.shards

    # ------------------------------------------------------------- datasets
    def train_dataset(self, rank: int = 0, world_size: int = 1) -> TrainWindows | SyntheticTrain:
        """The infinite training stream of one rank, starting at the resume point."""
        common = dict(
            block_size=self.block_size, batch_size=self.batch_size, seed=self.seed,
            rank=rank, world_size=world_size, start_window=self._start_window,
        )  # fmt: skip
        if self.task is not None:
            return SyntheticTrain(self.task, **common)
        shards = self._require_shards()
        n = shards.num_tokens("train")
        return TrainWindows(shards.bin_path("train"), shards.dtype, n, sampling=self.sampling, **common)

    def val_dataset(self, rank: int = 0, world_size: int = 1) -> ValWindows | SyntheticVal | None:
        """The fixed validation windows of one rank (None when validation is off)."""
        num_windows = self.val_batches * self.batch_size
        if num_windows == 0:
            return None
        common = dict(block_size=self.block_size, batch_size=self.batch_size, num_windows=num_windows,
                      rank=rank, world_size=world_size)  # fmt: skip
        if self.task is not None:
            return SyntheticVal(self.task, **common)
        shards = self._require_shards()
        if self.val_fraction == 0:
            return None
        if shards.num_docs("val") == 0:
            raise DataError(
                f"the validation split of {shards.meta['source']} is empty (the corpus has "
                f"{shards.num_docs('train')} document(s)); add documents or set val_fraction=0"
            )
        return ValWindows(shards.bin_path("val"), shards.dtype, shards.num_tokens("val"), **common)

    def _loader(self, dataset, persistent: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=None,  # datasets yield whole batches: window choice stays a pure function of k
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=persistent and self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        rank, world_size = distributed_context(self.trainer)
        # A new loader continues where the previous one stopped (or where the checkpoint left off).
        self._start_window = self._position()
        self._consumed = 0
        self._windows_per_batch = self.batch_size * world_size
        return self._loader(self.train_dataset(rank, world_size), persistent=False)

    def val_dataloader(self) -> DataLoader | list:
        rank, world_size = distributed_context(self.trainer)
        dataset = self.val_dataset(rank, world_size)
        return [] if dataset is None else self._loader(dataset, persistent=True)

    # --------------------------------------------------------------- resume
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Counts training batches as the loop takes them, then defers to the LightningModule's hook."""
        trainer = self.trainer
        if trainer is not None and trainer.training:
            self._consumed += 1
        model = None if trainer is None else trainer.lightning_module
        if model is not None and is_overridden("on_before_batch_transfer", model):
            batch = model.on_before_batch_transfer(batch, dataloader_idx)
        return batch

    def _position(self) -> int:
        return self._start_window + self._consumed * self._windows_per_batch

    def state_dict(self) -> dict[str, Any]:
        """The resume point: how many global windows (all ranks together) training has consumed."""
        return {
            "version": STATE_VERSION,
            "windows": self._position(),
            "source": self.source_name,
            "seed": self.seed,
            "cache": None if self.shards is None else self.shards.path.name,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != STATE_VERSION:
            raise DataError(f"unknown TokenDataModule state version {state_dict.get('version')!r}")
        if state_dict.get("source") != self.source_name or state_dict.get("seed") != self.seed:
            log.warning(
                "resuming data stream saved for source=%s seed=%s with source=%s seed=%s: batches will differ",
                state_dict.get("source"), state_dict.get("seed"), self.source_name, self.seed,
            )  # fmt: skip
        self._loaded_state = dict(state_dict)
        self._start_window = int(state_dict["windows"])
        self._consumed = 0

    # ----------------------------------------------------------------- misc
    def __repr__(self) -> str:
        where = self.cache_path or "not prepared"
        return (
            f"TokenDataModule(source={self.source_name}, tokenizer={self.tokenizer_name}, vocab={self.vocab_size}, "
            f"block={self.block_size}, batch={self.batch_size}, cache={where})"
        )
