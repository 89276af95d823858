"""Shared helpers for the model tests: a CPU-sized config and a parameter perturbation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepdelta.model import ModelConfig

# Small enough that the full ablation grid runs forward and backward in seconds on CPU.
TINY = dict(n_layer=2, d_model=32, n_head=2, head_dim=16, vocab_size=64, block_size=16)


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


@torch.no_grad()
def perturb(model: nn.Module, std: float = 0.1, seed: int = 0) -> nn.Module:
    """Add noise to every parameter. Several parts start as exact identities or zeros
    (token-conv kernels, compressor weights, gate weights, norm gains); without this a
    test at initialisation could not see a wrong or non-causal tap, or a misused gain."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)
    return model


@pytest.fixture
def tiny():
    return tiny_config


@pytest.fixture
def noisy():
    return perturb
