"""Test-only callbacks, added to real CLI runs with ``+callbacks.NAME._target_=tests.recorders.X``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L


class RecordBatches(L.Callback):
    """Appends, per rank, a hash of every training sequence it sees to ``{path}/batches_rank{r}.jsonl``."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        rows = [hashlib.sha1(row.cpu().numpy().tobytes()).hexdigest()[:16] for row in batch[0]]
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / f"batches_rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "rows": rows}) + "\n")
