"""Parameter and FLOPs counts, analytic from the config (no model needs to be built).

FLOPs per trained token = 3 × forward (backward ≈ 2 × forward):
- matmuls: 2 per weight of every linear map, the tied LM head included (the "6N" term);
- attention: 2·2·T·d per layer forward for QKᵀ and AV, counted for the full T×T square
  as nanoGPT/PaLM do (so MFU figures compare with theirs), i.e. 12·L·T·d per token;
- state traffic: the element-wise work on the (d, dv) state — expansion, compressors,
  the DDL read/compare/write and additive adds — small, but it grows with dv.
"""

from __future__ import annotations

from torch import nn

from deepdelta.model.config import HYPER, ModelConfig


def matmul_weights(cfg: ModelConfig) -> int:
    """Weights used in matrix products per token, LM head included."""
    d, L = cfg.d_model, cfg.n_layer
    per_layer = 4 * d * d + 3 * d * cfg.mlp_hidden
    if cfg.residual in HYPER:  # the dynamic weights: per stream d×(n+2) (hc), n·d×(n²+2n) (mhc)
        n = cfg.dv
        per_layer += 2 * (0 if not cfg.hc_dynamic else n * d * (n + 2) if cfg.residual == "hc" else n * d * n * (n + 2))
    elif cfg.residual != "additive":
        branch = d * cfg.dv + (d * d if cfg.map == "v" else 0)
        branch += d * cfg.beta_hidden + cfg.beta_hidden if cfg.beta_hidden else d
        per_layer += 2 * branch
    return L * per_layer + cfg.vocab_size * d


def state_flops(cfg: ModelConfig) -> int:
    """Forward element-wise FLOPs per token on the residual state."""
    d, dv, K = cfg.d_model, cfg.dv, cfg.conv_kernel
    compress = 0 if dv == 1 else (2 * d * dv if cfg.compressor == "cc" else 2 * K * d * dv + 2 * d * dv)
    hyper = 2 * d * dv + 2 * d * dv * dv + 2 * d * dv  # read, mix, write
    rule = {"additive": d * dv, "ddl": 3 * d + 6 * d * dv, "write_only": 3 * d + 3 * d * dv, "hc": hyper, "mhc": hyper}
    rule = rule[cfg.residual]
    if cfg.residual in HYPER:  # no block compressor; the readout sums the streams (d·dv)
        return (2 * K * d * dv if dv > 1 and cfg.expand == "conv" else 0) + 2 * cfg.n_layer * rule + d * dv
    expand = 2 * K * d * dv if dv > 1 and cfg.expand == "conv" else 0
    return expand + 2 * cfg.n_layer * (compress + rule) + compress


def flops_breakdown(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, int]:
    """Training FLOPs per token by part, at sequence length ``seq_len`` (default block_size)."""
    T = seq_len or cfg.block_size
    parts = {
        "matmul": 6 * matmul_weights(cfg),
        "attention": 12 * cfg.n_layer * T * cfg.d_model,
        "state": 3 * state_flops(cfg),
    }
    parts["total"] = sum(parts.values())
    return parts


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    return flops_breakdown(cfg, seq_len)["total"]


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total and non-embedding parameters (the tied head is counted once, as embedding)."""
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    return {"total": total, "non_embedding": total - embedding}
