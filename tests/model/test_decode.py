"""Incremental decoding (deepdelta.model.decode) computes what the full forward computes.

Float64 on CPU with perturbed weights (identity-initialised taps would hide a wrong history):
prefill + one decode_step per token must give the full forward's logits within 1e-10
relative, for every residual × compressor × expansion × dv × impl, v-maps and the fused
update, from prompts of 1 token and of fewer tokens than the token-conv kernel.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from tests.model.conftest import perturb, tiny_config

from deepdelta.model import DeltaTransformer
from deepdelta.model.decode import DecodeCache, decode_step, generate, prefill

RTOL = 1e-10  # fp64 rounding is ~1e-16; a wrong tap or position is ≥ 1e-3
V = 64  # tiny_config's vocabulary
T = 8  # tokens checked per sequence (block_size 16)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops: one thread is fastest, and on a shared 2-core machine two threads each
    ran the file ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_for(**overrides) -> DeltaTransformer:
    torch.manual_seed(0)
    return perturb(DeltaTransformer(tiny_config(**overrides)).double()).eval()


def incremental(model: DeltaTransformer, idx: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits (B, T, V): prefill of the first ``prompt`` tokens, then one decode_step each."""
    logits, cache = prefill(model, idx[:, :prompt])
    steps = [decode_step(model, idx[:, t], cache)[:, None] for t in range(prompt, idx.shape[1] - 1)]
    assert cache.length == idx.shape[1] - 1
    return torch.cat([logits, *steps], dim=1)


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < RTOL, f"relative error {err:.2e}"


def check(model: DeltaTransformer, prompts=(1, 3)) -> None:
    idx = torch.randint(0, V, (2, T + 1), generator=torch.Generator().manual_seed(1))
    full = model(idx[:, :-1])
    for prompt in prompts:  # 1 token; 3 < conv_kernel = 4: the histories start short
        assert_close(incremental(model, idx, prompt), full)


# dv = 1 has no compressor or expansion: its one model is listed once (as cc-conv)
GRID = [
    c
    for c in itertools.product(("additive", "ddl", "write_only"), ("cc", "tc"), ("conv", "repeat"), (1, 2, 4))
    if c[3] > 1 or c[1:3] == ("cc", "conv")
]


@pytest.mark.parametrize("impl", ["reference", "paper"])
@pytest.mark.parametrize("residual,compressor,expand,dv", GRID, ids=["-".join(map(str, c)) for c in GRID])
def test_incremental_logits_equal_full_forward(residual, compressor, expand, dv, impl):
    check(model_for(residual=residual, compressor=compressor, expand=expand, dv=dv, impl=impl))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(map="v", residual="ddl", compressor="tc", dv=4),
        dict(map="v", residual="write_only", compressor="cc", expand="repeat", dv=2),
        dict(map="v", residual="ddl", dv=1, impl="paper"),
        dict(kernel="fused", residual="ddl", compressor="cc", dv=4),  # the kernel's formulas in torch on CPU
        dict(kernel="fused", residual="write_only", compressor="tc", dv=2),
        dict(conv_kernel=1, compressor="tc", dv=2),  # no history at all
        dict(conv_kernel=6, compressor="tc", dv=2, beta_hidden=8),  # longer than the 3-token prompt
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_incremental_logits_other_choices(overrides):
    check(model_for(**overrides))


def test_prefill_logits_and_limits():
    model = model_for(residual="ddl", compressor="tc", dv=2)
    idx = torch.randint(0, V, (3, 16), generator=torch.Generator().manual_seed(2))
    logits, cache = prefill(model, idx)
    assert_close(logits, model(idx))
    assert isinstance(cache, DecodeCache) and cache.length == 16 and cache.full
    with pytest.raises(ValueError, match="block_size"):
        prefill(model, torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="idx"):
        prefill(model, torch.zeros(4, dtype=torch.long))


def test_full_cache_falls_back_to_the_last_block():
    """Past block_size, a step is the full forward over the last block_size tokens."""
    model = model_for(residual="ddl", compressor="tc", dv=2)
    idx = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(3))
    _, cache = prefill(model, idx[:, :14])
    for t in range(14, 20):
        got = decode_step(model, idx[:, t], cache)
        window = idx[:, max(0, t + 1 - 16) : t + 1]
        assert_close(got, model(window)[:, -1])
        assert cache.length == window.shape[1] and torch.equal(cache.tokens, window)


def test_greedy_generation_same_with_and_without_cache():
    model = model_for(residual="ddl", compressor="tc", expand="conv", dv=4)
    idx = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(4))
    cached = generate(model, idx, 20, temperature=0)  # 25 > block_size 16: crosses the fallback
    plain = generate(model, idx, 20, temperature=0, use_cache=False)
    assert cached.shape == (2, 25) and torch.equal(cached[:, :5], idx)
    assert torch.equal(cached, plain)


def test_block_size_crop():
    model = model_for(residual="ddl", compressor="cc", dv=2)
    idx = torch.randint(0, V, (1, 30), generator=torch.Generator().manual_seed(5))
    out = generate(model, idx, 3, temperature=0)
    assert out.shape == (1, 33) and torch.equal(out[:, :30], idx)
    assert torch.equal(out, generate(model, idx, 3, temperature=0, use_cache=False))
    # only the last block_size tokens matter: an earlier prefix changes nothing
    other = torch.cat([torch.zeros(1, 14, dtype=torch.long), idx[:, 14:]], dim=1)
    assert torch.equal(generate(model, other, 3, temperature=0)[:, 30:], out[:, 30:])


def test_sampling_is_seeded_and_respects_top_k():
    model = model_for(residual="ddl", compressor="tc", dv=2)
    idx = torch.randint(0, V, (4, 3), generator=torch.Generator().manual_seed(6))

    def draw(seed: int, **kw) -> torch.Tensor:
        return generate(model, idx, 10, temperature=3.0, generator=torch.Generator().manual_seed(seed), **kw)

    a, b = draw(0, top_k=3), draw(0, top_k=3)
    assert torch.equal(a, b)
    assert torch.equal(a, draw(0, top_k=3, use_cache=False))  # same logits, same draws
    assert not torch.equal(draw(0), draw(1))
    logits = model(a[:, :-1])[:, 2:]  # the logits each new token was drawn from
    top3 = logits.topk(3, dim=-1).indices
    assert (a[:, 3:, None] == top3).any(-1).all()
    without = draw(0)  # at temperature 3 tokens outside the top 3 do occur
    free = model(without[:, :-1])[:, 2:].topk(3, dim=-1).indices
    assert not (without[:, 3:, None] == free).any(-1).all()
    assert torch.equal(draw(0, top_k=1), generate(model, idx, 10, temperature=0))


def test_stop_tokens():
    model = model_for(residual="ddl", dv=1)
    idx = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(7))
    free = generate(model, idx, 12, temperature=0)[:, 4:]
    stops = {int(free[0, 2]), int(free[1, 5])}
    first = [next(i for i, t in enumerate(row.tolist()) if t in stops) for row in free]
    out = generate(model, idx, 12, temperature=0, stop_token_ids=stops)[:, 4:]
    assert out.shape[1] == max(first) + 1  # stopped once every row had stopped
    for row, f in enumerate(first):
        assert torch.equal(out[row, : f + 1], free[row, : f + 1])
        assert (out[row, f:] == free[row, f]).all()  # a stopped row repeats its stop token
    never = generate(model, idx, 12, temperature=0, stop_token_ids=set())
    assert torch.equal(never[:, 4:], free)


def test_arguments_and_mode():
    model = model_for(residual="ddl", dv=1).train()
    idx = torch.zeros(1, 2, dtype=torch.long)
    assert torch.equal(generate(model, idx, 0), idx)
    for bad in (dict(max_new_tokens=-1), dict(temperature=-1.0), dict(top_k=0), dict(temperature=float("nan"))):
        with pytest.raises(ValueError):
            generate(model, idx, **{"max_new_tokens": 2, **bad})
    generate(model, idx, 2)
    assert model.training  # restored


@pytest.mark.parametrize("use_cache", [True, False])
def test_stop_check_after_the_next_step_gives_the_same_tokens(monkeypatch, use_cache):
    """On a GPU generate reads the stop check after it queued the next step (no idle device
    while the host waits); the tokens must not change. Forced here on the CPU."""
    import deepdelta.model.decode as decode

    model = model_for(residual="ddl", dv=1)
    idx = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(7))
    free = generate(model, idx, 12, temperature=0, use_cache=use_cache)[:, 4:]
    for stops in ({int(free[0, 2]), int(free[1, 5])}, {int(free[0, 11]), int(free[1, 11])}, {V + 1}):
        want = generate(model, idx, 12, temperature=0, stop_token_ids=stops, use_cache=use_cache)
        monkeypatch.setattr(decode, "_read_stop_late", lambda device: True)
        got = generate(model, idx, 12, temperature=0, stop_token_ids=stops, use_cache=use_cache)
        monkeypatch.undo()
        assert torch.equal(got, want)
