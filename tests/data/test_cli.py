"""``python -m deepdelta.data``: prepare/info through the real Hydra config, errors as one clear line."""

from __future__ import annotations

import json

from deepdelta.data.__main__ import main


def test_prepare_then_info_through_the_training_config(txt_corpus, cache, monkeypatch, capsys):
    monkeypatch.setenv("DEEPDELTA_CACHE", str(cache))  # conf/paths/default.yaml reads it
    overrides = ["data=text", f"data.paths=[{txt_corpus}]", "data.progress=false"]
    assert main(["info", *overrides]) == 0
    assert "not prepared yet" in capsys.readouterr().out
    assert main(["prepare", *overrides]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["cache_hit"] is False and first["cache"].startswith(str(cache.resolve()))
    assert first["splits"]["train"]["docs"] + first["splits"]["val"]["docs"] == 40
    assert main(["prepare", *overrides]) == 0
    assert json.loads(capsys.readouterr().out)["cache_hit"] is True
    assert main(["info", *overrides]) == 0
    assert json.loads(capsys.readouterr().out)["cache"] == first["cache"]


def test_bad_input_is_one_clear_line_and_exit_code_2(cache, monkeypatch, capsys):
    monkeypatch.setenv("DEEPDELTA_CACHE", str(cache))
    assert main(["prepare", "data=text", "data.paths=[/nonexistent/corpus.txt]"]) == 2
    assert "error: source=text: file not found: '/nonexistent/corpus.txt'" in capsys.readouterr().err
    assert main(["prepare", "data.tokenizer=wordpiece"]) == 2
    assert "unknown tokenizer 'wordpiece'; choose one of: byte, gpt2, bpe" in capsys.readouterr().err
