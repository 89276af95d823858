"""The backbone: pre-norm RMSNorm, RoPE attention with QK-norm, SwiGLU, tied embeddings.

Each block compresses the state X (B, T, d, dv) to x_in, runs a sublayer on
c = RMSNorm(x_in), and lets its residual rule rewrite X; attention then MLP, one
compressor per block shared by both. A final readout compressor feeds the last norm and
the tied LM head. With residual=additive and dv=1 this is a standard pre-norm Transformer.
With residual=hc or mhc (Hyper-Connections, mHC) the state holds dv = n streams and there is
no block compressor: each sublayer's own rule reads its input from the streams (the width
connection) and writes them; the readout sums the streams (docs/hyper_connections.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepdelta.model import ops
from deepdelta.model.config import HYPER, ModelConfig
from deepdelta.model.loss import linear_cross_entropy
from deepdelta.model.residual import Gate, HyperConnection, ResidualRule, make_rule
from deepdelta.model.state import Compress, Expand


def rope_tables(cfg: ModelConfig) -> tuple[Tensor, Tensor]:
    """cos and sin (block_size, head_dim/2) in fp32, written as the reference writes them
    (its rounding of inv_freq and of the angles, so that fp64 models agree to ~1e-15)."""
    inv_freq = 1.0 / (float(cfg.rope_base) ** (torch.arange(0, cfg.head_dim, 2).float() / float(cfg.head_dim)))
    angles = torch.outer(torch.arange(cfg.block_size, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x1, x2) = halves of the head dimension; ``x`` (B, T, H, Dh)."""
    x1, x2 = ops.at_least_fp32(x).chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        self.norm_first = cfg.qk_norm == "before_rope"

    def heads(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (B, T, H, Dh) with RoPE and QK-norm applied: what attention reads (and the
        KV cache of model/decode.py keeps)."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)
        if self.norm_first:
            q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        else:  # the reference: rotate, then normalise (the norm gains then act on rotated pairs)
            q, k = self.q_norm(apply_rope(q, cos, sin)), self.k_norm(apply_rope(k, cos, sin))
        return q, k, v

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.heads(x, cos, sin)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.mlp_hidden, bias=False)
        self.proj = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.hyper = cfg.residual in HYPER
        if not self.hyper:
            self.compress = Compress(cfg)
        self.norm_attn = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.rule_attn = make_rule(cfg, 2 * layer)
        self.norm_mlp = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.rule_mlp = make_rule(cfg, 2 * layer + 1)

    def forward(self, state: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        if self.hyper:  # each sublayer reads its input from the streams, then writes them
            x_in, mixing = self.rule_attn.read(state)
            state = self.rule_attn.write(state, mixing, self.attn(self.norm_attn(x_in), cos, sin))
            x_in, mixing = self.rule_mlp.read(state)
            return self.rule_mlp.write(state, mixing, self.mlp(self.norm_mlp(x_in)))
        x_in = self.compress(state)
        c = self.norm_attn(x_in)
        # the attention update also returns the MLP's input (fused with the write for `cc`),
        # and the MLP update may recompute the mid-block state from its edit in the backward
        state, x_in, edit = self.rule_attn(state, x_in, c, self.attn(c, cos, sin), compress=self.compress)
        c = self.norm_mlp(x_in)
        return self.rule_mlp(state, x_in, c, self.mlp(c), prev=edit)[0]


class DeltaTransformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.expand = Expand(cfg)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.readout = Compress(cfg)
        self.norm_out = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The paper's init: embeddings N(0, 0.02), matrices N(0, 0.5/√d), output
        projections N(0, 0.5/√d/√L); gate biases logit(β0/β_max). By ``impl`` (config):
        gate weights zero (β = β0 for every token) or N(0, 0.5/√d); value biases zero or
        U(±1/√d); compressor kernels identity/average or N(0, 0.5/√d) (read vectors 1/dv,
        the conv expansion identity either way)."""
        cfg = self.config
        std = 0.5 / math.sqrt(cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(cfg.n_layer) if name.endswith(("attn.proj", "mlp.proj")) else 1.0
                nn.init.normal_(module.weight, std=std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, ResidualRule) and module.kind != "additive" and cfg.value_bias_init == "uniform":
                bound = 1 / math.sqrt(cfg.d_model)  # PyTorch's nn.Linear default, which the reference keeps
                nn.init.uniform_(module.value.bias, -bound, bound)
            elif isinstance(module, Compress) and module.kind in ("cc", "tc") and cfg.compressor_init == "normal":
                nn.init.normal_(module.mix if module.kind == "cc" and not module.toeplitz else module.weight, std=std)
            elif isinstance(module, Gate):
                if cfg.gate_init == "zero":
                    nn.init.zeros_(module.out.weight)
                nn.init.constant_(module.out.bias, module.bias_init)

    def final_state(self, idx: Tensor) -> Tensor:
        """The residual state X (B, T, d, dv) after the last block."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.config.block_size}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        state = self.expand(self.embed(idx))
        if self.config.state_dtype == "bfloat16":  # stored in bf16; every update computes in fp32
            state = state.to(torch.bfloat16)
        for block in self.blocks:
            state = block(state, cos, sin)
        return state

    def hidden(self, idx: Tensor) -> Tensor:
        """Final normalised hidden states (B, T, d), the input of the tied LM head."""
        return self.norm_out(self.readout(self.final_state(idx)))

    def forward(self, idx: Tensor) -> Tensor:
        """Logits (B, T, vocab)."""
        return F.linear(self.hidden(idx), self.embed.weight)

    def loss(self, idx: Tensor, targets: Tensor, chunk: int = 8192) -> Tensor:
        """Mean next-token cross-entropy without materialising fp32 logits of the batch."""
        return linear_cross_entropy(self.hidden(idx), self.embed.weight, targets, chunk=chunk)

    # -- probes -------------------------------------------------------------------------
    def rules(self) -> dict[str, ResidualRule | HyperConnection]:
        """Residual rules by name, ``"{layer}.attn"`` and ``"{layer}.mlp"``."""
        out = {}
        for i, block in enumerate(self.blocks):
            out[f"{i}.attn"], out[f"{i}.mlp"] = block.rule_attn, block.rule_mlp
        return out

    def set_recording(self, on: bool) -> None:
        for rule in self.rules().values():
            rule.record = on
            if not on:
                rule.last = {}

    @torch.no_grad()
    def probe(self, idx: Tensor) -> dict[str, dict[str, Tensor]]:
        """One forward pass with recording on: per sublayer β (B,T), ‖k̃‖ (B,T), k̂ (B,T,d)
        and e_pre (B,T,dv). Empty for `additive`, which has no gate, and for hc/mhc (see
        ``probe_mixing``)."""
        return {name: rec for name, rec in self._recorded(idx).items() if "beta" in rec}

    @torch.no_grad()
    def probe_mixing(self, idx: Tensor) -> dict[str, dict[str, Tensor]]:
        """hc/mhc: one forward pass with recording on; per sublayer (B,T) ``mix_dist``
        ‖A_r − I‖_F (mhc: H_res), ``read_entropy`` of the read weights (0: one stream,
        log n: all alike) and, for mhc, ``sinkhorn_residual`` max |column sum − 1|.
        Empty for the other residuals."""
        return {name: rec for name, rec in self._recorded(idx).items() if "mix_dist" in rec}

    def _recorded(self, idx: Tensor) -> dict[str, dict[str, Tensor]]:
        self.set_recording(True)
        try:
            self.hidden(idx)
            return {name: dict(rule.last) for name, rule in self.rules().items() if rule.last}
        finally:
            self.set_recording(False)

    # -- optimisation helpers -------------------------------------------------------------
    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay matrices of linear maps and the embedding; no decay on
        norms, biases (gates' included), compressors and token-conv kernels."""
        decay = {id(m.weight) for m in self.modules() if isinstance(m, (nn.Linear, nn.Embedding))}
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0},
        ]
