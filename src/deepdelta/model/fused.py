"""The fused DDL update: one pass over the state forward, one pass backward (issue 5).

``update(state, k, v, beta, ...)`` computes the same function as ``ops.delta_update`` /
``ops.write_only_update`` — key norm, read, compare, write — and optionally the reads of
the new state that the next compression needs (``Compress.taps``: one for `cc`, one per
token-conv tap for `tc`), in one Triton kernel per row of the state (one token's (d, dv)
matrix): the state is read once and written once. Its
backward is one more kernel per row, from the saved input state, with the gradients
derived by hand (``_backward_formulas`` states them in torch; tests compare them with
autograd through ``ops``).

Memory: the op saves its input state, not its output. With ``prev`` (the inputs of the
update that produced ``state``), it saves nothing of its own and recomputes ``state``
from ``prev`` inside the backward kernel (a row-local recomputation), so a block's two
updates keep one state, as the compiled plain ops do.

The Triton kernels run for fp32 and bf16 states on CUDA; elsewhere (CPU, fp64) the op runs
the same formulas in torch, so the hand-written backward is tested on the CPU too. A bf16
state (``state_dtype=bfloat16``) is loaded, updated in fp32 and rounded once when stored,
like ``ops``; its gradient is stored in bf16 as well, and everything else (v, β, the
reads) stays in fp32.

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
    state: Tensor, k: Tensor, v: Tensor, beta: Tensor, taps: Tensor | None, k_eps: float, erase: bool
) -> tuple[Tensor, Tensor]:
    rule = ops.delta_update if erase else ops.write_only_update
    new = rule(state, k.to(v.dtype), v, beta, k_eps)  # rounded once to the state's dtype
    if taps is None:
        return new, v.new_empty(0)
    return new, torch.einsum("ndj,sdj->nsd", new.to(taps.dtype), taps)  # reads of the state as stored


def _grad_taps(grad_reads: Tensor, state: Tensor, scaled_key: Tensor, e: Tensor) -> Tensor:
    """∂taps[s] = Σ_n grad_reads[n, s] ⊗ X'[n] with X' = X + (β k̂) eᵀ before its rounding:
    a column sum of the input state (one reduction under torch.compile) plus a (d × N)(N × dv)
    product, per tap."""
    x = state.to(e.dtype)
    return torch.stack([(g[..., None] * x).sum(0) + (g * scaled_key).T @ e for g in grad_reads.unbind(1)])


def _backward_formulas(
    state: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    taps: Tensor | None,
    grad_new: Tensor,
    grad_reads: Tensor | None,
    k_eps: float,
    erase: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Gradients of X' = X + β k̂ eᵀ, e = v − k̂ᵀX (e = v without erase), and of the reads
    r_s = Σ_j taps[s]⊙X'.

    With G = ∂L/∂X' (plus Σ_s grad_reads_s ⊗ taps[s]) and g = Gᵀk̂:
    ∂X = G − β k̂ gᵀ, ∂v = β g, ∂β = g·e, ∂k̂ = β (G e − X g),
    ∂k = (∂k̂ − k̂ (k̂·∂k̂)) / sqrt(‖k‖² + ε²), ∂taps[s] = Σ_tokens grad_reads_s ⊗ X'.
    (Without erase the X g term and the −β k̂ gᵀ term drop.) Computed in v's dtype (at least
    fp32); ∂X is returned in the state's dtype, and ∂taps uses X' before its rounding."""
    out_dtype, state, grad_new = state.dtype, state.to(v.dtype), grad_new.to(v.dtype)
    kh, inv = _key(k, v.dtype, k_eps)
    b = beta[..., None]
    e = v - (kh[..., None] * state).sum(-2) if erase else v
    G = grad_new if taps is None else grad_new + torch.einsum("nsd,sdj->ndj", grad_reads, taps)
    g = (kh[..., None] * G).sum(-2)
    grad_kh = (G * e[..., None, :]).sum(-1)
    if erase:
        grad_kh = grad_kh - (state * g[..., None, :]).sum(-1)
    grad_kh = b * grad_kh
    grad_k = (grad_kh - kh * (kh * grad_kh).sum(-1, keepdim=True)) * inv
    grad_state = G - (b * kh)[..., None] * g[..., None, :] if erase else G
    grad_taps = _grad_taps(grad_reads, state, b * kh, e) if taps is not None else None
    return grad_state.to(out_dtype), grad_k.to(k.dtype), b * g, (g * e).sum(-1), grad_taps


# -- Triton kernels -----------------------------------------------------------------------

if triton is not None:
    # R rows per program share the block-wide reductions over d (a row is only d·dv
    # numbers); R and the warps are tuned per (d, dv). The interpreter
    # (TRITON_INTERPRET=1, CPU) cannot benchmark, so it gets one configuration.
    _SHAPES = ((1, 4), (1, 8), (2, 4), (2, 8), (4, 8), (4, 16))  # (R, warps)
    if os.environ.get("TRITON_INTERPRET") == "1":
        _SHAPES = ((2, 4),)
    _CONFIGS = [triton.Config({"R": r}, num_warps=w) for r, w in _SHAPES]

    # Pointers arrive offset to the program's first row, ``rows`` is tl.arange(0, R) and
    # ``N`` the rows left from there: the per-element offsets stay 32-bit (fewer registers).

    @triton.jit
    def _load_edit(k_ptr, v_ptr, b_ptr, rows, N, D, DV, eps2, BD: tl.constexpr, BV: tl.constexpr):
        """R rows' edit: k̂ (R, BD), 1/sqrt(‖k‖² + ε²) (R,), v (R, BV), β (R,)."""
        offs_d = tl.arange(0, BD)
        offs_j = tl.arange(0, BV)
        mask_r = rows < N
        mask_k = mask_r[:, None] & (offs_d < D)[None, :]
        k = tl.load(k_ptr + rows[:, None] * D + offs_d[None, :], mask=mask_k, other=0.0).to(tl.float32)
        inv = 1.0 / tl.sqrt((tl.sum(k * k, axis=1) + eps2).to(tl.float32))  # eps2 may arrive as fp64
        mask_v = mask_r[:, None] & (offs_j < DV)[None, :]
        v = tl.load(v_ptr + rows[:, None] * DV + offs_j[None, :], mask=mask_v, other=0.0)
        beta = tl.load(b_ptr + rows, mask=mask_r, other=0.0)
        return k * inv[:, None], inv, v, beta

    @triton.jit
    def _load_state(x_ptr, rows, N, D, DV, BD: tl.constexpr, BV: tl.constexpr):
        x = tl.load(x_ptr + _tile(rows, D, DV, BD, BV), mask=_mask(rows, N, D, DV, BD, BV), other=0.0)
        return x.to(tl.float32)  # a bf16 state is updated in fp32

    @triton.jit
    def _tile(rows, D, DV, BD: tl.constexpr, BV: tl.constexpr):
        offs_d = tl.arange(0, BD)
        offs_j = tl.arange(0, BV)
        return rows[:, None, None] * D * DV + offs_d[None, :, None] * DV + offs_j[None, None, :]

    @triton.jit
    def _mask(rows, N, D, DV, BD: tl.constexpr, BV: tl.constexpr):
        offs_d = tl.arange(0, BD)
        offs_j = tl.arange(0, BV)
        return (rows < N)[:, None, None] & (offs_d < D)[None, :, None] & (offs_j < DV)[None, None, :]

    @triton.jit
    def _load_tap(taps_ptr, s, D, DV, BD: tl.constexpr, BV: tl.constexpr):
        offs_d = tl.arange(0, BD)
        offs_j = tl.arange(0, BV)
        mask = (offs_d < D)[:, None] & (offs_j < DV)[None, :]
        return tl.load(taps_ptr + s * D * DV + offs_d[:, None] * DV + offs_j[None, :], mask=mask, other=0.0)

    @triton.jit
    def _apply(x, kh, v, beta, ERASE: tl.constexpr):
        # X' = X + β k̂ eᵀ with e = v − k̂ᵀX (or e = v without erase), for R rows at once
        if ERASE:
            e = v - tl.sum(kh[:, :, None] * x, axis=1)
        else:
            e = v
        return x + (beta[:, None] * kh)[:, :, None] * e[:, None, :], e

    @triton.autotune(configs=_CONFIGS, key=["D", "DV", "S"])
    @triton.jit
    def _forward_kernel(
        x_ptr, k_ptr, v_ptr, b_ptr, taps_ptr, out_ptr, reads_ptr, N, D, DV, eps2,
        R: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, ERASE: tl.constexpr, S: tl.constexpr,
    ):  # fmt: skip
        first = tl.program_id(0).to(tl.int64) * R
        rows, N = tl.arange(0, R), N - first
        x_ptr += first * D * DV
        out_ptr += first * D * DV
        k_ptr += first * D
        v_ptr += first * DV
        b_ptr += first
        reads_ptr += first * S * D
        kh, _, v, beta = _load_edit(k_ptr, v_ptr, b_ptr, rows, N, D, DV, eps2, BD, BV)
        new, _ = _apply(_load_state(x_ptr, rows, N, D, DV, BD, BV), kh, v, beta, ERASE)
        new = new.to(out_ptr.dtype.element_ty)  # rounded once (a no-op for an fp32 state)
        tl.store(out_ptr + _tile(rows, D, DV, BD, BV), new, mask=_mask(rows, N, D, DV, BD, BV))
        offs_d = tl.arange(0, BD)
        mask_c = (rows < N)[:, None] & (offs_d < D)[None, :]
        for s in tl.static_range(S):  # the compression's reads, of the state as stored
            tap = _load_tap(taps_ptr, s, D, DV, BD, BV)
            read = tl.sum(new.to(tl.float32) * tap[None, :, :], axis=2)
            tl.store(reads_ptr + (rows[:, None] * S + s) * D + offs_d[None, :], read, mask=mask_c)

    @triton.autotune(configs=_CONFIGS, key=["D", "DV", "S"])
    @triton.jit
    def _backward_kernel(
        x_ptr, k_ptr, v_ptr, b_ptr, taps_ptr, gnew_ptr, greads_ptr,
        px_ptr, pk_ptr, pv_ptr, pb_ptr,
        gx_ptr, gk_ptr, gv_ptr, gb_ptr, e_ptr,
        N, D, DV, eps2,
        R: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
        ERASE: tl.constexpr, S: tl.constexpr, CHAIN: tl.constexpr,
    ):  # fmt: skip
        # a loop over 16 rows per program (to sum ∂taps in the kernel) took 1.3x as long in
        # all on the H100; ∂taps is summed outside
        first = tl.program_id(0).to(tl.int64) * R
        rows, N = tl.arange(0, R), N - first
        x_ptr += first * D * DV
        px_ptr += first * D * DV
        gnew_ptr += first * D * DV
        gx_ptr += first * D * DV
        k_ptr += first * D
        pk_ptr += first * D
        gk_ptr += first * D
        greads_ptr += first * S * D
        v_ptr += first * DV
        pv_ptr += first * DV
        gv_ptr += first * DV
        e_ptr += first * DV
        b_ptr += first
        pb_ptr += first
        gb_ptr += first
        offs_d = tl.arange(0, BD)
        offs_j = tl.arange(0, BV)
        mask_r = rows < N
        mask_k = mask_r[:, None] & (offs_d < D)[None, :]
        mask_v = mask_r[:, None] & (offs_j < DV)[None, :]
        tile = _tile(rows, D, DV, BD, BV)
        mask = _mask(rows, N, D, DV, BD, BV)
        if CHAIN:  # recompute this op's input state from the previous edit
            kh0, _, v0, beta0 = _load_edit(pk_ptr, pv_ptr, pb_ptr, rows, N, D, DV, eps2, BD, BV)
            x, _ = _apply(_load_state(px_ptr, rows, N, D, DV, BD, BV), kh0, v0, beta0, ERASE)
            x = x.to(gx_ptr.dtype.element_ty).to(tl.float32)  # rounded as the forward stored it
        else:
            x = _load_state(x_ptr, rows, N, D, DV, BD, BV)
        kh, inv, v, beta = _load_edit(k_ptr, v_ptr, b_ptr, rows, N, D, DV, eps2, BD, BV)
        _, e = _apply(x, kh, v, beta, ERASE)
        G = tl.load(gnew_ptr + tile, mask=mask, other=0.0).to(tl.float32)
        for s in tl.static_range(S):
            gread = tl.load(greads_ptr + (rows[:, None] * S + s) * D + offs_d[None, :], mask=mask_k, other=0.0)
            G += gread[:, :, None] * _load_tap(taps_ptr, s, D, DV, BD, BV)[None, :, :]
        if S > 0:  # for ∂taps, summed outside
            tl.store(e_ptr + rows[:, None] * DV + offs_j[None, :], e, mask=mask_v)
        g = tl.sum(kh[:, :, None] * G, axis=1)
        tl.store(gv_ptr + rows[:, None] * DV + offs_j[None, :], beta[:, None] * g, mask=mask_v)
        tl.store(gb_ptr + rows, tl.sum(g * e, axis=1), mask=mask_r)
        grad_kh = tl.sum(G * e[:, None, :], axis=2)
        if ERASE:
            grad_kh -= tl.sum(x * g[:, None, :], axis=2)
            G -= (beta[:, None] * kh)[:, :, None] * g[:, None, :]
        grad_kh = beta[:, None] * grad_kh
        grad_k = (grad_kh - kh * tl.sum(kh * grad_kh, axis=1)[:, None]) * inv[:, None]
        tl.store(gk_ptr + rows[:, None] * D + offs_d[None, :], grad_k.to(gk_ptr.dtype.element_ty), mask=mask_k)
        tl.store(gx_ptr + tile, G.to(gx_ptr.dtype.element_ty), mask=mask)


def _blocks(D: int, DV: int) -> tuple[int, int]:
    return triton.next_power_of_2(D), max(2, triton.next_power_of_2(DV))


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
    taps: Tensor | None,
    prev_state: Tensor | None,
    prev_k: Tensor | None,
    prev_v: Tensor | None,
    prev_beta: Tensor | None,
    k_eps: float,
    erase: bool,
) -> tuple[Tensor, Tensor]:
    """(X', the taps' reads of X' (N, S, d) or an empty tensor). The prev_* inputs are only
    kept for the backward (to recompute ``state``)."""
    if not _use_triton(state):
        return _forward_formulas(state, k, v, beta, taps, k_eps, erase)
    N, D, DV = state.shape
    BD, BV = _blocks(D, DV)
    S = taps.shape[0] if taps is not None else 0
    new = torch.empty_like(state)
    reads = v.new_empty((N, S, D) if S else (0,))
    torch.library.wrap_triton(_forward_kernel)[lambda meta: (triton.cdiv(N, meta["R"]),)](
        state, k, v, beta, taps if S else state, new, reads, N, D, DV, k_eps**2,
        BD=BD, BV=BV, ERASE=erase, S=S,
    )  # fmt: skip
    return new, reads


@_define("deepdelta::ddl_update_backward", mutates_args=())
def _backward_op(
    state: Tensor | None,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    taps: Tensor | None,
    grad_new: Tensor,
    grad_reads: Tensor | None,
    prev_state: Tensor | None,
    prev_k: Tensor | None,
    prev_v: Tensor | None,
    prev_beta: Tensor | None,
    k_eps: float,
    erase: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(∂state, ∂k, ∂v, ∂β, ∂taps or an empty tensor)."""
    chain = prev_state is not None

    def state_in() -> Tensor:  # saved, or recomputed from the previous edit (the kernel does this per row)
        return _forward_formulas(prev_state, prev_k, prev_v, prev_beta, None, k_eps, erase)[0] if chain else state

    ref = prev_state if chain else state
    if not _use_triton(ref):
        gx, gk, gv, gb, gtaps = _backward_formulas(state_in(), k, v, beta, taps, grad_new, grad_reads, k_eps, erase)
        gx = gx.clone() if gx is grad_new else gx  # an op's output may not alias its input
        return gx, gk, gv, gb, gtaps if gtaps is not None else v.new_empty(0)
    N, D, DV = ref.shape
    BD, BV = _blocks(D, DV)
    S = taps.shape[0] if taps is not None else 0
    gx = torch.empty_like(ref)
    gk = torch.empty_like(k)
    gv = torch.empty_like(v)
    gb = torch.empty_like(beta)
    e = v.new_empty((N, DV) if S else (0,))
    torch.library.wrap_triton(_backward_kernel)[lambda meta: (triton.cdiv(N, meta["R"]),)](
        ref, k, v, beta, taps if S else ref, grad_new.contiguous(),
        grad_reads.contiguous() if S else k,
        ref, prev_k if chain else k, prev_v if chain else v, prev_beta if chain else beta,
        gx, gk, gv, gb, e, N, D, DV, k_eps**2,
        BD=BD, BV=BV, ERASE=erase, S=S, CHAIN=chain,
    )  # fmt: skip
    if not S:
        return gx, gk, gv, gb, e
    scaled_key = beta[:, None] * _key(k, torch.float32, k_eps)[0]
    return gx, gk, gv, gb, _grad_taps(grad_reads, state_in(), scaled_key, e)


def _setup_context(ctx, inputs, output) -> None:
    state, k, v, beta, taps, prev_state, prev_k, prev_v, prev_beta, k_eps, erase = inputs
    ctx.k_eps, ctx.erase, ctx.chain = k_eps, erase, prev_state is not None
    ctx.save_for_backward(None if ctx.chain else state, k, v, beta, taps, prev_state, prev_k, prev_v, prev_beta)


def _backward(ctx, grad_new: Tensor, grad_reads: Tensor):
    state, k, v, beta, taps, prev_state, prev_k, prev_v, prev_beta = ctx.saved_tensors
    gx, gk, gv, gb, gtaps = _backward_op(
        state, k, v, beta, taps, grad_new, grad_reads if taps is not None else None,
        prev_state, prev_k, prev_v, prev_beta, ctx.k_eps, ctx.erase,
    )  # fmt: skip
    return gx, gk, gv, gb, gtaps if taps is not None else None, None, None, None, None, None, None


_update_op.register_autograd(_backward, setup_context=_setup_context)


def update(
    state: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    k_eps: float = 1e-5,
    erase: bool = True,
    taps: Tensor | None = None,
    prev: Edit | None = None,
) -> tuple[Tensor, Tensor | None]:
    """X' = the DDL update (``erase=True``) or the write-only update of ``state`` (..., d, dv),
    and, with ``taps`` (S, d, dv), the reads Σ_j taps[s]⊙X' (..., S, d) of the new state
    (``Compress.combine`` makes the compression from them).

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
    taps = taps.to(dtype).contiguous() if taps is not None else None
    new, reads = _update_op(*flat(Edit(state, k, v, beta)), taps, *before, k_eps, erase)
    return new.view(*lead, d, dv), (reads.view(*lead, -1, d) if taps is not None else None)
