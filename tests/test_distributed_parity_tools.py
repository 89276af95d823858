"""CPU checks of the DDP parity tooling (issue 18): the medians of `make bench-ddp --repeat`, and the
step losses and gradient distance the 2-GPU parity test (tests/test_ddp_parity.py) asserts on."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from deepdelta import scaling
from tests.test_ddp_parity import rel, step_losses


def _val(*losses: float) -> pd.Series:
    return pd.Series(losses, index=[29, 59][: len(losses)])


def test_bench_summary_pairs_each_ddp_run_with_the_one_gpu_run_before_it():
    results = [
        ("1 GPU", "one", 100.0, _val(3.0, 2.00)),
        ("DDP", "ddp", 190.0, _val(3.0, 2.10)),
        ("1 GPU (run 2)", "one", 110.0, _val(3.0, 2.04)),
        ("DDP (run 2)", "ddp", 198.0, _val(3.0, 2.02)),
        ("1 GPU (run 3)", "one", 100.0, _val(3.0, 1.98)),
        ("DDP (run 3)", "ddp", 180.0, _val(3.0, 2.01)),
    ]
    s = scaling.summary(results)
    assert s["speedup"] == pytest.approx([1.9, 1.8, 1.8])
    assert s["gap"] == pytest.approx([0.10, -0.02, 0.03])
    assert s["spread"] == pytest.approx([0.04, 0.06])  # consecutive 1-GPU runs


def test_bench_summary_with_one_repeat_has_the_extra_one_gpu_run_as_spread(capsys):
    results = [
        ("1 GPU", "one", 100.0, _val(2.0)),
        ("DDP", "ddp", 188.0, _val(2.1)),
        ("1 GPU again", "one", 101.0, _val(2.05)),
    ]
    s = scaling.summary(results)
    assert (s["speedup"], s["gap"], s["spread"]) == (pytest.approx([1.88]), pytest.approx([0.1]), pytest.approx([0.05]))
    scaling.print_tables(results)
    out = capsys.readouterr().out
    assert "| speed-up, DDP / 1 GPU | 1.88× | 1.88 |" in out
    assert "| DDP | 188 | 1.88× | 2.1000 |" in out


def test_bench_plan_interleaves_repeats_and_keeps_a_spread():
    kinds = [r[4] for r in scaling.plan(2, 16, repeat=3)]
    assert kinds == ["one", "ddp"] * 3
    runs = scaling.plan(2, 16)  # one repeat: a second 1-GPU run gives the spread
    assert [r[0] for r in runs] == ["gpu1", "gpu2", "gpu1-repeat"]
    assert runs[1][2] == ["trainer=ddp", "trainer.devices=2"] and runs[1][3] == 2
    assert len({r[0] for r in scaling.plan(2, 16, repeat=3, diagnose=True)}) == 9  # directories are distinct


def test_step_losses_average_micro_batches_and_ranks(tmp_path):
    # DDP: two ranks, one micro-batch a step; one GPU: 2 micro-batches a step
    for r, losses in enumerate([[1.0, 3.0], [2.0, 5.0]]):
        (tmp_path / "ddp").mkdir(exist_ok=True)
        rec = {"world": 2, "accumulate": 1, "losses": losses}
        (tmp_path / "ddp" / f"losses_rank{r}.json").write_text(json.dumps(rec))
    (tmp_path / "one").mkdir()
    rec = {"world": 1, "accumulate": 2, "losses": [1.0, 2.0, 3.0, 5.0]}
    (tmp_path / "one" / "losses_rank0.json").write_text(json.dumps(rec))
    assert step_losses(tmp_path / "ddp") == step_losses(tmp_path / "one") == [1.5, 4.0]


def test_step_losses_need_every_rank(tmp_path):
    (tmp_path / "losses_rank0.json").write_text(json.dumps({"world": 2, "accumulate": 1, "losses": [1.0]}))
    with pytest.raises(AssertionError, match="missing rank records"):
        step_losses(tmp_path)


def test_rel_is_the_global_relative_distance():
    b = {"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}
    a = {"w": torch.tensor([3.0, 0.5]), "b": torch.tensor([4.0])}
    assert rel(a, b) == pytest.approx(0.1)
    with pytest.raises(AssertionError):
        rel({"w": a["w"]}, b)
