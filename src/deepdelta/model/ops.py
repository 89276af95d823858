"""The DDL math (spec §3-§5) as small pure functions on tensors.

Shapes: a state is ``(..., d, dv)``, a direction ``(..., d)``, a value ``(..., dv)``
and a gate ``(...)``. Every other part of deepdelta calls these; nothing re-derives them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in fp32 if it is in a lower precision (bf16, fp16); fp32/fp64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def gate(logits: Tensor, beta_max: float) -> Tensor:
    """β = β_max · σ(logits), evaluated in fp32 (spec §3; fp64 stays fp64)."""
    return beta_max * torch.sigmoid(at_least_fp32(logits))


def normalize_key(k: Tensor, k_eps: float = 1e-5) -> Tensor:
    """k̂ = k / sqrt(‖k‖² + ε²), written as RMSNorm(k, eps=ε²/d)/√d (spec §4).

    The mean-of-squares form cannot overflow in low precision and is exactly the same
    function; the reduction runs in fp32 (fp64 for fp64 input) and the result keeps
    ``k``'s dtype.
    """
    d = k.shape[-1]
    k_hat = F.rms_norm(at_least_fp32(k), (d,), eps=k_eps**2 / d) / math.sqrt(d)
    return k_hat.to(k.dtype)


def read(state: Tensor, k_hat: Tensor) -> Tensor:
    """k̂ᵀX: the state's content along k̂, one number per value channel ``(..., dv)``.

    Written as a product and a sum (not a batched matmul) so that it runs in the state's
    dtype even under autocast, and so that torch.compile fuses it with the key norm.
    (A per-channel loop, to fuse the read and the write in one kernel, measured no
    faster under torch.compile and used more memory: docs/benchmarks.md.)
    """
    return (k_hat.to(state.dtype)[..., :, None] * state).sum(-2)


def write(state: Tensor, direction: Tensor, value: Tensor) -> Tensor:
    """X + direction ⊗ value, ``direction`` (..., d), ``value`` (..., dv)."""
    return state + direction[..., :, None] * value[..., None, :]


def discrepancy(state: Tensor, k: Tensor, v: Tensor, k_eps: float = 1e-5) -> Tensor:
    """e = k̂ᵀX − vᵀ, what a DDL update at β=1 would erase ``(..., dv)``."""
    return read(state, normalize_key(k, k_eps)) - v


def delta_update(state: Tensor, k: Tensor, v: Tensor, beta: Tensor, k_eps: float = 1e-5) -> Tensor:
    """X + β·k̂(vᵀ − k̂ᵀX): read along k̂, compare with v, write the difference back.

    Computed in at least fp32 and returned in the state's dtype: a bf16-stored state
    (``state_dtype=bfloat16``) is rounded once, after the update."""
    x = at_least_fp32(state)
    k_hat = normalize_key(k, k_eps).to(x.dtype)
    error = v.to(x.dtype) - read(x, k_hat)
    return write(x, beta.to(x.dtype)[..., None] * k_hat, error).to(state.dtype)


def write_only_update(state: Tensor, k: Tensor, v: Tensor, beta: Tensor, k_eps: float = 1e-5) -> Tensor:
    """X + β·k̂vᵀ: the same write with no erase term (the paper's missing control)."""
    x = at_least_fp32(state)
    k_hat = normalize_key(k, k_eps).to(x.dtype)
    return write(x, beta.to(x.dtype)[..., None] * k_hat, v.to(x.dtype)).to(state.dtype)
