# ruff: noqa: B023  (each loop's closures are timed within that iteration)
"""Time the fused kernels' forward and backward per launch configuration (R rows, warps), at the
paper's small shape (16384 rows, d=768, dv=4): is occupancy (registers) what limits them?

It calls the private ops of commit 67312b2. The recorded runs (2026-11-23, H100) were at that
commit, with PYTHONPATH=src plus a folder holding fused_old.py, which is
`git show c2371f4:src/deepdelta/model/fused.py`:
    python3 configs_fused.py 4 deepdelta.model.fused   # …_fused-configs_int32-offsets.txt
    python3 configs_fused.py 4 fused_old               # …_fused-configs_int64-offsets.txt
"""

import importlib
import itertools
import sys

import torch
import triton

fused = importlib.import_module(sys.argv[2] if len(sys.argv) > 2 else "deepdelta.model.fused")

N, D, DV = 16 * 1024, 768, int(sys.argv[1]) if len(sys.argv) > 1 else 4
torch.manual_seed(0)


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


shapes = [(R, w) for R in (1, 2, 4) for w in (4, 8, 16, 32) if R * 1024 * DV / (32 * w) >= 4]
rows = []
for dt, (S, chain) in itertools.product((torch.float32, torch.bfloat16), ((1, False), (0, True))):
    x0, k0, v0, b0 = r(N, D, DV, dt=dt), r(N, D, dt=torch.bfloat16), r(N, DV), torch.rand(N, device="cuda")
    state = fused._update_op(x0, k0, v0, b0, None, None, None, None, None, 1e-5, True)[0]
    k, v, beta = r(N, D, dt=torch.bfloat16), r(N, DV), torch.rand(N, device="cuda")
    taps = r(S, D, DV) if S else None
    gnew, greads = r(N, D, DV, dt=dt), (r(N, S, D) if S else None)
    prev = (x0, k0, v0, b0) if chain else (None,) * 4

    def fwd():
        return fused._update_op(state, k, v, beta, taps, *prev, 1e-5, True)

    def bwd():
        return fused._backward_op(None if chain else state, k, v, beta, taps, gnew, greads, *prev, 1e-5, True)

    for R, w in shapes:
        for kern in (fused._forward_kernel, fused._backward_kernel):
            kern.configs = [triton.Config({"R": R}, num_warps=w)]
            kern.cache = {}
        try:
            tf, tb = timeit(fwd), timeit(bwd)
        except Exception as e:  # e.g. out of resources
            tf = tb = float("nan")
            print("fail", R, w, type(e).__name__, str(e)[:80])
        rows.append((str(dt)[6:], S, chain, R, w, tf, tb))
        case = f"{str(dt)[6:]:9s} taps={S} chain={int(chain)} R={R} warps={w:2d}"
        print(f"{case}: forward {tf:6.0f} us, backward {tb:6.0f} us", flush=True)
print("\nbest per case:")
for key, grp in itertools.groupby(rows, key=lambda t: t[:3]):
    grp = list(grp)
    f = min(grp, key=lambda t: t[5])
    b = min(grp, key=lambda t: t[6])
    print(key, f"forward {f[5]:.0f} us (R={f[3]}, w={f[4]}), backward {b[6]:.0f} us (R={b[3]}, w={b[4]})")
