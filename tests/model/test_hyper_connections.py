"""residual=hc and residual=mhc (docs/hyper_connections.md): the pre-norm baseline at init, a
float64 cross-check against the `hyper-connections` package (PyPI, 0.4.11), Sinkhorn's
doubly-stochastic output, non-negative mHC weights and the grid (dv 1, 2, 4) with decoding."""

from __future__ import annotations

import math

import pytest
import torch
from tests.model.conftest import perturb, tiny_config

from deepdelta.model import decode
from deepdelta.model.residual import HyperConnection, ManifoldHyperConnection, sinkhorn
from deepdelta.model.transformer import DeltaTransformer

HYPER = ("hc", "mhc")


def _model(**overrides) -> DeltaTransformer:
    torch.manual_seed(0)
    return DeltaTransformer(tiny_config(**overrides)).double()


@pytest.mark.parametrize("residual", HYPER)
@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("dv", [1, 2, 4])
def test_init_is_the_prenorm_baseline(residual, dynamic, dv):
    """Equal streams, reads that sum to one, row-stochastic mixing and write weights one keep
    every stream equal to the baseline's residual; the readout's sum is n times it, which the
    final RMSNorm removes (up to its eps, made negligible here)."""
    base = _model(residual="additive", dv=1, norm_eps=1e-30)
    model = _model(residual=residual, dv=dv, hc_dynamic=dynamic, norm_eps=1e-30)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(".rule_" in k or k.startswith("expand.") for k in missing)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    # mhc at n=1: σ cannot read 1, so x_in = 0.9·x, which the sublayer's RMSNorm removes
    torch.testing.assert_close(model(idx), base(idx), rtol=1e-10, atol=1e-10)


# -- the cross-check against the package ---------------------------------------------------
def _branch(d: int):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    return lambda x: torch.tanh(x @ w)


def _streams(B: int, T: int, d: int, n: int) -> torch.Tensor:
    return torch.randn(B, T, d, n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


def _package_layout(state: torch.Tensor) -> torch.Tensor:  # (B,T,d,n) → (B·n, T, d), streams inner
    B, T, d, n = state.shape
    return state.permute(0, 3, 1, 2).reshape(B * n, T, d)


def _compare(ours: HyperConnection, theirs, pairs, n: int) -> tuple[float, float]:
    """One layer both ways on the same streams; returns the max relative errors of the
    outputs (branch input, new streams) and of the gradients (streams, mapped weights)."""
    d = 32
    state = _streams(2, 5, d, n)
    f = _branch(d)
    s1, s2 = state.clone().requires_grad_(), _package_layout(state).requires_grad_()
    x_in, mixing = ours.read(s1)
    new = ours.write(s1, mixing, f(x_in))
    branch_input, add_residual = theirs(s2)
    out = add_residual(f(branch_input))
    new_theirs = out.reshape(2, n, 5, d).permute(0, 2, 3, 1)
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
    out_err = max(rel(x_in, branch_input), rel(new, new_theirs))
    r = torch.randn(new.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (new * r).sum().backward()
    (new_theirs * r).sum().backward()
    grad_err = rel(_package_layout(s1.grad), s2.grad)
    for mine, theirs_param, transform in pairs:
        grad_err = max(grad_err, rel(transform(mine.grad), theirs_param.grad))
    return out_err, grad_err


@pytest.mark.parametrize("dynamic", [True, False])
def test_hc_matches_the_package_in_float64(dynamic):
    hc = pytest.importorskip("hyper_connections")
    n, d, index = 4, 32, 5
    ours = HyperConnection(tiny_config(residual="hc", dv=n, hc_dynamic=dynamic, norm_eps=1e-30), index).double()
    theirs = hc.HyperConnections(n, dim=d, layer_index=index, tanh=True).double()
    perturb(ours, std=0.3)
    with torch.no_grad():  # the package's RMSNorm is x/‖x‖·√d·(γ + 1)
        theirs.static_alpha.copy_(torch.cat([ours.static_read[:, None], ours.static_mix], 1))
        theirs.static_beta.copy_(ours.static_write)
        if dynamic:
            theirs.dynamic_alpha_fn.copy_(ours.dynamic_read)
            theirs.dynamic_alpha_scale.copy_(ours.read_scale)
            theirs.dynamic_beta_fn.copy_(ours.dynamic_write)
            theirs.dynamic_beta_scale.copy_(ours.write_scale)
            theirs.norm.gamma.copy_(ours.norm.weight - 1)
        else:  # the package is always dynamic: zero dynamic weights give the static HC
            theirs.dynamic_alpha_fn.zero_()
            theirs.dynamic_beta_fn.zero_()
    pairs = [
        (ours.static_read, theirs.static_alpha, lambda g: g),
        (ours.static_write, theirs.static_beta, lambda g: g),
    ]
    pairs = [  # the static matrix's gradient, stacked as the package stores it
        (ours.static_mix, theirs.static_alpha, lambda g: torch.cat([ours.static_read.grad[:, None], g], 1)),
        pairs[1],
    ]
    if dynamic:
        pairs += [
            (ours.dynamic_read, theirs.dynamic_alpha_fn, lambda g: g),
            (ours.dynamic_write, theirs.dynamic_beta_fn, lambda g: g),
            (ours.read_scale, theirs.dynamic_alpha_scale, lambda g: g),
            (ours.write_scale, theirs.dynamic_beta_scale, lambda g: g),
            (ours.norm.weight, theirs.norm.gamma, lambda g: g),
        ]
    out_err, grad_err = _compare(ours, theirs, pairs, n)
    print(f"hc dynamic={dynamic}: max rel error outputs {out_err:.1e}, gradients {grad_err:.1e}")
    assert out_err < 1e-12 and grad_err < 1e-12


def test_mhc_matches_the_package_in_float64(monkeypatch):
    """The package's static part (its dynamic weights zero): H_pre = σ(b_pre), H_post = 2σ(b_post),
    H_res = Sinkhorn(b_res). Its dynamic part differs from the paper's (per-stream norm and
    projections; the paper's x̃ flattens all n·d entries) and is not compared. The package
    computes in fp32 (`.float()`); the test keeps fp64 through those casts. Both Sinkhorns
    run to convergence (their orders within an iteration differ: the package ends on columns)."""
    hc = pytest.importorskip("hyper_connections")
    n, d, index = 4, 32, 3
    cfg = tiny_config(residual="mhc", dv=n, hc_dynamic=False, mhc_sinkhorn_iters=200)
    ours = ManifoldHyperConnection(cfg, index).double()
    theirs = hc.ManifoldConstrainedHyperConnections(n, dim=d, layer_index=index, sinkhorn_iters=200).double()
    perturb(ours, std=0.5)
    with torch.no_grad():  # the package's static_alpha is [pre | res as source × destination]
        theirs.static_alpha.copy_(torch.cat([ours.bias_read[:, None], ours.bias_mix.T], 1))
        theirs.static_beta.copy_(ours.bias_write)
        theirs.dynamic_alpha_fn.zero_()
        theirs.dynamic_beta_fn.zero_()
    monkeypatch.setattr(torch.Tensor, "float", lambda self, *a, **k: self)
    pairs = [
        (ours.bias_mix, theirs.static_alpha, lambda g: torch.cat([ours.bias_read.grad[:, None], g.T], 1)),
        (ours.bias_write, theirs.static_beta, lambda g: g),
    ]
    out_err, grad_err = _compare(ours, theirs, pairs, n)
    print(f"mhc static: max rel error outputs {out_err:.1e}, gradients {grad_err:.1e}")
    assert out_err < 1e-12 and grad_err < 1e-12


# -- Sinkhorn and the mHC constraints ------------------------------------------------------
@pytest.mark.parametrize("spread", [1.0, 3.0])
def test_sinkhorn_is_doubly_stochastic_within_its_contraction_bound(spread):
    """Logits in [−m, m]: the kernel's projective diameter is at most Δ = 4m and each half-step
    contracts the column error by tanh(Δ/4)² (Birkhoff–Hopf), so after t iterations it is at
    most n·tanh(m)^(2t−1); the rows sum to one to rounding (the last step normalises them)."""
    n = 4
    g = torch.Generator().manual_seed(0)
    logits = (torch.rand(64, n, n, generator=g, dtype=torch.float64) * 2 - 1) * spread
    for iters in (1, 2, 5, 20):
        m = sinkhorn(logits, iters)
        assert (m >= 0).all()
        torch.testing.assert_close(m.sum(-1), torch.ones(64, n, dtype=torch.float64), rtol=0, atol=1e-14)
        bound = n * math.tanh(spread) ** (2 * iters - 1)
        assert (m.sum(-2) - 1).abs().max().item() <= bound + 1e-14


def test_mhc_weights_are_nonnegative_and_bounded():
    n = 4
    rule = ManifoldHyperConnection(tiny_config(residual="mhc", dv=n), 1).double()
    perturb(rule, std=3.0)
    x = _streams(2, 5, 32, n).transpose(-1, -2) * 10
    pre, res, post = rule.weights(x)
    assert (pre >= 0).all() and (pre <= 1).all() and (post >= 0).all() and (post <= 2).all() and (res >= 0).all()
    assert (res.sum(-1) - 1).abs().max() < 1e-12


# -- the grid ----------------------------------------------------------------------------------
@pytest.mark.parametrize("residual", HYPER)
@pytest.mark.parametrize("dv", [1, 2, 4])
def test_grid_forward_backward_causal_and_decoded(residual, dv):
    model = perturb(_model(residual=residual, dv=dv))
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    logits = model(idx)
    assert logits.shape == (2, 12, 64) and torch.isfinite(logits).all()
    model.loss(idx, idx).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 64
    with torch.no_grad():
        torch.testing.assert_close(model(changed)[:, :7], logits[:, :7].detach(), rtol=0, atol=1e-12)
        first, cache = decode.prefill(model, idx[:, :8])
        steps = [decode.decode_step(model, idx[:, t : t + 1], cache).reshape(2, 1, -1) for t in range(8, 12)]
    torch.testing.assert_close(torch.cat([first, *steps], 1), logits.detach(), rtol=1e-10, atol=1e-10)


def test_mixing_probe_records_per_sublayer_and_the_beta_probe_is_empty():
    model = _model(residual="mhc", dv=4)
    idx = torch.randint(0, 64, (2, 8))
    records = model.probe_mixing(idx)
    assert sorted(records) == ["0.attn", "0.mlp", "1.attn", "1.mlp"]
    rec = records["0.attn"]
    assert rec["mix_dist"].shape == (2, 8) and rec["read_entropy"].shape == (2, 8)
    assert rec["sinkhorn_residual"].max() < 1e-6
    assert model.probe(idx) == {} and _model(residual="ddl", dv=4).probe_mixing(idx) == {}


def test_config_rejects_the_fused_kernel_and_bad_fields():
    with pytest.raises(ValueError) as err:
        tiny_config(residual="mhc", kernel="fused", hc_dynamic="yes", mhc_sinkhorn_iters=0, mhc_init_eps=1.0)
    msg = str(err.value)
    for field in ("kernel: got 'fused' with residual='mhc'", "hc_dynamic", "mhc_sinkhorn_iters", "mhc_init_eps"):
        assert field in msg
