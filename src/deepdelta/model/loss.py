"""Next-token cross-entropy straight from the last hidden states, in row chunks.

The LM head and the loss are fused: each chunk's logits exist only inside this function
(in fp32 for the softmax), and the gradients for the hidden states and the head are
computed in the same pass, so the full (N, vocab) fp32 logits are never materialised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _chunks(hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int, ignore_index: int, dtype: torch.dtype):
    """Yield (start, logits in at least fp32, safe targets, mask) per row chunk."""
    w = weight.to(dtype)
    for start in range(0, targets.numel(), chunk):
        t = targets[start : start + chunk]
        logits = (hidden[start : start + chunk].to(dtype) @ w.t()).to(_softmax_dtype(dtype))
        mask = t != ignore_index
        yield start, logits, torch.where(mask, t, 0), mask


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 matmuls; fp64 stays fp64 (exact parity tests)."""
    return torch.promote_types(dtype, torch.float32)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, ignore_index, dtype):  # type: ignore[override]
        valid = (targets != ignore_index).sum().clamp(min=1)
        acc = _softmax_dtype(dtype)
        loss = torch.zeros((), device=hidden.device, dtype=acc)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=acc)
        w = weight.to(dtype)
        for start, logits, t, mask in _chunks(hidden, weight, targets, chunk, ignore_index, dtype):
            lse = torch.logsumexp(logits, dim=-1)
            loss += ((lse - logits.gather(1, t[:, None]).squeeze(1)) * mask).sum()
            # d loss / d logits = (softmax − onehot) / valid on unmasked rows
            grad = torch.exp(logits - lse[:, None])
            grad.scatter_add_(1, t[:, None], -torch.ones_like(lse)[:, None])
            grad = (grad * (mask[:, None] / valid)).to(dtype)
            h = hidden[start : start + chunk].to(dtype)
            grad_hidden[start : start + chunk] = grad @ w
            grad_weight += (grad.t() @ h).to(acc)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss / valid

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_out.to(grad_hidden.dtype), grad_weight * grad_out, None, None, None, None


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int = 8192, ignore_index: int = -100
) -> Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets`` (rows ≠ ignore_index).

    ``hidden`` (..., d), ``weight`` (vocab, d), ``targets`` (...). Under autocast the
    matmuls run in the autocast dtype; the softmax always runs in fp32.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    if device == "cuda" and torch.compiler.is_compiling():
        # Compiled for a GPU, the plain formula measured faster than the chunks and needs
        # less memory (docs/benchmarks.md): inductor keeps the logits in the autocast dtype,
        # fuses the fp32 upcast into the softmax reductions and the whole backward into one
        # pass, so fp32 logits are never materialised here either.
        with torch.autocast(device, enabled=False):
            logits = hidden.to(dtype) @ weight.to(dtype).t()
            total = F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")
            return total / (targets != ignore_index).sum().clamp(min=1)
    with torch.autocast(device, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, ignore_index, dtype)
        total = torch.zeros((), device=hidden.device, dtype=_softmax_dtype(dtype))
        for _, logits, t, mask in _chunks(hidden, weight, targets, chunk, ignore_index, dtype):
            total += ((torch.logsumexp(logits, -1) - logits.gather(1, t[:, None]).squeeze(1)) * mask).sum()
        return total / (targets != ignore_index).sum().clamp(min=1)
