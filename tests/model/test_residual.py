"""One sublayer's residual rule (spec §3, §5) against the formulas, written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from deepdelta.model import DeltaTransformer, ops
from deepdelta.model.residual import Gate, ResidualRule

F64 = torch.float64
B, T, D = 2, 5, 32


def unit(k, eps):
    return k / torch.sqrt((k * k).sum(-1, keepdim=True) + eps**2)


def rule_inputs(dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = torch.randn(B, T, D, dv, generator=g, dtype=F64)
    x_in = torch.randn(B, T, D, generator=g, dtype=F64) * 3  # un-normalised, ≠ c
    c = torch.randn(B, T, D, generator=g, dtype=F64)
    h = torch.randn(B, T, D, generator=g, dtype=F64)
    return state, x_in, c, h


def expected_update(rule, cfg, state, x_in, c, h):
    """k̃, v, β and the new state from spec §3 and §5."""
    Wv, bv = rule.value.weight, rule.value.bias
    if cfg.map == "k":
        k = h
        v = (c if cfg.value_source == "context" else x_in) @ Wv.T + bv
    else:
        k = c @ rule.key.weight.T
        v = h @ Wv.T + bv
    if cfg.value_squash == "sigmoid":
        v = cfg.value_scale * torch.sigmoid(v)
    gate = rule.gate
    if cfg.beta_hidden:
        z = torch.tanh(c @ gate.hidden.weight.T + gate.hidden.bias)
    else:
        z = c
    beta = cfg.beta_max * torch.sigmoid(z @ gate.out.weight[0] + gate.out.bias[0])
    kh = unit(k, cfg.k_eps)
    read = (kh[..., :, None] * state).sum(-2)
    if cfg.residual == "ddl":
        new = state + beta[..., None, None] * kh[..., :, None] * (v - read)[..., None, :]
    else:
        new = state + beta[..., None, None] * kh[..., :, None] * v[..., None, :]
    return k, v, beta, kh, read - v, new


VARIANTS = [
    dict(map="k", value_source="context", value_squash="none"),
    dict(map="k", value_source="state", value_squash="none"),
    dict(map="k", value_source="context", value_squash="sigmoid", value_scale=3.0),
    dict(map="k", value_source="state", value_squash="sigmoid", value_scale=4.0),
    dict(map="v", value_squash="none"),
    dict(map="v", value_squash="sigmoid", value_scale=2.5),
]


@pytest.mark.parametrize("residual", ["ddl", "write_only"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()))
@pytest.mark.parametrize("beta_hidden", [0, 8])
@pytest.mark.parametrize("dv", [1, 3])
def test_rule_matches_spec(tiny, noisy, residual, variant, beta_hidden, dv):
    cfg = tiny(residual=residual, dv=dv, beta_hidden=beta_hidden, beta_max=2.0, **variant)
    torch.manual_seed(0)
    rule = noisy(ResidualRule(cfg).double(), std=0.3)
    state, x_in, c, h = rule_inputs(dv)
    rule.record = True
    out = rule(state, x_in, c, h)[0]
    k, v, beta, kh, e_pre, new = expected_update(rule, cfg, state, x_in, c, h)
    with torch.no_grad():
        assert_close(out, new, atol=1e-12, rtol=1e-12)
        assert beta.std() > 0.1  # the gate really varies across tokens here
        last = rule.last
        assert_close(last["beta"].double(), beta, atol=1e-6, rtol=0)  # recorded in fp32
        assert_close(last["k_norm"].double(), k.norm(dim=-1), atol=1e-5, rtol=1e-6)
        assert_close(last["k_hat"].double(), kh, atol=1e-6, rtol=0)
        assert_close(last["e_pre"].double(), e_pre, atol=1e-5, rtol=1e-6)
    if variant["value_squash"] == "sigmoid":
        assert 0 < v.min() and v.max() < variant["value_scale"]


def test_value_source_and_squash_change_v(tiny, noisy):
    """Same weights, same inputs: each value option changes the update as specified."""
    state, x_in, c, h = rule_inputs(2)
    outs = {}
    for source in ("context", "state"):
        for squash in ("none", "sigmoid"):
            cfg = tiny(dv=2, value_source=source, value_squash=squash)
            torch.manual_seed(0)
            rule = noisy(ResidualRule(cfg).double(), std=0.3)
            outs[source, squash] = rule(state, x_in, c, h)[0]
    keys = list(outs)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            assert not torch.allclose(outs[a], outs[b]), (a, b)


def test_additive_adds_h_to_every_channel(tiny):
    rule = ResidualRule(tiny(residual="additive", dv=3))
    assert list(rule.parameters()) == []
    state, x_in, c, h = rule_inputs(3)
    rule.record = True
    assert torch.equal(rule(state, x_in, c, h)[0], state + h[..., None])
    assert rule.last == {}


@pytest.mark.parametrize("beta_max, beta_init", [(2.0, 1.0), (1.0, 0.5), (2.0, 0.25), (1.0, 0.9)])
@pytest.mark.parametrize("beta_hidden", [0, 8])
def test_gate_starts_at_beta_init(tiny, beta_max, beta_init, beta_hidden):
    """gate_init=zero (impl=paper): β = beta_init for every token."""
    cfg = tiny(beta_max=beta_max, beta_init=beta_init, beta_hidden=beta_hidden, gate_init="zero")
    model = DeltaTransformer(cfg)
    gate = model.blocks[0].rule_attn.gate
    assert math.isclose(gate.bias_init, math.log(beta_init / (beta_max - beta_init)))
    c = torch.randn(B, T, D)
    beta = ops.gate(gate(c), beta_max)
    assert_close(beta, torch.full((B, T), beta_init), atol=1e-6, rtol=0)
    if beta_hidden:  # the hidden layer is live (random), only the output layer starts at zero
        assert gate.hidden.weight.abs().sum() > 0


def test_reference_gate_init_varies_around_beta_init(tiny):
    """gate_init=normal (impl=reference): W_β ~ N(0, 0.5/√d) and b_β = logit(β0/β_max), so β
    varies by token around β0 (the median logit is the bias)."""
    torch.manual_seed(0)
    cfg = tiny(d_model=512, n_head=4, head_dim=128, n_layer=1)
    gate = DeltaTransformer(cfg).blocks[0].rule_attn.gate
    assert cfg.gate_init == "normal" and gate.out.bias.item() == 0.0  # logit(1/2)
    assert math.isclose(gate.out.weight.std().item(), 0.5 / math.sqrt(512), rel_tol=0.1)
    beta = ops.gate(gate(torch.randn(64, 16, 512)), cfg.beta_max)
    assert beta.std() > 0.1 and abs(beta.median().item() - 1.0) < 0.05


def test_reference_value_bias_is_pytorchs_default_uniform(tiny):
    torch.manual_seed(0)
    bias = DeltaTransformer(tiny(d_model=64, n_head=2, head_dim=32, dv=4)).blocks[0].rule_mlp.value.bias
    bound = 1 / math.sqrt(64)
    assert bias.abs().max() <= bound and bias.abs().max() > 0
    paper = DeltaTransformer(tiny(d_model=64, n_head=2, head_dim=32, dv=4, impl="paper"))
    assert torch.equal(paper.blocks[0].rule_mlp.value.bias, torch.zeros(4))


@pytest.mark.parametrize("dtype", [torch.bfloat16, F64])
def test_gate_logits_in_at_least_fp32_for_any_parameter_dtype(tiny, noisy, dtype):
    for beta_hidden in (0, 8):
        gate = noisy(Gate(tiny(beta_hidden=beta_hidden)), std=0.3).to(dtype)
        c = torch.randn(B, T, D).to(dtype)
        logits = gate(c)
        assert logits.dtype == (F64 if dtype == F64 else torch.float32)
        assert logits.shape == (B, T)
        w = gate.out.weight.double()
        z = c.double()
        if beta_hidden:
            z = torch.tanh(z @ gate.hidden.weight.double().T + gate.hidden.bias.double())
        expected = z @ w[0] + gate.out.bias.double()[0]
        tol = 1e-12 if dtype == F64 else 1e-4
        assert_close(logits.double(), expected, atol=tol, rtol=tol)


def test_gate_stays_fp32_under_autocast(tiny, noisy):
    gate = noisy(Gate(tiny()), std=0.3)
    c = torch.randn(B, T, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = gate(c)
    assert logits.dtype == torch.float32
    assert_close(logits, gate(c), atol=0, rtol=0)
