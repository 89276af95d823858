"""Tokenizers: byte (256), gpt2 (tiktoken, padded to 50304), bpe (Hugging Face `tokenizers`, trained per corpus).

Every tokenizer turns one document into a 1-D integer array and prepends its end-of-text id, so
windows that straddle two documents see an explicit boundary. Heavy libraries load lazily: the
DataModule needs only ``vocab_size_of`` at construction time.
(Named ``tokenizer.py``, not ``tokenizers.py``, so it can never shadow the ``tokenizers`` package.)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from deepdelta.data.errors import DataError, choose
from deepdelta.data.network import url_reachable

TOKENIZERS = ("byte", "gpt2", "bpe")
GPT2_VOCAB = 50257
GPT2_PADDED_VOCAB = 50304  # next multiple of 64: faster matmuls, as in the paper's setup
BPE_MIN_VOCAB = 512  # 256 byte symbols + the special token + room for merges
EOT_TEXT = "<|endoftext|>"
_GPT2_URLS = (
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
)

Doc = str | bytes


def vocab_size_of(name: str, bpe_vocab_size: int = 8192) -> int:
    """The model-facing vocabulary size of a tokenizer, without loading it."""
    choose("tokenizer", name, TOKENIZERS)
    if name == "byte":
        return 256
    if name == "gpt2":
        return GPT2_PADDED_VOCAB
    if int(bpe_vocab_size) < BPE_MIN_VOCAB or int(bpe_vocab_size) > 2**32 - 1:
        raise DataError(f"bpe_vocab_size must be in [{BPE_MIN_VOCAB}, 2**32), got {bpe_vocab_size}")
    return int(bpe_vocab_size)


def _as_text(doc: Doc) -> str:
    # Source files may hold invalid UTF-8 (the stdlib has deliberate test cases); replace, don't fail.
    return doc.decode("utf-8", errors="replace") if isinstance(doc, bytes) else doc


def _with_eot(eot_id: int, ids: Sequence[int]) -> np.ndarray:
    out = np.empty(len(ids) + 1, dtype=np.uint32)
    out[0] = eot_id
    out[1:] = ids  # one C-level conversion of the list
    return out


class Tokenizer:
    """Interface: ``vocab_size`` (padded, what the model embeds), ``eot_id``, ``encode_batch``, ``decode``."""

    name: str
    vocab_size: int
    eot_id: int

    def encode_batch(self, docs: Sequence[Doc]) -> list[np.ndarray]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens. NUL (0) separates documents: it never occurs in real text."""

    name = "byte"
    vocab_size = 256
    eot_id = 0

    def encode_batch(self, docs: Sequence[Doc]) -> list[np.ndarray]:
        out = []
        for doc in docs:
            raw = doc if isinstance(doc, bytes) else doc.encode("utf-8", errors="replace")
            arr = np.empty(len(raw) + 1, dtype=np.uint8)
            arr[0] = self.eot_id
            arr[1:] = np.frombuffer(raw, dtype=np.uint8)  # no Python loop: ~GB/s
            out.append(arr)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def _tiktoken_cache_dir() -> str:
    # Mirrors tiktoken.load.read_file_cached, so we can tell "cached" from "must download".
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    import tempfile

    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def gpt2_files_cached() -> bool:
    cache = _tiktoken_cache_dir()
    return bool(cache) and all(
        os.path.exists(os.path.join(cache, hashlib.sha1(url.encode()).hexdigest())) for url in _GPT2_URLS
    )


def ensure_gpt2_available() -> None:
    """Raise a DataError in seconds when tiktoken's GPT-2 files are neither cached nor downloadable."""
    try:
        import tiktoken  # noqa: F401
    except ImportError as e:
        raise DataError("tokenizer=gpt2 needs the `tiktoken` package: pip install tiktoken") from e
    if gpt2_files_cached() or url_reachable("https://openaipublic.blob.core.windows.net"):
        return
    raise DataError(
        "tokenizer=gpt2: tiktoken's GPT-2 files (vocab.bpe, encoder.json) are not in its cache "
        f"({_tiktoken_cache_dir()!r}) and openaipublic.blob.core.windows.net cannot be reached. "
        "Run once on a machine with internet and copy that folder here (point TIKTOKEN_CACHE_DIR at it), "
        "or use tokenizer=byte or tokenizer=bpe, which need no download."
    )


class GPT2Tokenizer(Tokenizer):
    """The paper's GPT-2 vocabulary through tiktoken; ids < 50257, the model's embedding is padded to 50304."""

    name = "gpt2"
    vocab_size = GPT2_PADDED_VOCAB

    def __init__(self, encoding=None) -> None:  # encoding: a tiktoken.Encoding (tests inject a small one)
        if encoding is None:
            ensure_gpt2_available()
            import tiktoken

            encoding = tiktoken.get_encoding("gpt2")
        self.enc = encoding
        self.eot_id = int(encoding.eot_token)

    def encode_batch(self, docs: Sequence[Doc]) -> list[np.ndarray]:
        ids = self.enc.encode_ordinary_batch([_as_text(d) for d in docs], num_threads=os.cpu_count() or 1)
        return [_with_eot(self.eot_id, row) for row in ids]

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode([int(i) for i in ids if int(i) < self.enc.n_vocab])


class BPETokenizer(Tokenizer):
    """A byte-level BPE trained on the corpus' training documents (never on validation ones)."""

    name = "bpe"

    def __init__(self, tok, vocab_size: int) -> None:  # tok: tokenizers.Tokenizer
        self.tok = tok
        self.vocab_size = int(vocab_size)
        self.eot_id = int(tok.token_to_id(EOT_TEXT))

    @classmethod
    def train(cls, texts: Iterable[Doc], vocab_size: int, show_progress: bool = False) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=int(vocab_size),
            special_tokens=[EOT_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
            show_progress=show_progress,
        )
        tok.train_from_iterator((_as_text(t) for t in texts), trainer=trainer)
        return cls(tok, vocab_size)

    @classmethod
    def load(cls, path: Path, vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        if not Path(path).is_file():
            raise DataError(f"BPE tokenizer file missing: {path} (delete its cache folder to rebuild)")
        return cls(HFTokenizer.from_file(str(path)), vocab_size)

    def save(self, path: Path) -> None:
        self.tok.save(str(path))

    def encode_batch(self, docs: Sequence[Doc]) -> list[np.ndarray]:
        encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)  # no offsets: faster
        rows = encode([_as_text(d) for d in docs], add_special_tokens=False)
        return [_with_eot(self.eot_id, row.ids) for row in rows]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def run_dir_of(path: str | os.PathLike) -> Path | None:
    """The training run directory (the one holding ``.hydra/config.yaml``) of ``path``: the
    directory itself, or a checkpoint file inside it (``<run>/checkpoints/last.ckpt``)."""
    path = Path(path).resolve()
    candidates = [path] if path.is_dir() else list(path.parents)[:2]
    return next((c for c in candidates if (c / ".hydra" / "config.yaml").is_file()), None)


def from_run(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer a training run used: ``data.tokenizer`` of the run's ``.hydra/config.yaml``
    (``path``: its directory, or a checkpoint file in it). ``bpe`` is read from the token cache
    entry the run tokenised its corpus into, under ``data.cache_dir`` as it resolves now
    (``DEEPDELTA_CACHE``, else ``~/.cache/deepdelta``); ``gpt2`` needs tiktoken's files.
    Raises DataError naming what is missing."""
    run = run_dir_of(path)
    if run is None:
        raise DataError(f"{path}: not a training run directory (no .hydra/config.yaml), so its tokenizer is unknown")
    from omegaconf import OmegaConf

    try:
        data = OmegaConf.to_container(OmegaConf.load(run / ".hydra" / "config.yaml").data, resolve=True)
    except Exception as e:  # a config written by another version, or an unresolvable interpolation
        raise DataError(f"{run}/.hydra/config.yaml: cannot read its data config ({e})") from e
    name = choose("tokenizer", data.get("tokenizer", "byte"), TOKENIZERS)
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer()
    # bpe: the entry's key hashes the source and the tokenizer settings, as the run computed it
    from deepdelta.data.datamodule import TokenDataModule
    from deepdelta.data.shards import cache_path, cache_settings

    data.pop("_target_", None)
    dm = TokenDataModule(**{**data, "progress": False})
    settings = cache_settings(
        dm.source, name, bpe_vocab_size=dm.bpe_vocab_size, bpe_train_bytes=dm.bpe_train_bytes,
        val_fraction=dm.val_fraction, max_tokens=dm.max_tokens,
    )  # fmt: skip
    file = cache_path(dm.cache_dir, dm.source_name, name, settings) / "tokenizer.json"
    if not file.is_file():
        raise DataError(
            f"the run's BPE tokenizer is not in the token cache: {file} is missing (the corpus changed since, "
            "or the run used another cache: point DEEPDELTA_CACHE at the cache it trained with)"
        )
    return BPETokenizer.load(file, dm.bpe_vocab_size)


TOKENIZER_OVERRIDES = ("byte", "gpt2")  # the ones that need no run: bpe lives in its run's token cache
_VOCAB_IMPLIES = {256: "byte", GPT2_VOCAB: "gpt2", GPT2_PADDED_VOCAB: "gpt2"}


def tokenizer_for(
    path: str | os.PathLike, vocab_size: int, override: str | None = None, option: str = "--tokenizer"
) -> Tokenizer:
    """The tokenizer to read and write a model's tokens with (``deepdelta.eval`` and
    ``deepdelta.sample`` share this rule). ``path``: a run directory, a checkpoint inside one,
    or a bare model file; ``vocab_size``: the model's embedding rows. In order:

    1. ``override`` (``byte`` or ``gpt2``), when the user named one (``option`` is how, for
       the messages);
    2. the run's own tokenizer (``from_run``: byte, gpt2 or the run's BPE);
    3. for a model file outside any run, the one its vocabulary implies: 256 → byte,
       50257 or 50304 → gpt2 (a BPE vocabulary cannot be told from its size).

    Raises DataError naming the bad value and what is allowed; also when the tokenizer's ids
    do not fit the model's embedding."""
    if override is not None:
        name = choose(option.strip("-="), override, TOKENIZER_OVERRIDES)
    elif run_dir_of(path) is not None:
        name = None
    elif int(vocab_size) in _VOCAB_IMPLIES:
        name = _VOCAB_IMPLIES[int(vocab_size)]
    else:
        implied = ", ".join(f"{v} → {n}" for v, n in _VOCAB_IMPLIES.items())
        raise DataError(
            f"{path}: a model file outside a run directory with vocabulary {vocab_size}, so its tokenizer "
            f"is unknown (a vocabulary implies one only for {implied}): give its run directory instead, "
            f"or {option} {' | '.join(TOKENIZER_OVERRIDES)}"
        )
    tok = from_run(path) if name is None else ByteTokenizer() if name == "byte" else GPT2Tokenizer()
    ids = GPT2_VOCAB if tok.name == "gpt2" else tok.vocab_size  # gpt2's padding ids are never produced
    if ids > int(vocab_size):
        raise DataError(
            f"tokenizer {tok.name} produces ids up to {ids - 1}, the model embeds {vocab_size}: allowed, "
            f"a tokenizer of at most {vocab_size} ids ({option} {' | '.join(TOKENIZER_OVERRIDES)} or the run's own)"
        )
    return tok
