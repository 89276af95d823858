"""`make bench-ddp` (deepdelta.scaling) end to end on CPU: 2 gloo processes against 1 process
accumulating 2 micro-batches, through the real CLI; the table it prints is what docs/benchmarks.md
shows. The same runs prove that DDP trains on what one process trains on: every step the two ranks
take disjoint windows whose union is the single process's two micro-batches, and fp32 losses agree."""

from __future__ import annotations

import json
import os
import re

import pandas as pd
import pytest

from deepdelta import scaling
from tests.conftest import ROOT


def _rows(run_dir, rank):
    lines = (run_dir / "rec" / f"batches_rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line)["rows"] for line in lines]


@pytest.mark.slow
def test_scaling_prints_speedup_matching_losses_and_profiles(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))  # tests.recorders
    scaling.main([
        "--gpus", "2", "--steps", "8", "--micro", "2", "--model", "tiny", "--no-compile", "--out", str(tmp_path),
        "--profile", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.log_every_n_steps=1",
        "+callbacks.rec._target_=tests.recorders.RecordBatches", "+callbacks.rec.path=${paths.output_dir}/rec",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert re.search(r"\| 1 GPU, 2 × 2 accumulated \| [\d,]+ \| 1\.00× \|", out), out[-2000:]
    assert re.search(r"\| 2 GPUs DDP, 2 × 2 \| [\d,]+ \| \d+\.\d\d× \|", out), out[-2000:]
    rows = [line for line in out.splitlines() if re.match(r"\| \d+ \| \d", line)]
    assert len(rows) == 4  # validation every 8 // 4 = 2 steps
    for row in rows:  # on CPU in fp32, the same global batch gives the same losses
        one, ddp = (float(x) for x in row.strip("| ").split(" | ")[1:3])
        assert abs(one - ddp) < 1e-4, row

    # the same windows: each step the ranks' disjoint halves are the single process's two micro-batches
    ddp, one = tmp_path / "gpu2", tmp_path / "gpu1"
    rank0, rank1, solo = _rows(ddp, 0), _rows(ddp, 1), _rows(one, 0)
    assert len(rank0) == len(rank1) == 8 and len(solo) == 16
    for step in range(8):
        assert not set(rank0[step]) & set(rank1[step])
        assert set(rank0[step]) | set(rank1[step]) == set(solo[2 * step] + solo[2 * step + 1])
    m_ddp, m_one = (pd.read_csv(d / "csv" / "metrics.csv") for d in (ddp, one))
    for col in ["val/loss", "train/tokens"]:
        a, b = m_ddp[col].dropna().to_numpy(), m_one[col].dropna().to_numpy()
        assert len(a) == len(b) > 0 and a == pytest.approx(b, rel=1e-4), col
    assert json.loads((ddp / "summary.json").read_text())["status"] == "finished"

    # --profile: steps 3–7 of every run and rank; on CPU there is no device timeline, so only the wall time is a figure
    runs = r"1 GPU, 2 × 2 accumulated|2 GPUs DDP, 2 × 2, rank [01]|1 GPU again"
    profiled = re.findall(rf"^\| ({runs}) \| ([\d.]+) \| – \|", out, re.M)
    assert [p[0] for p in profiled] == ["1 GPU, 2 × 2 accumulated", "2 GPUs DDP, 2 × 2, rank 0",
                                        "2 GPUs DDP, 2 × 2, rank 1", "1 GPU again"], out[-1500:]  # fmt: skip
    record = json.loads((one / "profile" / "profile_rank0.json").read_text())
    assert (record["start_step"], record["micro_batches"], record["kernels"]) == (3, 10, 0)  # 5 steps of 2
    assert all(float(p[1]) > 0 for p in profiled)


def test_profile_needs_the_steps_it_profiles(capsys):
    with pytest.raises(SystemExit) as e:
        scaling.main(["--steps", "7", "--profile"])
    assert e.value.code == 2
    assert "--profile needs --steps of at least 8 (got 7): it profiles steps 3–7" in capsys.readouterr().err
