"""The residual rule of one sublayer: how its output h rewrites the state X (spec §3, §5).

`additive` adds h to every value channel. `ddl` and `write_only` generate a direction k̃,
a value v and a gate β from the sublayer's context c and output h (k-map or v-map) and
call the update in `ops`. When `record` is on, the rule keeps the last forward's β, ‖k̃‖,
k̂ and e_pre = k̂ᵀX − vᵀ (detached); when off it costs nothing.

The update itself runs either as the ops (``kernel=plain``) or as one fused kernel
(``model/fused.py``), which can also make the next compression's reads of the new state
and recompute its input from the previous update in the backward instead of keeping it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepdelta.model import fused, ops
from deepdelta.model.config import ModelConfig
from deepdelta.model.state import Compress


def narrow_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` for a map with at most 8 outputs (the value, the gate), as
    products and sums in at least fp32. torch.compile fuses these into the row kernel
    that already reads ``x`` instead of calling a GEMM with N ≤ 8 (a separate pass)."""
    x = ops.at_least_fp32(x)
    weight = weight.to(x.dtype)
    if weight.shape[0] > 8:
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
    if weight.shape[0] == 1:
        out = (x * weight[0]).sum(-1, keepdim=True)
    else:
        out = torch.stack([(x * w).sum(-1) for w in weight], -1)
    return out if bias is None else out + bias.to(x.dtype)


class Gate(nn.Module):
    """Gate logits from the context, in fp32: one linear map, or W₂ tanh(W₁c + b₁) + b₂."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hidden = nn.Linear(cfg.d_model, cfg.beta_hidden) if cfg.beta_hidden else None
        self.out = nn.Linear(cfg.beta_hidden or cfg.d_model, 1)
        self.bias_init = math.log(cfg.beta_init / (cfg.beta_max - cfg.beta_init))  # logit(β0/β_max)

    def forward(self, c: Tensor) -> Tensor:
        # The weights are cast too, so the gate also runs in fp32 when the model itself
        # is stored in bf16 (and in fp64 when it is stored in fp64).
        with torch.autocast(c.device.type, enabled=False):
            x = ops.at_least_fp32(c)
            if self.hidden is not None:
                x = torch.tanh(F.linear(x, self.hidden.weight.to(x.dtype), self.hidden.bias.to(x.dtype)))
            return narrow_linear(x, self.out.weight, self.out.bias).squeeze(-1)


class ResidualRule(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.kind = cfg.residual
        self.record = False
        self.last: dict[str, Tensor] = {}
        if self.kind == "additive":
            return
        d = cfg.d_model
        if cfg.map == "v":
            self.key = nn.Linear(d, d, bias=False)  # k̃ = W_k c: geometry decoupled from content
        self.value = nn.Linear(d, cfg.dv, bias=True)
        self.gate = Gate(cfg)

    def forward(
        self,
        state: Tensor,
        x_in: Tensor,
        c: Tensor,
        h: Tensor,
        compress: Compress | None = None,
        prev: fused.Edit | None = None,
    ) -> tuple[Tensor, Tensor | None, fused.Edit | None]:
        """``state`` (B,T,d,dv), compressed input ``x_in`` and context ``c`` = norm(x_in),
        sublayer output ``h`` = F(c), all (B,T,d). Returns the new state; ``compress`` of it
        (the next sublayer's x_in) when given; and the edit, for a following call with
        ``prev=``. ``prev``, the edit that made ``state``, lets the fused kernel recompute
        ``state`` in the backward instead of keeping it."""
        if self.kind == "additive":
            new = (ops.at_least_fp32(state) + h[..., None]).to(state.dtype)  # rounded once if stored in bf16
            return new, compress(new) if compress is not None else None, None
        cfg = self.cfg
        if cfg.map == "k":
            k = h
            v = narrow_linear(c if cfg.value_source == "context" else x_in, self.value.weight, self.value.bias)
        else:
            k = self.key(c)
            v = narrow_linear(h, self.value.weight, self.value.bias)
        if cfg.value_squash == "sigmoid":
            v = cfg.value_scale * torch.sigmoid(v)
        beta = ops.gate(self.gate(c), cfg.beta_max)
        if self.record:
            self._record(state, k, v, beta)
        erase = self.kind == "ddl"
        if cfg.kernel == "plain":
            update = ops.delta_update if erase else ops.write_only_update
            new = update(state, k, v, beta, cfg.k_eps)
            return new, compress(new) if compress is not None else None, None
        taps = compress.taps() if compress is not None else None
        new, reads, edit = fused.update(state, k, v, beta, cfg.k_eps, erase, taps=taps, prev=prev)
        if compress is None:
            x_next = None
        elif taps is None:
            x_next = compress(new)
        else:  # the kernel read the new state for each tap; shift and sum the reads
            x_next = compress.combine(reads.unbind(-2))
        return new, x_next, edit

    @torch.no_grad()
    def _record(self, state: Tensor, k: Tensor, v: Tensor, beta: Tensor) -> None:
        k_hat = ops.normalize_key(k.float(), self.cfg.k_eps)
        self.last = {
            "beta": beta.detach().float(),
            "k_norm": k.detach().float().norm(dim=-1),
            "k_hat": k_hat,
            "e_pre": ops.read(state.float(), k_hat) - v.float(),
        }
