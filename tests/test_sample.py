"""``python -m deepdelta.sample`` continues a prompt from a trained run; the run's tokenizer is found.

One tiny run is trained through the real CLI (byte tokens, 10 steps); the sampler's output is
checked against ``generate`` called by hand on the same checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepdelta import sample
from deepdelta.convert import load_model
from deepdelta.data.errors import DataError
from deepdelta.data.tokenizer import BPETokenizer, ByteTokenizer, from_run, run_dir_of
from deepdelta.model.decode import generate
from tests.conftest import ROOT

PROMPT = "def main("

pytestmark = pytest.mark.slow


def _env(cache_dir: Path) -> dict[str, str]:
    return {**os.environ, "DEEPDELTA_CACHE": str(cache_dir), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


@pytest.fixture(scope="module")
def run_dir(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained tiny run (byte tokenizer, as `make train`), 10 steps on 50 stdlib files."""
    tmp = tmp_path_factory.mktemp("sample")
    overrides = ["debug=fast", "logger=csv", "model.n_layer=2", "data.batch_size=4", "model.block_size=64"]
    overrides += ["data.max_files=50", f"hydra.run.dir={tmp / 'run'}"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "src" / "train.py"), *overrides],
        cwd=tmp, env=_env(cache_dir), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run"


def test_sample_continues_a_prompt(run_dir: Path, cache_dir: Path):
    args = ["--prompt", PROMPT, "--max-new-tokens", "24", "--temperature", "0", "--device", "cpu"]
    proc = subprocess.run(
        [sys.executable, "-m", "deepdelta.sample", str(run_dir), *args],
        env=_env(cache_dir), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "tokens/s" in proc.stderr and "(cache, cpu)" in proc.stderr
    # by hand: the run's checkpoint, byte tokens after the end-of-text id, greedy
    model = load_model(run_dir)
    idx = torch.tensor([[0, *PROMPT.encode()]])
    new = generate(model, idx, 24, temperature=0, stop_token_ids={0})[0, idx.shape[1] :].tolist()
    new = new[: new.index(0)] if 0 in new else new
    expected = PROMPT + bytes(new).decode("utf-8", errors="replace")
    assert proc.stdout == expected + "\n"
    assert proc.stdout.startswith(PROMPT)


def test_sample_in_process(run_dir: Path, cache_dir: Path, monkeypatch, capsys):
    monkeypatch.setenv("DEEPDELTA_CACHE", str(cache_dir))
    base = [str(run_dir), "--prompt", PROMPT, "--max-new-tokens", "16", "--device", "cpu"]
    outs = []
    for extra in (["--temperature", "0"], ["--temperature", "0", "--no-cache"]):
        assert sample.main(base + extra) == 0
        outs.append(capsys.readouterr())
    assert outs[0].out == outs[1].out and "(no cache, cpu)" in outs[1].err
    seeded = []
    for _ in range(2):  # a seed makes sampling reproducible
        assert sample.main(base + ["--temperature", "1.5", "--top-k", "5", "--seed", "3"]) == 0
        seeded.append(capsys.readouterr().out)
    assert seeded[0] == seeded[1]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert sample.main([str(ckpt), *base[1:], "--temperature", "0"]) == 0  # a checkpoint inside the run
    assert capsys.readouterr().out == outs[0].out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--prompt", ""], "--prompt is empty"),
        (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["--prompt", "x", "--max-new-tokens", "ten"], "--max-new-tokens"),
        (["--prompt", "x", "--temperature", "-1"], "--temperature"),
        (["--prompt", "x", "--top-k", "0"], "--top-k"),
        (["--prompt", "x", "--seed", "1.5"], "--seed"),
        ([], "--prompt"),
    ],
)
def test_bad_input(run_dir: Path, args, message, capsys):
    assert sample.main([str(run_dir), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_bad_runs(tmp_path: Path, run_dir: Path, cache_dir: Path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.pt").write_text("not a model")
    for path, message in [
        (tmp_path / "missing", "no such run"),
        (tmp_path / "empty", "no checkpoint"),
        (tmp_path / "junk.pt", "cannot load a model"),
    ]:
        assert sample.main([str(path), "--prompt", "x"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    # a model file outside a run: its vocabulary (256) implies the byte tokenizer, as for eval;
    # --tokenizer names it explicitly, and a bad name is refused with the allowed ones
    from deepdelta.convert import save_model

    save_model(load_model(run_dir), tmp_path / "model.pt")
    args = ["--prompt", "x", "--max-new-tokens", "2", "--device", "cpu", "--temperature", "0"]
    assert sample.main([str(tmp_path / "model.pt"), *args]) == 0
    inferred = capsys.readouterr().out
    assert sample.main([str(tmp_path / "model.pt"), *args, "--tokenizer", "byte"]) == 0
    assert capsys.readouterr().out == inferred
    assert sample.main([str(tmp_path / "model.pt"), *args, "--tokenizer", "bpe"]) == 2
    assert "--tokenizer: got 'bpe', allowed: byte | gpt2" in capsys.readouterr().err
    # a real process: the message and no traceback
    proc = subprocess.run(
        [sys.executable, "-m", "deepdelta.sample", str(tmp_path / "missing"), "--prompt", "x"],
        env=_env(cache_dir), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_tokenizer_from_run(run_dir: Path):
    assert run_dir_of(run_dir) == run_dir.resolve()
    assert run_dir_of(run_dir / "checkpoints" / "last.ckpt") == run_dir.resolve()
    assert isinstance(from_run(run_dir), ByteTokenizer)
    with pytest.raises(DataError, match="not a training run"):
        from_run(run_dir / "checkpoints")


def test_bpe_tokenizer_from_run(tmp_path: Path, monkeypatch):
    """A BPE run's tokenizer is the one in the token cache entry its data config names."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DEEPDELTA_CACHE", str(cache))
    data = dict(source="pysource", tokenizer="bpe", bpe_vocab_size=512, max_files=5, progress=False)
    from deepdelta.data import TokenDataModule

    dm = TokenDataModule(cache_dir=str(cache), **data)
    dm.prepare_data()
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    lines = [f"  {k}: {v}" for k, v in data.items()]
    (run / ".hydra" / "config.yaml").write_text(
        "seed: 0\nmodel:\n  block_size: 64\ndata:\n  _target_: deepdelta.data.TokenDataModule\n"
        + "\n".join(lines)
        + "\n  block_size: ${model.block_size}\n  cache_dir: ${paths.cache_dir}\n  seed: ${seed}\n"
        + "paths:\n  output_dir: ${hydra:runtime.output_dir}\n"
        + "  cache_dir: ${oc.env:DEEPDELTA_CACHE,${oc.env:HOME}/.cache/deepdelta}\n"
    )
    tok = from_run(run)
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 512
    text = "def main():\n    return 42\n"
    ids = tok.encode_batch([text])[0]
    assert ids[0] == tok.eot_id and tok.decode(ids[1:]) == text
    assert list(ids) == list(dm.tokenizer.encode_batch([text])[0])
    monkeypatch.setenv("DEEPDELTA_CACHE", str(tmp_path / "elsewhere"))
    with pytest.raises(DataError, match="DEEPDELTA_CACHE"):
        from_run(run)
