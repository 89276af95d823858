"""The expanded state: input expansion and compressors (spec §1, "Expanded state")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from deepdelta.model.state import Compress, Expand, causal_token_conv

F64 = torch.float64


def conv1d_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Causal depthwise conv over tokens via F.conv1d with K-1 zeros of left padding.
    ``x`` (B, T, *C), ``weight`` (*C, K) → (B, T, *C)."""
    B, T, *C = x.shape
    K = weight.shape[-1]
    xc = x.reshape(B, T, -1).transpose(1, 2)  # (B, C, T)
    y = F.conv1d(F.pad(xc, (K - 1, 0)), weight.reshape(-1, 1, K), groups=xc.shape[1])
    return y.transpose(1, 2).reshape(B, T, *C)


@pytest.mark.parametrize("K", [1, 2, 4, 7])
@pytest.mark.parametrize("T", [1, 3, 10])
def test_causal_token_conv_matches_conv1d(K, T):
    g = torch.Generator().manual_seed(K * 100 + T)
    x = torch.randn(2, T, 5, 3, generator=g, dtype=F64)
    w = torch.randn(5, 3, K, generator=g, dtype=F64)
    assert_close(causal_token_conv(x, w), conv1d_reference(x, w), atol=1e-13, rtol=0)


def test_causal_token_conv_is_causal():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 4, generator=g, dtype=F64)
    w = torch.randn(4, 4, generator=g, dtype=F64)
    y = causal_token_conv(x, w)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 6, 4, generator=g, dtype=F64)
    y2 = causal_token_conv(x2, w)
    assert torch.equal(y[:, :6], y2[:, :6])
    assert not torch.allclose(y[:, 6:], y2[:, 6:])


@pytest.mark.parametrize("dv", [2, 4])
def test_expansions_at_init_copy_the_embedding(tiny, dv):
    emb = torch.randn(2, 9, 32, dtype=F64)
    for expand in ("conv", "repeat"):
        x = Expand(tiny(dv=dv, expand=expand)).double()(emb)
        assert x.shape == (2, 9, 32, dv)
        assert_close(x, emb[..., None].expand(2, 9, 32, dv), atol=0, rtol=0)
    one = Expand(tiny(dv=1))(emb)
    assert one.shape == (2, 9, 32, 1) and torch.equal(one[..., 0], emb)


@pytest.mark.parametrize("compressor", ["cc", "tc"])
@pytest.mark.parametrize("dv", [2, 4])
def test_compressors_average_at_init(tiny, compressor, dv):
    state = torch.randn(2, 9, 32, dv, dtype=F64)
    x = Compress(tiny(dv=dv, compressor=compressor)).double()(state)
    assert_close(x, state.mean(-1), atol=1e-14, rtol=0)


def test_dv1_has_no_compressor_parameters(tiny):
    for compressor in ("cc", "tc"):
        c = Compress(tiny(dv=1, compressor=compressor))
        assert list(c.parameters()) == []
        state = torch.randn(2, 5, 32, 1)
        assert torch.equal(c(state), state[..., 0])
    assert list(Expand(tiny(dv=1, expand="conv")).parameters()) == []


def test_cc_mixes_channels_per_feature(tiny):
    """x_in[i] = Σ_j c[i, j] X[i, j] at the current token."""
    comp = Compress(tiny(dv=3, compressor="cc", cc_form="mix")).double()
    with torch.no_grad():
        comp.mix.copy_(torch.randn(32, 3, dtype=F64))
    state = torch.randn(2, 5, 32, 3, dtype=F64)
    assert_close(comp(state), torch.einsum("btij,ij->bti", state, comp.mix), atol=1e-13, rtol=0)


@pytest.mark.parametrize("dv", [2, 3, 4, 5])
def test_cc_toeplitz_is_a_same_padded_conv_over_channels_then_read(tiny, dv):
    """The reference's cc: each feature's dv channels go through a "same"-padded
    cross-correlation with its kernel (left pad ⌊(dv−1)/2⌋), and the read vector pools the
    dv outputs; written out with F.conv1d, in fp64."""
    comp = Compress(tiny(dv=dv, compressor="cc")).double()
    g = torch.Generator().manual_seed(dv)
    with torch.no_grad():
        comp.weight.copy_(torch.randn(32, dv, generator=g, dtype=F64))
        comp.read.copy_(torch.randn(dv, generator=g, dtype=F64))
    state = torch.randn(2, 5, 32, dv, generator=g, dtype=F64)
    left = (dv - 1) // 2
    x = F.pad(state.reshape(-1, 32, dv), (left, dv - 1 - left))  # (BT, d, dv + K − 1)
    conv = F.conv1d(x, comp.weight[:, None, :], groups=32)  # (BT, d, dv)
    expected = (conv @ comp.read).reshape(2, 5, 32)
    assert_close(comp(state), expected, atol=1e-13, rtol=0)
    # both forms, as built (impl=paper's init), are the plain average over channels; the
    # parameters hold 1/dv rounded to fp32 (relative error ≤ 2⁻²⁴ of |X| ≤ 5)
    for form in ("toeplitz", "mix"):
        fresh = Compress(tiny(dv=dv, compressor="cc", cc_form=form)).double()
        assert_close(fresh(state), state.mean(-1), atol=1e-6, rtol=0)


def test_tc_is_token_conv_then_read(tiny):
    comp = Compress(tiny(dv=3, compressor="tc", conv_kernel=3)).double()
    with torch.no_grad():
        comp.weight.copy_(torch.randn(32, 3, 3, dtype=F64))
        comp.read.copy_(torch.randn(3, dtype=F64))
    state = torch.randn(2, 7, 32, 3, dtype=F64)
    expected = conv1d_reference(state, comp.weight) @ comp.read
    assert_close(comp(state), expected, atol=1e-13, rtol=0)


@pytest.mark.parametrize("K,T", [(1, 4), (3, 2), (4, 9)])
def test_tc_gradients_match_autograd_of_the_plain_conv(tiny, K, T):
    """The tc read (taps applied before the shift) against autograd of the plain formula
    (shift the state, then apply the taps), and against finite differences, in fp64."""
    comp = Compress(tiny(dv=3, compressor="tc", conv_kernel=K)).double()
    g = torch.Generator().manual_seed(K * 10 + T)
    with torch.no_grad():
        comp.weight.copy_(torch.randn(32, 3, K, generator=g, dtype=F64))
        comp.read.copy_(torch.randn(3, generator=g, dtype=F64))
    state = torch.randn(2, T, 32, 3, generator=g, dtype=F64, requires_grad=True)
    upstream = torch.randn(2, T, 32, generator=g, dtype=F64)
    grads = torch.autograd.grad((comp(state) * upstream).sum(), (state, comp.weight, comp.read))
    plain = (causal_token_conv(state, comp.weight * comp.read[:, None]).sum(-1) * upstream).sum()
    expected = torch.autograd.grad(plain, (state, comp.weight, comp.read))
    for got, want in zip(grads, expected, strict=True):
        assert_close(got, want, atol=1e-12, rtol=1e-12)
    small = Compress(tiny(d_model=4, n_head=1, head_dim=4, dv=2, compressor="tc", conv_kernel=K)).double()
    assert torch.autograd.gradcheck(small, (torch.randn(1, T, 4, 2, dtype=F64, requires_grad=True),))


def test_tc_keeps_only_the_state_for_backward(tiny):
    """The memory claim: the backward of the tc read keeps the state and the taps, not K
    shifted copies of the state (which made tc dv=4 need 2.9× the additive peak memory)."""
    comp = Compress(tiny(dv=4, compressor="tc", conv_kernel=4))
    state = torch.randn(2, 16, 32, 4, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        comp(state)
    state_sized = [t for t in saved if t.numel() >= state.numel()]
    assert state_sized and all(t.data_ptr() == state.data_ptr() for t in state_sized)


def test_conv_expand_is_a_causal_token_conv(tiny):
    exp = Expand(tiny(dv=3, expand="conv", conv_kernel=3)).double()
    with torch.no_grad():
        exp.weight.copy_(torch.randn(32, 3, 3, dtype=F64))
    emb = torch.randn(2, 7, 32, dtype=F64)
    expected = conv1d_reference(emb[..., None].expand(2, 7, 32, 3), exp.weight)
    assert_close(exp(emb), expected, atol=1e-13, rtol=0)
