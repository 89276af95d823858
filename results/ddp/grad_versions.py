"""Do two processes that compile the same model get the same gradients? (issue 18)

    DIR=/dev/shm/gv TAG=a python results/ddp/grad_versions.py     # one process, one GPU: saves its gradients
    DIR=/dev/shm/gv python results/ddp/grad_versions.py compare   # the table

One process: the small preset (ddl, dv=1 unless V=cc4), seed 0, one 16×1024 batch of random
tokens, compiled regionally as the fast path does (MODE=eager: not compiled, bf16 autocast;
MODE=fp32: not compiled, no autocast, the reference), loss and gradients twice in a row.
Knobs, each an environment variable: NORED=1 (cuBLAS may not reduce split-K partial sums in
bf16), NOCUDNN=1 (no cuDNN attention), TORCHINDUCTOR_DETERMINISTIC=1,
TORCHINDUCTOR_EMULATE_PRECISION_CASTS=1. ``compare`` prints, for every saved run, its loss,
the repeat within the process, and ‖Δg‖/‖g‖ against the first run of its knob set, against
the first default run, and against fp32; then, for the pair furthest apart, the error per
layer (where in the network the gradients part).
"""

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.environ.get("SRC", "src"))
from deepdelta.model import DeltaTransformer, ModelConfig  # noqa: E402
from deepdelta.model.fastpath import compile_model, configure_torch  # noqa: E402

OUT = Path(os.environ.get("DIR", "/dev/shm/gv"))


def fields():
    v = os.environ.get("V", "ddl1")
    f = dict(residual="ddl", dv=1) if v == "ddl1" else dict(residual="ddl", dv=4, compressor="cc", expand="conv")
    return {**f, "impl": os.environ["IMPL"]} if os.environ.get("IMPL") else f


def run() -> None:
    t0 = time.time()
    tag, mode = os.environ["TAG"], os.environ.get("MODE", "compiled")
    configure_torch()
    if os.environ.get("NORED") == "1":
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    if os.environ.get("NOCUDNN") == "1":
        torch.backends.cuda.enable_cudnn_sdp(False)
    dry = os.environ.get("DRY") == "1"  # a CPU check of this script: the tiny preset, eager
    dev = "cpu" if dry else "cuda"
    cfg = ModelConfig.preset("tiny" if dry else "small", **fields())
    torch.manual_seed(0)
    m = DeltaTransformer(cfg).to(dev)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (16, cfg.block_size), generator=gen).to(dev)
    y = torch.randint(0, cfg.vocab_size, (16, cfg.block_size), generator=gen).to(dev)
    if mode == "compiled" and not dry:
        compile_model(m, regional=True)
    out = {}
    for i in range(2):
        m.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=mode != "fp32"):
            loss = m.loss(x, y)
        loss.backward()
        if not dry:
            torch.cuda.synchronize()
        out[f"loss{i}"] = float(loss.detach())
        out[f"g{i}"] = {n: p.grad.detach().float().cpu() for n, p in m.named_parameters()}
    OUT.mkdir(parents=True, exist_ok=True)
    torch.save(out, OUT / f"{tag}.pt")
    print(f"{tag}: loss {out['loss0']:.9f} {out['loss1']:.9f}  {time.time() - t0:.0f} s", flush=True)


def rel(a, b) -> float:
    num = sum(float((a[k] - b[k]).double().norm() ** 2) for k in b)
    return (num / sum(float(b[k].double().norm() ** 2) for k in b)) ** 0.5


def group(name: str) -> str:
    parts = name.split(".")
    return f"block {int(parts[1]):2d}" if parts[0] == "blocks" else parts[0]


def compare() -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    runs = {p.stem: torch.load(p, map_location=dev) for p in sorted(OUT.glob("*.pt"))}
    fp32 = runs.get("fp32")
    base = next((k for k in runs if k.startswith("default")), None)
    firsts: dict[str, str] = {}
    print("| run | loss | repeat | vs first of its knobs | vs first default | vs fp32 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for tag, r in runs.items():
        knob = tag.rstrip("0123456789").rstrip("-_")
        first = firsts.setdefault(knob, tag)
        g = r["g0"]
        cols = [
            f"{r['loss0']:.6f}",
            f"{rel(r['g1'], g):.1e}",
            f"{rel(g, runs[first]['g0']):.1e}" if first != tag else "-",
            f"{rel(g, runs[base]['g0']):.1e}" if base and base != tag else "-",
            f"{rel(g, fp32['g0']):.1e}" if fp32 is not None and tag != "fp32" else "-",
        ]
        print(f"| {tag} | " + " | ".join(cols) + " |")
    defaults = [k for k in runs if k.startswith("default")]
    pairs = [(rel(runs[a]["g0"], runs[b]["g0"]), a, b) for i, a in enumerate(defaults) for b in defaults[i + 1 :]]
    if pairs:
        err, a, b = max(pairs)
        print(f"\nper layer, {a} vs {b} (global {err:.1e}); and {a} vs fp32:")
        ga, gb = runs[a]["g0"], runs[b]["g0"]
        names: dict[str, list[str]] = {}
        for n in ga:
            names.setdefault(group(n), []).append(n)
        for grp, ns in names.items():
            sub = {n: gb[n] for n in ns}
            line = f"  {grp}: {rel({n: ga[n] for n in ns}, sub):.1e}"
            if fp32 is not None:
                line += f"  (vs fp32 {rel({n: ga[n] for n in ns}, {n: fp32['g0'][n] for n in ns}):.1e})"
            print(line)


if __name__ == "__main__":
    compare() if sys.argv[1:] == ["compare"] else run()
