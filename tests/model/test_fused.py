"""The fused update (model/fused.py) against the plain ops, on the CPU.

Its torch path states the formulas the Triton kernels implement, including the
hand-derived backward; these tests compare them with autograd through ``ops``, check the
spec's exact properties through the op, and check that a model built with
``kernel=fused`` computes the same loss and gradients as ``kernel=plain``. The Triton
kernels themselves are compared on the GPU (tests/test_fastpath.py, ``-m gpu``).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.testing import assert_close

from deepdelta.model import DeltaTransformer, ModelConfig, fused, ops

F64 = torch.float64
N, D = 7, 24


def inputs(dv: int, seed: int = 0, dtype: torch.dtype = F64):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)

    beta = (torch.rand(N, generator=g, dtype=F64) * 2).to(dtype)
    return r(N, D, dv), r(N, D, scale=3.0), r(N, dv), beta


def reads(state, taps):
    """What the op's reads should be: Σ_j taps[s]⊙X per tap, (N, S, d)."""
    return torch.stack([(state * tap).sum(-1) for tap in taps], -2)


@pytest.mark.parametrize("erase", [True, False], ids=["ddl", "write_only"])
@pytest.mark.parametrize("n_taps", [1, 3, 0], ids=["cc", "tc", "no-compress"])
@pytest.mark.parametrize("chain", [False, True], ids=["saved", "recomputed"])
@pytest.mark.parametrize("dv", [1, 3])
def test_forward_and_backward_match_autograd_of_ops(erase, n_taps, chain, dv):
    rule = ops.delta_update if erase else ops.write_only_update
    x0, k0, v0, b0 = inputs(dv, seed=1)
    mid, _, edit = fused.update(x0, k0, v0, b0, erase=erase)  # the previous update
    assert torch.equal(mid, rule(x0, k0, v0, b0))
    state = mid.requires_grad_()
    k, v, beta = (t.requires_grad_() for t in inputs(dv, seed=2)[1:])
    taps = torch.randn(n_taps, D, dv, dtype=F64, requires_grad=True) if n_taps else None
    leaves = [state, k, v, beta] + ([taps] if n_taps else [])
    g_new, g_reads = torch.randn(N, D, dv, dtype=F64), torch.randn(N, n_taps, D, dtype=F64)

    want_new = rule(state, k, v, beta)
    want_loss = (want_new * g_new).sum() + ((reads(want_new, taps) * g_reads).sum() if n_taps else 0)
    want = torch.autograd.grad(want_loss, leaves)

    new, got_reads, _ = fused.update(state, k, v, beta, erase=erase, taps=taps, prev=edit if chain else None)
    assert (got_reads is None) == (taps is None)
    got = torch.autograd.grad((new * g_new).sum() + ((got_reads * g_reads).sum() if n_taps else 0), leaves)

    assert_close(new, want_new, rtol=1e-12, atol=1e-12)
    if n_taps:
        assert_close(got_reads, reads(want_new, taps), rtol=1e-12, atol=1e-12)
    for name, a, b in zip(["state", "k", "v", "beta", "taps"], got, want, strict=False):
        assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"grad {name}: {m}")


def test_batched_shapes_and_bf16_key():
    """(B, T, d, dv) states, a bf16 key (as under autocast): gradients keep each input's dtype."""
    state = torch.randn(2, 3, D, 4, requires_grad=True)
    k = torch.randn(2, 3, D, dtype=torch.bfloat16, requires_grad=True)
    v, beta = torch.randn(2, 3, 4, requires_grad=True), torch.rand(2, 3, requires_grad=True)
    new, got_reads, _ = fused.update(state, k, v, beta, taps=torch.full((2, D, 4), 0.25))
    assert new.shape == state.shape and got_reads.shape == (2, 3, 2, D)
    assert_close(new, ops.delta_update(state, k.float(), v, beta), rtol=1e-6, atol=1e-6)
    new.sum().backward()
    assert k.grad.dtype == torch.bfloat16 and state.grad.dtype == torch.float32


@pytest.mark.parametrize("erase", [True, False])
def test_identity_at_beta_zero(erase):
    x, k, v, _ = inputs(4)
    new, _, _ = fused.update(x, k, v, torch.zeros(N, dtype=F64), erase=erase)
    assert torch.equal(new, x)


def test_exact_overwrite_and_contraction():
    """β=1: k̂ᵀX' = vᵀ; any β: e_post = (1−β)·e_pre (spec, exact properties)."""
    x, k, v, beta = inputs(4)
    kh = ops.normalize_key(k)
    new, _, _ = fused.update(x, k, v, torch.ones(N, dtype=F64))
    assert_close(ops.read(new, kh), v, rtol=1e-10, atol=1e-10)
    new, _, _ = fused.update(x, k, v, beta)
    e_pre, e_post = ops.read(x, kh) - v, ops.read(new, kh) - v
    assert_close(e_post, (1 - beta)[:, None] * e_pre, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("erase", [True, False], ids=["ddl", "write_only"])
def test_the_edit_keeps_what_the_backward_needs(erase):
    """The update's Edit: its input rows, e = v − k̂ᵀX (−e_pre; v without erase) and
    1/sqrt(‖k‖² + ε²), so the backward finds them without a reduction over d."""
    x, k, v, beta = inputs(3)
    _, _, edit = fused.update(x, k, v, beta, erase=erase)
    assert torch.equal(edit.state, x) and torch.equal(edit.k, k) and torch.equal(edit.beta, beta)
    assert_close(edit.e, -ops.discrepancy(x, k, v) if erase else v, rtol=1e-12, atol=1e-12)
    assert_close(edit.inv, 1 / torch.sqrt((k * k).sum(-1) + 1e-10), rtol=1e-12, atol=0)


VARIANTS = {
    "ddl-cc-ec-dv3": dict(residual="ddl", dv=3, compressor="cc", expand="conv"),
    "ddl-tc-rep-dv2": dict(residual="ddl", dv=2, compressor="tc", expand="repeat"),
    "ddl-tc-k16-dv2": dict(residual="ddl", dv=2, compressor="tc", conv_kernel=16),  # taps beyond T=12
    "write_only-cc-dv2": dict(residual="write_only", dv=2, compressor="cc"),
    "ddl-dv1": dict(residual="ddl", dv=1),
    "ddl-vmap-sigmoid": dict(residual="ddl", dv=2, map="v", value_squash="sigmoid"),
    "additive-cc-dv2": dict(residual="additive", dv=2),
}


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_model_with_fused_kernel_matches_plain(tiny, noisy, overrides):
    cfg = tiny(kernel="plain", **overrides)
    plain = noisy(DeltaTransformer(cfg).double(), std=0.1)
    fast = DeltaTransformer(dataclasses.replace(cfg, kernel="fused")).double()
    fast.load_state_dict(plain.state_dict())
    idx, targets = torch.randint(0, cfg.vocab_size, (2, 2, 12)).unbind(0)
    losses = []
    for model in (plain, fast):
        loss = model.loss(idx, targets)
        loss.backward()
        losses.append(loss)
    assert_close(losses[1], losses[0], rtol=1e-12, atol=1e-12)
    for (name, p), q in zip(plain.named_parameters(), fast.parameters(), strict=True):
        assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-11, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("compressor", ["cc", "tc"])
def test_a_fused_block_keeps_one_state_for_the_backward(tiny, noisy, compressor):
    """The MLP update recomputes the mid-block state from the attention update's inputs,
    so the backward keeps one (B, T, d, dv) state per block, not two."""
    B, T, dv = 2, 8, 4

    def states_kept(kernel: str) -> int:
        model = noisy(DeltaTransformer(tiny(dv=dv, kernel=kernel, n_layer=1, compressor=compressor)))
        state = torch.randn(B, T, model.config.d_model, dv, requires_grad=True)
        cos, sin = model.rope_cos[:T], model.rope_sin[:T]
        kept = set()

        def pack(t):
            if t.shape == state.shape:
                kept.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.blocks[0](state, cos, sin)
        return len(kept)

    assert states_kept("fused") == 1
    assert states_kept("plain") > 1


def test_kernel_choice_is_validated():
    with pytest.raises(ValueError, match=r"kernel: got 'triton', allowed: plain \| fused"):
        ModelConfig(kernel="triton")


@pytest.mark.parametrize("erase", [True, False], ids=["ddl", "write_only"])
@pytest.mark.parametrize("chain", [False, True], ids=["saved", "recomputed"])
def test_bf16_state_matches_ops(erase, chain):
    """state_dtype=bfloat16: the op's new state equals the ops' (fp32 update, rounded once)
    and its reads are of the stored state. Its gradients are those of the update
    without the rounding (fp64 autograd through the ops on the same values), the state's
    stored in bf16 like the state."""
    rule = ops.delta_update if erase else ops.write_only_update
    x0, k0, v0, b0 = inputs(4, seed=1, dtype=torch.float32)
    x0 = x0.bfloat16()
    mid, _, edit = fused.update(x0, k0, v0, b0, erase=erase)  # the previous update
    assert torch.equal(mid, rule(x0, k0, v0, b0))
    state = mid.requires_grad_()
    assert state.dtype == torch.bfloat16
    k, v, beta = (t.requires_grad_() for t in inputs(4, seed=2, dtype=torch.float32)[1:])
    taps = torch.randn(2, D, 4, requires_grad=True)
    leaves = [state, k, v, beta, taps]
    g_new, g_reads = torch.randn(N, D, 4).bfloat16(), torch.randn(N, 2, D)

    new, got_reads, _ = fused.update(state, k, v, beta, erase=erase, taps=taps, prev=edit if chain else None)
    assert new.dtype == torch.bfloat16 and got_reads.dtype == torch.float32
    with torch.no_grad():
        stored = rule(state, k, v, beta)
        assert torch.equal(new, stored)
        assert_close(got_reads, reads(stored.float(), taps), rtol=1e-6, atol=1e-6)

    got = torch.autograd.grad((new * g_new).sum() + (got_reads * g_reads).sum(), leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    new64 = rule(*leaves64[:4])
    loss64 = (new64 * g_new.double()).sum() + (reads(new64, leaves64[4]) * g_reads.double()).sum()
    want = torch.autograd.grad(loss64, leaves64)
    assert got[0].dtype == torch.bfloat16
    for name, a, b in zip(["state", "k", "v", "beta", "taps"], got, want, strict=True):
        tol = 8e-3 if name == "state" else 1e-4  # ∂X is rounded to bf16 once
        assert_close(a.double(), b, rtol=tol, atol=tol, msg=lambda m, name=name: f"grad {name}: {m}")


def test_bf16_state_identity_at_beta_zero():
    x, k, v, _ = inputs(4, dtype=torch.float32)
    x = x.bfloat16()
    new, _, _ = fused.update(x, k, v, torch.zeros(N))
    assert torch.equal(new, x)
