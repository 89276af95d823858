"""Run the fused DDL update (forward + backward) at the paper's small shape, for Nsight Compute.

Autotuning happens before cudaProfilerStart, so `ncu --profile-from-start off` sees one tuned
forward and backward launch per case: cc (1 tap, saved state), MLP update (no taps, chained),
tc (4 taps), each with an fp32 and a bf16 state. The recorded report
(…_ncu_fused_kernels.txt) is of the kernels of commit c2371f4; this script is written for
the API since b710726 (``update`` returns the ``Edit``).
"""

import torch

from deepdelta.model import fused

N, D, DV = 16 * 1024, 768, 4
torch.manual_seed(0)


def case(state_dtype, n_taps, chain):
    def r(*s, dt=torch.float32):
        return torch.randn(*s, device="cuda").to(dt)

    x0, k0, v0, b0 = r(N, D, DV, dt=state_dtype), r(N, D, dt=torch.bfloat16), r(N, DV), torch.rand(N, device="cuda")
    state, _, edit = fused.update(x0, k0, v0, b0)
    state.requires_grad_()
    k = r(N, D, dt=torch.bfloat16).requires_grad_()
    v, beta = r(N, DV).requires_grad_(), torch.rand(N, device="cuda").requires_grad_()
    taps = r(n_taps, D, DV).requires_grad_() if n_taps else None
    prev = edit if chain else None

    def run():
        new, reads, _ = fused.update(state, k, v, beta, taps=taps, prev=prev)
        loss = new.float().sum() + (reads.sum() if reads is not None else 0)
        loss.backward()

    return run


cases = {
    f"{dt}-taps{s}-chain{int(c)}": case(dt, s, c)
    for dt in (torch.float32, torch.bfloat16)
    for s, c in ((1, False), (0, True), (4, False))
}
for run in cases.values():  # autotune and warm up
    for _ in range(3):
        run()
torch.cuda.synchronize()
# timings with CUDA events (no profiler)
for name, run in cases.items():
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record()
    for _ in range(20):
        run()
    ev[1].record()
    torch.cuda.synchronize()
    print(f"{name}: {ev[0].elapsed_time(ev[1]) / 20 * 1e3:.0f} us per forward+backward (with the loss's sums)")
torch.cuda.cudart().cudaProfilerStart()
for run in cases.values():
    run()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
