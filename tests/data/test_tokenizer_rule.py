"""One rule for the tokenizer of a model, shared by ``deepdelta.eval`` and ``deepdelta.sample``
(``tokenizer_for``): an explicit override, else the run's own, else what a bare model file's
vocabulary implies; errors name the bad value and the allowed ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepdelta.convert import save_model
from deepdelta.data import tokenizer as tokmod
from deepdelta.data.errors import DataError
from deepdelta.data.tokenizer import ByteTokenizer, tokenizer_for
from deepdelta.model import DeltaTransformer, ModelConfig


class FakeGPT2(tokmod.Tokenizer):
    """Stands in for tiktoken's GPT-2 (its files may not be cached here; no download in tests)."""

    name = "gpt2"
    vocab_size = tokmod.GPT2_PADDED_VOCAB
    eot_id = 50256


@pytest.fixture
def fake_gpt2(monkeypatch):
    monkeypatch.setattr(tokmod, "GPT2Tokenizer", FakeGPT2)


def fake_run(root: Path, tokenizer: str) -> Path:
    (root / ".hydra").mkdir(parents=True)
    (root / ".hydra" / "config.yaml").write_text(f"data:\n  tokenizer: {tokenizer}\n")
    return root


def test_bare_model_file_vocabulary_implies_the_tokenizer(tmp_path, fake_gpt2):
    model = tmp_path / "model.pt"
    assert isinstance(tokenizer_for(model, 256), ByteTokenizer)
    assert isinstance(tokenizer_for(model, 50304), FakeGPT2) and isinstance(tokenizer_for(model, 50257), FakeGPT2)
    with pytest.raises(DataError, match=r"vocabulary 8192.*256 → byte.*--tokenizer byte \| gpt2"):
        tokenizer_for(model, 8192)
    with pytest.raises(DataError, match=r"vocabulary 8192.*tokenizer= byte \| gpt2"):
        tokenizer_for(model, 8192, option="tokenizer=")


def test_override_wins_and_is_checked(tmp_path, fake_gpt2):
    run = fake_run(tmp_path / "run", "gpt2")
    assert isinstance(tokenizer_for(run, 50304), FakeGPT2)  # the run's own
    assert isinstance(tokenizer_for(run, 50304, "byte"), ByteTokenizer)  # the override
    assert isinstance(tokenizer_for(tmp_path / "m.pt", 8192, "byte"), ByteTokenizer)  # unknown vocabulary, named
    with pytest.raises(DataError, match=r"unknown tokenizer 'bpe'; choose one of: byte, gpt2"):
        tokenizer_for(run, 50304, "bpe")
    with pytest.raises(DataError, match=r"tokenizer gpt2 produces ids up to 50256, the model embeds 256"):
        tokenizer_for(tmp_path / "m.pt", 256, "gpt2")


def test_sample_and_eval_share_the_rule(tmp_path, capsys):
    """The same model file: both commands infer byte from its vocabulary and refuse one they
    cannot tell, with the same message (each naming its own option)."""
    from deepdelta import sample

    torch.manual_seed(0)
    byte_file, odd_file = tmp_path / "byte.pt", tmp_path / "odd.pt"
    save_model(DeltaTransformer(ModelConfig.preset("tiny", n_layer=1)), byte_file)
    save_model(DeltaTransformer(ModelConfig.preset("tiny", n_layer=1, vocab_size=1000)), odd_file)
    args = ["--prompt", "x", "--max-new-tokens", "2", "--device", "cpu"]
    assert sample.main([str(byte_file), *args]) == 0
    capsys.readouterr()
    assert sample.main([str(odd_file), *args]) == 2
    sample_err = capsys.readouterr().err
    assert "vocabulary 1000" in sample_err and "--tokenizer byte | gpt2" in sample_err
    pytest.importorskip("lm_eval")
    from deepdelta.eval.__main__ import _tokenizer, main
    from deepdelta.eval.run import EvalError

    assert isinstance(_tokenizer(byte_file, 256), ByteTokenizer)
    with pytest.raises(EvalError) as err:
        _tokenizer(odd_file, 1000)
    assert str(err.value) == sample_err.removeprefix("error: ").strip().replace("--tokenizer ", "tokenizer= ")
    assert main([str(byte_file), "tokenizer=bpe"]) == 2
    assert "tokenizer: got 'bpe', allowed: byte | gpt2" in capsys.readouterr().err
