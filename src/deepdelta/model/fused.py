"""The fused DDL update: one pass over the state forward, one pass backward (issue 5).

``update(state, k, v, beta, ...)`` computes the same function as ``ops.delta_update`` /
``ops.write_only_update`` — key norm, read, compare, write — and optionally the `cc`
compression of the new state (the next sublayer's input), in one Triton kernel over the
rows of the state (one token's (d, dv) matrix each): it reads the state from memory once
(a second read of each row comes from L2) and writes it once. Its backward is one more
kernel, from the saved input state, with the gradients derived by hand (``_backward_formulas`` states them in torch; tests compare them with
autograd through ``ops``).

Memory: the op saves its input state, not its output. With ``prev`` (the inputs of the
update that produced ``state``), it saves nothing of its own and recomputes ``state``
from ``prev`` inside the backward kernel (a row-local recomputation), so a block's two
updates keep one state, as the compiled plain ops do.

The Triton kernels run for fp32 and bf16 states on CUDA; elsewhere (CPU, fp64) the op runs
the same formulas in torch, so the hand-written backward is tested on the CPU too. A bf16
state (``state_dtype=bfloat16``) is loaded, updated in fp32 and rounded once when stored,
like ``ops``; its gradient is stored in bf16 as well, and everything else (v, β, the
compression) stays in fp32.

It is opt-in (``model.kernel=fused``). On an H100 it trained dv=2 and dv=4 models 1-5%
faster than the compiled plain ops, dv=1 models slower, and it always needed more memory.
docs/benchmarks.md has the measurements and the per-kernel times.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import Tensor

from deepdelta.model import ops

try:  # triton ships with CUDA builds of torch; CPU-only installs do without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


class Edit(NamedTuple):
    """The inputs of one update: enough to recompute its output state row by row."""

    state: Tensor
    k: Tensor
    v: Tensor
    beta: Tensor


# -- the formulas, in torch (CPU / fp64 path, and the statement of the kernels' math) --------


def _key(k: Tensor, dtype: torch.dtype, k_eps: float) -> tuple[Tensor, Tensor]:
    """k̂ and 1/sqrt(‖k‖² + ε²) in ``dtype``, the compute dtype (no rounding of k̂ to k's dtype)."""
    k = k.to(dtype)
    inv = torch.rsqrt((k * k).sum(-1, keepdim=True) + k_eps**2)
    return k * inv, inv


def _forward_formulas(
    state: Tensor, k: Tensor, v: Tensor, beta: Tensor, mix: Tensor | None, k_eps: float, erase: bool
) -> tuple[Tensor, Tensor]:
    rule = ops.delta_update if erase else ops.write_only_update
    new = rule(state, k.to(v.dtype), v, beta, k_eps)  # rounded once to the state's dtype
    return new, ((new * mix).sum(-1) if mix is not None else v.new_empty(0))


def _backward_formulas(
    state: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    mix: Tensor | None,
    grad_new: Tensor,
    grad_xc: Tensor | None,
    k_eps: float,
    erase: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Gradients of X' = X + β k̂ eᵀ, e = v − k̂ᵀX (e = v without erase), and of x_c = Σ_j mix⊙X'.

    With G = ∂L/∂X' (plus grad_xc ⊗ mix) and g = Gᵀk̂:
    ∂X = G − β k̂ gᵀ, ∂v = β g, ∂β = g·e, ∂k̂ = β (G e − X g),
    ∂k = (∂k̂ − k̂ (k̂·∂k̂)) / sqrt(‖k‖² + ε²), ∂mix = Σ_tokens grad_xc ⊗ X'.
    (Without erase the X g term and the −β k̂ gᵀ term drop.) Computed in v's dtype (at least
    fp32); ∂X is returned in the state's dtype, and ∂mix uses X' before its rounding."""
    out_dtype, state, grad_new = state.dtype, state.to(v.dtype), grad_new.to(v.dtype)
    kh, inv = _key(k, v.dtype, k_eps)
    b = beta[..., None]
    e = v - (kh[..., None] * state).sum(-2) if erase else v
    G = grad_new if mix is None else grad_new + grad_xc[..., None] * mix
    g = (kh[..., None] * G).sum(-2)
    grad_kh = (G * e[..., None, :]).sum(-1)
    if erase:
        grad_kh = grad_kh - (state * g[..., None, :]).sum(-1)
    grad_kh = b * grad_kh
    grad_k = (grad_kh - kh * (kh * grad_kh).sum(-1, keepdim=True)) * inv
    grad_state = G - (b * kh)[..., None] * g[..., None, :] if erase else G
    grad_mix = None
    if mix is not None:
        new = state + (b * kh)[..., None] * e[..., None, :]
        grad_mix = (grad_xc[..., None] * new).reshape(-1, *mix.shape).sum(0)
    return grad_state.to(out_dtype), grad_k.to(k.dtype), b * g, (g * e).sum(-1), grad_mix


# -- Triton kernels -----------------------------------------------------------------------

if triton is not None:
    # A program takes R token rows (each a (d, dv) matrix) and walks d in chunks of BD: a
    # first pass makes the row sums (‖k‖², kᵀX, kᵀG), a second pass writes the outputs. Small
    # chunks keep the tiles in registers (whole-row tiles of R × 1024 × 4, a quarter of them
    # masked at d = 768, left the kernels far below the bandwidth: docs/benchmarks.md); the
    # second pass reads the rows again from L2. R and the warps are tuned per (d, dv). The
    # interpreter (TRITON_INTERPRET=1, CPU) cannot benchmark, so it gets one configuration.
    _SHAPES = ((1, 4), (2, 4), (4, 4), (2, 8), (4, 8), (8, 8))  # (R, warps)
    if os.environ.get("TRITON_INTERPRET") == "1":
        _SHAPES = ((2, 4),)
    _CONFIGS = [triton.Config({"R": r}, num_warps=w) for r, w in _SHAPES]

    @triton.jit
    def _rows(k_ptr, rows, d0, N, D, BD: tl.constexpr):
        """A (R, BD) chunk of k (or of any (N, D) tensor), in fp32, and its offsets and mask."""
        dd = d0 + tl.arange(0, BD)
        at = rows[:, None] * D + dd[None, :]
        mask = (rows < N)[:, None] & (dd < D)[None, :]
        return tl.load(k_ptr + at, mask=mask, other=0.0).to(tl.float32), at, mask

    @triton.jit
    def _cells(x_ptr, rows, d0, N, D, DV, BD: tl.constexpr, BV: tl.constexpr):
        """A (R, BD, BV) chunk of the state, in fp32, and its offsets and mask."""
        dd = d0 + tl.arange(0, BD)
        jj = tl.arange(0, BV)
        at = rows[:, None, None] * D * DV + dd[None, :, None] * DV + jj[None, None, :]
        mask = (rows < N)[:, None, None] & (dd < D)[None, :, None] & (jj < DV)[None, None, :]
        return tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32), at, mask

    @triton.jit
    def _edit(
        x_ptr, k_ptr, v_ptr, b_ptr, rows, N, D, DV, eps2, BD: tl.constexpr, BV: tl.constexpr, ERASE: tl.constexpr
    ):
        """One pass over R rows: 1/sqrt(‖k‖² + ε²) (R,), e = v − k̂ᵀX (or v) (R, BV), k̂ᵀX, β."""
        ksq = tl.zeros((rows.shape[0],), tl.float32)
        kx = tl.zeros((rows.shape[0], BV), tl.float32)
        for d0 in range(0, D, BD):
            k, _, _ = _rows(k_ptr, rows, d0, N, D, BD)
            ksq += tl.sum(k * k, axis=1)
            if ERASE:
                x, _, _ = _cells(x_ptr, rows, d0, N, D, DV, BD, BV)
                kx += tl.sum(k[:, :, None] * x, axis=1)
        inv = 1.0 / tl.sqrt((ksq + eps2).to(tl.float32))  # eps2 may arrive as fp64
        jj = tl.arange(0, BV)
        mask_v = (rows < N)[:, None] & (jj < DV)[None, :]
        v = tl.load(v_ptr + rows[:, None] * DV + jj[None, :], mask=mask_v, other=0.0)
        beta = tl.load(b_ptr + rows, mask=rows < N, other=0.0)
        r = kx * inv[:, None]
        e = v
        if ERASE:
            e = v - r
        return inv, e, r, beta

    @triton.jit
    def _state(x_ptr, pk_ptr, rows, d0, N, D, DV, w0, e0, out_ty: tl.constexpr,
               BD: tl.constexpr, BV: tl.constexpr, CHAIN: tl.constexpr):  # fmt: skip
        """A chunk of this update's input state: loaded, or with CHAIN recomputed from the
        previous edit (x_ptr its input state, w0 = β₀/sqrt(‖k₀‖² + ε²), e0 its e) and
        rounded as the forward stored it."""
        x, _, _ = _cells(x_ptr, rows, d0, N, D, DV, BD, BV)
        if CHAIN:
            k0, _, _ = _rows(pk_ptr, rows, d0, N, D, BD)
            x = (x + (w0[:, None] * k0)[:, :, None] * e0[:, None, :]).to(out_ty).to(tl.float32)
        return x

    @triton.autotune(configs=_CONFIGS, key=["D", "DV"])
    @triton.jit
    def _forward_kernel(
        x_ptr, k_ptr, v_ptr, b_ptr, mix_ptr, out_ptr, xc_ptr, N, D, DV, eps2,
        R: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, ERASE: tl.constexpr, MIX: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
        inv, e, _, beta = _edit(x_ptr, k_ptr, v_ptr, b_ptr, rows, N, D, DV, eps2, BD, BV, ERASE)
        w = beta * inv  # X' = X + β k̂ eᵀ with k̂ = k · inv
        jj = tl.arange(0, BV)
        for d0 in range(0, D, BD):
            k, at_k, mask_k = _rows(k_ptr, rows, d0, N, D, BD)
            x, at, mask = _cells(x_ptr, rows, d0, N, D, DV, BD, BV)
            new = (x + (w[:, None] * k)[:, :, None] * e[:, None, :]).to(out_ptr.dtype.element_ty)  # rounded once
            tl.store(out_ptr + at, new, mask=mask)
            if MIX:  # the cc compression of the state as stored
                dd = d0 + tl.arange(0, BD)
                mask_m = (dd < D)[:, None] & (jj < DV)[None, :]
                mix = tl.load(mix_ptr + dd[:, None] * DV + jj[None, :], mask=mask_m, other=0.0)
                tl.store(xc_ptr + at_k, tl.sum(new.to(tl.float32) * mix[None, :, :], axis=2), mask=mask_k)

    @triton.autotune(configs=_CONFIGS, key=["D", "DV"])
    @triton.jit
    def _backward_kernel(
        x_ptr, k_ptr, v_ptr, b_ptr, mix_ptr, gnew_ptr, gxc_ptr,
        px_ptr, pk_ptr, pv_ptr, pb_ptr,
        gx_ptr, gk_ptr, gv_ptr, gb_ptr, e_ptr,
        N, D, DV, eps2,
        R: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
        ERASE: tl.constexpr, MIX: tl.constexpr, CHAIN: tl.constexpr,
    ):  # fmt: skip
        # with G = ∂L/∂X' (+ ∂L/∂x_c ⊗ mix), g = k̂ᵀG, r = k̂ᵀX: ∂X = G − β k̂ gᵀ, ∂v = β g,
        # ∂β = g·e, ∂k̂ = β (G e − X g) and k̂·∂k̂ = β (g·e − r·g), so a first pass over the
        # rows makes every row sum and a second one writes ∂X and ∂k. The input state is
        # only needed with erase (write-only's gradients do not depend on it).
        rows = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
        jj = tl.arange(0, BV)
        mask_v = (rows < N)[:, None] & (jj < DV)[None, :]
        xs = x_ptr
        w0 = tl.zeros((R,), tl.float32)
        e0 = tl.zeros((R, BV), tl.float32)
        if CHAIN and ERASE:  # the previous edit, to recompute this update's input state chunk by chunk
            inv0, e0, _, beta0 = _edit(px_ptr, pk_ptr, pv_ptr, pb_ptr, rows, N, D, DV, eps2, BD, BV, ERASE)
            w0 = beta0 * inv0
            xs = px_ptr
        ksq = tl.zeros((R,), tl.float32)
        kx = tl.zeros((R, BV), tl.float32)
        kg = tl.zeros((R, BV), tl.float32)
        for d0 in range(0, D, BD):
            k, at_k, mask_k = _rows(k_ptr, rows, d0, N, D, BD)
            G, _, _ = _cells(gnew_ptr, rows, d0, N, D, DV, BD, BV)
            if MIX:
                dd = d0 + tl.arange(0, BD)
                mask_m = (dd < D)[:, None] & (jj < DV)[None, :]
                mix = tl.load(mix_ptr + dd[:, None] * DV + jj[None, :], mask=mask_m, other=0.0)
                gxc = tl.load(gxc_ptr + at_k, mask=mask_k, other=0.0)
                G += gxc[:, :, None] * mix[None, :, :]
            ksq += tl.sum(k * k, axis=1)
            kg += tl.sum(k[:, :, None] * G, axis=1)
            if ERASE:
                x = _state(xs, pk_ptr, rows, d0, N, D, DV, w0, e0, gx_ptr.dtype.element_ty, BD, BV, CHAIN)
                kx += tl.sum(k[:, :, None] * x, axis=1)
        inv = 1.0 / tl.sqrt((ksq + eps2).to(tl.float32))
        v = tl.load(v_ptr + rows[:, None] * DV + jj[None, :], mask=mask_v, other=0.0)
        beta = tl.load(b_ptr + rows, mask=rows < N, other=0.0)
        g = kg * inv[:, None]
        r = kx * inv[:, None]
        e = v
        if ERASE:
            e = v - r
        tl.store(gv_ptr + rows[:, None] * DV + jj[None, :], beta[:, None] * g, mask=mask_v)
        tl.store(gb_ptr + rows, tl.sum(g * e, axis=1), mask=rows < N)
        if MIX:
            tl.store(e_ptr + rows[:, None] * DV + jj[None, :], e, mask=mask_v)
        dot = tl.sum(g * e, axis=1)  # k̂·∂k̂ / β
        if ERASE:
            dot -= tl.sum(r * g, axis=1)
        for d0 in range(0, D, BD):
            k, at_k, mask_k = _rows(k_ptr, rows, d0, N, D, BD)
            G, at, mask = _cells(gnew_ptr, rows, d0, N, D, DV, BD, BV)
            if MIX:
                dd = d0 + tl.arange(0, BD)
                mask_m = (dd < D)[:, None] & (jj < DV)[None, :]
                mix = tl.load(mix_ptr + dd[:, None] * DV + jj[None, :], mask=mask_m, other=0.0)
                gxc = tl.load(gxc_ptr + at_k, mask=mask_k, other=0.0)
                G += gxc[:, :, None] * mix[None, :, :]
            kh = k * inv[:, None]
            grad_kh = tl.sum(G * e[:, None, :], axis=2)
            if ERASE:
                x = _state(xs, pk_ptr, rows, d0, N, D, DV, w0, e0, gx_ptr.dtype.element_ty, BD, BV, CHAIN)
                grad_kh -= tl.sum(x * g[:, None, :], axis=2)
                G -= (beta[:, None] * kh)[:, :, None] * g[:, None, :]
            grad_k = beta[:, None] * (grad_kh - kh * dot[:, None]) * inv[:, None]
            tl.store(gk_ptr + at_k, grad_k.to(gk_ptr.dtype.element_ty), mask=mask_k)
            tl.store(gx_ptr + at, G.to(gx_ptr.dtype.element_ty), mask=mask)


def _blocks(D: int, DV: int) -> tuple[int, int]:
    """The chunk of d a program handles at a time, and dv padded to a power of two."""
    return min(triton.next_power_of_2(D), 256), max(2, triton.next_power_of_2(DV))


def _use_triton(state: Tensor) -> bool:
    return triton is not None and state.is_cuda and state.dtype in (torch.float32, torch.bfloat16)


# -- the op and its autograd --------------------------------------------------------------


# triton_op lets torch.compile see the kernels; without triton it is a plain custom op
_define = torch.library.triton_op if triton is not None else torch.library.custom_op


@_define("deepdelta::ddl_update", mutates_args=())
def _update_op(
    state: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    mix: Tensor | None,
    prev_state: Tensor | None,
    prev_k: Tensor | None,
    prev_v: Tensor | None,
    prev_beta: Tensor | None,
    k_eps: float,
    erase: bool,
) -> tuple[Tensor, Tensor]:
    """(X', the cc compression of X' or an empty tensor). The prev_* inputs are only kept
    for the backward (to recompute ``state``)."""
    if not _use_triton(state):
        return _forward_formulas(state, k, v, beta, mix, k_eps, erase)
    N, D, DV = state.shape
    BD, BV = _blocks(D, DV)
    new = torch.empty_like(state)
    xc = v.new_empty((N, D) if mix is not None else (0,))
    torch.library.wrap_triton(_forward_kernel)[lambda meta: (triton.cdiv(N, meta["R"]),)](
        state, k, v, beta, mix if mix is not None else state, new, xc, N, D, DV, k_eps**2,
        BD=BD, BV=BV, ERASE=erase, MIX=mix is not None,
    )  # fmt: skip
    return new, xc


@_define("deepdelta::ddl_update_backward", mutates_args=())
def _backward_op(
    state: Tensor | None,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    mix: Tensor | None,
    grad_new: Tensor,
    grad_xc: Tensor | None,
    prev_state: Tensor | None,
    prev_k: Tensor | None,
    prev_v: Tensor | None,
    prev_beta: Tensor | None,
    k_eps: float,
    erase: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(∂state, ∂k, ∂v, ∂β, ∂mix or an empty tensor)."""
    chain = prev_state is not None
    ref = prev_state if chain else state
    if not _use_triton(ref):
        if chain:
            state = _forward_formulas(prev_state, prev_k, prev_v, prev_beta, None, k_eps, erase)[0]
        gx, gk, gv, gb, gmix = _backward_formulas(state, k, v, beta, mix, grad_new, grad_xc, k_eps, erase)
        gx = gx.clone() if gx is grad_new else gx  # an op's output may not alias its input
        return gx, gk, gv, gb, gmix if gmix is not None else v.new_empty(0)
    N, D, DV = ref.shape
    BD, BV = _blocks(D, DV)
    gx = torch.empty_like(ref)
    gk = torch.empty_like(k)
    gv = torch.empty_like(v)
    gb = torch.empty_like(beta)
    e = v.new_empty((N, DV) if mix is not None else (0,))
    torch.library.wrap_triton(_backward_kernel)[lambda meta: (triton.cdiv(N, meta["R"]),)](
        ref, k, v, beta, mix if mix is not None else ref, grad_new.contiguous(),
        grad_xc.contiguous() if grad_xc is not None else k,
        ref, prev_k if chain else k, prev_v if chain else v, prev_beta if chain else beta,
        gx, gk, gv, gb, e, N, D, DV, k_eps**2,
        BD=BD, BV=BV, ERASE=erase, MIX=mix is not None, CHAIN=chain,
    )  # fmt: skip
    if mix is None:
        return gx, gk, gv, gb, e
    # ∂mix = Σ_n grad_xc ⊗ X', X' = X + β k̂ eᵀ: a column sum of the input state (fused into
    # one reduction under torch.compile) plus a (d × N)(N × dv) product
    if chain:
        state = _forward_formulas(prev_state, prev_k, prev_v, prev_beta, None, k_eps, erase)[0]
    kh = _key(k, torch.float32, k_eps)[0]
    gmix = (grad_xc[..., None] * state.float()).sum(0) + (grad_xc * beta[:, None] * kh).T @ e
    return gx, gk, gv, gb, gmix


def _setup_context(ctx, inputs, output) -> None:
    state, k, v, beta, mix, prev_state, prev_k, prev_v, prev_beta, k_eps, erase = inputs
    ctx.k_eps, ctx.erase, ctx.chain = k_eps, erase, prev_state is not None
    ctx.save_for_backward(None if ctx.chain else state, k, v, beta, mix, prev_state, prev_k, prev_v, prev_beta)


def _backward(ctx, grad_new: Tensor, grad_xc: Tensor):
    state, k, v, beta, mix, prev_state, prev_k, prev_v, prev_beta = ctx.saved_tensors
    gx, gk, gv, gb, gmix = _backward_op(
        state, k, v, beta, mix, grad_new, grad_xc if mix is not None else None,
        prev_state, prev_k, prev_v, prev_beta, ctx.k_eps, ctx.erase,
    )  # fmt: skip
    return gx, gk, gv, gb, gmix if mix is not None else None, None, None, None, None, None, None


_update_op.register_autograd(_backward, setup_context=_setup_context)


def update(
    state: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    k_eps: float = 1e-5,
    erase: bool = True,
    mix: Tensor | None = None,
    prev: Edit | None = None,
) -> tuple[Tensor, Tensor | None]:
    """X' = the DDL update (``erase=True``) or the write-only update of ``state`` (..., d, dv),
    and, with ``mix`` (d, dv), the `cc` compression Σ_j mix⊙X' (..., d) of the new state.

    ``prev`` names the update whose output ``state`` is; the backward then recomputes
    ``state`` from it instead of keeping it (``state`` must equal that update's output).
    """
    lead, (d, dv) = state.shape[:-2], state.shape[-2:]
    dtype = ops.at_least_fp32(state).dtype  # the compute dtype (fp32 for a bf16 state)

    def flat(edit: Edit) -> list[Tensor]:  # contiguous rows, v and β in the compute dtype
        x, k, v, beta = edit
        rows = [x.reshape(-1, d, dv), k.reshape(-1, d), v.to(dtype).reshape(-1, dv), beta.to(dtype).reshape(-1)]
        return [t.contiguous() for t in rows]

    before = flat(prev) if prev is not None else [None] * 4
    mix = mix.to(dtype).contiguous() if mix is not None else None
    new, xc = _update_op(*flat(Edit(state, k, v, beta)), mix, *before, k_eps, erase)
    return new.view(*lead, d, dv), (xc.view(*lead, d) if mix is not None else None)
