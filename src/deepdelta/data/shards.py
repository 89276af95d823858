"""Token shards: a corpus tokenised once into memory-mapped arrays, one per split, reused by every run.

Layout of one cache entry, ``<cache_dir>/tokens/<source>-<tokenizer>-<key>/``::

    meta.json                  settings, dtype, token and document counts
    train.bin / val.bin        all tokens of the split, flat (uint8/uint16/uint32 as the vocab needs)
    train.idx.npy / val...     int64 document start offsets (n_docs + 1)
    train.ids.npy / val...     int64 ordinal of each document in source order (which documents went where)
    tokenizer.json             the trained BPE (bpe only)

``key`` hashes (source fingerprint, tokenizer, settings); never the seed, block or batch size, so a
sweep shares one entry. Entries are built in a temporary folder and renamed into place (atomic),
under a file lock (concurrent jobs wait instead of tokenising twice).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from deepdelta.data.errors import DataError
from deepdelta.data.sources import Document, Source
from deepdelta.data.tokenizer import BPETokenizer, ByteTokenizer, GPT2Tokenizer, Tokenizer, vocab_size_of

log = logging.getLogger(__name__)

FORMAT = 1
SPLITS = ("train", "val")
_SPLIT_SALT = b"deepdelta/val/v1"  # fixed: the held-out documents do not change with the training seed
_BATCH_DOCS, _BATCH_BYTES = 512, 16 << 20  # tokenizer batches: enough for Rust-side parallelism


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id below ``vocab_size``."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dt).max + 1:
            return np.dtype(dt)
    raise DataError(f"vocab_size {vocab_size} does not fit in uint32")


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """Deterministic, order-free split: a document is held out iff the hash of its id falls below the fraction."""
    if val_fraction <= 0:
        return False
    h = hashlib.blake2b(doc_id.encode("utf-8", errors="surrogatepass"), digest_size=8, key=_SPLIT_SALT).digest()
    return int.from_bytes(h, "little") / 2**64 < val_fraction


def cache_settings(
    source: Source,
    tokenizer: str,
    *,
    bpe_vocab_size: int,
    bpe_train_bytes: int,
    val_fraction: float,
    max_tokens: int | None,
) -> dict[str, Any]:
    """Everything that changes the tokens on disk (and nothing that does not)."""
    tok: dict[str, Any] = {"name": tokenizer}
    if tokenizer == "bpe":
        tok |= {"vocab_size": int(bpe_vocab_size), "train_bytes": int(bpe_train_bytes)}
    return {
        "format": FORMAT,
        "source": source.fingerprint(),
        "tokenizer": tok,
        "val_fraction": float(val_fraction),
        "max_tokens": None if max_tokens is None else int(max_tokens),
    }


def cache_path(cache_dir: str | os.PathLike, source_kind: str, tokenizer: str, settings: dict[str, Any]) -> Path:
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser().resolve() / "tokens" / f"{source_kind}-{tokenizer}-{key}"


class TokenShards:
    """A built cache entry, opened read-only. Token arrays are memory maps: opening is instant at any size."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise DataError(f"not a token cache entry (no meta.json): {self.path}")
        self.meta: dict[str, Any] = json.loads(meta_file.read_text())
        if self.meta.get("format") != FORMAT:
            raise DataError(f"token cache {self.path} has format {self.meta.get('format')}, expected {FORMAT}")
        self.dtype = np.dtype(self.meta["dtype"])
        self._tokenizer: Tokenizer | None = None

    def bin_path(self, split: str) -> Path:
        return self.path / f"{split}.bin"

    def num_tokens(self, split: str) -> int:
        return int(self.meta["splits"][split]["tokens"])

    def num_docs(self, split: str) -> int:
        return int(self.meta["splits"][split]["docs"])

    def tokens(self, split: str) -> np.ndarray:
        return open_tokens(self.bin_path(split), self.dtype, self.num_tokens(split))

    def doc_offsets(self, split: str) -> np.ndarray:
        return np.load(self.path / f"{split}.idx.npy")

    def doc_ordinals(self, split: str) -> np.ndarray:
        return np.load(self.path / f"{split}.ids.npy")

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer that wrote this entry (for decoding samples); gpt2 loads tiktoken lazily."""
        if self._tokenizer is None:
            name = self.meta["tokenizer"]
            if name == "bpe":
                self._tokenizer = BPETokenizer.load(self.path / "tokenizer.json", self.meta["vocab_size"])
            else:
                self._tokenizer = GPT2Tokenizer() if name == "gpt2" else ByteTokenizer()
        return self._tokenizer


def open_tokens(path: Path, dtype: np.dtype, n_tokens: int) -> np.ndarray:
    if n_tokens == 0:
        return np.empty(0, dtype=dtype)  # mmap of an empty file is an error
    return np.memmap(path, dtype=dtype, mode="r", shape=(n_tokens,))


class _SplitWriter:
    """Appends documents to ``<split>.bin`` and records where each starts and which source document it was."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype) -> None:
        self.folder, self.split, self.dtype = folder, split, dtype
        self.file = open(folder / f"{split}.bin", "wb")  # closed in finish()
        self.offsets: list[int] = [0]
        self.ordinals: list[int] = []

    @property
    def n_tokens(self) -> int:
        return self.offsets[-1]

    def append(self, tokens: np.ndarray, ordinal: int) -> None:
        self.file.write(tokens.astype(self.dtype, copy=False).tobytes())
        self.offsets.append(self.offsets[-1] + len(tokens))
        self.ordinals.append(ordinal)

    def pop_last(self) -> tuple[np.ndarray, int]:
        """Remove the last document (to give an empty split one); returns its tokens and ordinal."""
        self.file.flush()
        start, end = self.offsets[-2], self.offsets[-1]
        tokens = np.fromfile(self.folder / f"{self.split}.bin", dtype=self.dtype, count=end - start,
                             offset=start * self.dtype.itemsize)  # fmt: skip
        self.file.seek(start * self.dtype.itemsize)
        self.file.truncate()
        self.offsets.pop()
        return tokens, self.ordinals.pop()

    def finish(self) -> dict[str, int]:
        self.file.close()
        np.save(self.folder / f"{self.split}.idx.npy", np.asarray(self.offsets, dtype=np.int64))
        np.save(self.folder / f"{self.split}.ids.npy", np.asarray(self.ordinals, dtype=np.int64))
        return {"tokens": self.n_tokens, "docs": len(self.ordinals)}


def _batches(docs: Iterable[Document]) -> Iterator[list[tuple[int, str, str | bytes]]]:
    batch: list[tuple[int, str, str | bytes]] = []
    size = 0
    for ordinal, (doc_id, content) in enumerate(docs):
        batch.append((ordinal, doc_id, content))
        size += len(content)
        if len(batch) >= _BATCH_DOCS or size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _bpe_training_texts(source: Source, val_fraction: float, budget_bytes: int) -> Iterator[str | bytes]:
    """Training documents only (the tokenizer must not see held-out text), up to a byte budget."""
    seen = 0
    for doc_id, content in source.documents():
        if not content or is_validation(doc_id, val_fraction):
            continue
        yield content
        seen += len(content)
        if seen >= budget_bytes:
            return


def _progress(total: int | None, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="doc", disable=not enabled, mininterval=0.5, dynamic_ncols=True)


def build_shards(
    folder: Path,
    source: Source,
    tokenizer: str,
    *,
    bpe_vocab_size: int,
    bpe_train_bytes: int,
    val_fraction: float,
    max_tokens: int | None,
    settings: dict[str, Any],
    progress: bool = True,
) -> None:
    """Tokenise ``source`` into ``folder`` (which must be new and empty). Raises DataError on bad input."""
    t0 = time.perf_counter()
    source.check()  # bad fields / unreachable hub: fail before any compute
    tok: Tokenizer
    if tokenizer == "gpt2":
        tok = GPT2Tokenizer()
    elif tokenizer == "bpe":
        log.info("training a %d-token BPE on the training documents of %s", bpe_vocab_size, source.describe())
        tok = BPETokenizer.train(_bpe_training_texts(source, val_fraction, bpe_train_bytes), bpe_vocab_size, progress)
        tok.save(folder / "tokenizer.json")
    else:
        tok = ByteTokenizer()
    dtype = token_dtype(vocab_size_of(tokenizer, bpe_vocab_size))
    writers = {split: _SplitWriter(folder, split, dtype) for split in SPLITS}
    budget = math.inf if max_tokens is None else int(max_tokens)
    total = n_docs = n_empty = 0
    truncated = False
    with _progress(source.num_documents(), f"tokenising {source.describe()} [{tokenizer}]", progress) as bar:
        for batch in _batches(source.documents()):
            for (ordinal, doc_id, _), ids in zip(batch, tok.encode_batch([c for _, _, c in batch]), strict=True):
                if len(ids) <= 1:  # only the end-of-text marker: an empty document
                    n_empty += 1
                    continue
                if total + len(ids) > budget:
                    ids, truncated = ids[: int(budget - total)], True
                    if len(ids) <= 1:
                        break
                writers["val" if is_validation(doc_id, val_fraction) else "train"].append(ids, ordinal)
                total += len(ids)
                n_docs += 1
                if truncated:
                    break
            bar.update(len(batch))
            bar.set_postfix(tokens=f"{total:,}", refresh=False)
            if truncated:
                break
    if total == 0:
        raise DataError(f"empty corpus: {source.describe()} has no text ({n_empty} empty document(s))")
    # A tiny corpus can hash every document to one side; move one document so both splits exist.
    if val_fraction > 0 and len(writers["val"].ordinals) == 0 and len(writers["train"].ordinals) >= 2:
        writers["val"].append(*writers["train"].pop_last())
    elif len(writers["train"].ordinals) == 0 and len(writers["val"].ordinals) >= 2:
        writers["train"].append(*writers["val"].pop_last())
    if not writers["train"].ordinals:
        raise DataError(f"{source.describe()}: no training documents left (val_fraction={val_fraction})")
    meta = {
        "format": FORMAT,
        "source": source.describe(),
        "tokenizer": tokenizer,
        "vocab_size": vocab_size_of(tokenizer, bpe_vocab_size),
        "eot_id": tok.eot_id,
        "dtype": dtype.name,
        "splits": {split: w.finish() for split, w in writers.items()},
        "documents": n_docs,
        "empty_documents": n_empty,
        "truncated_at_max_tokens": truncated,
        "build_seconds": round(time.perf_counter() - t0, 3),
        "settings": settings,
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


def prepare_shards(
    cache_dir: str | os.PathLike,
    source: Source,
    tokenizer: str,
    *,
    bpe_vocab_size: int = 8192,
    bpe_train_bytes: int = 200_000_000,
    val_fraction: float = 0.05,
    max_tokens: int | None = None,
    progress: bool = True,
) -> tuple[TokenShards, bool]:
    """Open the cache entry for these settings, building it first if missing. Returns ``(shards, cache_hit)``."""
    settings = cache_settings(
        source, tokenizer, bpe_vocab_size=bpe_vocab_size, bpe_train_bytes=bpe_train_bytes,
        val_fraction=val_fraction, max_tokens=max_tokens,
    )  # fmt: skip
    final = cache_path(cache_dir, source.kind, tokenizer, settings)
    if (final / "meta.json").is_file():
        return _hit(final), True
    final.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(final) + ".lock"):
        if (final / "meta.json").is_file():  # another process built it while we waited
            return _hit(final), True
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
        try:
            build_shards(
                tmp, source, tokenizer, bpe_vocab_size=bpe_vocab_size, bpe_train_bytes=bpe_train_bytes,
                val_fraction=val_fraction, max_tokens=max_tokens, settings=settings, progress=progress,
            )  # fmt: skip
            if final.exists():  # a half-written entry from an older, non-atomic tool: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    shards = TokenShards(final)
    m = shards.meta
    log.info(
        "tokenised %s in %.1fs: %s train / %s val tokens (%d docs) -> %s",
        m["source"], m["build_seconds"], f"{shards.num_tokens('train'):,}", f"{shards.num_tokens('val'):,}",
        m["documents"], final,
    )  # fmt: skip
    return shards, False


def _hit(path: Path) -> TokenShards:
    shards = TokenShards(path)
    log.info(
        "token cache hit, no tokenisation: %s (%s train / %s val tokens)",
        path, f"{shards.num_tokens('train'):,}", f"{shards.num_tokens('val'):,}",
    )  # fmt: skip
    return shards
