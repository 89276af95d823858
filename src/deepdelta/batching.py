"""Global batch → per-device micro-batch × gradient accumulation, for any world size."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int  # sequences per optimizer step, over all devices
    micro_batch: int  # sequences per device per forward/backward
    accumulate: int  # micro-batches per optimizer step on each device
    world_size: int

    def as_dict(self) -> dict[str, int]:
        return {f"batch/{k}": v for k, v in self.__dict__.items()}


def plan_batch(global_batch: int | None, max_micro_batch: int, world_size: int, accumulate: int = 1) -> BatchPlan:
    """Split ``global_batch`` sequences over ``world_size`` devices with micro-batches of at
    most ``max_micro_batch`` and the fewest accumulation steps. ``global_batch=None`` keeps
    ``max_micro_batch`` and ``accumulate`` as given (global = micro × world × accumulate)."""
    if global_batch is None:
        return BatchPlan(max_micro_batch * world_size * accumulate, max_micro_batch, accumulate, world_size)
    if global_batch < world_size or global_batch % world_size:
        raise ValueError(
            f"global_batch: got {global_batch}, allowed: a positive multiple of the world size {world_size} "
            "(devices × nodes)"
        )
    per_device = global_batch // world_size
    accumulate = -(-per_device // max_micro_batch)
    while per_device % accumulate:  # the micro-batch must divide the device's share exactly
        accumulate += 1
    return BatchPlan(global_batch, per_device // accumulate, accumulate, world_size)
