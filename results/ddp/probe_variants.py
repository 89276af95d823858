"""Where does compiled DDP's gradient part from one GPU's? (issue 18; the probe of
../shared/tools/ddp_grad_probe.py, extended.)

    V=ddl1 torchrun --nproc_per_node 2 results/ddp/probe_variants.py

The small preset, regional compile, optimize_ddp off, bf16 autocast, a 32×1024 batch of
random tokens (each rank one half). Phases, in this order, in one process per rank:

  P1   DDP as deepdelta builds it (current stream), K iterations on the same batch and weights;
       iteration 0 is the call that compiles the blocks
  refs one GPU (each rank on its own GPU, the whole batch): 16×2 accumulated twice (the
       repeat is the floor), each rank's own half alone, then 32×1 (a second batch size:
       Dynamo recompiles with a dynamic batch dimension) and 16×2 again
  P2   the same DDP module again, K iterations (now past the recompilation)
  then each variant: a fresh model with the same weights, DDP built another way, K iterations

Every DDP iteration's all-reduced gradients are compared with the 16×2 reference computed
on the same GPU (‖Δg‖/‖g‖ over all parameters) and, bit for bit, with the other rank's.
"manual" is no DDP at all: each rank's own-half gradients (from the refs), all-reduced
after a device synchronisation. The last lines are a table.
"""

import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.environ.get("SRC", "src"))
from deepdelta.model import DeltaTransformer, ModelConfig  # noqa: E402
from deepdelta.model.fastpath import compile_model, configure_torch  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

T0 = time.time()
BUDGET = float(os.environ.get("BUDGET", "170"))  # seconds; variants past it are skipped
K = int(os.environ.get("K", "4"))
DRY = os.environ.get("DRY") == "1"  # a CPU check of this script: gloo, the tiny preset, eager
if DRY:
    torch.cuda.synchronize = lambda: None
dist.init_process_group("gloo" if DRY else "nccl")
rank, world = dist.get_rank(), dist.get_world_size()
if not DRY:
    torch.cuda.set_device(rank)
dev = torch.device("cpu") if DRY else torch.device("cuda", rank)
AC = "cpu" if DRY else "cuda"
configure_torch()
torch._dynamo.config.optimize_ddp = False
torch._dynamo.config.cache_size_limit = 64
variant = os.environ.get("V", "ddl1")
fields = {
    "ddl1": dict(residual="ddl", dv=1),
    "cc4": dict(residual="ddl", dv=4, compressor="cc", expand="conv"),
    "fused": dict(residual="ddl", dv=4, compressor="cc", expand="conv", kernel="fused", state_dtype="bfloat16"),
}[variant]
cfg = ModelConfig.preset("tiny" if DRY else "small", **fields)
B, T = (2, 32) if DRY else (16, 1024)
gen = torch.Generator().manual_seed(0)
x = torch.randint(0, cfg.vocab_size, (2 * B, T), generator=gen).to(dev)
y = torch.randint(0, cfg.vocab_size, (2 * B, T), generator=gen).to(dev)
xh, yh = x.chunk(world)[rank], y.chunk(world)[rank]


def say(*a):
    print(f"[r{rank} {time.time() - T0:5.1f}s] " + " ".join(map(str, a)), flush=True)


torch.manual_seed(0)
_first = DeltaTransformer(cfg)
SD = {k: v.to(dev) for k, v in _first.state_dict().items()}
del _first


def build(compiled=True):
    with torch.device(dev):
        m = DeltaTransformer(cfg)
    m.load_state_dict(SD)
    if compiled and not DRY:
        compile_model(m, regional=True)
    return m


class LossWrap(nn.Module):  # DDP.forward must run (it prepares the reducer)
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, xs, ys):
        return self.m.loss(xs, ys)


def grads(m):
    return {n: p.grad.detach().float().clone() for n, p in m.named_parameters() if p.grad is not None}


def run_single(m, splits, xs=x, ys=y):
    m.zero_grad(set_to_none=True)
    for a, b in zip(xs.chunk(splits), ys.chunk(splits)):
        with torch.autocast(AC, dtype=torch.bfloat16):
            loss = m.loss(a, b) / splits
        loss.backward()
    torch.cuda.synchronize()
    return grads(m)


def rel(a, b):
    keys = list(b)
    diff = torch.stack([(a[k] - b[k]).norm() if k in a else b[k].norm() for k in keys])
    ref = torch.stack([b[k].norm() for k in keys])
    glob = float(diff.norm() / ref.norm())
    per = (diff / ref.clamp_min(1e-30)).cpu()
    i = int(per.argmax())
    return glob, float(per.median()), float(per[i]), keys[i]


def cross_rank_mismatch(g):
    """Parameters whose all-reduced gradient differs between the ranks (by a checksum)."""
    s = torch.stack([v.double().sum() for v in g.values()] + [v.double().norm() for v in g.values()])
    out = [torch.empty_like(s) for _ in range(world)]
    dist.all_gather(out, s)
    return int((out[0] != out[1]).sum()) if world > 1 else 0


rows = []  # (phase, iter, err vs 16x2 static ref, median param, worst, cross-rank mismatches, ms)


def ddp_iters(tag, m, d, refs, k=K):
    for i in range(k):
        m.zero_grad(set_to_none=True)
        t = time.time()
        with torch.autocast(AC, dtype=torch.bfloat16):
            loss = d(xh, yh)
        loss.backward()
        torch.cuda.synchronize()
        ms = (time.time() - t) * 1e3
        g = grads(m)
        errs = [rel(g, r) for r in refs]
        rows.append((tag, i, errs, cross_rank_mismatch(g), ms))
        say(f"{tag} it{i}: " + "  ".join(f"{e[0]:.2e}/{e[1]:.2e} worst {e[2]:.1e} {e[3]}" for e in errs),
            f"xrank {rows[-1][3]}  {ms:.0f} ms")
        del g


# P1: DDP the fast path's way; the first call compiles
m_d = build()
d = DDP(LossWrap(m_d), device_ids=None if DRY else [rank])
p1 = []
for i in range(K):
    m_d.zero_grad(set_to_none=True)
    with torch.autocast(AC, dtype=torch.bfloat16):
        loss = d(xh, yh)
    loss.backward()
    torch.cuda.synchronize()
    g = grads(m_d)
    p1.append((g, cross_rank_mismatch(g)))
say("P1 done", dict(torch._dynamo.utils.counters["stats"]))

# references on this GPU
m_r = build()
refA = run_single(m_r, 2)
refA2 = run_single(m_r, 2)
own = run_single(m_r, 1, xh, yh)  # this rank's half alone
manual = {k: v.clone() for k, v in own.items()}
for v in manual.values():
    dist.all_reduce(v)
    v /= world
refB = run_single(m_r, 1)  # 32×1: a new batch size
refC = run_single(m_r, 2)  # 16×2 after it
say("refs done", dict(torch._dynamo.utils.counters["stats"]))
floor_rep, floor_split, floor_dyn = rel(refA2, refA), rel(refB, refA), rel(refC, refA)
say(f"floor: 16x2 repeat {floor_rep[0]:.2e}  32x1 vs 16x2 {floor_split[0]:.2e}  16x2 after 32x1 {floor_dyn[0]:.2e}")
rows.append(("manual", 0, [rel(manual, refA), rel(manual, refC)], cross_rank_mismatch(manual), 0.0))
for i, (g, xr) in enumerate(p1):
    rows.append(("P1", i, [rel(g, refA), rel(g, refC)], xr, 0.0))
    e = rows[-1][2]
    say(f"P1 it{i}: " + "  ".join(f"{a[0]:.2e}/{a[1]:.2e} worst {a[2]:.1e} {a[3]}" for a in e), f"xrank {xr}")
del p1, refA2, refB, own, manual
refs = [refA, refC]

ddp_iters("P2", m_d, d, refs)
del d, m_d


def hook_sync(state, bucket):
    torch.cuda.synchronize()
    return allreduce_hook(None, bucket)


def hook_plain(state, bucket):
    return allreduce_hook(None, bucket)


VARIANTS = {
    "static_graph": dict(static_graph=True),
    "bucket_view": dict(gradient_as_bucket_view=True),
    "one_bucket": dict(bucket_cap_mb=4096),
    "side_stream": "side",
    "py_hook": hook_plain,
    "sync_hook": hook_sync,
    "no_bcast": dict(broadcast_buffers=False),
    "find_unused": dict(find_unused_parameters=True),
    "eager": "eager",
}
only = os.environ.get("ONLY")
for name, how in VARIANTS.items():
    if only and name not in only.split(","):
        continue
    if time.time() - T0 > BUDGET:
        say(f"skip {name}: past the budget")
        continue
    m = build(compiled=how != "eager")
    if how == "side":
        with torch.cuda.stream(torch.cuda.Stream()) if not DRY else torch.autograd.set_grad_enabled(True):
            dm = DDP(LossWrap(m), device_ids=None if DRY else [rank])
    elif isinstance(how, dict):
        dm = DDP(LossWrap(m), device_ids=None if DRY else [rank], **how)
    else:
        dm = DDP(LossWrap(m), device_ids=None if DRY else [rank])
        if callable(how):
            dm.register_comm_hook(None, how)
    ddp_iters(name, m, dm, refs)
    del dm, m

for r in range(world):
    dist.barrier()
    if rank != r:
        continue
    print(f"\n== {variant}, rank {rank}: floor 16x2 repeat {floor_rep[0]:.2e}, 32x1 vs 16x2 {floor_split[0]:.2e}, "
          f"16x2 after 32x1 vs before {floor_dyn[0]:.2e}")
    print("| phase | global err per iteration vs 16x2 (vs 16x2 after 32x1) | median param, it0 | xrank | ms |")
    by = {}
    for tag, i, errs, xr, ms in rows:
        by.setdefault(tag, []).append((errs, xr, ms))
    for tag, its in by.items():
        e = " ".join(f"{a[0][0]:.1e}({a[1][0]:.1e})" for a, _, _ in its)
        print(f"| {tag} | {e} | {its[0][0][0][1]:.1e} | {max(r for _, r, _ in its)} | "
              f"{sum(ms for _, _, ms in its[1:]) / max(1, len(its) - 1):.0f} |")
dist.barrier()
dist.destroy_process_group()
