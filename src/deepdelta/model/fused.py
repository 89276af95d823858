"""The fused DDL update: one pass over the state forward, one pass backward (issue 5).

``update(state, k, v, beta, ...)`` computes the same function as ``ops.delta_update`` /
``ops.write_only_update`` — key norm, read, compare, write — and optionally the reads of
the new state that the next compression needs (``Compress.taps``: one for `cc`, one per
token-conv tap for `tc`), in one Triton kernel per row of the state (one token's (d, dv)
matrix): the state is read once and written once. Its backward is one more kernel per
row, with the gradients derived by hand (``_backward_formulas`` states them in torch;
tests compare them with autograd through ``ops``).

The forward also returns its per-row results e = v − k̂ᵀX and 1/sqrt(‖k‖² + ε²) (dv + 1
numbers a row, kept in an ``Edit``), so the backward needs no reduction over d to find
them again: of the six block-wide reductions a row's backward had, two remain. Nsight
Compute found these kernels bound by latency, not bandwidth (up to 255 registers a thread,
12.5–25% occupancy, DRAM at 28–55% of its peak); docs/benchmarks.md has the measurements.

Memory: the op saves its input state, not its output. With ``prev`` (the ``Edit`` of the
update that produced ``state``), it saves no state of its own and recomputes ``state``
from ``prev`` inside the backward kernel (X + β k̂ eᵀ, elementwise), so a block's two
updates keep one state, as the compiled plain ops do.

The Triton kernels run for fp32 and bf16 states on CUDA; elsewhere (CPU, fp64) the op runs
the same formulas in torch, so the hand-written backward is tested on the CPU too. A bf16
state (``state_dtype=bfloat16``) is loaded, updated in fp32 and rounded once when stored,
like ``ops``; its gradient is stored in bf16 as well, and everything else (v, β, e, the
reads) stays in fp32.

It is opt-in (``model.kernel=fused``); docs/benchmarks.md has its measurements against the
compiled plain ops and the per-kernel times.
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
    """What one update kept, as rows: its input state (N, d, dv), key (N, d), gate (N,),
    e = v − k̂ᵀX (N, dv) and 1/sqrt(‖k‖² + ε²) (N,). Enough to recompute its output."""

    state: Tensor
    k: Tensor
    beta: Tensor
    e: Tensor
    inv: Tensor


# -- the formulas, in torch (CPU / fp64 path, and the statement of the kernels' math) --------


def _key(k: Tensor, dtype: torch.dtype, k_eps: float) -> tuple[Tensor, Tensor]:
    """k̂ (``ops.normalize_key``) and 1/sqrt(‖k‖² + ε²), in ``dtype``, the compute dtype."""
    k = k.to(dtype)
    return ops.normalize_key(k, k_eps), torch.rsqrt((k * k).sum(-1) + k_eps**2)


def _written(state: Tensor, k_hat: Tensor, beta: Tensor, e: Tensor) -> Tensor:
    """X + β k̂ eᵀ in the compute dtype, rounded once to the state's dtype (as ``ops``)."""
    return ops.write(ops.at_least_fp32(state).to(e.dtype), beta[..., None] * k_hat, e).to(state.dtype)


def _forward_formulas(
    state: Tensor, k: Tensor, v: Tensor, beta: Tensor, taps: Tensor | None, k_eps: float, erase: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(X', the taps' reads of X' as stored, e, 1/sqrt(‖k‖² + ε²)): ``ops.delta_update`` /
    ``ops.write_only_update`` written out, in v's dtype (at least fp32)."""
    k_hat, inv = _key(k, v.dtype, k_eps)
    e = v - ops.read(state.to(v.dtype), k_hat) if erase else v.clone()  # an output may not alias an input
    new = _written(state, k_hat, beta, e)
    reads = torch.einsum("ndj,sdj->nsd", new.to(v.dtype), taps) if taps is not None else v.new_empty(0)
    return new, reads, e, inv


def _recomputed(prev: Edit, k_eps: float) -> Tensor:
    """The output state of the update that ``prev`` kept, as its forward stored it."""
    return _written(prev.state, _key(prev.k, prev.e.dtype, k_eps)[0], prev.beta, prev.e)


def _grad_taps(grad_reads: Tensor, state: Tensor, scaled_key: Tensor, e: Tensor) -> Tensor:
    """∂taps[s] = Σ_n grad_reads[n, s] ⊗ X'[n] with X' = X + (β k̂) eᵀ before its rounding:
    a column sum of the input state (one reduction under torch.compile) plus a (d × N)(N × dv)
    product, per tap."""
    x = state.to(e.dtype)
    return torch.stack([(g[..., None] * x).sum(0) + (g * scaled_key).T @ e for g in grad_reads.unbind(1)])


def _backward_formulas(
    state: Tensor,
    k: Tensor,
    beta: Tensor,
    e: Tensor,
    inv: Tensor,
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
    (Without erase the X g term and the −β k̂ gᵀ term drop.) Computed in e's dtype (at least
    fp32); ∂X is returned in the state's dtype, and ∂taps uses X' before its rounding."""
    out_dtype, state, grad_new = state.dtype, state.to(e.dtype), grad_new.to(e.dtype)
    kh = _key(k, e.dtype, k_eps)[0]
    b = beta[..., None]
    G = grad_new if taps is None else grad_new + torch.einsum("nsd,sdj->ndj", grad_reads, taps)
    g = (kh[..., None] * G).sum(-2)
    grad_kh = (G * e[..., None, :]).sum(-1)
    if erase:
        grad_kh = grad_kh - (state * g[..., None, :]).sum(-1)
    grad_kh = b * grad_kh
    grad_k = (grad_kh - kh * (kh * grad_kh).sum(-1, keepdim=True)) * inv[..., None]
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
    def _load_rows(ptr, rows, N, W, stride, BW: tl.constexpr):
        """(R, BW) fp32: R rows of width W, ``stride`` apart (masked beyond)."""
        offs = tl.arange(0, BW)
        mask = (rows < N)[:, None] & (offs < W)[None, :]
        return tl.load(ptr + rows[:, None] * stride + offs[None, :], mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _store_rows(ptr, rows, N, W, stride, value, BW: tl.constexpr):
        offs = tl.arange(0, BW)
        mask = (rows < N)[:, None] & (offs < W)[None, :]
        tl.store(ptr + rows[:, None] * stride + offs[None, :], value.to(ptr.dtype.element_ty), mask=mask)

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
    def _load_state(x_ptr, rows, N, D, DV, BD: tl.constexpr, BV: tl.constexpr):
        x = tl.load(x_ptr + _tile(rows, D, DV, BD, BV), mask=_mask(rows, N, D, DV, BD, BV), other=0.0)
        return x.to(tl.float32)  # a bf16 state is updated in fp32

    @triton.jit
    def _load_tap(taps_ptr, s, D, DV, BD: tl.constexpr, BV: tl.constexpr):
        offs_d = tl.arange(0, BD)
        offs_j = tl.arange(0, BV)
        mask = (offs_d < D)[:, None] & (offs_j < DV)[None, :]
        return tl.load(taps_ptr + s * D * DV + offs_d[:, None] * DV + offs_j[None, :], mask=mask, other=0.0)

    @triton.jit
    def _write(x, kh, beta, e):
        # X + β k̂ eᵀ for R rows: one expression, so the backward's recomputation of a
        # forward's output is the same arithmetic
        return x + (beta[:, None] * kh)[:, :, None] * e[:, None, :]

    @triton.autotune(configs=_CONFIGS, key=["D", "DV", "S"])
    @triton.jit
    def _forward_kernel(
        x_ptr, k_ptr, v_ptr, b_ptr, taps_ptr, out_ptr, reads_ptr, e_ptr, inv_ptr, N, D, DV, eps2,
        R: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, ERASE: tl.constexpr, S: tl.constexpr,
    ):  # fmt: skip
        first = tl.program_id(0).to(tl.int64) * R
        rows, N = tl.arange(0, R), N - first
        x_ptr += first * D * DV
        out_ptr += first * D * DV
        k_ptr += first * D
        v_ptr += first * DV
        e_ptr += first * DV
        b_ptr += first
        inv_ptr += first
        reads_ptr += first * S * D
        k = _load_rows(k_ptr, rows, N, D, D, BD)
        inv = 1.0 / tl.sqrt((tl.sum(k * k, axis=1) + eps2).to(tl.float32))  # eps2 may arrive as fp64
        kh = k * inv[:, None]
        beta = tl.load(b_ptr + rows, mask=rows < N, other=0.0)
        x = _load_state(x_ptr, rows, N, D, DV, BD, BV)
        e = _load_rows(v_ptr, rows, N, DV, DV, BV)
        if ERASE:
            e -= tl.sum(kh[:, :, None] * x, axis=1)
        new = _write(x, kh, beta, e).to(out_ptr.dtype.element_ty)  # rounded once (no-op for fp32)
        tl.store(out_ptr + _tile(rows, D, DV, BD, BV), new, mask=_mask(rows, N, D, DV, BD, BV))
        _store_rows(e_ptr, rows, N, DV, DV, e, BV)
        tl.store(inv_ptr + rows, inv, mask=rows < N)
        for s in tl.static_range(S):  # the compression's reads, of the state as stored
            read = tl.sum(new.to(tl.float32) * _load_tap(taps_ptr, s, D, DV, BD, BV)[None, :, :], axis=2)
            _store_rows(reads_ptr + s * D, rows, N, D, S * D, read, BD)

    @triton.autotune(configs=_CONFIGS, key=["D", "DV", "S"])
    @triton.jit
    def _backward_kernel(
        x_ptr, k_ptr, b_ptr, e_ptr, inv_ptr, taps_ptr, gnew_ptr, greads_ptr,
        px_ptr, pk_ptr, pb_ptr, pe_ptr, pinv_ptr,
        gx_ptr, gk_ptr, gv_ptr, gb_ptr,
        N, D, DV,
        R: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
        ERASE: tl.constexpr, S: tl.constexpr, CHAIN: tl.constexpr,
    ):  # fmt: skip
        # a loop over 16 rows per program (to sum ∂taps in the kernel) took 1.3x as long in
        # all on the H100; ∂taps is summed outside
        first = tl.program_id(0).to(tl.int64) * R
        rows, N = tl.arange(0, R), N - first
        state_offset = first * D * DV
        x_ptr += state_offset
        px_ptr += state_offset
        gnew_ptr += state_offset
        gx_ptr += state_offset
        k_ptr += first * D
        pk_ptr += first * D
        gk_ptr += first * D
        greads_ptr += first * S * D
        e_ptr += first * DV
        pe_ptr += first * DV
        gv_ptr += first * DV
        b_ptr += first
        pb_ptr += first
        inv_ptr += first
        pinv_ptr += first
        gb_ptr += first
        mask_r = rows < N
        tile = _tile(rows, D, DV, BD, BV)
        mask = _mask(rows, N, D, DV, BD, BV)
        if ERASE:  # X is only needed for the erase term of ∂k̂
            if CHAIN:  # recompute this op's input state from the previous edit, elementwise
                kh0 = _load_rows(pk_ptr, rows, N, D, D, BD) * tl.load(pinv_ptr + rows, mask=mask_r, other=0.0)[:, None]
                beta0 = tl.load(pb_ptr + rows, mask=mask_r, other=0.0)
                e0 = _load_rows(pe_ptr, rows, N, DV, DV, BV)
                x = _write(_load_state(px_ptr, rows, N, D, DV, BD, BV), kh0, beta0, e0)
                x = x.to(gx_ptr.dtype.element_ty).to(tl.float32)  # rounded as the forward stored it
            else:
                x = _load_state(x_ptr, rows, N, D, DV, BD, BV)
        inv = tl.load(inv_ptr + rows, mask=mask_r, other=0.0)
        kh = _load_rows(k_ptr, rows, N, D, D, BD) * inv[:, None]
        beta = tl.load(b_ptr + rows, mask=mask_r, other=0.0)
        e = _load_rows(e_ptr, rows, N, DV, DV, BV)
        G = tl.load(gnew_ptr + tile, mask=mask, other=0.0).to(tl.float32)
        for s in tl.static_range(S):
            gread = _load_rows(greads_ptr + s * D, rows, N, D, S * D, BD)
            G += gread[:, :, None] * _load_tap(taps_ptr, s, D, DV, BD, BV)[None, :, :]
        g = tl.sum(kh[:, :, None] * G, axis=1)
        _store_rows(gv_ptr, rows, N, DV, DV, beta[:, None] * g, BV)
        tl.store(gb_ptr + rows, tl.sum(g * e, axis=1), mask=mask_r)
        grad_kh = tl.sum(G * e[:, None, :], axis=2)
        if ERASE:
            grad_kh -= tl.sum(x * g[:, None, :], axis=2)
            G -= (beta[:, None] * kh)[:, :, None] * g[:, None, :]
        grad_kh = beta[:, None] * grad_kh
        grad_k = (grad_kh - kh * tl.sum(kh * grad_kh, axis=1)[:, None]) * inv[:, None]
        _store_rows(gk_ptr, rows, N, D, D, grad_k, BD)
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
    prev_beta: Tensor | None,
    prev_e: Tensor | None,
    prev_inv: Tensor | None,
    k_eps: float,
    erase: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(X', the taps' reads of X' (N, S, d) or an empty tensor, e, 1/sqrt(‖k‖² + ε²)). The
    prev_* inputs are only kept for the backward (to recompute ``state``)."""
    if not _use_triton(state):
        return _forward_formulas(state, k, v, beta, taps, k_eps, erase)
    N, D, DV = state.shape
    BD, BV = _blocks(D, DV)
    S = taps.shape[0] if taps is not None else 0
    new = torch.empty_like(state)
    reads = v.new_empty((N, S, D) if S else (0,))
    e, inv = torch.empty_like(v), torch.empty_like(beta)
    torch.library.wrap_triton(_forward_kernel)[lambda meta: (triton.cdiv(N, meta["R"]),)](
        state, k, v, beta, taps if S else state, new, reads, e, inv, N, D, DV, k_eps**2,
        BD=BD, BV=BV, ERASE=erase, S=S,
    )  # fmt: skip
    return new, reads, e, inv


@_define("deepdelta::ddl_update_backward", mutates_args=())
def _backward_op(
    state: Tensor | None,
    k: Tensor,
    beta: Tensor,
    e: Tensor,
    inv: Tensor,
    taps: Tensor | None,
    grad_new: Tensor,
    grad_reads: Tensor | None,
    prev_state: Tensor | None,
    prev_k: Tensor | None,
    prev_beta: Tensor | None,
    prev_e: Tensor | None,
    prev_inv: Tensor | None,
    k_eps: float,
    erase: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(∂state, ∂k, ∂v, ∂β, ∂taps or an empty tensor)."""
    chain = prev_state is not None

    def state_in() -> Tensor:  # saved, or recomputed from the previous edit (the kernel does this per row)
        return _recomputed(Edit(prev_state, prev_k, prev_beta, prev_e, prev_inv), k_eps) if chain else state

    ref = prev_state if chain else state
    if not _use_triton(ref):
        gx, gk, gv, gb, gtaps = _backward_formulas(
            state_in(), k, beta, e, inv, taps, grad_new, grad_reads, k_eps, erase
        )  # fmt: skip
        gx = gx.clone() if gx is grad_new else gx  # an op's output may not alias its input
        return gx, gk, gv, gb, gtaps if gtaps is not None else e.new_empty(0)
    N, D, DV = ref.shape
    BD, BV = _blocks(D, DV)
    S = taps.shape[0] if taps is not None else 0
    gx, gk, gv, gb = torch.empty_like(ref), torch.empty_like(k), torch.empty_like(e), torch.empty_like(beta)
    torch.library.wrap_triton(_backward_kernel)[lambda meta: (triton.cdiv(N, meta["R"]),)](
        ref, k, beta, e, inv, taps if S else ref, grad_new.contiguous(), grad_reads.contiguous() if S else k,
        ref, prev_k if chain else k, prev_beta if chain else beta, prev_e if chain else e,
        prev_inv if chain else inv, gx, gk, gv, gb, N, D, DV,
        BD=BD, BV=BV, ERASE=erase, S=S, CHAIN=chain,
    )  # fmt: skip
    if not S:
        return gx, gk, gv, gb, e.new_empty(0)
    scaled_key = beta[:, None] * k.to(e.dtype) * inv[:, None]
    return gx, gk, gv, gb, _grad_taps(grad_reads, state_in(), scaled_key, e)


def _setup_context(ctx, inputs, output) -> None:
    state, k, v, beta, taps, prev_state, prev_k, prev_beta, prev_e, prev_inv, k_eps, erase = inputs
    _, _, e, inv = output
    ctx.k_eps, ctx.erase, ctx.chain = k_eps, erase, prev_state is not None
    ctx.mark_non_differentiable(e, inv)  # kept for a following update's backward, not part of the loss
    ctx.save_for_backward(
        None if ctx.chain else state, k, beta, e, inv, taps, prev_state, prev_k, prev_beta, prev_e, prev_inv
    )  # fmt: skip


def _backward(ctx, grad_new: Tensor, grad_reads: Tensor, _grad_e: Tensor, _grad_inv: Tensor):
    state, k, beta, e, inv, taps, *prev = ctx.saved_tensors
    gx, gk, gv, gb, gtaps = _backward_op(
        state, k, beta, e, inv, taps, grad_new, grad_reads if taps is not None else None, *prev, ctx.k_eps, ctx.erase
    )  # fmt: skip
    return gx, gk, gv, gb, gtaps if taps is not None else None, None, None, None, None, None, None, None


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
) -> tuple[Tensor, Tensor | None, Edit]:
    """X' = the DDL update (``erase=True``) or the write-only update of ``state`` (..., d, dv);
    with ``taps`` (S, d, dv), the reads Σ_j taps[s]⊙X' (..., S, d) of the new state
    (``Compress.combine`` makes the compression from them); and this update's ``Edit``.

    ``prev`` is the ``Edit`` of the update whose output ``state`` is; the backward then
    recomputes ``state`` from it instead of keeping it.
    """
    lead, (d, dv) = state.shape[:-2], state.shape[-2:]
    dtype = ops.at_least_fp32(state).dtype  # the compute dtype (fp32 for a bf16 state)
    rows = [state.reshape(-1, d, dv), k.reshape(-1, d), v.to(dtype).reshape(-1, dv), beta.to(dtype).reshape(-1)]
    rows = [t.contiguous() for t in rows]
    taps = taps.to(dtype).contiguous() if taps is not None else None
    new, reads, e, inv = _update_op(*rows, taps, *(prev if prev is not None else [None] * 5), k_eps, erase)
    edit = Edit(rows[0], rows[1], rows[3], e, inv)
    return new.view(*lead, d, dv), (reads.view(*lead, -1, d) if taps is not None else None), edit
