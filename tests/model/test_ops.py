"""The DDL math of `ops` against the exact properties of the spec ("Exact properties").

Every expected value is computed here, in fp64, from the formulas of the spec:
k̂ = k / sqrt(‖k‖² + ε²), DDL X + β·k̂(vᵀ − k̂ᵀX), write-only X + β·k̂vᵀ.
bf16 runs are compared with the fp64 formula on the same (bf16-rounded) inputs.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from deepdelta.model import ops

EPS = 1e-5
D, DV = 16, 3
LEAD = (4, 5)  # leading (batch, token) dims
F64, BF16 = torch.float64, torch.bfloat16
# bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 2e-3); with O(1) states and a
# 16-term read the accumulated error stays well under these bounds.
BF16_TOL = dict(atol=4e-2, rtol=2e-2)


def ref_unit(k: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    k = k.double()
    return k / torch.sqrt((k * k).sum(-1, keepdim=True) + eps**2)


def ref_read(state: torch.Tensor, k_hat: torch.Tensor) -> torch.Tensor:
    return (k_hat[..., :, None] * state).sum(-2)  # k̂ᵀX, (..., dv)


def ref_delta(state, k, v, beta, eps=EPS):
    state, v, beta = state.double(), v.double(), beta.double()
    kh = ref_unit(k, eps)
    return state + beta[..., None, None] * kh[..., :, None] * (v - ref_read(state, kh))[..., None, :]


def ref_write_only(state, k, v, beta, eps=EPS):
    state, v, beta = state.double(), v.double(), beta.double()
    kh = ref_unit(k, eps)
    return state + beta[..., None, None] * kh[..., :, None] * v[..., None, :]


def inputs(dtype=F64, seed=0, lead=LEAD, d=D, dv=DV, k_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    state = torch.randn(*lead, d, dv, generator=g, dtype=F64)
    k = torch.randn(*lead, d, generator=g, dtype=F64) * k_scale
    v = torch.randn(*lead, dv, generator=g, dtype=F64)
    beta = 2 * torch.rand(*lead, generator=g, dtype=F64)  # β ∈ (0, 2)
    return state.to(dtype), k.to(dtype), v.to(dtype), beta.float()


UPDATES = {"ddl": (ops.delta_update, ref_delta), "write_only": (ops.write_only_update, ref_write_only)}


# -- agreement with the formulas -----------------------------------------------------------


@pytest.mark.parametrize("rule", UPDATES)
@pytest.mark.parametrize("dv", [1, 3])
def test_update_matches_formula_fp64(rule, dv):
    update, ref = UPDATES[rule]
    state, k, v, beta = inputs(dv=dv)
    beta = beta.double()
    out = update(state, k, v, beta)
    assert out.shape == state.shape and out.dtype == F64
    assert_close(out, ref(state, k, v, beta), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("rule", UPDATES)
def test_update_matches_formula_bf16(rule):
    update, ref = UPDATES[rule]
    state, k, v, beta = inputs(BF16)
    out = update(state, k, v, beta)
    assert out.dtype == BF16, "a bf16 state must stay bf16 (β in fp32 must not upcast it)"
    assert_close(out.double(), ref(state, k, v, beta), **BF16_TOL)


@pytest.mark.parametrize("rule", UPDATES)
def test_bf16_state_is_updated_in_fp32_and_rounded_once(rule):
    """state_dtype=bfloat16: the update itself runs in fp32; only its result is rounded."""
    update, _ = UPDATES[rule]
    state, k, v, beta = inputs(BF16, dv=4)
    v = v.float()
    out = update(state, k, v, beta)
    assert out.dtype == BF16
    assert torch.equal(out, update(state.float(), k, v, beta).to(BF16))


def test_delta_update_gradients_fp64():
    state, k, v, beta = inputs(lead=(2,), d=5, dv=2)
    args = [t.double().requires_grad_() for t in (state, k, v, beta)]
    assert torch.autograd.gradcheck(ops.delta_update, args)
    assert torch.autograd.gradcheck(ops.write_only_update, args)


# -- exact properties (spec) ---------------------------------------------------------------


@pytest.mark.parametrize("rule", UPDATES)
@pytest.mark.parametrize("dtype", [F64, BF16])
def test_identity_at_beta_zero(rule, dtype):
    update, _ = UPDATES[rule]
    state, k, v, beta = inputs(dtype)
    out = update(state, k, v, torch.zeros_like(beta))
    assert torch.equal(out, state)


@pytest.mark.parametrize("dv", [1, 3])
def test_exact_overwrite_at_beta_one_fp64(dv):
    state, k, v, beta = inputs(dv=dv)
    out = ops.delta_update(state, k, v, torch.ones_like(beta))
    kh = ref_unit(k)
    # before: the read-out is far from v; after: it is v (to ‖k̂‖² = 1 − ε²/(‖k‖²+ε²))
    assert (ref_read(state, kh) - v).abs().max() > 0.1
    assert_close(ref_read(out, kh), v, atol=1e-10, rtol=0)


def test_exact_overwrite_at_beta_one_bf16():
    state, k, v, beta = inputs(BF16)
    out = ops.delta_update(state, k, v, torch.ones_like(beta))
    assert_close(ref_read(out.double(), ref_unit(k)), v.double(), **BF16_TOL)


@pytest.mark.parametrize("dtype", [F64, BF16])
def test_discrepancy_contracts_by_one_minus_beta(dtype):
    """e_post = (1 − β)·e_pre for β ∈ (0, 2), e = k̂ᵀX − vᵀ."""
    state, k, v, beta = inputs(dtype, seed=1)
    out = ops.delta_update(state, k, v, beta)
    e_pre = ops.discrepancy(state.double(), k.double(), v.double())
    e_post = ops.discrepancy(out.double(), k.double(), v.double())
    assert_close(e_pre, ref_read(state.double(), ref_unit(k)) - v.double(), atol=1e-12, rtol=0)
    expected = (1 - beta.double())[..., None] * e_pre
    if dtype == F64:
        assert_close(e_post, expected, atol=1e-10, rtol=0)
    else:
        assert_close(e_post, expected, **BF16_TOL)


@pytest.mark.parametrize("rule", UPDATES)
@pytest.mark.parametrize("dtype", [F64, BF16])
def test_orthogonal_complement_passes_unchanged(rule, dtype):
    """Every u ⊥ k passes unchanged: (I − k̂k̂ᵀ)X_new = (I − k̂k̂ᵀ)X, for DDL and write-only."""
    update, _ = UPDATES[rule]
    state, k, v, beta = inputs(dtype, seed=2)
    out = update(state, k, v, beta)
    kh = ref_unit(k) / ref_unit(k).norm(dim=-1, keepdim=True)  # exactly unit, for the projector

    def perp(x):
        x = x.double()
        return x - kh[..., :, None] * ref_read(x, kh)[..., None, :]

    tol = dict(atol=1e-12, rtol=0) if dtype == F64 else BF16_TOL
    assert_close(perp(out), perp(state), **tol)
    # a state that lies entirely in k⊥ with v = 0 is returned as it is
    x_perp = perp(state).to(dtype)
    out = update(x_perp, k, torch.zeros_like(v), beta)
    assert_close(out.double(), x_perp.double(), **tol)


@pytest.mark.parametrize("beta_value", [0.3, 1.0, 1.5, 2.0])
def test_shortcut_eigenvalues_fp64(beta_value):
    """A = I − βk̂k̂ᵀ: eigenvalue 1 − β on k (once), 1 on k⊥ (d − 1 times); β=2 is a
    reflection (orthogonal). A is read off by updating the identity as a d-channel state
    (dv = d, v = 0), which also exercises the per-column action."""
    d = 12
    g = torch.Generator().manual_seed(3)
    k = torch.randn(d, generator=g, dtype=F64) * 3
    eye = torch.eye(d, dtype=F64)
    beta = torch.tensor(beta_value, dtype=F64)
    A = ops.delta_update(eye, k, torch.zeros(d, dtype=F64), beta)
    assert_close(A, A.T, atol=1e-14, rtol=0)
    eig = torch.linalg.eigvalsh(A)
    expected = torch.tensor(sorted([1 - beta_value] + [1.0] * (d - 1)), dtype=F64)
    assert_close(eig, expected, atol=1e-10, rtol=0)
    kh = k / k.norm()
    assert_close(A @ kh, (1 - beta_value) * kh, atol=1e-10, rtol=0)
    u = torch.randn(d, generator=g, dtype=F64)
    u = u - (u @ kh) * kh
    assert_close(A @ u, u, atol=1e-12, rtol=0)
    if beta_value == 2.0:
        assert_close(A.T @ A, eye, atol=1e-10, rtol=0)


def test_shortcut_eigenvalues_bf16():
    d = 12
    k = torch.randn(d, generator=torch.Generator().manual_seed(4), dtype=F64).to(BF16)
    A = ops.delta_update(torch.eye(d, dtype=BF16), k, torch.zeros(d, dtype=BF16), torch.tensor(1.5))
    A = A.double()
    eig = torch.linalg.eigvalsh((A + A.T) / 2)
    expected = torch.tensor([-0.5] + [1.0] * (d - 1), dtype=F64)
    assert_close(eig, expected, atol=3e-2, rtol=0)


@pytest.mark.parametrize("rule", UPDATES)
def test_update_acts_on_each_value_column(rule):
    """For dv > 1 the update is the dv = 1 update applied to every column with its own v_j."""
    update, _ = UPDATES[rule]
    state, k, v, beta = inputs(dv=4, seed=5)
    beta = beta.double()
    out = update(state, k, v, beta)
    for j in range(4):
        col = update(state[..., j : j + 1], k, v[..., j : j + 1], beta)
        assert_close(out[..., j : j + 1], col, atol=1e-13, rtol=0)


# -- write-only never erases -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, BF16])
def test_write_only_never_erases(dtype):
    """The component along k grows by exactly βv whatever the state holds; k⊥ unchanged."""
    state, k, v, beta = inputs(dtype, seed=6)
    out = ops.write_only_update(state, k, v, beta)
    kh = ref_unit(k)
    grown = ref_read(out.double(), kh) - ref_read(state.double(), kh)
    # ‖k̂‖² = 1 − ε²/(‖k‖² + ε²): 1 to ~1e-11 here
    tol = dict(atol=1e-10, rtol=0) if dtype == F64 else BF16_TOL
    assert_close(grown, beta.double()[..., None] * v.double(), **tol)
    # at β = 1, unlike DDL, the old content along k survives: k̂ᵀX_new = k̂ᵀX + v ≠ v
    one = torch.ones_like(beta)
    out1 = ops.write_only_update(state, k, v, one)
    assert_close(ref_read(out1.double(), kh), ref_read(state.double(), kh) + v.double(), **tol)
    assert (ref_read(out1.double(), kh) - v.double()).abs().max() > 0.5


# -- the key normalisation ---------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.0, 1e-9, 1e-6, 1e-5, 1e-3, 1.0, 1e4])
def test_normalize_key_formula_fp64(scale):
    k = torch.randn(*LEAD, D, generator=torch.Generator().manual_seed(7), dtype=F64) * scale
    out = ops.normalize_key(k)
    assert out.dtype == F64
    assert torch.isfinite(out).all()
    assert_close(out, ref_unit(k), atol=1e-15, rtol=1e-12)
    if scale >= 1.0:
        assert_close(out.norm(dim=-1), torch.ones(LEAD, dtype=F64), atol=1e-9, rtol=0)


def test_normalize_key_custom_eps():
    k = torch.randn(3, D, generator=torch.Generator().manual_seed(8), dtype=F64) * 0.1
    assert_close(ops.normalize_key(k, k_eps=0.5), ref_unit(k, eps=0.5), atol=1e-15, rtol=1e-12)


def test_normalize_key_zero_is_zero():
    for dtype in (F64, torch.float32, BF16):
        out = ops.normalize_key(torch.zeros(3, D, dtype=dtype))
        assert out.dtype == dtype
        assert torch.equal(out, torch.zeros(3, D, dtype=dtype))


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e-10, 1e-5, 1.0, 1e3])
def test_normalize_key_bf16_is_finite_and_correct(scale):
    """Tiny keys (whose squares underflow in bf16) and ordinary ones: finite, right value."""
    k = (torch.randn(*LEAD, D, generator=torch.Generator().manual_seed(9), dtype=F64) * scale).to(BF16)
    assert (k != 0).any()
    out = ops.normalize_key(k)
    assert out.dtype == BF16
    assert torch.isfinite(out).all()
    assert_close(out.double(), ref_unit(k), atol=0, rtol=2e-2)


def test_delta_update_with_zero_key_is_identity():
    state, k, v, beta = inputs(BF16)
    out = ops.delta_update(state, torch.zeros_like(k), v, beta)
    assert torch.equal(out, state)


# -- the gate -------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta_max", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_gate_is_scaled_sigmoid_in_fp32(beta_max, dtype):
    logits = (torch.randn(*LEAD, generator=torch.Generator().manual_seed(10), dtype=F64) * 4).to(dtype)
    beta = ops.gate(logits, beta_max)
    assert beta.dtype == torch.float32
    assert_close(beta.double(), beta_max * torch.sigmoid(logits.double()), atol=1e-6, rtol=1e-6)
    extreme = ops.gate(torch.tensor([-100.0, 0.0, 100.0], dtype=dtype), beta_max)
    assert_close(extreme, torch.tensor([0.0, beta_max / 2, beta_max]), atol=1e-6, rtol=0)


def test_gate_resolves_beyond_bf16():
    """fp32 evaluation: β near β_max keeps more resolution than a bf16 sigmoid would."""
    logits = torch.tensor([3.0, 3.015625], dtype=BF16)  # adjacent bf16 values (ulp 2^-6)
    beta = ops.gate(logits, 2.0)
    assert beta[1] > beta[0]
    assert_close(beta, 2.0 * torch.sigmoid(logits.float()), atol=0, rtol=0)
