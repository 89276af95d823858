"""The expanded residual state X ∈ R^{d×dv}: input expansion and compressors (spec §1).

All token convolutions are causal and depthwise: output t reads inputs t-K+1..t only.
They are written as K shifted multiply-adds, which stays in the (B, T, ...) layout and
compiles to one fused kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepdelta.model import ops
from deepdelta.model.config import ModelConfig


def causal_token_conv(x: Tensor, weight: Tensor) -> Tensor:
    """y[:, t] = Σ_s weight[..., K-1-s] · x[:, t-s]; ``x`` (B, T, *C), ``weight`` (*C, K)."""
    K = weight.shape[-1]
    T = x.shape[1]
    y = x * weight[..., K - 1]
    pad = (0, 0) * (x.dim() - 2)
    for s in range(1, min(K, T)):
        y = y + F.pad(x[:, : T - s], pad + (s, 0)) * weight[..., K - 1 - s]
    return y


def _shift(x: Tensor, s: int) -> Tensor:
    """``x[:, t - s]`` along the token axis, zeros for t < s."""
    return F.pad(x[:, : x.shape[1] - s], (0, 0) * (x.dim() - 2) + (s, 0)) if s else x


def causal_conv_read(state: Tensor, taps: Tensor) -> Tensor:
    """y[:, t, i] = Σ_s Σ_j taps[i, j, K-1-s] · state[:, t-s, i, j]: a causal depthwise token
    convolution of the state followed by a sum over its value channels.

    Each tap is read from the state at its own token first, and the (B, T, d) results are
    shifted, not the (B, T, d, dv) state: the backward pass then keeps the state itself
    (shared by the K products) instead of K shifted copies of it, which made `tc` at dv=4
    need 2.9× the additive peak memory (docs/benchmarks.md), and it reads the state once."""
    K = taps.shape[-1]
    return sum(_shift((state * taps[..., K - 1 - s]).sum(-1), s) for s in range(min(K, state.shape[1])))


def identity_kernel(*shape: int, K: int) -> Tensor:
    """A depthwise kernel whose last tap is 1: the convolution starts as the identity."""
    w = torch.zeros(*shape, K)
    w[..., -1] = 1.0
    return w


class Expand(nn.Module):
    """Embedding (B, T, d) → state (B, T, d, dv): `conv` (identity-initialised) or `repeat`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dv = cfg.dv
        self.conv = cfg.dv > 1 and cfg.expand == "conv"
        if self.conv:
            self.weight = nn.Parameter(identity_kernel(cfg.d_model, cfg.dv, K=cfg.conv_kernel))

    def forward(self, x: Tensor) -> Tensor:
        if self.conv:
            return causal_token_conv(x[..., None], self.weight)
        return x[..., None].expand(*x.shape, self.dv).contiguous() if self.dv > 1 else x[..., None]


class Compress(nn.Module):
    """State (B, T, d, dv) → x_in (B, T, d): `cc` channel mixing or `tc` token conv + read."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dv = cfg.dv
        self.kind = cfg.compressor if cfg.dv > 1 else "none"
        if self.kind == "cc":
            self.mix = nn.Parameter(torch.full((cfg.d_model, cfg.dv), 1.0 / cfg.dv))
        elif self.kind == "tc":
            self.weight = nn.Parameter(identity_kernel(cfg.d_model, cfg.dv, K=cfg.conv_kernel))
            self.read = nn.Parameter(torch.full((cfg.dv,), 1.0 / cfg.dv))

    def forward(self, state: Tensor) -> Tensor:
        if self.kind == "cc":
            return (state * self.mix).sum(-1)
        if self.kind == "tc":
            # The convolution and the read are linear, so they are one depthwise convolution
            # with taps weight·read summed over the channels: no (B, T, d, dv) intermediate,
            # and only the state itself is kept for the backward pass.
            return causal_conv_read(state, self.weight * self.read[:, None])
        return ops.at_least_fp32(state[..., 0])  # a bf16-stored state is read in fp32
