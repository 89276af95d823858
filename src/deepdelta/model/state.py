"""The expanded residual state X ∈ R^{d×dv}: input expansion and compressors (spec §1).

All token convolutions are causal and depthwise: output t reads inputs t-K+1..t only.
They are written as K shifted multiply-adds, which stays in the (B, T, ...) layout and
compiles to one fused kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepdelta.model import ops
from deepdelta.model.config import HYPER, ModelConfig


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


def toeplitz_mix(kernel: Tensor, read: Tensor) -> Tensor:
    """The reference's `cc` as one (d, dv) mix: Σ_k read_k · W′[:, k, :], W′[i, k, j] =
    kernel[i, j − k + ⌊(dv−1)/2⌋] (zero outside the kernel): a "same"-padded depthwise
    convolution along the dv channels whose dv outputs the read vector pools. ``kernel``
    (d, dv), ``read`` (dv,). Bilinear in (kernel, read), linear in the state."""
    dv = kernel.shape[-1]
    j = torch.arange(dv, device=kernel.device)
    offset = j[None, :] - j[:, None] + (dv - 1) // 2  # (k, j) → kernel index
    valid = (offset >= 0) & (offset < dv)
    toeplitz = kernel[:, offset.clamp(0, dv - 1)] * valid  # (d, k, j)
    return (read[:, None] * toeplitz).sum(-2)


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
    """State (B, T, d, dv) → x_in (B, T, d): `cc` channel mixing or `tc` token conv + read
    (`sum` of the streams: the readout of hc/mhc).

    Both are sums of per-token reads of the state: x_in[t] = Σ_s Σ_j taps[s]⊙X[t−s] over
    S taps (`taps()`), one for `cc` (the mix) and conv_kernel for `tc` (the convolution
    weights times the read, which are linear, so they are one depthwise convolution). Each
    tap reads the state at its own token and the (B, T, d) reads are shifted (`combine`),
    not the (B, T, d, dv) state: the backward keeps the state itself instead of K shifted
    copies (with those, `tc` at dv=4 needed 2.9× the additive peak memory,
    docs/benchmarks.md). The fused update kernel makes the same reads where it writes the
    state, and `combine` finishes them.

    `cc` comes in two forms (``cc_form``): `mix`, one (d, dv) parameter, and `toeplitz`, the
    reference's d×dv kernel and read vector (``toeplitz_mix``), which give the same kind of
    map with another parametrisation (and so another optimisation).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dv = cfg.dv
        # hc/mhc: only the final readout is a Compress, and it sums the streams (HC §2.1)
        self.kind = "sum" if cfg.residual in HYPER else cfg.compressor if cfg.dv > 1 else "none"
        self.toeplitz = self.kind == "cc" and cfg.cc_form == "toeplitz"
        if self.kind == "cc" and not self.toeplitz:
            self.mix = nn.Parameter(torch.full((cfg.d_model, cfg.dv), 1.0 / cfg.dv))
        elif self.toeplitz:  # the kernel's centre tap 1: W′ = I, so it starts as the average too
            self.weight = nn.Parameter(torch.zeros(cfg.d_model, cfg.dv))
            self.weight.data[:, (cfg.dv - 1) // 2] = 1.0
            self.read = nn.Parameter(torch.full((cfg.dv,), 1.0 / cfg.dv))
        elif self.kind == "tc":
            self.weight = nn.Parameter(identity_kernel(cfg.d_model, cfg.dv, K=cfg.conv_kernel))
            self.read = nn.Parameter(torch.full((cfg.dv,), 1.0 / cfg.dv))

    def channel_mix(self) -> Tensor:
        """`cc`'s (d, dv) mix, whichever form holds it."""
        return toeplitz_mix(self.weight, self.read) if self.toeplitz else self.mix

    def taps(self) -> Tensor | None:
        """(S, d, dv): tap s reads the state s tokens back. None for `none` (dv=1)."""
        if self.kind == "cc":
            return self.channel_mix()[None]
        if self.kind == "tc":  # the kernel's last entry multiplies the current token
            return (self.weight * self.read[:, None]).flip(-1).movedim(-1, 0)
        return None

    @staticmethod
    def combine(reads: Sequence[Tensor]) -> Tensor:
        """x_in (B, T, d) from the taps' reads (B, T, d) of each token's own state, tap s
        shifted s tokens later (taps beyond T read nothing)."""
        out = reads[0]
        for s in range(1, min(len(reads), out.shape[1])):
            out = out + _shift(reads[s], s)
        return out

    def forward(self, state: Tensor) -> Tensor:
        if self.kind == "cc":  # its one tap, written directly: through taps()[0] the compiled
            # blocks needed 0.56 GiB more at dv=4 on the H100, one (B, T, d) fp32 tensor each
            return (state * self.channel_mix()).sum(-1)
        if self.kind == "tc":
            return self.combine([(state * tap).sum(-1) for tap in self.taps()[: state.shape[1]]])
        if self.kind == "sum":
            return ops.at_least_fp32(state).sum(-1)
        return ops.at_least_fp32(state[..., 0])  # a bf16-stored state is read in fp32
