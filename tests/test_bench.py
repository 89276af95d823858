"""The benchmark entry point runs on CPU at the tiny shape and prints every row."""

from __future__ import annotations

import csv

import pytest

from deepdelta import bench


def test_bench_cpu_tiny(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    rows = bench.main(["--device", "cpu", "--batch", "2", "--seq", "32", "--steps", "2", "--out", str(out)])
    names = [r["variant"] for r in rows]
    assert names == list(bench.DEFAULT_VARIANTS)
    assert all("error" not in r for r in rows)
    assert all(r["tok_s"] > 0 and r["step_ms"] > 0 and r["first_step_s"] > 0 for r in rows)
    assert all(r["params"] > 0 and r["flops_per_token"] > 0 for r in rows)
    assert all(r["mfu"] is None and r["peak_mem_gib"] is None for r in rows)  # no GPU peak on CPU
    assert rows[0]["tok_s_ratio"] == pytest.approx(1.0)
    printed = capsys.readouterr().out
    for name in names:
        assert f"| {name} " in printed
    assert "tok/s" in printed and "MFU" in printed
    with open(out) as f:
        assert [r["variant"] for r in csv.DictReader(f)] == names


def test_variant_names():
    assert bench.variant_overrides("ddl-cc-ec-dv4") == dict(residual="ddl", compressor="cc", expand="conv", dv=4)
    assert bench.variant_overrides("write_only-tc-rep-dv8") == dict(
        residual="write_only", compressor="tc", expand="repeat", dv=8
    )
    assert bench.variant_overrides("additive") == dict(residual="additive", dv=1)
    assert bench.variant_overrides("ddl-cc-dv4-plain") == dict(residual="ddl", compressor="cc", dv=4, kernel="plain")
    assert bench.variant_overrides("ddl-dv1-fused-bf16") == dict(
        residual="ddl", dv=1, kernel="fused", state_dtype="bfloat16"
    )
    with pytest.raises(ValueError, match="allowed"):
        bench.variant_overrides("ddl-xx-dv4")


def test_hyper_connection_names():
    assert bench.variant_overrides("hc-rep-dv4") == dict(residual="hc", dv=4, hc_dynamic=True, expand="repeat")
    assert bench.variant_overrides("hc-static-rep-dv4") == dict(residual="hc", dv=4, hc_dynamic=False, expand="repeat")
    assert bench.variant_overrides("mhc-static-dv2-bf16") == dict(
        residual="mhc", dv=2, hc_dynamic=False, state_dtype="bfloat16"
    )
    assert bench.variant_overrides("mhc-ec-dv4-plain") == dict(
        residual="mhc", dv=4, hc_dynamic=True, expand="conv", kernel="plain"
    )
    with pytest.raises(ValueError, match="fused kernel implements the ddl and write_only"):
        bench.variant_overrides("mhc-rep-dv4-fused")
    with pytest.raises(ValueError, match="compressor is ignored"):
        bench.variant_overrides("hc-cc-rep-dv4")
    with pytest.raises(ValueError, match="-static with hc or mhc only"):
        bench.variant_overrides("ddl-static-dv4")
    for name in bench.VARIANT_SETS["peers"]:
        bench.variant_overrides(name)  # every name of the set parses


def test_cpu_bench_runs_hc_and_mhc_rows(capsys):
    rows = bench.main(["--device", "cpu", "--batch", "1", "--seq", "16", "--steps", "1", "--warmup", "0",
                       "--variants", "additive,hc-rep-dv4,hc-static-rep-dv2,mhc-rep-dv4"])  # fmt: skip
    assert [r["variant"] for r in rows] == ["additive", "hc-rep-dv4", "hc-static-rep-dv2", "mhc-rep-dv4"]
    assert all("error" not in r for r in rows), rows
    assert all(r["tok_s"] > 0 and r["tok_s_ratio"] > 0 for r in rows)
    # static at n=2 has the fewest connection weights, mhc's φ (n·d × (n² + 2n)) the most
    assert rows[2]["params"] < rows[1]["params"] < rows[3]["params"]
    printed = capsys.readouterr().out
    assert "| mhc-rep-dv4 " in printed and "| hc-static-rep-dv2 " in printed


def test_ratios_use_the_additive_row_of_the_same_length():
    rows = [
        dict(variant="additive", seq=64, tok_s=100.0, peak_mem_gib=2.0),
        dict(variant="ddl-dv1", seq=64, tok_s=80.0, peak_mem_gib=2.2),
        dict(variant="ddl-dv1", seq=128, tok_s=50.0, peak_mem_gib=3.0),
    ]
    bench.add_ratios(rows)
    assert rows[1]["tok_s_ratio"] == pytest.approx(0.8) and rows[1]["mem_ratio"] == pytest.approx(1.1)
    assert rows[2]["tok_s_ratio"] is None
    assert "| -" in bench.format_table(rows)


def test_tune_sets_inductor_config():
    import torch._inductor.config as inductor_config

    old = inductor_config.unroll_reductions_threshold  # (monkeypatch would delete the key on undo)
    try:
        bench.apply_tune("inductor.unroll_reductions_threshold=4")
        assert inductor_config.unroll_reductions_threshold == 4
    finally:
        inductor_config.unroll_reductions_threshold = old
    with pytest.raises(ValueError):
        bench.apply_tune("nothing.x=1")
    with pytest.raises(ValueError):
        bench.apply_tune("inductor.no_such_knob=1")


def test_paper_six_set_at_either_impl(capsys):
    rows = bench.main(["--device", "cpu", "--batch", "1", "--seq", "16", "--steps", "1", "--warmup", "0",
                       "--variants", "paper_six", "--impl", "paper"])  # fmt: skip
    assert [r["variant"] for r in rows] == list(bench.VARIANT_SETS["paper_six"])
    assert all("error" not in r for r in rows)
    assert "impl=paper" in capsys.readouterr().out
