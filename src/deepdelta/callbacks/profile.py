"""Where a training step's time goes on the GPU: a torch.profiler window over a few micro-batches.

``StepProfile(start, steps, path)`` profiles optimizer steps ``start … start + steps − 1`` and
writes ``path/profile_rank{r}.json``: per micro-batch, the wall time and the
device's kernel time split into communication (NCCL), optimizer and clipping (multi-tensor
kernels), the other kernels, the communication no other kernel overlaps, and the idle rest.
`make bench-ddp ARGS="--profile"` adds it to each run of the DDP scaling bench, so that a DDP GPU
and a single GPU can be compared micro-batch for micro-batch (issue 18). On CPU there is no
device timeline: the file holds the wall time only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.autograd import DeviceType

CATEGORIES = ("communication", "optimizer", "compute")


def category(kernel: str) -> str:
    """communication (NCCL), optimizer (fused AdamW, clipping's norms: multi-tensor kernels) or compute."""
    name = kernel.lower()
    if "nccl" in name:
        return "communication"
    if "multi_tensor_apply" in name or "adam" in name or "lpnorm" in name:
        return "optimizer"
    return "compute"


def union(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The intervals merged into disjoint ones, in order."""
    merged: list[tuple[float, float]] = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def covered(intervals: Sequence[tuple[float, float]]) -> float:
    return sum(e - s for s, e in union(intervals))


def uncovered(a: Sequence[tuple[float, float]], b: Sequence[tuple[float, float]]) -> float:
    """How much of ``a`` no interval of ``b`` covers: both merged once, then one pass over the two."""
    ua, ub = union(a), union(b)
    hidden, j = 0.0, 0
    for s, e in ua:
        while j < len(ub) and ub[j][1] <= s:  # ends before this interval, so before every later one
            j += 1
        k = j
        while k < len(ub) and ub[k][0] < e:
            hidden += min(e, ub[k][1]) - max(s, ub[k][0])
            k += 1
    return sum(e - s for s, e in ua) - hidden


def breakdown(kernels: Sequence[tuple[str, float, float]], wall_us: float, micro_batches: int) -> dict[str, float]:
    """Milliseconds per micro-batch: wall, busy (any kernel running), each category's kernel time
    (overlaps within a category counted once), the communication not hidden behind other kernels,
    and idle (wall − busy). ``kernels``: (name, start µs, end µs)."""
    spans: dict[str, list[tuple[float, float]]] = {c: [] for c in CATEGORIES}
    for name, s, e in kernels:
        spans[category(name)].append((s, e))
    busy = covered([iv for c in CATEGORIES for iv in spans[c]])
    per = 1e-3 / micro_batches  # µs in total → ms per micro-batch
    return {
        "wall_ms": wall_us * per,
        "busy_ms": busy * per,
        **{f"{c}_ms": covered(spans[c]) * per for c in CATEGORIES},
        "communication_exposed_ms": uncovered(spans["communication"], spans["optimizer"] + spans["compute"]) * per,
        "idle_ms": max(0.0, wall_us - busy) * per,
    }


class StepProfile(L.Callback):
    """Profiles optimizer steps ``start … start + steps − 1`` (every micro-batch of them);
    ``trace=True`` also writes the Chrome trace (``trace_rank{r}.json``, for chrome://tracing)."""

    def __init__(self, start: int = 30, steps: int = 5, path: str = "profile", trace: bool = False):
        if start < 0 or steps < 1:
            raise ValueError(f"StepProfile: start={start}, steps={steps}; start must be >= 0 and steps >= 1")
        self.start, self.steps, self.path, self.trace = start, steps, Path(path), trace
        self._prof: torch.profiler.profile | None = None
        self._done = 0
        self._t0 = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._prof is None and not self._done and trainer.global_step == self.start:
            cuda = pl_module.device.type == "cuda"
            activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
            if cuda:
                torch.cuda.synchronize(pl_module.device)
            self._prof = torch.profiler.profile(activities=[activity])
            self._prof.__enter__()
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._prof is not None:
            self._done += 1  # micro-batches
            if trainer.global_step >= self.start + self.steps:
                self._finish(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._prof is not None:  # training ended inside the window
            self._finish(trainer, pl_module)

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        wall_us = (time.perf_counter() - self._t0) * 1e6
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        kernels = [
            (e.name, e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA
        ]
        totals: dict[str, float] = {}
        for name, s, e in kernels:
            totals[name] = totals.get(name, 0.0) + (e - s) * 1e-3 / self._done
        top = sorted(totals.items(), key=lambda kv: -kv[1])[:15]
        rank = trainer.global_rank
        record = {
            "rank": rank, "world": trainer.world_size, "accumulate": trainer.accumulate_grad_batches,
            "device": str(pl_module.device), "start_step": self.start, "micro_batches": self._done,
            "kernels": len(kernels), **breakdown(kernels, wall_us, self._done),
            "top_kernels_ms": [[name, round(ms, 4), category(name)] for name, ms in top],
        }  # fmt: skip
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / f"profile_rank{rank}.json").write_text(json.dumps(record, indent=1))
        if self.trace:
            prof.export_chrome_trace(str(self.path / f"trace_rank{rank}.json"))
