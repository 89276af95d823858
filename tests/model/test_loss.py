"""The fused, chunked LM-head cross-entropy against F.cross_entropy on full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from deepdelta.model import DeltaTransformer
from deepdelta.model.loss import linear_cross_entropy

B, T = 3, 16  # N = 48 rows


def make(tiny, noisy, **kw):
    torch.manual_seed(0)
    model = noisy(DeltaTransformer(tiny(dv=2, compressor="tc", **kw)), std=0.1)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 64, (B, T), generator=g)
    targets = torch.randint(0, 64, (B, T), generator=g)
    return model, idx, targets


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def reference(model, idx, targets):
    return F.cross_entropy(model(idx).flatten(0, 1).float(), targets.flatten())


@pytest.mark.parametrize("chunk", [1, 7, 16, 48, 8192])
@pytest.mark.parametrize("ignore", [False, True])
def test_loss_and_gradients_match_cross_entropy(tiny, noisy, chunk, ignore):
    model, idx, targets = make(tiny, noisy)
    if ignore:
        targets[0, :5] = -100
        targets[2, -3:] = -100
    ref = reference(model, idx, targets)
    g_ref = grads(model, ref)
    loss = model.loss(idx, targets, chunk=chunk)
    g = grads(model, loss)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    for name in g_ref:
        assert_close(g[name], g_ref[name], atol=1e-6, rtol=1e-4, msg=name)


def test_ignored_rows_do_not_count(tiny, noisy):
    """Mean over the rows that are not ignored; an ignored row's target has no effect."""
    model, idx, targets = make(tiny, noisy)
    targets[1] = -100
    with torch.no_grad():
        loss = model.loss(idx, targets, chunk=10)
        keep = torch.tensor([0, 2])
        only = model.loss(idx[keep], targets[keep], chunk=10)
    assert_close(loss, only, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("chunk", [5, 8192])
def test_no_grad_path_matches(tiny, noisy, chunk):
    model, idx, targets = make(tiny, noisy)
    targets[0, :3] = -100
    with torch.no_grad():
        assert_close(model.loss(idx, targets, chunk=chunk), reference(model, idx, targets), atol=1e-6, rtol=1e-6)


def test_upstream_gradient_is_applied():
    """backward scales by the incoming gradient (e.g. loss × 2.5, or a summed loss)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(20, 8, generator=g, requires_grad=True)
    weight = torch.randn(11, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (20,), generator=g)
    (2.5 * linear_cross_entropy(hidden, weight, targets, chunk=6)).backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (2.5 * F.cross_entropy(hidden @ weight.T, targets)).backward()
    assert_close(gh, hidden.grad, atol=1e-6, rtol=1e-5)
    assert_close(gw, weight.grad, atol=1e-6, rtol=1e-5)


def test_leading_dimensions_are_flattened():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(11, 8, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    expected = F.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten())
    assert_close(linear_cross_entropy(hidden, weight, targets, chunk=3).double(), expected, atol=1e-6, rtol=1e-6)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # RMSNorm on CPU
@pytest.mark.parametrize("chunk", [7, 8192])
def test_loss_under_bf16_autocast(tiny, noisy, chunk):
    model, idx, targets = make(tiny, noisy)
    targets[1, :4] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = reference(model, idx, targets)
        loss = model.loss(idx, targets, chunk=chunk)
    g_ref = grads(model, ref)
    g = grads(model, loss)
    with torch.no_grad():
        fp32 = reference(model, idx, targets)
    assert loss.dtype == torch.float32
    # both within bf16 error of each other and of the fp32 loss
    assert_close(loss, ref, atol=0, rtol=1e-2)
    assert_close(loss, fp32, atol=0, rtol=1e-2)
    for name in g_ref:
        assert g[name].dtype == torch.float32
        assert rel_err(g[name], g_ref[name]) < 1e-2, name
