"""Document sources and the errors users see before any compute."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from deepdelta.data import DataError, TokenDataModule
from deepdelta.data import sources as sources_mod
from deepdelta.data.sources import HFSource, PySource, TextSource


def test_pysource_discovers_stdlib_py_files_sorted_without_site_packages():
    src = PySource()
    files = src.files()
    ids = [doc_id for doc_id, _ in files]
    assert ids == sorted(ids) and len(ids) > 500
    assert all(i.endswith(".py") for i in ids)
    assert not any("site-packages" in i or "__pycache__" in i for i in ids)
    assert "os.py" in ids and "json/__init__.py" in ids
    assert Path(files[0][1]).is_relative_to(Path(sysconfig.get_paths()["stdlib"]).resolve())
    assert src.fingerprint() == PySource().fingerprint()  # deterministic key


def test_pysource_max_files_and_site_packages():
    assert [d for d, _ in PySource(max_files=5).files()] == [d for d, _ in PySource().files()][:5]
    with_site = [d for d, _ in PySource(include_site_packages=True).files()]
    assert any(d.startswith("site-packages/") for d in with_site)
    assert PySource(include_site_packages=True).fingerprint() != PySource().fingerprint()


def test_text_source_reads_txt_jsonl_parquet(txt_corpus, jsonl_file, parquet_file):
    src = TextSource([str(txt_corpus / "**" / "*.txt"), str(jsonl_file), str(parquet_file)], text_field="body")
    src.check()
    docs = list(src.documents())
    assert len(docs) == 40 + 30 + 20
    ids = [d for d, _ in docs]
    assert len(set(ids)) == len(ids)
    assert ids[0] == "corpus/part0/doc00.txt" and docs[0][1].startswith("doc 0:")
    assert "rows.jsonl#0" in ids and "rows.parquet#19" in ids
    # a folder works as well as a glob
    assert len(list(TextSource(str(txt_corpus)).documents())) == 40


def test_hf_source_reads_a_save_to_disk_folder(hf_disk):
    src = HFSource(str(hf_disk), split="train")
    src.check()
    docs = list(src.documents())
    assert len(docs) == 50 and docs[0] == ("0", docs[0][1]) and docs[3][1].startswith("doc 303:")
    assert src.num_documents() == 50


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source": "parquetz"}, "unknown data source 'parquetz'; choose one of: pysource, text, hf, synthetic"),
        ({"tokenizer": "sentencepiece"}, "unknown tokenizer 'sentencepiece'; choose one of: byte, gpt2, bpe"),
        ({"sampling": "shuffled"}, "unknown sampling 'shuffled'"),
        ({"source": "text"}, "source=text needs `paths`"),
        ({"source": "text", "paths": ["/nonexistent/file.txt"]}, "file not found: '/nonexistent/file.txt'"),
        ({"source": "text", "paths": ["/nonexistent/*.txt"]}, "matches no files"),
        ({"source": "hf"}, "source=hf needs `name`"),
        ({"source": "synthetic", "tokenizer": "gpt2"}, "synthetic source is byte-tokenised"),
        ({"block_size": 0}, "block_size must be a positive integer"),
        ({"val_fraction": 1.5}, "val_fraction must be in [0, 1)"),
        ({"tokenizer": "bpe", "bpe_vocab_size": 100}, "bpe_vocab_size must be in [512"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message, cache):
    with pytest.raises(DataError) as e:
        TokenDataModule(cache_dir=str(cache), **kwargs)
    assert message in str(e.value)


def test_empty_corpus_is_a_clear_error(tmp_path, cache):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("")
    dm = TokenDataModule(source="text", paths=[str(tmp_path / "*.txt")], cache_dir=str(cache), progress=False)
    with pytest.raises(DataError, match="empty corpus"):
        dm.prepare_data()


def test_empty_documents_only_is_a_clear_error(tmp_path, cache):
    (tmp_path / "rows.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    dm = TokenDataModule(source="text", paths=[str(tmp_path / "rows.jsonl")], cache_dir=str(cache), progress=False)
    with pytest.raises(DataError, match=r"empty corpus.*2 empty document"):
        dm.prepare_data()


def test_missing_text_field_names_the_available_fields(jsonl_file, hf_disk, cache):
    dm = TokenDataModule(source="text", paths=[str(jsonl_file)], text_field="content", cache_dir=str(cache))
    with pytest.raises(
        DataError, match=r"text field 'content' not found in .*rows.jsonl; its fields are \['body', 'id'\]"
    ):
        dm.prepare_data()
    dm = TokenDataModule(source="hf", name=str(hf_disk), text_field="body", cache_dir=str(cache))
    with pytest.raises(DataError, match=r"text field 'body' not found .*its fields are \['text', 'n'\]"):
        dm.prepare_data()
    assert not [p for p in (cache / "tokens").glob("*") if p.is_dir()]  # failed builds leave no entry behind


def test_unreachable_hub_offline_mode_fails_fast(monkeypatch, cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dm = TokenDataModule(source="hf", name="deepdelta-test/not-a-cached-dataset", config="x", cache_dir=str(cache))
    with pytest.raises(DataError) as e:
        dm.prepare_data()
    msg = str(e.value)
    assert "'deepdelta-test/not-a-cached-dataset'" in msg and "HF_HUB_OFFLINE" in msg and "save_to_disk" in msg


def test_unreachable_hub_online_mode_fails_fast(monkeypatch, cache):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(sources_mod, "url_reachable", lambda url, timeout=5.0: False)
    dm = TokenDataModule(source="hf", name="HuggingFaceFW/fineweb-edu", config="sample-10BT", cache_dir=str(cache))
    with pytest.raises(
        DataError, match=r"cannot reach the Hugging Face Hub .* 'HuggingFaceFW/fineweb-edu'.*HF_HUB_OFFLINE=1"
    ):
        dm.prepare_data()
