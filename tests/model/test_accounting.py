"""Parameter counts and the analytic FLOPs estimate against built models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepdelta.model import DeltaTransformer, ModelConfig, count_parameters, flops_per_token
from deepdelta.model.accounting import flops_breakdown, matmul_weights

CONFIGS = [
    dict(residual="additive", dv=1),
    dict(residual="additive", dv=4, compressor="tc"),
    dict(residual="ddl", dv=1),
    dict(residual="ddl", dv=4, map="k"),
    dict(residual="ddl", dv=2, map="v", beta_hidden=8),
    dict(residual="write_only", dv=3, compressor="tc", expand="repeat", beta_hidden=5),
]


def linear_weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize("kw", CONFIGS, ids=str)
def test_matmul_weights_match_a_built_model(tiny, kw):
    cfg = tiny(n_layer=3, **kw)
    model = DeltaTransformer(cfg)
    assert matmul_weights(cfg) == linear_weights(model) + cfg.vocab_size * cfg.d_model  # + tied head


@pytest.mark.parametrize("name", ["small", "medium"])
@pytest.mark.parametrize("kw", [dict(residual="additive"), dict(residual="ddl", dv=4, map="v")], ids=str)
def test_matmul_weights_match_the_presets(name, kw):
    cfg = ModelConfig.preset(name, **kw)
    with torch.device("meta"):
        model = DeltaTransformer(cfg)
    assert matmul_weights(cfg) == linear_weights(model) + cfg.vocab_size * cfg.d_model


@pytest.mark.parametrize("kw", CONFIGS, ids=str)
def test_count_parameters(tiny, kw):
    cfg = tiny(**kw)
    model = DeltaTransformer(cfg)
    counts = count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["non_embedding"] == counts["total"] - cfg.vocab_size * cfg.d_model


def test_medium_preset_analytically():
    """The paper's 353M: matmul weights ≈ all parameters (norms, biases, compressors are tiny)."""
    cfg = ModelConfig.preset("medium")
    assert abs(matmul_weights(cfg) - 353e6) / 353e6 < 0.01
    assert abs(matmul_weights(ModelConfig.preset("small")) - 124e6) / 124e6 < 0.01


@pytest.mark.parametrize("residual", ["additive", "ddl", "write_only"])
@pytest.mark.parametrize("compressor", ["cc", "tc"])
def test_flops_grow_with_dv(residual, compressor):
    flops = [
        flops_per_token(ModelConfig.preset("small", residual=residual, dv=dv, compressor=compressor))
        for dv in (1, 2, 4, 8)
    ]
    assert flops == sorted(flops) and len(set(flops)) == 4, flops


def test_flops_grow_with_seq_len():
    cfg = ModelConfig.preset("small")
    flops = [flops_per_token(cfg, seq_len=T) for T in (128, 256, 512, 1024)]
    assert flops == sorted(flops) and len(set(flops)) == 4
    assert flops_per_token(cfg) == flops_per_token(cfg, seq_len=cfg.block_size)
    # attention term: 12·L·T·d per token
    assert flops[1] - flops[0] == 12 * cfg.n_layer * 128 * cfg.d_model


def test_flops_breakdown():
    cfg = ModelConfig.preset("small", dv=4)
    parts = flops_breakdown(cfg, seq_len=512)
    assert parts["total"] == parts["matmul"] + parts["attention"] + parts["state"]
    assert parts["matmul"] == 6 * matmul_weights(cfg)
    assert parts["attention"] == 12 * cfg.n_layer * 512 * cfg.d_model
    assert 0 < parts["state"] < 0.1 * parts["matmul"]  # state traffic: small but present
    # the DDL branches cost more than the plain residual, and v-map more than k-map
    base = flops_per_token(ModelConfig.preset("small", residual="additive"))
    ddl = flops_per_token(ModelConfig.preset("small", residual="ddl"))
    vmap = flops_per_token(ModelConfig.preset("small", residual="ddl", map="v"))
    assert base < ddl < vmap
