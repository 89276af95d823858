"""`callbacks.divergence.sync=false`: the guard's verdict goes to a fused AdamW as ``found_inf`` and is read a
step later, without a host sync. It must skip and stop exactly as the synchronous guard does: the same weights
after a skipped step, the same step named, the same weights when it stops, and checkpoints that count the
skip. In process, on CPU (where AdamW has a fused kernel too), with a NaN put into chosen steps' loss."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from deepdelta.callbacks.divergence import Diverged, DivergenceGuard


class Tiny(L.LightningModule):
    def __init__(self, nan_at: set[int]):
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.nan_at = nan_at
        self.last_loss: torch.Tensor | None = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.lin(x), y)
        if self.global_step + 1 in self.nan_at:  # 1-based, as the guard names steps
            loss = loss * float("nan")
        self.last_loss = loss.detach()
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1, fused=True)

    def train_dataloader(self):
        x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


class Counted(L.Callback):
    """What the guard would write into a checkpoint at the end of each step."""

    def __init__(self, guard: DivergenceGuard):
        self.guard, self.saved = guard, []

    def on_train_batch_end(self, *args) -> None:
        self.saved.append(self.guard.state_dict()["skipped"])


def fit(sync: bool, max_skips: int, nan_at: set[int], steps: int = 6):
    torch.manual_seed(0)
    model, guard = Tiny(nan_at), DivergenceGuard(max_skips, sync=sync)
    counted = Counted(guard)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", callbacks=[guard, counted], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    error = None
    try:
        trainer.fit(model)
    except Diverged as e:
        error = str(e)
    weights = [p.detach().clone() for p in model.parameters()]
    return weights, guard, counted.saved, error, trainer.optimizers[0]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_skipped_step_leaves_the_weights_the_synchronous_guard_leaves():
    w_sync, g_sync, saved_sync, err_sync, opt_sync = fit(True, 1, {3})
    w_lazy, g_lazy, saved_lazy, err_lazy, opt_lazy = fit(False, 1, {3})
    w_clean = fit(True, 1, set())[0]
    assert err_sync is None and err_lazy is None
    assert all(torch.equal(a, b) for a, b in zip(w_sync, w_lazy, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(w_sync, w_clean, strict=True))  # the skip did something
    assert g_sync.skipped == g_lazy.skipped == 1
    assert [float(s["step"]) for s in opt_lazy.state.values()] == [5.0, 5.0]  # 6 steps, one skipped
    assert saved_sync == saved_lazy == [0, 0, 1, 1, 1, 1]  # a checkpoint after step 3 counts its skip


@pytest.mark.parametrize("bad_step", [3, 6])  # 6: the last step, read when training ends
def test_a_bad_step_without_skips_stops_naming_it_with_the_weights_before_it(bad_step):
    w_sync, _, _, err_sync, _ = fit(True, 0, {bad_step})
    w_lazy, _, _, err_lazy, _ = fit(False, 0, {bad_step})
    want = f"training diverged at step {bad_step}: loss = nan; non-finite gradients in 2 of 2 parameter tensors"
    assert err_sync.startswith(want) and err_lazy.startswith(want), (err_sync, err_lazy)
    assert all(torch.equal(a, b) for a, b in zip(w_sync, w_lazy, strict=True))
    assert all(bool(p.isfinite().all()) for p in w_lazy)


def test_sync_must_be_a_boolean():
    with pytest.raises(ValueError, match="sync: got 'no', allowed: true or false"):
        DivergenceGuard(sync="no")
