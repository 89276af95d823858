"""The mechanism probe: its numbers against hand computation, and the callback in a real
Lightning fit (CSV logger, probes.csv, additive without a gate, hc and mhc with their mixing)."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from deepdelta.analysis.mechanism import (
    COLUMNS,
    MIX_COLUMNS,
    beta_stats,
    metric_name,
    mixing_stats,
    probe_stats,
    read_probes,
    rows_to_metrics,
)
from deepdelta.callbacks import MechanismProbe, PeakMemory
from deepdelta.model import DeltaTransformer, ModelConfig
from deepdelta.model.residual import Gate, ResidualRule
from deepdelta.module import DeltaLM

TINY = dict(n_layer=2, n_head=2, head_dim=16, d_model=32, vocab_size=64, block_size=16)
OPTIM = dict(lr=1e-3, weight_decay=0.1, betas=[0.9, 0.95], warmup_steps=2, min_lr_ratio=0.1)


def model_with_gates(logit: float | None, **overrides) -> DeltaTransformer:
    """A tiny model (fp64) whose gates are forced: zero weights, bias ``logit`` (None: random gates)."""
    torch.manual_seed(0)
    model = DeltaTransformer(ModelConfig(**{**TINY, **overrides})).double()
    with torch.no_grad():
        for gate in (m for m in model.modules() if isinstance(m, Gate)):
            if logit is None:
                gate.out.weight.normal_(0, 1.0)
                gate.out.bias.normal_(0, 1.0)
            else:
                gate.out.weight.zero_()
                gate.out.bias.fill_(logit)
    return model


def probe(model: DeltaTransformer, seed: int = 0) -> dict:
    idx = torch.randint(0, TINY["vocab_size"], (3, TINY["block_size"]), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.probe(idx)


@pytest.mark.parametrize("beta_max", [2.0, 1.0])
@pytest.mark.parametrize(
    "logit, beta_over_half_max, regime",
    [(-40.0, 0.0, "skip"), (0.0, 1.0, "half"), (40.0, 2.0, "max")],
)
def test_regime_shares_with_forced_gates(beta_max, logit, beta_over_half_max, regime):
    model = model_with_gates(logit, beta_max=beta_max)
    rows, _ = probe_stats(probe(model), model.config.k_eps)
    beta = beta_over_half_max * beta_max / 2
    assert [r["sublayer"] for r in rows] == ["0.attn", "0.mlp", "1.attn", "1.mlp"]
    for r in rows:
        for col in ["beta_mean", "beta_q05", "beta_q25", "beta_q50", "beta_q75", "beta_q95"]:
            assert r[col] == pytest.approx(beta, abs=1e-6), col
        assert r["beta_std"] == pytest.approx(0.0, abs=1e-6)
        assert r["beta_skip"] == (1.0 if regime == "skip" else 0.0)
        # β = 1: the overwrite band; β = β_max/2 = 0.5 (project) is in none of the named regimes
        overwrite = regime == "half" and beta_max == 2.0 or regime == "max" and beta_max == 1.0
        assert r["beta_overwrite"] == (1.0 if overwrite else 0.0)
        assert r["beta_over_relaxed"] == (1.0 if regime == "max" and beta_max == 2.0 else 0.0)
        assert r["beta_near_reflection"] == (1.0 if regime == "max" and beta_max == 2.0 else 0.0)


def test_beta_stats_by_hand():
    beta = torch.tensor([[0.05, 0.5, 1.0], [1.05, 1.5, 1.95]])
    stats = dict(zip(COLUMNS, beta_stats(beta).tolist(), strict=False))
    assert stats["beta_mean"] == pytest.approx(6.05 / 6)
    assert stats["beta_std"] == pytest.approx(float(np.std(beta.numpy(), ddof=1)), rel=1e-6)
    sorted_b = [0.05, 0.5, 1.0, 1.05, 1.5, 1.95]
    for q, col in [(0.05, "beta_q05"), (0.25, "beta_q25"), (0.5, "beta_q50"), (0.75, "beta_q75"), (0.95, "beta_q95")]:
        assert stats[col] == pytest.approx(float(np.quantile(sorted_b, q)), rel=1e-6)
    assert stats["beta_skip"] == pytest.approx(1 / 6)
    assert stats["beta_overwrite"] == pytest.approx(2 / 6)  # 1.0 and 1.05
    assert stats["beta_over_relaxed"] == pytest.approx(2 / 6)  # 1.5 and 1.95
    assert stats["beta_near_reflection"] == pytest.approx(1 / 6)


def recompute(model: DeltaTransformer, idx: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """k̃, k̂, v and the state entering every rule, captured by hooks and redone by hand."""
    captured: dict[str, tuple] = {}
    handles = [
        rule.register_forward_hook(lambda mod, args, out, name=name: captured.__setitem__(name, args))
        for name, rule in model.rules().items()
    ]
    with torch.no_grad():
        model(idx)
    for h in handles:
        h.remove()
    out = {}
    cfg = model.config
    for name, (state, x_in, c, h) in captured.items():
        rule: ResidualRule = model.rules()[name]
        k_hat = h / torch.sqrt((h * h).sum(-1, keepdim=True) + cfg.k_eps**2)
        v = (c if cfg.value_source == "context" else x_in) @ rule.value.weight.T + rule.value.bias
        if cfg.value_squash == "sigmoid":
            v = cfg.value_scale * torch.sigmoid(v)
        out[name] = {"k": h, "k_hat": k_hat, "e_pre": (k_hat[..., :, None] * state).sum(-2) - v}
    return out


def test_k_and_discrepancy_against_recomputation():
    model = model_with_gates(None, dv=3)
    with torch.no_grad():  # layer 0's attention writes nothing: k̃ = 0, the ε guard's regime
        model.blocks[0].attn.proj.weight.zero_()
    idx = torch.randint(0, TINY["vocab_size"], (3, TINY["block_size"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        records = model.probe(idx)
    rows, mean_k = probe_stats(records, model.config.k_eps)
    ref = recompute(model, idx)
    eps = model.config.k_eps
    previous = None
    for r in rows:
        want = ref[r["sublayer"]]
        k_norm = want["k"].norm(dim=-1)
        assert r["k_norm"] == pytest.approx(k_norm.mean().item(), rel=1e-5, abs=1e-9)
        assert r["k_small"] == pytest.approx((k_norm < 10 * eps).double().mean().item())
        assert r["e_pre_norm"] == pytest.approx(want["e_pre"].norm(dim=-1).mean().item(), rel=1e-5)
        assert r["e_pre_channel_std"] == pytest.approx(want["e_pre"].std(-1, correction=0).mean().item(), rel=1e-5)
        mean = want["k_hat"].reshape(-1, TINY["d_model"]).mean(0)
        assert r["k_coherence"] == pytest.approx(mean.norm().item(), rel=1e-5, abs=1e-9)
        if previous is None:
            assert math.isnan(r["k_cos_prev"])
        elif r["sublayer"] != "0.mlp":  # after 0.attn's zero k̂ the cosine is 0 by convention
            cos = (want["k_hat"] * previous).sum(-1) / (want["k_hat"].norm(dim=-1) * previous.norm(dim=-1))
            assert r["k_cos_prev"] == pytest.approx(cos.mean().item(), rel=1e-5)
        assert math.isnan(r["k_drift"])  # first probe: nothing to drift from
        previous = want["k_hat"]
    zero = rows[0]
    assert zero["sublayer"] == "0.attn" and zero["k_norm"] == 0.0 and zero["k_small"] == 1.0
    assert zero["e_pre_norm"] == pytest.approx(ref["0.attn"]["e_pre"].norm(dim=-1).mean().item())  # = ‖v‖
    # drift: the same records again give cosine 1; a reversed mean k̂ gives −1
    again, _ = probe_stats(records, eps, mean_k)
    flipped, _ = probe_stats(records, eps, {n: -m for n, m in mean_k.items()})
    for a, f in zip(again[1:], flipped[1:], strict=True):
        assert a["k_drift"] == pytest.approx(1.0) and f["k_drift"] == pytest.approx(-1.0)


def test_dv1_has_no_channel_spread_and_metric_names():
    rows, _ = probe_stats(probe(model_with_gates(None)), 1e-5)
    assert all(math.isnan(r["e_pre_channel_std"]) for r in rows)
    metrics = rows_to_metrics(rows)
    assert "beta/1.mlp/mean" in metrics and "beta/0.attn/near_reflection" in metrics
    assert "k/0.mlp/cos_prev" in metrics and "k/0.attn/cos_prev" not in metrics  # NaN skipped
    assert "e_pre/1.attn/norm" in metrics and not any(k.endswith("channel_std") for k in metrics)
    assert metric_name("e_pre_channel_std", "3.mlp") == "e_pre/3.mlp/channel_std"


def test_additive_model_has_nothing_to_probe():
    model = DeltaTransformer(ModelConfig(**TINY, residual="additive"))
    rows, mean_k = probe_stats(probe(model), 1e-5)
    assert rows == [] and mean_k == {}


# -- the callback in a Lightning fit ---------------------------------------------------------
class Tokens(L.LightningDataModule):
    def __init__(self, rows: int = 4, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, TINY["vocab_size"], (rows, TINY["block_size"] + 1), generator=g)

    def _loader(self):
        return DataLoader(TensorDataset(self.x[:, :-1], self.x[:, 1:]), batch_size=len(self.x))

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()


def fit(
    tmp_path, residual: str, steps: int = 4, every: int = 2, logit: float | None = None, extra=(), **model
) -> MechanismProbe:
    torch.manual_seed(0)
    module = DeltaLM(
        model=dict(TINY, residual=residual, **model), optim=dict(OPTIM, lr=0.0 if logit is not None else 1e-3)
    )
    if logit is not None:
        with torch.no_grad():
            for gate in (m for m in module.model.modules() if isinstance(m, Gate)):
                gate.out.weight.zero_()
                gate.out.bias.fill_(logit)
    callback = MechanismProbe(every_n_steps=every)
    trainer = L.Trainer(
        max_steps=steps, logger=CSVLogger(tmp_path, name="csv", version=""), callbacks=[callback, *extra],
        default_root_dir=tmp_path, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=1, val_check_interval=steps, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        log_every_n_steps=1, accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.fit(module, datamodule=Tokens())
    return callback


def test_callback_writes_probes_and_metrics(tmp_path):
    callback = fit(tmp_path, "ddl", logit=40.0)  # lr 0: every probe sees β = 2·σ(40) ≈ 2
    probes = pd.read_csv(tmp_path / "probes.csv")
    assert sorted(probes["step"].unique()) == [0, 2, 4]
    assert len(probes) == 3 * 4 and list(probes.columns[:4]) == ["step", "sublayer", "layer", "part"]
    assert (probes["beta_near_reflection"] == 1.0).all() and (probes["beta_skip"] == 0.0).all()
    assert probes.loc[probes["step"] > 0, "k_drift"].to_numpy() == pytest.approx(1.0)  # lr 0: k does not move
    metrics = pd.read_csv(tmp_path / "csv" / "metrics.csv")
    for key in ["beta/0.attn/mean", "beta/1.mlp/q95", "beta/1.mlp/over_relaxed", "k/0.mlp/norm", "e_pre/1.attn/norm"]:
        assert sorted(metrics.loc[metrics[key].notna(), "step"]) == [0, 2, 4], key
    assert metrics["probe/seconds"].dropna().is_monotonic_increasing
    assert callback.seconds > 0


def test_callback_probe_batch_matches_direct_computation(tmp_path):
    callback = fit(tmp_path, "ddl", steps=2, every=2, logit=0.0)
    torch.manual_seed(0)  # the same init as `fit`, whose lr 0 kept it
    module = DeltaLM(model=dict(TINY, residual="ddl"), optim=OPTIM)
    with torch.no_grad():
        for gate in (m for m in module.model.modules() if isinstance(m, Gate)):
            gate.out.weight.zero_()
            gate.out.bias.zero_()
        rows, _ = probe_stats(module.model.probe(Tokens().x[:, :-1]), 1e-5)
    recorded = [r for r in callback.rows if r["step"] == 0]
    for got, want in zip(recorded, rows, strict=True):
        for col in ["beta_mean", "beta_overwrite", "k_norm", "e_pre_norm", "k_coherence"]:
            assert got[col] == pytest.approx(want[col], rel=1e-5), col


def test_additive_run_reports_no_gate_without_failing(tmp_path):
    callback = fit(tmp_path, "additive", extra=[PeakMemory()])
    assert callback.rows == [] and not (tmp_path / "probes.csv").exists()
    metrics = pd.read_csv(tmp_path / "csv" / "metrics.csv")
    assert "train/loss" in metrics and not any(c.startswith(("beta/", "k/", "e_pre/")) for c in metrics)
    assert (metrics["train/peak_mem_gb"].dropna() > 0.01).all()  # the process's peak RSS on CPU


def test_every_n_steps_is_validated():
    with pytest.raises(ValueError, match="every_n_steps: got 0"):
        MechanismProbe(every_n_steps=0)


def test_a_resumed_run_probing_a_step_twice_keeps_the_last(tmp_path):
    path = tmp_path / "probes.csv"
    rows = [{"step": s, "sublayer": "0.attn", "beta_mean": v} for s, v in [(0, 1.0), (25, 0.9), (25, 0.8), (50, 0.7)]]
    pd.DataFrame(rows).to_csv(path, index=False)
    assert list(read_probes(path)["beta_mean"]) == [1.0, 0.8, 0.7]


# -- hc / mhc: the mixing probe ----------------------------------------------------------------
def test_mixing_stats_by_hand_for_static_hc():
    torch.manual_seed(0)
    model = DeltaTransformer(ModelConfig(**TINY, residual="hc", dv=3, hc_dynamic=False))
    mix = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.25, 0.0, 0.75]])
    read = torch.tensor([0.5, -0.5, 0.0])
    with torch.no_grad():
        model.blocks[1].rule_mlp.static_mix.copy_(mix)
        model.blocks[1].rule_mlp.static_read.copy_(read)
    rows = mixing_stats(model.probe_mixing(torch.randint(0, TINY["vocab_size"], (2, 8))))
    assert [r["sublayer"] for r in rows] == ["0.attn", "0.mlp", "1.attn", "1.mlp"]
    for r in rows[:3]:  # the paper's init: identity mixing, one stream read
        assert r["mix_dist"] == 0.0 and r["mix_read_entropy"] == pytest.approx(0.0, abs=1e-6)
    last = rows[3]
    assert last["mix_dist"] == pytest.approx((mix - torch.eye(3)).norm().item())
    assert last["mix_dist_std"] == 0.0  # static: the same matrix for every token
    assert last["mix_read_entropy"] == pytest.approx(math.log(2))  # |read| spread over two streams equally
    assert all(math.isnan(r["mix_sinkhorn_residual"]) for r in rows)  # hc has no Sinkhorn
    metrics = rows_to_metrics(rows)
    assert metrics["mix/1.mlp/dist"] == pytest.approx(last["mix_dist"]) and "mix/1.mlp/read_entropy" in metrics
    assert not any(k.endswith("sinkhorn_residual") for k in metrics)  # NaN skipped
    assert metric_name("mix_sinkhorn_residual", "0.attn") == "mix/0.attn/sinkhorn_residual"


def test_mixing_stats_of_mhc_at_init():
    model = DeltaTransformer(ModelConfig(**TINY, residual="mhc", dv=4))
    rows = mixing_stats(model.probe_mixing(torch.randint(0, TINY["vocab_size"], (2, 8))))
    eps, n = model.config.mhc_init_eps, 4
    want_mix = ((1 - eps) * torch.eye(n) + eps / n - torch.eye(n)).norm().item()
    read = torch.full((n,), eps / n) + (1 - eps) * torch.eye(n)[0]
    want_entropy = -(read * read.log()).sum().item()
    for r in rows:
        assert r["mix_dist"] == pytest.approx(want_mix, rel=1e-5)
        assert r["mix_dist_std"] == pytest.approx(0.0, abs=1e-6)  # φ = 0 at init: every token alike
        assert r["mix_read_entropy"] == pytest.approx(want_entropy, rel=1e-5)
        assert 0.0 <= r["mix_sinkhorn_residual"] < 1e-5  # the init is a fixed point of Sinkhorn
    assert mixing_stats(DeltaTransformer(ModelConfig(**TINY)).probe_mixing(torch.zeros(1, 4, dtype=torch.long))) == []


@pytest.mark.parametrize("residual", ["hc", "mhc"])
def test_callback_probes_the_mixing_of_hyper_connections(tmp_path, residual):
    callback = fit(tmp_path, residual, dv=2)
    probes = pd.read_csv(tmp_path / "probes.csv")
    assert list(probes.columns) == ["step", "sublayer", "layer", "part", *MIX_COLUMNS]
    assert sorted(probes["step"].unique()) == [0, 2, 4] and len(probes) == 3 * 4  # every probe, not only the first
    assert probes["mix_sinkhorn_residual"].notna().all() == (residual == "mhc")
    moved = probes.pivot_table(index="sublayer", columns="step", values="mix_dist")
    assert (moved[4] != moved[0]).any()  # training moves the mixing
    metrics = pd.read_csv(tmp_path / "csv" / "metrics.csv")
    for key in ["mix/0.attn/dist", "mix/1.mlp/dist_std", "mix/0.mlp/read_entropy"]:
        assert sorted(metrics.loc[metrics[key].notna(), "step"]) == [0, 2, 4], key
    assert ("mix/1.attn/sinkhorn_residual" in metrics) == (residual == "mhc")
    assert not any(c.startswith(("beta/", "k/", "e_pre/")) for c in metrics)
    assert len(callback.rows) == 12 and callback.seconds > 0
