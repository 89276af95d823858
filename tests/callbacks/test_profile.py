"""`deepdelta.callbacks.profile`: the interval arithmetic behind `make bench-ddp ARGS="--profile"`'s
table (end to end on CPU, where there is no device timeline: tests/test_scaling.py)."""

from __future__ import annotations

import pytest

from deepdelta.callbacks.profile import breakdown, category


def test_profile_breakdown_splits_a_timeline_exactly():
    kernels = [  # (name, start µs, end µs) of two micro-batches
        ("triton_poi_fused_add_0", 0, 10),
        ("sm90_xmma_gemm_bf16bf16", 5, 20),  # overlaps the first: counted once
        ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 15, 30),  # 5 µs hidden behind the gemm
        ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", 32, 36),
        ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 36, 40),  # after the optimizer: all exposed
    ]
    assert [category(k[0]) for k in kernels] == ["compute", "compute", "communication", "optimizer", "communication"]
    got = breakdown(kernels, wall_us=50, micro_batches=2)
    want = {"wall_ms": 25, "busy_ms": 19, "compute_ms": 10, "optimizer_ms": 2, "communication_ms": 9.5,
            "communication_exposed_ms": 7, "idle_ms": 6}  # µs over 2 micro-batches, in ms: ×1e-3 / 2  # fmt: skip
    assert got == pytest.approx({k: v * 1e-3 for k, v in want.items()})
