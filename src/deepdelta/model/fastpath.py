"""The fast training path: one place that says how a DeltaTransformer trains on a GPU.

What it sets (measured on one H100, see docs/benchmarks.md):
- bf16 autocast over the forward pass with fp32 master weights (the parameters and the
  optimiser state stay fp32; the residual state X stays fp32 unless
  ``model.state_dtype=bfloat16``; β is fp32);
- ``torch.compile`` per Block (compiled once, reused by the identical blocks), of the
  expansion, the readout and the LM head + cross-entropy, ``fullgraph=True`` (no graph
  breaks anywhere in the DDL path), default mode, no CUDA graphs; ``regional=False``
  compiles the whole loss as one graph instead (a few % faster, several times longer to
  compile);
- fused AdamW over ``model.parameter_groups(weight_decay)``;
- attention through ``F.scaled_dot_product_attention`` (on the H100 it picks cuDNN's
  flash kernels for bf16 causal attention);
- TF32 stays off: the gates are computed in fp32 as the spec asks; the value and gate
  maps are products and sums (``residual.narrow_linear``), so the only fp32 matmul left
  is the first layer of the optional two-layer gate.

The LightningModule uses the same functions, so the benchmark and the training runs time
the same code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from deepdelta.model.loss import linear_cross_entropy


def configure_torch() -> None:
    """Process-wide flags for the fast path (idempotent)."""
    torch.set_float32_matmul_precision("highest")  # no TF32: the gate logits stay fp32 (spec §3)
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True  # cuBLAS default


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """bf16 on CUDA; None (plain fp32) on CPU, where bf16 autocast is slow."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else None


def compile_model(
    model: nn.Module, mode: str | None = None, regional: bool = True, fullgraph: bool = True
) -> Callable[..., Tensor]:
    """Compile the training loss in place: ``model.loss`` becomes the compiled function
    (an instance attribute, so the state_dict is unchanged), which is also returned.

    ``regional=True`` compiles each Block (one compilation, reused by all identical
    blocks), the input expansion, and the readout + final RMSNorm + LM head + cross-entropy,
    each on its own; the embedding lookup stays eager. It compiles
    several times faster than the whole model in one graph. ``regional=False`` compiles
    ``model.loss`` whole.
    ``fullgraph=True`` turns any graph break into an error.
    """
    if not regional:
        compiled = torch.compile(model.loss, mode=mode, fullgraph=fullgraph)
    else:
        for block in model.blocks:
            block.compile(mode=mode, fullgraph=fullgraph)
        model.expand.compile(mode=mode, fullgraph=fullgraph)  # eager, it costs ~2 ms/step at dv=4

        def head(state: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
            # readout, final norm, LM head and loss in one region: the norm fuses with the readout
            return linear_cross_entropy(model.norm_out(model.readout(state)), weight, targets, chunk=chunk)

        head_loss = torch.compile(head, mode=mode, fullgraph=fullgraph)

        def compiled(idx: Tensor, targets: Tensor, chunk: int = 8192) -> Tensor:
            # DeltaTransformer.loss, with the head compiled on its own
            return head_loss(model.final_state(idx), model.embed.weight, targets, chunk)

    model.loss = compiled
    return compiled


def make_optimizer(
    model: nn.Module,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over ``model.parameter_groups``; the fused kernel on CUDA unless ``fused=False``."""
    fused = next(model.parameters()).is_cuda if fused is None else fused
    return torch.optim.AdamW(model.parameter_groups(weight_decay), lr=lr, betas=betas, eps=eps, fused=fused)


def make_train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    grad_clip: float | None = 1.0,
    dtype: torch.dtype | None | str = "auto",
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """One optimisation step: autocast forward + loss, backward, clip, step, zero_grad.

    ``dtype="auto"`` picks bf16 on CUDA and fp32 on CPU; ``loss_fn(idx, targets)``
    defaults to ``model.loss`` (compiled if ``compile_model`` ran). Returns the detached
    loss without synchronising.
    """
    device = next(model.parameters()).device
    if dtype == "auto":
        dtype = autocast_dtype(device)
    loss_fn = loss_fn or (lambda idx, targets: model.loss(idx, targets))
    params = [p for p in model.parameters() if p.requires_grad]

    def step(idx: Tensor, targets: Tensor) -> Tensor:
        # with CUDA graphs (compile mode "reduce-overhead") a step's graphs reuse the last
        # step's output memory: mark the new step, and return a copy of the loss
        torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            loss = loss_fn(idx, targets)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=device.type == "cuda")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().clone()

    return step
