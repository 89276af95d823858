"""``python -m deepdelta.bench_eval`` (``make bench-eval``) runs on CPU at the tiny shape: a local
multiple-choice task through the harness, and sampling with and without the caches."""

from __future__ import annotations

import csv

import pytest
import torch

from deepdelta import bench_eval

pytest.importorskip("lm_eval")

FAST = ["--device", "cpu", "--examples", "3", "--batch-size", "6", "--context-chars", "16"]
FAST += ["--prompt-tokens", "4", "--new-tokens", "3"]


def test_bench_eval_cpu_tiny(tmp_path, capsys):
    out = tmp_path / "bench_eval.csv"
    names = ["ddl-cc-ec-dv4", "hc-dv2"]
    rows = bench_eval.main([*FAST, "--variants", ",".join(names), "--out", str(out)])
    assert [r["variant"] for r in rows] == names and all("error" not in r for r in rows)
    for r in rows:
        assert r["eval_examples"] == 3 and 0 <= r["eval_acc"] <= 1
        assert r["eval_examples_s"] == pytest.approx(3 / r["eval_s"]) and r["eval_tok_s"] > r["eval_examples_s"]
        for key in ("cache", "nocache"):  # every requested token came out (no stop token)
            assert r[f"sample_{key}_tok_s"] == pytest.approx(3 / r[f"sample_{key}_s"])
        assert r["cache_speedup"] == pytest.approx(r["sample_cache_tok_s"] / r["sample_nocache_tok_s"])
    printed = capsys.readouterr().out.rstrip().splitlines()
    assert printed[-len(names) - 2].startswith("| variant ") and "sample tok/s no cache" in printed[-len(names) - 2]
    assert [line.split("|")[1].strip() for line in printed[-len(names) :]] == names  # the table comes last
    with open(out) as f:
        assert [r["variant"] for r in csv.DictReader(f)] == names


def test_bench_eval_a_model_file(tmp_path):
    """--run: a model file (its byte vocabulary implies the tokenizer, the rule of eval and sample)."""
    from deepdelta.convert import save_model
    from deepdelta.model import DeltaTransformer, ModelConfig

    torch.manual_seed(0)
    save_model(DeltaTransformer(ModelConfig.preset("tiny", n_layer=1)), tmp_path / "model.pt")
    (row,) = bench_eval.main([*FAST, "--run", str(tmp_path / "model.pt")])
    assert row["variant"] == "model.pt" and row["eval_examples"] == 3 and row["sample_cache_tok_s"] > 0


def test_variant_names_and_limits():
    assert bench_eval.variant_overrides("hc-dv2") == dict(residual="hc", dv=2, hc_dynamic=True)
    assert bench_eval.variant_overrides("mhc-dv4") == dict(residual="mhc", dv=4, hc_dynamic=True)
    assert bench_eval.variant_overrides("ddl-cc-ec-dv4") == dict(residual="ddl", compressor="cc", expand="conv", dv=4)
    with pytest.raises(ValueError, match=r"got 'ddl-xx'.*\{hc\|mhc\}\[-static\]"):
        bench_eval.variant_overrides("ddl-xx")
    with pytest.raises(SystemExit, match="at most the preset's block_size 128"):
        bench_eval.main(["--device", "cpu", "--prompt-tokens", "100", "--new-tokens", "29"])
    docs = bench_eval.synthetic_docs(5, context_chars=50)
    assert docs == bench_eval.synthetic_docs(5, context_chars=50) and len(docs) == 5
    assert all(len(d["choices"]) == 4 and 0 <= d["answer"] < 4 for d in docs)
