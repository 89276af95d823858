"""Time the residual update alone: ``python -m deepdelta.updatebench`` (``make bench-update``).

For each dv and state dtype, at the paper's small shape (16 × 1024 tokens, d = 768): one DDL
update with the `cc` compression of its new state, as the fused Triton op
(``model.kernel=fused``) and as the plain ops compiled by torch.compile (``kernel=plain``),
forward and forward + backward. Prints the median time (``triton.testing.do_bench``) and the
bandwidth it reaches for the bytes the update has to move: forward reads the state and
writes the new one; backward reads the state and the new state's gradient and writes the
state's gradient (plus the (N, d) key, compression and their gradients, both ways). Needs a
CUDA GPU.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch

from deepdelta.model import fused, ops


def _plain(state, k, v, beta, mix):
    new = ops.delta_update(state, k, v, beta)
    return new, (new * mix).sum(-1)


def _fused(state, k, v, beta, mix):
    return fused.update(state, k, v, beta, mix=mix)


def _bytes(n: int, d: int, dv: int, state_dtype: torch.dtype, backward: bool) -> int:
    state = n * d * dv * state_dtype.itemsize
    rows = n * d * (2 + 4)  # the bf16 key and the fp32 compression
    return (2 * state + rows) + ((3 * state + 2 * rows) if backward else 0)


def time_update(impl: Callable, n: int, d: int, dv: int, state_dtype: torch.dtype, backward: bool) -> float:
    """Median milliseconds of one update (forward, or forward + backward)."""
    from triton.testing import do_bench

    g = torch.Generator(device="cuda").manual_seed(0)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, device="cuda", generator=g).to(dtype)

    state = r(n, d, dv, dtype=state_dtype).requires_grad_(backward)
    k = r(n, d, dtype=torch.bfloat16).requires_grad_(backward)
    v, beta = r(n, dv).requires_grad_(backward), torch.rand(n, device="cuda", generator=g).requires_grad_(backward)
    mix = r(d, dv).requires_grad_(backward)
    g_new, g_xc = r(n, d, dv, dtype=state_dtype), r(n, d)

    def run():
        new, xc = impl(state, k, v, beta, mix)
        if backward:
            torch.autograd.grad((new, xc), (state, k, v, beta, mix), (g_new, g_xc))

    return do_bench(run, warmup=50, rep=200)


def _configs() -> str:
    """The autotuned rows per program and warps of the last fused forward and backward."""
    out = []
    for kernel in (fused._forward_kernel, fused._backward_kernel):
        best = getattr(kernel, "best_config", None)
        out.append(f"R={best.kwargs['R']}, {best.num_warps} warps" if best else "?")
    return " / ".join(out)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m deepdelta.updatebench", description=__doc__.split("\n\n")[0])
    p.add_argument("--dv", default="1,4", help="comma-separated value channels (default 1,4)")
    p.add_argument("--tokens", type=int, default=16 * 1024, help="rows of the state (default 16384)")
    p.add_argument("--d", type=int, default=768, help="model width (default 768)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("updatebench: needs a CUDA GPU (the fused update is a Triton kernel)")
    plain = torch.compile(_plain, fullgraph=True)
    rows = []
    print(f"# deepdelta.updatebench: {torch.cuda.get_device_name()}, N={args.tokens}, d={args.d}")
    print("| dv | state | impl | forward ms | GB/s | fwd+bwd ms | GB/s | Triton config (fwd / bwd) |")
    print("|---|---|---|---|---|---|---|---|")
    for dv in (int(x) for x in args.dv.split(",")):
        for dtype in (torch.float32, torch.bfloat16):
            for name, impl in (("fused", _fused), ("plain", plain)):
                fwd = time_update(impl, args.tokens, args.d, dv, dtype, backward=False)
                both = time_update(impl, args.tokens, args.d, dv, dtype, backward=True)
                gbs = [_bytes(args.tokens, args.d, dv, dtype, b) / (t * 1e-3) / 1e9 for b, t in ((0, fwd), (1, both))]
                state = str(dtype).removeprefix("torch.")
                rows.append(dict(dv=dv, state=state, impl=name, fwd_ms=fwd, fwd_gbs=gbs[0], ms=both, gbs=gbs[1]))
                config = _configs() if name == "fused" else ""
                print(
                    f"| {dv} | {state} | {name} | {fwd:.3f} | {gbs[0]:,.0f} | {both:.3f} | {gbs[1]:,.0f} | {config} |"
                )
    return rows


if __name__ == "__main__":
    main()
