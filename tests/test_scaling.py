"""`make bench-ddp` (deepdelta.scaling) end to end on CPU: 2 gloo processes against 1 process
accumulating 2 micro-batches, through the real CLI; the table it prints is what docs/benchmarks.md shows."""

from __future__ import annotations

import re

import pytest

from deepdelta import scaling


@pytest.mark.slow
def test_scaling_prints_speedup_and_matching_losses(tmp_path, capsys):
    scaling.main([
        "--gpus", "2", "--steps", "8", "--micro", "2", "--model", "tiny", "--no-compile", "--out", str(tmp_path),
        "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.log_every_n_steps=1",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert re.search(r"\| 1 GPU, 2 × 2 accumulated \| [\d,]+ \| 1\.00× \|", out), out[-2000:]
    assert re.search(r"\| 2 GPUs DDP, 2 × 2 \| [\d,]+ \| \d+\.\d\d× \|", out), out[-2000:]
    rows = [line for line in out.splitlines() if re.match(r"\| \d+ \| \d", line)]
    assert len(rows) == 4  # validation every 8 // 4 = 2 steps
    for row in rows:  # on CPU in fp32, the same global batch gives the same losses
        one, ddp = (float(x) for x in row.strip("| ").split(" | ")[1:3])
        assert abs(one - ddp) < 1e-4, row
