"""Incremental decoding: the model one token at a time, with caches, and sampling.

Everything a new token's logits read from earlier tokens is cached per sequence:

- per layer, the attention keys and values after RoPE and QK-norm (``Attention.heads``);
- per layer, for a `tc` compressor, the last K−1 states it read before attention and the
  last K−1 it read before the MLP (the block's one compressor reads two different states);
  the same for the final `readout` compressor;
- for the `conv` expansion, the last K−1 embeddings.

`cc` (and dv = 1) reads only the current token's state, so it needs no history. Each
token convolution runs the model's own module over [history, new tokens] and keeps the
new tokens' outputs: the cached path computes the same function as ``model(idx)``, which
tests/model/test_decode.py checks in float64 for every residual × compressor × expansion
× dv choice.

The caches hold at most ``block_size`` positions (RoPE's table ends there). When one more
token does not fit, ``decode_step`` runs a full forward over the last ``block_size``
tokens, as ``generate(use_cache=False)`` does at every step: correct, not fast.

Rows of a batch share their positions: prompts of one call have one length (no padding).
Inference only: no autograd; under CUDA autocast the caches keep what the model computes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from deepdelta.model.state import Compress
from deepdelta.model.transformer import Attention, Block, DeltaTransformer


@dataclass
class LayerCache:
    """One block's caches. ``k``, ``v`` (B, H, block_size, Dh), filled up to the cache's
    length; ``attn_hist``/``mlp_hist`` (B, ≤K−1, d, dv), the states the block's `tc`
    compressor read before attention and before the MLP (None for `cc` and dv = 1)."""

    k: Tensor | None = None
    v: Tensor | None = None
    attn_hist: Tensor | None = None
    mlp_hist: Tensor | None = None


@dataclass
class DecodeCache:
    """What ``decode_step`` needs from the tokens so far. ``tokens`` (B, L): the tokens whose
    positions the caches hold (the last ``block_size`` at most); ``embed_hist`` (B, ≤K−1, d)
    for the `conv` expansion, ``readout_hist`` for a `tc` readout."""

    layers: list[LayerCache]
    tokens: Tensor
    block_size: int
    embed_hist: Tensor | None = None
    readout_hist: Tensor | None = None

    @property
    def length(self) -> int:
        """Positions held (the next token's position)."""
        return self.tokens.shape[1]

    @property
    def full(self) -> bool:
        return self.length >= self.block_size


def _empty_cache(model: DeltaTransformer, idx: Tensor) -> DecodeCache:
    return DecodeCache(
        layers=[LayerCache() for _ in model.blocks],
        tokens=idx[:, :0],
        block_size=model.config.block_size,
    )


def _history(fn: Callable[[Tensor], Tensor], x: Tensor, hist: Tensor | None, keep: int) -> tuple[Tensor, Tensor | None]:
    """A causal token convolution ``fn`` of new tokens ``x`` (B, T, ...) given the ``hist``
    of the inputs before them; returns its outputs at x's tokens and the last ``keep`` inputs.
    A history shorter than ``keep`` means the sequence starts there: ``fn`` pads with zeros
    exactly as the full forward does at token 0."""
    if keep == 0:
        return fn(x), None
    full = x if hist is None else torch.cat([hist, x], dim=1)
    return fn(full)[:, -x.shape[1] :], full[:, -keep:].clone()  # clone: don't pin a long prompt's tensor


def _compress(compress: Compress, state: Tensor, hist: Tensor | None) -> tuple[Tensor, Tensor | None]:
    keep = compress.weight.shape[-1] - 1 if compress.kind == "tc" else 0  # cc and dv=1 read one token
    return _history(compress, state, hist, keep)


def _attend(attn: Attention, x: Tensor, cos: Tensor, sin: Tensor, lc: LayerCache, pos: int, capacity: int) -> Tensor:
    B, T, _ = x.shape
    q, k, v = (t.transpose(1, 2) for t in attn.heads(x, cos, sin))  # (B, H, T, Dh)
    if lc.k is None:  # allocated once, at the dtype the model computes k and v in
        lc.k = k.new_empty(B, attn.n_head, capacity, attn.head_dim)
        lc.v = v.new_empty(B, attn.n_head, capacity, attn.head_dim)
    lc.k[:, :, pos : pos + T] = k
    lc.v[:, :, pos : pos + T] = v
    keys, values = lc.k[:, :, : pos + T], lc.v[:, :, : pos + T]
    if pos == 0:  # a prompt: the model's own causal attention
        y = F.scaled_dot_product_attention(q, keys, values, is_causal=True)
    elif T == 1:  # one new token sees every cached one
        y = F.scaled_dot_product_attention(q, keys, values)
    else:  # a chunk after cached tokens: query i sees keys ≤ pos + i
        mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(pos)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    return attn.proj(y.transpose(1, 2).reshape(B, T, -1))


def _block(block: Block, state: Tensor, lc: LayerCache, cos: Tensor, sin: Tensor, pos: int, capacity: int) -> Tensor:
    """``Block.forward`` with caches. For `tc` the MLP's input is compressed here, with its
    own history; `cc` and dv = 1 let the attention update compress it, as the model does
    (the fused kernel makes that read itself). hc/mhc read each token's own streams."""
    if block.hyper:
        x_in, mixing = block.rule_attn.read(state)
        h = _attend(block.attn, block.norm_attn(x_in), cos, sin, lc, pos, capacity)
        state = block.rule_attn.write(state, mixing, h)
        x_in, mixing = block.rule_mlp.read(state)
        return block.rule_mlp.write(state, mixing, block.mlp(block.norm_mlp(x_in)))
    x_in, lc.attn_hist = _compress(block.compress, state, lc.attn_hist)
    c = block.norm_attn(x_in)
    h = _attend(block.attn, c, cos, sin, lc, pos, capacity)
    tc = block.compress.kind == "tc"
    state, x_in, _ = block.rule_attn(state, x_in, c, h, compress=None if tc else block.compress)
    if tc:
        x_in, lc.mlp_hist = _compress(block.compress, state, lc.mlp_hist)
    c = block.norm_mlp(x_in)
    return block.rule_mlp(state, x_in, c, block.mlp(c))[0]


def _extend(model: DeltaTransformer, idx: Tensor, cache: DecodeCache, last_only: bool = False) -> Tensor:
    """Run tokens ``idx`` (B, T) after the cache's, updating it; logits (B, T, V), or
    (B, 1, V) of the last token with ``last_only`` (the head is the costliest matmul)."""
    cfg = model.config
    pos, T = cache.length, idx.shape[1]
    if pos + T > cfg.block_size:
        raise ValueError(f"{pos} cached + {T} new tokens exceed block_size={cfg.block_size}")
    cos, sin = model.rope_cos[pos : pos + T], model.rope_sin[pos : pos + T]
    keep = cfg.conv_kernel - 1 if model.expand.conv else 0
    state, cache.embed_hist = _history(model.expand, model.embed(idx), cache.embed_hist, keep)
    if cfg.state_dtype == "bfloat16":  # as DeltaTransformer.final_state
        state = state.to(torch.bfloat16)
    for block, lc in zip(model.blocks, cache.layers, strict=True):
        state = _block(block, state, lc, cos, sin, pos, cfg.block_size)
    x, cache.readout_hist = _compress(model.readout, state, cache.readout_hist)
    cache.tokens = torch.cat([cache.tokens, idx], dim=1)
    if last_only:
        x = x[:, -1:]
    return F.linear(model.norm_out(x), model.embed.weight)


def _check_idx(model: DeltaTransformer, idx: Tensor) -> Tensor:
    if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.shape[1] < 1 or idx.dtype.is_floating_point:
        got = tuple(idx.shape) if isinstance(idx, Tensor) else type(idx).__name__
        raise ValueError(f"idx: expected integer token ids (B, T) with T >= 1, got {got}")
    return idx.to(model.embed.weight.device, torch.long)


@torch.no_grad()
def prefill(model: DeltaTransformer, idx: Tensor) -> tuple[Tensor, DecodeCache]:
    """Logits (B, T, V) of the prompt ``idx`` (B, T), T ≤ block_size, and its cache."""
    idx = _check_idx(model, idx)
    if idx.shape[1] > model.config.block_size:
        raise ValueError(f"prompt length {idx.shape[1]} exceeds block_size={model.config.block_size}")
    cache = _empty_cache(model, idx)
    return _extend(model, idx, cache), cache


@torch.no_grad()
def decode_step(model: DeltaTransformer, token: Tensor, cache: DecodeCache) -> Tensor:
    """Logits (B, V) of the position after ``token`` (B,), the next token of every row;
    ``cache`` is updated in place. With the cache full (``block_size`` positions), a full
    forward over the last ``block_size`` tokens, which refills it."""
    token = token.to(cache.tokens.device, torch.long).reshape(-1, 1)
    if not cache.full:
        return _extend(model, token, cache, last_only=True)[:, -1]
    window = torch.cat([cache.tokens, token], dim=1)[:, -cache.block_size :]
    fresh = _empty_cache(model, window)
    logits = _extend(model, window, fresh, last_only=True)[:, -1]
    cache.__dict__.update(fresh.__dict__)  # in place: the caller's object now holds the new window
    return logits


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, generator=None) -> Tensor:
    """Token ids (B,) from logits (B, V): argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the ``top_k`` most likely tokens."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(
    model: DeltaTransformer,
    idx: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    stop_token_ids: Iterable[int] | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Tensor:
    """``idx`` (B, T) followed by up to ``max_new_tokens`` sampled tokens: (B, T + n).

    ``temperature`` 0 is greedy. The model sees the last ``block_size`` tokens. Without
    the cache every step is a full forward (the reference the cache is timed against).
    Generation stops once every row has emitted one of ``stop_token_ids``; a row that
    stopped is continued with the stop token it emitted. ``generator`` (on the model's
    device) makes sampling reproducible. The model is in eval mode meanwhile.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: got {max_new_tokens!r}, allowed: an integer >= 0")
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature: got {temperature!r}, allowed: a number >= 0 (0: greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k: got {top_k!r}, allowed: an integer >= 1 or None")
    idx = _check_idx(model, idx)
    if max_new_tokens == 0:
        return idx.clone()
    block = model.config.block_size
    stops = sorted({int(t) for t in stop_token_ids}) if stop_token_ids is not None else []
    stop = torch.tensor(stops, dtype=torch.long, device=idx.device) if stops else None
    was_training = model.training
    model.eval()
    try:
        if use_cache:
            logits, cache = prefill(model, idx[:, -block:])
            logits = logits[:, -1]
        else:
            logits = _full_last(model, idx[:, -block:])
        new: list[Tensor] = []
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        fill = torch.zeros_like(done, dtype=torch.long)  # each stopped row's stop token
        for step in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, generator)
            if stop is not None:
                token = torch.where(done, fill, token)
                hit = torch.isin(token, stop) & ~done
                fill, done = torch.where(hit, token, fill), done | hit
            new.append(token)
            if step + 1 == max_new_tokens or (stop is not None and bool(done.all())):
                break
            if use_cache:
                logits = decode_step(model, token, cache)
            else:
                logits = _full_last(model, torch.cat([idx, *(t[:, None] for t in new)], dim=1)[:, -block:])
        return torch.cat([idx, torch.stack(new, dim=1)], dim=1)
    finally:
        model.train(was_training)


def _full_last(model: DeltaTransformer, idx: Tensor) -> Tensor:
    """The last position's logits (B, V) by a full forward (no cache)."""
    return F.linear(model.hidden(idx)[:, -1], model.embed.weight)
