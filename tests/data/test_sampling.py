"""Window sampling: seeded, disjoint across ranks and workers, resumable at the exact batch under Lightning."""

from __future__ import annotations

import itertools

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from deepdelta.data import DataError, TokenDataModule
from deepdelta.data.sampling import WindowPlan, validation_starts


def make_dm(corpus, cache, **kw) -> TokenDataModule:
    kw = {"block_size": 16, "batch_size": 4, "val_fraction": 0.2, "val_batches": 3, "progress": False, **kw}
    return TokenDataModule(source="text", paths=[str(corpus)], cache_dir=str(cache), **kw)


def take(loader, n):
    return [b for b in itertools.islice(iter(loader), n)]


def test_batches_are_next_token_pairs_and_identical_for_the_same_seed(txt_corpus, cache):
    a, b, c = (make_dm(txt_corpus, cache, seed=s) for s in (3, 3, 4))
    ba, bb, bc = (take(dm.train_dataloader(), 5) for dm in (a, b, c))
    for (x, y), (x2, y2) in zip(ba, bb, strict=True):
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 16)
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(ba, bc, strict=True))
    # windows are real corpus text
    assert a.tokenizer.decode(ba[0][0][0]) in a.tokenizer.decode(a.shards.tokens("train"))


def test_no_duplicate_windows_across_two_ranks(txt_corpus, cache):
    dm = make_dm(txt_corpus, cache)
    dm.setup()
    r0, r1 = dm.train_dataset(rank=0, world_size=2), dm.train_dataset(rank=1, world_size=2)
    starts0 = np.concatenate([r0.starts(k) for k in range(40)])
    starts1 = np.concatenate([r1.starts(k) for k in range(40)])
    assert len(starts0) == len(set(starts0)) and len(starts1) == len(set(starts1))
    assert not set(starts0) & set(starts1)
    rows0 = {tuple(row.tolist()) for k in range(40) for row in r0.batch(k)[0]}
    rows1 = {tuple(row.tolist()) for k in range(40) for row in r1.batch(k)[0]}
    assert not rows0 & rows1
    # the two ranks together see exactly what one rank with twice the batches would see
    single = dm.train_dataset(rank=0, world_size=1)
    assert set(np.concatenate([single.starts(k) for k in range(80)])) == set(starts0) | set(starts1)


def test_dataloaders_take_rank_and_world_size_from_the_trainer(txt_corpus, cache):
    from types import SimpleNamespace

    loaders = []
    for rank in range(2):
        dm = make_dm(txt_corpus, cache)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, training=False, lightning_module=None)
        loaders.append((dm, take(dm.train_dataloader(), 3), list(dm.val_dataloader())))
    (dm0, train0, val0), (_, train1, val1) = loaders
    for k in range(3):
        assert torch.equal(train0[k][0], dm0.train_dataset(0, 2).batch(k)[0])
        assert torch.equal(train1[k][0], dm0.train_dataset(1, 2).batch(k)[0])
    rows = [tuple(r.tolist()) for batches in (train0, train1) for x, _ in batches for r in x]
    assert len(rows) == len(set(rows))
    val_rows = [tuple(r.tolist()) for batches in (val0, val1) for x, _ in batches for r in x]
    assert len(val_rows) == len(set(val_rows)) == 3 * 4  # the fixed set, split across the ranks


def test_dataloader_workers_split_batches_and_keep_order(txt_corpus, cache):
    zero = take(make_dm(txt_corpus, cache, num_workers=0).train_dataloader(), 6)
    two = take(make_dm(txt_corpus, cache, num_workers=2).train_dataloader(), 6)
    for (x, _), (x2, _) in zip(zero, two, strict=True):
        assert torch.equal(x, x2)
    assert len({tuple(x[0].tolist()) for x, _ in two}) == 6


def test_random_plan_visits_every_slot_once_per_epoch_and_moves_boundaries():
    plan = WindowPlan(n_tokens=10_000, block_size=64, seed=1)
    e0 = plan.starts(np.arange(plan.per_epoch))
    assert len(set(e0)) == plan.per_epoch and e0.max() + 65 <= 10_000 and e0.min() >= 0
    assert len(set(e0 % 64)) == 1  # one offset per epoch...
    assert len({int(plan.starts(np.array([e * plan.per_epoch]))[0] % 64) for e in range(6)}) > 1  # ...that moves
    seq = WindowPlan(n_tokens=10_000, block_size=64, seed=1, sampling="sequential")
    assert seq.starts(np.arange(3)).tolist() == [0, 64, 128]
    assert seq.starts(np.array([seq.per_epoch])).tolist() == [0]
    with pytest.raises(DataError, match="fewer than block_size"):
        WindowPlan(n_tokens=10, block_size=64, seed=0)


def test_validation_windows_are_fixed_and_shared_by_ranks(txt_corpus, cache):
    dm = make_dm(txt_corpus, cache, seed=1)
    other = make_dm(txt_corpus, cache, seed=2)
    v1, v2 = take(dm.val_dataloader(), 10), take(other.val_dataloader(), 10)
    assert len(v1) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(v1, v2, strict=True))
    one = dm.val_dataset(0, 1).my_starts
    two = np.concatenate([dm.val_dataset(r, 2).my_starts for r in range(2)])
    assert sorted(two) == sorted(one[: len(two)]) and len(set(two)) == len(two)
    starts = validation_starts(n_tokens=1000, block_size=16, num_windows=10)
    assert np.all(np.diff(starts) >= 16)  # non-overlapping
    with pytest.raises(DataError, match="validation split has 10 tokens"):
        validation_starts(n_tokens=10, block_size=16, num_windows=4)


def test_resume_from_state_dict_continues_the_stream(txt_corpus, cache):
    full = take(make_dm(txt_corpus, cache, seed=5).train_dataloader(), 7)
    resumed = make_dm(txt_corpus, cache, seed=5)
    resumed.load_state_dict({"version": 1, "windows": 3 * 4, "source": "text", "seed": 5})
    rest = take(resumed.train_dataloader(), 4)
    for (x, y), (x2, y2) in zip(full[3:], rest, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)


class Recorder(pl.LightningModule):
    """A tiny bigram model that records every batch it trains on."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(256, 256)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        self.seen.append(x.clone())
        return F.cross_entropy(self.emb(x).flatten(0, 1), y.flatten())

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self.emb(batch[0]).flatten(0, 1), batch[1].flatten()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(dm, root, max_steps, ckpt_path=None) -> Recorder:
    model = Recorder()
    trainer = pl.Trainer(
        max_steps=max_steps, val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=2,
        num_sanity_val_steps=0, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root,
        callbacks=[ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=3, save_top_k=-1)],
    )  # fmt: skip
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("source", ["text", "synthetic"])
def test_lightning_resume_sees_exactly_the_uninterrupted_batches(source, txt_corpus, cache, tmp_path):
    def dm():
        if source == "synthetic":  # with 2 workers: prefetched batches must not count as consumed
            return TokenDataModule(source="synthetic", block_size=64, batch_size=4, val_batches=2, num_workers=2)
        return make_dm(txt_corpus, cache, seed=9)

    full = fit(dm(), tmp_path / "a", max_steps=7)
    assert len(full.seen) == 7
    resumed = fit(dm(), tmp_path / "b", max_steps=7, ckpt_path=tmp_path / "a" / "ckpt" / "epoch=0-step=3.ckpt")
    assert len(resumed.seen) == 4
    for a, b in zip(full.seen[3:], resumed.seen, strict=True):
        assert torch.equal(a, b)
    state = torch.load(tmp_path / "a" / "ckpt" / "epoch=0-step=6.ckpt", weights_only=False)["TokenDataModule"]
    assert state["windows"] == 6 * 4
