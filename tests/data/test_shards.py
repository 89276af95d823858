"""Token shards: built once, reused, split by document, right dtype, every tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deepdelta.data import DataError, TokenDataModule
from deepdelta.data import shards as shards_mod
from deepdelta.data import tokenizer as tok_mod
from deepdelta.data.shards import is_validation, token_dtype
from deepdelta.data.sources import TextSource


def text_dm(paths, cache, **kw) -> TokenDataModule:
    kw = {"block_size": 16, "batch_size": 4, "val_fraction": 0.2, "progress": False, **kw}
    return TokenDataModule(source="text", paths=[str(p) for p in paths], cache_dir=str(cache), **kw)


def test_second_run_is_a_cache_hit_without_tokenising(txt_corpus, cache, monkeypatch, caplog):
    first = text_dm([txt_corpus], cache)
    first.prepare_data()
    first.setup("fit")
    assert first.cache_hit is False
    entry = first.shards.path
    assert entry.parent == (cache / "tokens").resolve()
    assert not [p for p in entry.parent.iterdir() if ".tmp-" in p.name]  # atomic: no leftovers
    stamp = (entry / "train.bin").stat().st_mtime_ns

    def no_build(*a, **k):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(shards_mod, "build_shards", no_build)
    second = text_dm([txt_corpus], cache, seed=7, block_size=8, batch_size=2)  # seed/shape do not key the cache
    with caplog.at_level("INFO", logger="deepdelta.data"):
        second.prepare_data()
        second.setup("fit")
    assert second.cache_hit is True and second.shards.path == entry
    assert "token cache hit, no tokenisation" in caplog.text
    assert (entry / "train.bin").stat().st_mtime_ns == stamp


def test_cache_key_changes_with_content_and_settings(txt_corpus, cache):
    a = text_dm([txt_corpus], cache)
    a.setup()
    b = text_dm([txt_corpus], cache, val_fraction=0.3)
    b.setup()
    assert a.shards.path != b.shards.path and b.cache_hit is False
    (txt_corpus / "part0" / "doc00.txt").write_text("edited\n")
    c = text_dm([txt_corpus], cache)
    c.setup()
    assert c.shards.path != a.shards.path and c.cache_hit is False


def test_validation_is_held_out_by_document(txt_corpus, cache):
    dm = text_dm([txt_corpus], cache, val_fraction=0.25)
    dm.setup()
    s = dm.shards
    train_ids, val_ids = set(s.doc_ordinals("train")), set(s.doc_ordinals("val"))
    assert train_ids and val_ids and not train_ids & val_ids
    assert len(train_ids | val_ids) == 40
    # the split is the hash of the document id: recompute it from the source
    doc_ids = [d for d, _ in TextSource([str(txt_corpus)]).documents()]
    assert val_ids == {i for i, d in enumerate(doc_ids) if is_validation(d, 0.25)}
    # and each split holds exactly its documents' text, whole
    val_text = dm.tokenizer.decode(s.tokens("val"))
    for i, d in enumerate(doc_ids):
        body = (txt_corpus / d).read_text()
        assert (body in val_text) == (i in val_ids)
    offsets = s.doc_offsets("val")
    assert offsets[0] == 0 and offsets[-1] == s.num_tokens("val") and len(offsets) == len(val_ids) + 1


def test_split_does_not_depend_on_seed_or_order():
    ids = [f"file{i}.txt" for i in range(2000)]
    held = [d for d in ids if is_validation(d, 0.1)]
    assert 150 < len(held) < 250
    assert held == [d for d in reversed(ids) if is_validation(d, 0.1)][::-1]


def test_tiny_corpus_still_gets_a_validation_document(tmp_path, cache):
    for i in range(2):
        (tmp_path / f"d{i}.txt").write_text(f"document {i} " * 20)
    dm = text_dm([tmp_path / "*.txt"], cache, val_fraction=0.01)
    dm.setup()
    assert dm.shards.num_docs("train") == 1 and dm.shards.num_docs("val") == 1


def test_every_source_builds_shards(txt_corpus, jsonl_file, parquet_file, hf_disk, cache):
    dm = text_dm([jsonl_file, parquet_file], cache, text_field="body")
    dm.setup()
    assert dm.shards.meta["documents"] == 50
    hf = TokenDataModule(source="hf", name=str(hf_disk), cache_dir=str(cache), block_size=16, progress=False)
    hf.setup()
    assert hf.shards.meta["documents"] == 50 and hf.shards.num_tokens("train") > 1000
    py = TokenDataModule(source="pysource", max_files=30, cache_dir=str(cache), block_size=16, progress=False)
    py.setup()
    m = py.shards.meta
    assert m["dtype"] == "uint8" and m["documents"] + m["empty_documents"] == 30
    assert py.tokenizer.decode(py.shards.tokens("train")[:2000]).count("\0") >= 1  # NUL separates documents


def test_max_tokens_is_an_exact_budget(hf_disk, cache):
    dm = TokenDataModule(source="hf", name=str(hf_disk), max_tokens=3000, cache_dir=str(cache), progress=False)
    dm.setup()
    s = dm.shards
    assert s.num_tokens("train") + s.num_tokens("val") == 3000 and s.meta["truncated_at_max_tokens"]


def test_token_dtype_fits_the_vocabulary():
    assert token_dtype(256) == np.uint8
    assert token_dtype(50304) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_bpe_is_trained_on_training_documents_and_cached(txt_corpus, cache):
    dm = text_dm([txt_corpus], cache, tokenizer="bpe", bpe_vocab_size=600)
    assert dm.vocab_size == 600  # known before any corpus read
    dm.setup()
    s = dm.shards
    assert (s.path / "tokenizer.json").is_file() and s.meta["dtype"] == "uint16"
    train = np.asarray(s.tokens("train"))
    assert train.max() < 600 and s.num_tokens("train") < 0.6 * sum(
        len(p.read_bytes()) for p in txt_corpus.rglob("*.txt")
    )  # merges compress
    first_doc = train[s.doc_offsets("train")[0] : s.doc_offsets("train")[1]]
    assert first_doc[0] == dm.tokenizer.eot_id
    assert dm.tokenizer.decode(first_doc[1:]) == (txt_corpus / "part0" / "doc00.txt").read_text()
    again = text_dm([txt_corpus], cache, tokenizer="bpe", bpe_vocab_size=600)
    again.setup()
    assert again.cache_hit is True


def test_gpt2_without_cached_files_or_network_is_a_clear_error(txt_corpus, cache, tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-tiktoken-cache"))
    monkeypatch.setattr(tok_mod, "url_reachable", lambda url, timeout=5.0: False)
    dm = text_dm([txt_corpus], cache, tokenizer="gpt2")
    assert dm.vocab_size == 50304
    with pytest.raises(
        DataError, match=r"tokenizer=gpt2: tiktoken's GPT-2 files .* not in its cache .*TIKTOKEN_CACHE_DIR"
    ):
        dm.prepare_data()


def test_gpt2_path_with_an_injected_encoding(txt_corpus, cache, monkeypatch):
    """The gpt2 code path (batching, end-of-text id, uint16) with a tiny stand-in tiktoken encoding."""
    import tiktoken

    enc = tiktoken.Encoding(
        name="fake-gpt2",
        pat_str=r"""\s?\w+|\s?[^\w\s]+|\s+""",
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={"<|endoftext|>": 50256},
    )
    real_init = tok_mod.GPT2Tokenizer.__init__
    monkeypatch.setattr(tok_mod.GPT2Tokenizer, "__init__", lambda self, encoding=None: real_init(self, enc))
    dm = text_dm([txt_corpus], cache, tokenizer="gpt2")
    dm.setup()
    s = dm.shards
    assert s.meta["dtype"] == "uint16" and s.meta["eot_id"] == 50256
    train = np.asarray(s.tokens("train"))
    assert train[0] == 50256 and (train == 50256).sum() == s.num_docs("train")
    assert json.loads((s.path / "meta.json").read_text())["vocab_size"] == 50304
