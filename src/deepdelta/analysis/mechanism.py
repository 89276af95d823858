"""What the gate, the direction and the discrepancy do: statistics of one `model.probe()`.

`probe_stats` turns the per-sublayer records of `DeltaTransformer.probe` (β, ‖k̃‖, k̂,
e_pre) into one row of numbers per sublayer; `mixing_stats` does the same for the
Hyper-Connection rules (hc, mhc) from `DeltaTransformer.probe_mixing` (distance of the
mixing matrix from identity, entropy of the read weights, Sinkhorn residual). It is pure
tensor work (no Lightning, no logging), so the callback, the tests and a notebook all
compute the same thing.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

# The gate's regimes (spec §6): identity near 0, projection near 1, reflection near 2.
SKIP_BELOW = 0.1
OVERWRITE_BAND = (0.9, 1.1)
OVER_RELAXED_ABOVE = 1.1
NEAR_REFLECTION_ABOVE = 1.9
SMALL_K_FACTOR = 10.0  # ‖k̃‖ < 10·ε_k: the ε guard, not k̃, sets the direction's length
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)

# Columns of one row, in order; a metric is "{family}/{sublayer}/{stat}" for column "{family}_{stat}".
BETA_STATS = ["mean", "std", "q05", "q25", "q50", "q75", "q95", "skip", "overwrite", "over_relaxed", "near_reflection"]
COLUMNS = (
    [f"beta_{s}" for s in BETA_STATS]
    + ["k_norm", "k_small", "k_coherence", "k_cos_prev", "k_drift"]
    + ["e_pre_norm", "e_pre_channel_std"]
)
# hc/mhc runs (docs/hyper_connections.md), per sublayer over the probe's tokens: mean and std of
# ‖A_r − I‖_F (mhc: ‖H_res − I‖_F), mean entropy of the read weights (nats; 0 reads one stream,
# log n all alike) and, for mhc, the largest |column sum − 1| left by Sinkhorn (NaN for hc)
MIX_COLUMNS = ["mix_dist", "mix_dist_std", "mix_read_entropy", "mix_sinkhorn_residual"]
FAMILIES = ("beta", "k", "e_pre", "mix")


def metric_name(column: str, sublayer: str) -> str:
    """``beta_q05`` of ``1.mlp`` → ``beta/1.mlp/q05`` (the W&B / CSV metric key)."""
    family = next(f for f in sorted(FAMILIES, key=len, reverse=True) if column.startswith(f + "_"))
    return f"{family}/{sublayer}/{column[len(family) + 1 :]}"


def split_sublayer(name: str) -> tuple[int, str]:
    """``"3.attn"`` → ``(3, "attn")``."""
    layer, part = name.split(".", 1)
    return int(layer), part


@torch.no_grad()
def beta_stats(beta: Tensor) -> Tensor:
    """The ``beta_*`` columns of one sublayer, from its per-token gate values (any shape)."""
    b = beta.detach().float().flatten()
    q = torch.quantile(b, torch.tensor(QUANTILES, device=b.device))
    lo, hi = OVERWRITE_BAND
    shares = torch.stack(
        [
            (b < SKIP_BELOW).float().mean(),
            ((b >= lo) & (b <= hi)).float().mean(),
            (b > OVER_RELAXED_ABOVE).float().mean(),
            (b > NEAR_REFLECTION_ABOVE).float().mean(),
        ]
    )
    std = b.std() if b.numel() > 1 else b.new_zeros(())
    return torch.cat([torch.stack([b.mean(), std]), q, shares])


@torch.no_grad()
def probe_stats(
    records: dict[str, dict[str, Tensor]], k_eps: float, previous_mean_k: dict[str, Tensor] | None = None
) -> tuple[list[dict[str, float | int | str]], dict[str, Tensor]]:
    """One row per sublayer (``sublayer``, ``layer``, ``part`` and `COLUMNS`) and each
    sublayer's mean k̂ (to pass back as ``previous_mean_k`` at the next probe).

    ``k_cos_prev`` is the token-wise cosine of k̂ with the previous sublayer's (NaN for the
    first); ``k_drift`` the cosine of this sublayer's mean k̂ with its value at the previous
    probe (NaN at the first); ``k_coherence`` the length of the mean k̂ (1: every token
    writes along one direction); ``e_pre_channel_std`` the spread of e_pre across the dv
    value channels (NaN for dv = 1). Empty for a model without gates (additive).
    """
    previous_mean_k = previous_mean_k or {}
    names = list(records)
    vectors, mean_k = [], {}
    prev_k_hat: Tensor | None = None
    nan = torch.tensor(math.nan)
    for name in names:
        rec = records[name]
        k_hat = rec["k_hat"].float()
        k_norm = rec["k_norm"].float()
        e_pre = rec["e_pre"].float()
        nan = nan.to(k_hat.device)
        m = k_hat.flatten(0, -2).mean(0)
        mean_k[name] = m
        cos_prev = (
            F.cosine_similarity(k_hat, prev_k_hat, dim=-1).mean()
            if prev_k_hat is not None and prev_k_hat.shape == k_hat.shape
            else nan
        )
        drift = F.cosine_similarity(m, previous_mean_k[name].to(m), dim=0) if name in previous_mean_k else nan
        channel_std = e_pre.std(-1, correction=0).mean() if e_pre.shape[-1] > 1 else nan
        rest = torch.stack(
            [
                k_norm.mean(),
                (k_norm < SMALL_K_FACTOR * k_eps).float().mean(),
                m.norm(),
                cos_prev,
                drift,
                e_pre.norm(dim=-1).mean(),
                channel_std,
            ]
        )
        vectors.append(torch.cat([beta_stats(rec["beta"]), rest]))
        prev_k_hat = k_hat
    if not names:
        return [], {}
    values = torch.stack(vectors).cpu().tolist()  # one device sync for the whole probe
    rows: list[dict[str, float | int | str]] = []
    for name, vals in zip(names, values, strict=True):
        layer, part = split_sublayer(name)
        rows.append({"sublayer": name, "layer": layer, "part": part, **dict(zip(COLUMNS, vals, strict=True))})
    return rows, {n: m.detach() for n, m in mean_k.items()}


@torch.no_grad()
def mixing_stats(records: dict[str, dict[str, Tensor]]) -> list[dict[str, float | int | str]]:
    """One row per sublayer (``sublayer``, ``layer``, ``part`` and `MIX_COLUMNS`) from the
    records of `DeltaTransformer.probe_mixing`. Static connections give one value per
    sublayer (their std is 0). Empty for a model without Hyper-Connections."""
    names = list(records)
    if not names:
        return []
    vectors = []
    for name in names:
        rec = records[name]
        dist = rec["mix_dist"].float().flatten()
        entropy = rec["read_entropy"].float().flatten()
        nan = torch.tensor(math.nan, device=dist.device)
        residual = rec["sinkhorn_residual"].float().amax() if "sinkhorn_residual" in rec else nan
        std = dist.std() if dist.numel() > 1 else dist.new_zeros(())
        vectors.append(torch.stack([dist.mean(), std, entropy.mean(), residual]))
    values = torch.stack(vectors).cpu().tolist()  # one device sync for the whole probe
    rows: list[dict[str, float | int | str]] = []
    for name, vals in zip(names, values, strict=True):
        layer, part = split_sublayer(name)
        rows.append({"sublayer": name, "layer": layer, "part": part, **dict(zip(MIX_COLUMNS, vals, strict=True))})
    return rows


def rows_to_metrics(rows: list[dict[str, float | int | str]]) -> dict[str, float]:
    """Flatten probe rows (`COLUMNS` or `MIX_COLUMNS`) into ``{family}/{sublayer}/{stat}``
    metrics, skipping NaNs."""
    out: dict[str, float] = {}
    for row in rows:
        for col in (c for c in (*COLUMNS, *MIX_COLUMNS) if c in row):
            value = float(row[col])
            if not math.isnan(value):
                out[metric_name(col, str(row["sublayer"]))] = value
    return out


def read_probes(path: Path) -> pd.DataFrame:
    """A probes.csv; where a resumed run probed a step twice, its last probe wins."""
    frame = pd.read_csv(path)
    return frame.drop_duplicates(["step", "sublayer"], keep="last").reset_index(drop=True)
