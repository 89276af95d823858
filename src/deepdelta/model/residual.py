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


# -- Hyper-Connections (residual=hc) and mHC (residual=mhc): docs/hyper_connections.md ----------


def sinkhorn(logits: Tensor, iters: int) -> Tensor:
    """Sinkhorn–Knopp (mHC eq. 9): M⁽⁰⁾ = exp(logits), then ``iters`` times normalise the
    columns, then the rows (M⁽ᵗ⁾ = T_r(T_c(M⁽ᵗ⁻¹⁾))); ``logits`` (..., n, n). The rows end
    summing to 1 exactly (to rounding), so equal streams stay equal; the column sums
    converge linearly. A max is subtracted first (invariant: each normalisation removes it)."""
    m = torch.exp(logits - logits.amax((-2, -1), keepdim=True))
    for _ in range(iters):
        m = m / m.sum(-2, keepdim=True)
        m = m / m.sum(-1, keepdim=True)
    return m


def _read_entropy(weights: Tensor) -> Tensor:
    """Entropy (nats) of |read weights| normalised to sum to one, over the last axis."""
    p = weights.abs() / weights.abs().sum(-1, keepdim=True).clamp_min(1e-12)
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


class HyperConnection(nn.Module):
    """One sublayer's Hyper-Connection (Zhu et al., arXiv 2409.19606, §2.1–2.2, eqs. 1–6):
    ``read`` gives the sublayer's input x_in = Σᵢ A_m[i]·Hᵢ (the width connection), ``write``
    the new streams H′ⱼ = Σᵢ A_r[i, j]·Hᵢ + B[j]·h (the depth connection). Static: A_m, A_r,
    B are parameters; dynamic (``hc_dynamic``): each stream i adds its own
    s_α·tanh(H̄ᵢ W_m), s_α·tanh(H̄ᵢ W_r), s_β·tanh(H̄ᵢ W_β), H̄ᵢ = RMSNorm(Hᵢ).
    ``index`` is the sublayer's position in the stack (2·layer + 0 attention, 1 MLP)."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        n, d = cfg.dv, cfg.d_model
        self.kind, self.n, self.record = "hc", n, False
        self.last: dict[str, Tensor] = {}
        read = torch.zeros(n)
        read[index % n] = 1.0  # the paper's init: sublayer k reads stream k mod n
        self.static_read = nn.Parameter(read)  # A_m
        self.static_mix = nn.Parameter(torch.eye(n))  # A_r[i, j]: stream i → stream j
        self.static_write = nn.Parameter(torch.ones(n))  # B
        self.dynamic = cfg.hc_dynamic
        if self.dynamic:  # W_m, W_r, W_β zero and s_α = s_β = 0.01: static at init
            self.norm = nn.RMSNorm(d, eps=cfg.norm_eps)
            self.dynamic_read = nn.Parameter(torch.zeros(d, 1 + n))  # [W_m | W_r]
            self.dynamic_write = nn.Parameter(torch.zeros(d))  # W_β
            self.read_scale = nn.Parameter(torch.tensor(0.01))  # s_α
            self.write_scale = nn.Parameter(torch.tensor(0.01))  # s_β

    def weights(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A_m (…, n), A_r (…, n, n), B (…, n) for streams ``x`` (B, T, n, d) in ≥ fp32."""
        read, mix, write = (p.to(x.dtype) for p in (self.static_read, self.static_mix, self.static_write))
        if not self.dynamic:
            return read, mix, write
        normed = self.norm(x)  # H̄, per stream
        a = torch.tanh(normed @ self.dynamic_read.to(x.dtype)) * self.read_scale.to(x.dtype)  # (B, T, n, 1+n)
        b = torch.tanh(normed @ self.dynamic_write.to(x.dtype)) * self.write_scale.to(x.dtype)  # (B, T, n)
        return read + a[..., 0], mix + a[..., 1:], write + b

    def read(self, state: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x_in (B, T, d) from ``state`` (B, T, d, n), and what ``write`` needs."""
        x = ops.at_least_fp32(state).transpose(-1, -2)  # (B, T, n, d): the paper's H
        read, mix, write = self.weights(x)
        if self.record:
            self._record(read, mix)
        return (read[..., None, :] * x.transpose(-1, -2)).sum(-1), (mix, write)

    def write(self, state: Tensor, mixing: tuple[Tensor, Tensor], h: Tensor) -> Tensor:
        """H′ⱼ = Σᵢ A_r[i, j]·Hᵢ + B[j]·h, as (B, T, d, n) in the state's dtype."""
        mix, write = mixing
        x = ops.at_least_fp32(state)
        new = x @ mix + ops.at_least_fp32(h)[..., None] * write[..., None, :]
        return new.to(state.dtype)

    @torch.no_grad()
    def _record(self, read: Tensor, mix: Tensor, residual: Tensor | None = None) -> None:
        eye = torch.eye(self.n, dtype=mix.dtype, device=mix.device)
        self.last = {
            "mix_dist": (mix - eye).flatten(-2).norm(dim=-1).float(),  # ‖A_r − I‖_F
            "read_entropy": _read_entropy(read).float(),  # 0: one stream read, log n: all equally
        }
        if residual is not None:
            self.last["sinkhorn_residual"] = residual.float()


class ManifoldHyperConnection(HyperConnection):
    """mHC (Xie et al., arXiv 2512.24880, §4.1, eqs. 7–9): with x̃ = RMSNorm(vec(x)) over all
    n·d entries of the streams,
        H_pre = σ(α_pre·x̃φ_pre + b_pre),  H_post = 2σ(α_post·x̃φ_post + b_post),
        H_res = SinkhornKnopp(α_res·mat(x̃φ_res) + b_res),
    x_in = Σⱼ H_pre[j]·xⱼ and x′ᵢ = Σⱼ H_res[i, j]·xⱼ + H_post[i]·h. ``hc_dynamic=false``
    keeps only the biases. Init: docs/hyper_connections.md (all streams equal → the
    pre-norm baseline, exactly for n ≥ 2)."""

    def __init__(self, cfg: ModelConfig, index: int):
        nn.Module.__init__(self)
        n, d = cfg.dv, cfg.d_model
        self.kind, self.n, self.record, self.iters = "mhc", n, False, cfg.mhc_sinkhorn_iters
        self.last: dict[str, Tensor] = {}
        eps = cfg.mhc_init_eps
        # read: (1 − ε)·e_k + ε/n sums to one (n = 1: σ < 1, so 1 − ε); mix: (1 − ε)·I + ε/n,
        # doubly stochastic, a fixed point of Sinkhorn, so b_res = its log; write: 2σ(0) = 1
        read = torch.full((n,), eps / n)
        read[index % n] += 1 - eps
        if n == 1:
            read.fill_(1 - eps)
        self.bias_read = nn.Parameter(torch.logit(read.double()).float())  # b_pre
        self.bias_write = nn.Parameter(torch.zeros(n))  # b_post
        self.bias_mix = nn.Parameter(((1 - eps) * torch.eye(n, dtype=torch.float64) + eps / n).log().float())
        self.dynamic = cfg.hc_dynamic
        if self.dynamic:  # φ zero (as HC's dynamic weights), α = 0.01: the biases alone at init
            self.phi = nn.Parameter(torch.zeros(n * d, n * n + 2 * n))  # [φ_pre | φ_post | φ_res]
            self.scale = nn.Parameter(torch.full((3,), 0.01))  # α_pre, α_post, α_res
            self.norm_eps = cfg.norm_eps

    def weights(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """H_pre (…, n), H_res (…, n, n) [destination, source], H_post (…, n)."""
        n = self.n
        pre, post, res = (p.to(x.dtype) for p in (self.bias_read, self.bias_write, self.bias_mix))
        if self.dynamic:
            flat = F.rms_norm(x.flatten(-2), (n * x.shape[-1],), eps=self.norm_eps)  # x̃, (B, T, n·d)
            z = flat @ self.phi.to(x.dtype)
            a = self.scale.to(x.dtype)
            pre = a[0] * z[..., :n] + pre
            post = a[1] * z[..., n : 2 * n] + post
            res = a[2] * z[..., 2 * n :].unflatten(-1, (n, n)) + res
        return torch.sigmoid(pre), sinkhorn(res, self.iters), 2 * torch.sigmoid(post)

    def read(self, state: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        x = ops.at_least_fp32(state).transpose(-1, -2)  # (B, T, n, d): the paper's x_l
        pre, res, post = self.weights(x)
        if self.record:
            self._record(pre, res, (res.sum(-2) - 1).abs().amax(-1))  # column sums: the rows are exact
        return (pre[..., None, :] * x.transpose(-1, -2)).sum(-1), (res.transpose(-1, -2), post)


def make_rule(cfg: ModelConfig, index: int) -> nn.Module:
    """The residual rule of sublayer ``index`` (2·layer + 0 attention, 1 MLP)."""
    if cfg.residual == "hc":
        return HyperConnection(cfg, index)
    if cfg.residual == "mhc":
        return ManifoldHyperConnection(cfg, index)
    return ResidualRule(cfg)
