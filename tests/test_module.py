"""The LightningModule: schedule, optimiser groups, loss and metrics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deepdelta.module import DeltaLM, warmup_cosine

TINY = dict(n_layer=2, n_head=2, head_dim=16, d_model=32, vocab_size=64, block_size=16)
OPTIM = dict(lr=1e-3, weight_decay=0.1, betas=[0.9, 0.95], warmup_steps=10, min_lr_ratio=0.1)


def test_warmup_then_cosine_to_floor():
    lrs = [warmup_cosine(s, 10, 100, 0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:9], lrs[1:10], strict=True))  # rising warmup
    assert all(a >= b for a, b in zip(lrs[10:100], lrs[11:101], strict=True))  # falling cosine
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[100] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)


@pytest.mark.parametrize("residual", ["ddl", "additive"])
def test_no_weight_decay_on_norms_biases_gates_compressors(residual):
    module = DeltaLM(model=dict(TINY, residual=residual, dv=2), optim=OPTIM)
    decay, no_decay = module.model.parameter_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    names = {id(p): n for n, p in module.model.named_parameters()}
    for pid in decayed:
        assert names[pid].endswith("weight") and "norm" not in names[pid]
    for name, p in module.model.named_parameters():
        if name.endswith("bias") or "norm" in name or ".mix" in name or "compress" in name:
            assert id(p) not in decayed, name
    linear = [m.weight for m in module.model.modules() if isinstance(m, nn.Linear)]
    assert all(id(w) in decayed for w in linear)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(module.model.parameters()))


def test_validation_loss_and_perplexity_agree():
    module = DeltaLM(model=TINY, optim=OPTIM)
    x = torch.randint(0, 64, (3, 16))
    module.validation_step((x, x.roll(-1, 1)), 0)
    loss = module.val_loss.compute()
    expected = nn.functional.cross_entropy(module(x).flatten(0, 1), x.roll(-1, 1).flatten())
    assert loss == pytest.approx(expected.item(), rel=1e-5)
