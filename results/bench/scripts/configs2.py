# ruff: noqa: B023  (each loop's closures are timed within that iteration)
"""Fused kernels per launch configuration through the public API: forward (no grad) and the
backward of a chained MLP-style update (no taps), and of a cc-style update (one tap, whose
backward also includes the eager ∂taps sums). Eager timings, noisier than the kernels alone.

The recorded run (2026-11-23, H100; …_fused-configs_edit-vs-int32.txt) was at commit b710726,
with fused_i32.py = `git show 67312b2:src/deepdelta/model/fused.py` on PYTHONPATH:
    python3 configs2.py deepdelta.model.fused fused_i32
"""

import importlib
import itertools
import sys

import torch
import triton

mods = sys.argv[1:]
N, D, DV = 16 * 1024, 768, 4


def r(*s, dt=torch.float32):
    return torch.randn(*s, device="cuda").to(dt)


def timeit(fn, n=20):
    fn()
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n * 1e3


shapes = [(1, 4), (1, 8), (1, 16), (2, 4), (2, 8), (2, 16), (4, 8)]
best = {}
for name in mods:
    fused = importlib.import_module(name)
    for dt, (S, chain) in itertools.product((torch.float32, torch.bfloat16), ((1, False), (0, True))):
        torch.manual_seed(0)
        x0, k0, v0, b0 = r(N, D, DV, dt=dt), r(N, D, dt=torch.bfloat16), r(N, DV), torch.rand(N, device="cuda")
        out = fused.update(x0, k0, v0, b0)
        state, prev = out[0], (out[2] if len(out) == 3 else fused.Edit(x0, k0, v0, b0))
        state.requires_grad_()
        k = r(N, D, dt=torch.bfloat16).requires_grad_()
        v, beta = r(N, DV).requires_grad_(), torch.rand(N, device="cuda").requires_grad_()
        taps = r(S, D, DV) if S else None
        gnew = r(N, D, DV, dt=dt)
        for R, w in shapes:
            for kern in (fused._forward_kernel, fused._backward_kernel):
                kern.configs = [triton.Config({"R": R}, num_warps=w)]
                kern.cache = {}

            def fwd():
                with torch.no_grad():
                    fused.update(state, k, v, beta, taps=taps, prev=prev if chain else None)

            new = fused.update(state, k, v, beta, taps=taps, prev=prev if chain else None)[0]

            def bwd():
                return torch.autograd.grad(new, [state, k, v, beta], gnew, retain_graph=True)

            tf, tb = timeit(fwd), timeit(bwd)
            key = (name, str(dt)[6:], S, chain)
            print(*key, f"R={R} w={w:2d}: forward {tf:5.0f} us, backward {tb:5.0f} us", flush=True)
            bf, bb = best.get(key, (1e9, 1e9))
            best[key] = (min(bf, tf), min(bb, tb))
print("\nbest (us): module, state, taps, chain: forward, backward")
for key, (f, b) in best.items():
    print(*key, f"{f:.0f} {b:.0f}")
