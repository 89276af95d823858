"""Time every variant's training step: ``python -m deepdelta.bench`` (``make bench``).

For each variant: build the model at the preset's shape, compile (block by block, fused
AdamW, bf16 autocast: ``deepdelta.model.fastpath``), run the first step
(compilation included, timed on its own), warm up, then time forward + backward + clip +
optimiser steps with CUDA events (``time.perf_counter`` on CPU). Prints one table:
variant, parameters, tokens/s, MFU (``flops_per_token`` × tokens/s over the GPU's dense
bf16 peak), peak memory, first-step seconds, and tokens/s and memory relative to the
``additive`` row of the same run and sequence length.

On a GPU the default is the paper's small shape (12 layers, d=768, 6×128, vocab 50304,
T=1024); on CPU the tiny preset, a few steps, no compile, fp32 (so the tests run it).
Only torch and ``deepdelta.model`` are imported.
"""

from __future__ import annotations

import argparse
import csv
import gc
import re
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from deepdelta.model import DeltaTransformer, ModelConfig, flops_per_token
from deepdelta.model.config import HYPER
from deepdelta.model.fastpath import compile_model, configure_torch, make_optimizer, make_train_step

# Variants by name: ModelConfig overrides. In names, "cc"/"tc" is the compressor, "ec" the
# conv expansion (the paper's "EC"; "rep" is expand=repeat) and "dvN" the value channels.
VARIANTS: dict[str, dict] = {
    "additive": dict(residual="additive", dv=1),
    "ddl-dv1": dict(residual="ddl", dv=1),
    "write_only-dv1": dict(residual="write_only", dv=1),
    "ddl-cc-ec-dv2": dict(residual="ddl", compressor="cc", expand="conv", dv=2),
    "ddl-cc-ec-dv4": dict(residual="ddl", compressor="cc", expand="conv", dv=4),
    "ddl-tc-ec-dv4": dict(residual="ddl", compressor="tc", expand="conv", dv=4),
}
DEFAULT_VARIANTS = tuple(VARIANTS)
# named lists for --variants: the paper's six models (DDL-CC = ddl-cc-ec-dv4, "w/o EC" = rep);
# peers: the study's dv=4 comparison (issue 20), the additive and DDL-CC configs of the
# replication sweep (variant=additive_cc, ddl_cc) beside hc (dynamic, static) and mhc at n=4,
# named as conf/variant/{hc_dynamic_n4,hc_static_n4,mhc_n4}.yaml (expand=repeat)
VARIANT_SETS = {
    "paper_six": ("additive", "ddl-dv1", "ddl-tc-rep-dv4", "ddl-cc-rep-dv4", "ddl-tc-ec-dv4", "ddl-cc-ec-dv4"),
    "peers": ("additive", "additive-cc-ec-dv4", "ddl-cc-ec-dv4", "hc-rep-dv4", "hc-static-rep-dv4", "mhc-rep-dv4"),
}
_NAME = re.compile(
    r"^(additive|ddl|write_only|hc|mhc)(-static)?(?:-(cc|tc))?(?:-(ec|rep))?(?:-dv(\d+))?(?:-(plain|fused))?(-bf16)?$"
)
GRAMMAR = (
    "{additive|ddl|write_only}[-{cc|tc}][-{ec|rep}][-dvN][-{plain|fused}][-bf16] "
    "or {hc|mhc}[-static][-{ec|rep}][-dvN][-plain][-bf16]"
)

# Dense bf16 peak (no sparsity) by a substring of the device name; first match wins.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("A100", 312e12))


def variant_overrides(name: str) -> dict:
    """ModelConfig overrides for a variant: from VARIANTS, else parsed from the name (`GRAMMAR`),
    e.g. ``ddl-tc-ec-dv8``; ``plain|fused`` sets the update's ``kernel``, default plain;
    ``-bf16`` stores the state in bf16, ``state_dtype=bfloat16``. ``hc``/``mhc`` are the
    Hyper-Connection rules with n = dv streams (docs/hyper_connections.md): dynamic unless
    ``-static`` (``hc_dynamic=false``); they read the streams with their own weights, so a
    compressor in the name is refused (the model would ignore it), as is ``-fused`` (DDL's
    kernel)."""
    if name in VARIANTS:
        return dict(VARIANTS[name])
    m = _NAME.match(name)
    if not m:
        raise ValueError(f"variant: got {name!r}, allowed: one of {', '.join(VARIANTS)} or {GRAMMAR}")
    residual, static, compressor, expand, dv, kernel, bf16 = m.groups()
    hyper = residual in HYPER
    if static and not hyper:
        raise ValueError(f"variant: got {name!r}, allowed: -static with hc or mhc only (their hc_dynamic=false)")
    if hyper and compressor:
        raise ValueError(
            f"variant: got {name!r}, allowed: no -{compressor} with {residual} "
            "(each sublayer reads the streams with its own weights; model.compressor is ignored)"
        )
    if hyper and kernel == "fused":
        raise ValueError(
            f"variant: got {name!r}, allowed: -plain or nothing with {residual} "
            "(the fused kernel implements the ddl and write_only updates only)"
        )
    out: dict = dict(residual=residual, dv=int(dv or 1))
    if hyper:
        out["hc_dynamic"] = not static
    if kernel:
        out["kernel"] = kernel
    if bf16:
        out["state_dtype"] = "bfloat16"
    if compressor:
        out["compressor"] = compressor
    if expand:
        out["expand"] = "conv" if expand == "ec" else "repeat"
    return out


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _plain_loss(model: DeltaTransformer):
    """Full-vocabulary logits (bf16 under autocast) and F.cross_entropy on them in fp32."""

    def loss(idx, targets):
        logits = model(idx)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    return loss


def bench_variant(
    name: str,
    preset: str,
    batch: int,
    seq: int,
    steps: int,
    warmup: int,
    compile: bool,
    device: torch.device,
    loss: str = "model",
    mode: str | None = None,
    profile: Path | None = None,
    regional: bool = True,
    impl: str = "reference",
) -> dict:
    """Build, compile, warm up and time one variant; returns one table row."""
    torch.manual_seed(0)
    block_size = max(seq, ModelConfig.preset(preset).block_size)
    cfg = ModelConfig.preset(preset, **variant_overrides(name), block_size=block_size, impl=impl)
    model = DeltaTransformer(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(model, lr=1e-4, weight_decay=0.1)
    loss_fn = None
    if loss == "plain":
        loss_fn = _plain_loss(model)
        if compile:
            loss_fn = torch.compile(loss_fn, mode=mode, fullgraph=True)
    elif compile:
        compile_model(model, mode=mode, regional=regional)
    step = make_train_step(model, optimizer, grad_clip=1.0, loss_fn=loss_fn)
    data = torch.randint(0, cfg.vocab_size, (4, batch, seq + 1), device=device)
    batches = [(d[:, :-1], d[:, 1:]) for d in data]

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    first_loss = step(*batches[0])
    _sync(device)
    first_s = time.perf_counter() - t0
    for i in range(1, max(warmup, 1)):
        step(*batches[i % len(batches)])
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    times: list[float] = []
    host: list[float] = []
    alloc_retries = None
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        retries = torch.cuda.memory_stats(device).get("num_alloc_retries", 0)
        for i, (start, end) in enumerate(events):
            t = time.perf_counter()
            start.record()
            last_loss = step(*batches[i % len(batches)])
            end.record()
            host.append(time.perf_counter() - t)  # the host's time to enqueue the step
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) / 1e3 for start, end in events]
        peak_mem = torch.cuda.max_memory_allocated(device)
        alloc_retries = torch.cuda.memory_stats(device).get("num_alloc_retries", 0) - retries
    else:
        for i in range(steps):
            t = time.perf_counter()
            last_loss = step(*batches[i % len(batches)])
            times.append(time.perf_counter() - t)
        peak_mem = None
    step_s = statistics.median(times)
    tok_s = batch * seq / step_s
    peak = peak_flops(device)
    fpt = flops_per_token(cfg, seq_len=seq)
    if profile is not None:
        _profile(name, seq, step, batches, device, profile)
    row = dict(
        variant=name,
        seq=seq,
        batch=batch,
        params=n_params,
        step_ms=step_s * 1e3,
        tok_s=tok_s,
        flops_per_token=fpt,
        mfu=fpt * tok_s / peak if peak else None,
        peak_mem_gib=peak_mem / 2**30 if peak_mem is not None else None,
        first_step_s=first_s,
        host_ms=statistics.median(host) * 1e3 if host else None,
        alloc_retries=alloc_retries,
        loss_first=float(first_loss),
        loss_last=float(last_loss),
    )
    del model, optimizer, step, loss_fn, batches, data
    return row


def _profile(name: str, seq: int, step, batches, device: torch.device, path: Path) -> None:
    """Append the profiler's kernel table for three steps to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(3):
            step(*batches[i % len(batches)])
        _sync(device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    with open(path, "a") as f:
        f.write(f"\n===== {name} T={seq} (3 steps) =====\n")
        f.write(prof.key_averages().table(sort_by=sort, row_limit=45, max_name_column_width=90))


def add_ratios(rows: list[dict]) -> None:
    """tokens/s and peak memory over the ``additive`` row at the same sequence length."""
    base = {r["seq"]: r for r in rows if r["variant"] == "additive" and "error" not in r}
    for r in rows:
        b = base.get(r["seq"])
        ok = b is not None and "error" not in r
        r["tok_s_ratio"] = r["tok_s"] / b["tok_s"] if ok else None
        mem_ok = ok and r["peak_mem_gib"] is not None and b["peak_mem_gib"]
        r["mem_ratio"] = r["peak_mem_gib"] / b["peak_mem_gib"] if mem_ok else None


COLUMNS = (
    ("variant", "variant", "{}"),
    ("seq", "T", "{}"),
    ("params", "params", "{:.1f}M"),
    ("step_ms", "step ms", "{:.1f}"),
    ("tok_s", "tok/s", "{:,.0f}"),
    ("mfu", "MFU", "{:.1%}"),
    ("peak_mem_gib", "peak GiB", "{:.2f}"),
    ("first_step_s", "first step s", "{:.1f}"),
    ("tok_s_ratio", "× tok/s", "{:.3f}"),
    ("mem_ratio", "× mem", "{:.3f}"),
)


def format_table(rows: list[dict], columns: tuple[tuple[str, str, str], ...] = COLUMNS) -> str:
    """A markdown table of ``rows`` (``columns``: key, heading, format; ``params`` shown in millions);
    a row with an ``error`` shows it in place of its figures."""

    def cell(r: dict, key: str, fmt: str) -> str:
        if "error" in r and key not in ("variant", "seq"):
            return r["error"] if key == "params" else ""
        value = r.get(key)
        if value is None:
            return "-"
        return fmt.format(value / 1e6 if key == "params" else value)

    table = [[head for _, head, _ in columns]] + [[cell(r, k, f) for k, _, f in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |" for line in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_rows(path: Path, rows: list[dict]) -> None:
    """The rows as CSV, every key any row has as a column."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def apply_tune(item: str) -> None:
    """``inductor.a.b=VALUE`` sets ``torch._inductor.config.a.b``; ``ops.NAME=VALUE`` sets a
    constant of ``deepdelta.model.ops``. VALUE is a Python literal."""
    import ast

    import torch._inductor.config as inductor_config

    from deepdelta.model import ops

    key, _, value = item.partition("=")
    root, *path = key.split(".")
    obj = {"inductor": inductor_config, "ops": ops}.get(root)
    if obj is None or not path:
        raise ValueError(f"--tune: got {item!r}, allowed: inductor.<config>=VALUE or ops.<NAME>=VALUE")
    for name in path[:-1]:
        obj = getattr(obj, name)
    if not hasattr(obj, path[-1]):
        raise ValueError(f"--tune: {key} does not exist")
    setattr(obj, path[-1], ast.literal_eval(value))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m deepdelta.bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated variant names, or a set: {', '.join(VARIANT_SETS)}",
    )
    p.add_argument("--impl", choices=("reference", "paper"), default="reference", help="the model's impl (config)")
    p.add_argument("--preset", choices=("small", "tiny", "medium"), help="default: small on CUDA, tiny on CPU")
    p.add_argument("--batch", type=int, help="sequences per step (default: 16 on CUDA, 4 on CPU)")
    p.add_argument("--seq", default=None, help="tokens per sequence, or a comma list (default: preset block_size)")
    p.add_argument("--steps", type=int, help="timed steps (default: 20 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, help="untimed steps, the first (compiling) one included (default 5 / 1)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA only")
    p.add_argument("--mode", default=None, help="torch.compile mode (default: the default mode)")
    p.add_argument(
        "--regional",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compile block by block (default) or the whole loss in one graph",
    )
    p.add_argument("--loss", choices=("model", "plain"), default="model", help="model: model.loss (default)")
    p.add_argument(
        "--tune",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set inductor.<config> or ops.<CONSTANT> before building (repeatable), for A/B runs",
    )
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", type=Path, help="also write the rows to this CSV file")
    p.add_argument("--profile", type=Path, help="append a profiler table per variant to this file")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    preset = args.preset or ("small" if gpu else "tiny")
    seqs = [int(s) for s in str(args.seq).split(",")] if args.seq else [ModelConfig.preset(preset).block_size]
    batch = args.batch or (16 if gpu else 4)
    steps = args.steps or (20 if gpu else 3)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    do_compile = gpu if args.compile is None else args.compile
    names = [v for n in args.variants.split(",") if n.strip() for v in VARIANT_SETS.get(n.strip(), (n.strip(),))]
    for n in names:
        variant_overrides(n)  # fail early on a bad name
    configure_torch()
    for item in args.tune:
        apply_tune(item)
    where = torch.cuda.get_device_name(device) if gpu else "cpu"
    print(
        f"# deepdelta.bench: {where}, torch {torch.__version__}, preset={preset}, batch={batch}, T={seqs}, "
        f"steps={steps}, warmup={warmup}, compile={do_compile}, regional={args.regional}, loss={args.loss}, "
        f"tune={args.tune}, impl={args.impl}, "
        f"dtype={'bf16 autocast' if gpu else 'fp32'}",
        flush=True,
    )
    rows = []
    for seq in seqs:
        for name in names:
            try:
                row = bench_variant(
                    name,
                    preset,
                    batch,
                    seq,
                    steps,
                    warmup,
                    do_compile,
                    device,
                    args.loss,
                    args.mode,
                    args.profile,
                    args.regional,
                    args.impl,
                )
            except torch.OutOfMemoryError:
                row = dict(variant=name, seq=seq, batch=batch, error="OOM")
            except Exception as e:  # one broken variant must not lose the others' rows
                traceback.print_exc()
                row = dict(variant=name, seq=seq, batch=batch, error=type(e).__name__)
            rows.append(row)
            if "error" not in row:
                print(
                    f"  {name} T={seq}: {row['tok_s']:,.0f} tok/s, step {row['step_ms']:.1f} ms, "
                    f"first step {row['first_step_s']:.1f} s, loss {row['loss_first']:.3f}→{row['loss_last']:.3f}"
                    + (f", host {row['host_ms']:.1f} ms/step" if row["host_ms"] is not None else "")
                    + (f", alloc retries {row['alloc_retries']}" if row["alloc_retries"] is not None else ""),
                    flush=True,
                )
            else:
                print(f"  {name} T={seq}: {row['error']}", flush=True)
            gc.collect()
            # the next variant starts from empty compile caches: the compiled Block code would
            # otherwise collect one cache entry per variant (guard checks grow, and fullgraph
            # fails after 8)
            torch._dynamo.reset()
            if gpu:
                torch.cuda.empty_cache()
    add_ratios(rows)
    print(format_table(rows), flush=True)
    if args.out:
        write_rows(args.out, rows)
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
