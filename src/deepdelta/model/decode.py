"""Incremental decoding: the model one token at a time, with caches, and sampling.

Everything a new token's logits read from earlier tokens is cached per sequence:

- per layer, the attention keys and values after RoPE and QK-norm (``Attention.heads``);
- per layer, for a `tc` compressor, the last K−1 states it read before attention and the
  last K−1 it read before the MLP (the block's one compressor reads two different states);
  the same for the final `readout` compressor;
- for the `conv` expansion, the last K−1 embeddings.

`cc` (and dv = 1) reads only the current token's state, so it needs no history. A prompt's
token convolutions run the model's own modules over [history, new tokens] and keep the new
tokens' outputs; a decode step computes only its one token's output, Σ_i kernel[i]·window[i]
over the last K inputs. The cached path computes the same function as ``model(idx)``, which
tests/model/test_decode.py checks in float64 for every residual × compressor × expansion
× dv choice.

Per token, only what depends on the token runs: the compressors' parameter-only tensors
(`cc`'s mix, which the reference's Toeplitz form builds from ~10 ops, and `tc`'s taps) and
the conv expansion's kernel are computed once per cache (``_Compressor``), the tokens sit
in a buffer of ``block_size`` positions and the KV caches in buffers of that length (no
concatenation that grows with the context), and nothing waits for the device except the
stop-token check (read after the next step is queued, on a GPU). What remains is the
model's own eager forward of one token: about as many small ops as a full forward (~400 to
~2,800 a token for the small preset's variants), which at batch 1 on a GPU are bound by their
launches from Python, not by the GPU.

The caches hold at most ``block_size`` positions (RoPE's table ends there). When one more
token does not fit, ``decode_step`` runs a full forward over the last ``block_size``
tokens, as ``generate(use_cache=False)`` does at every step: correct, not fast.

Rows of a batch share their positions: prompts of one call have one length (no padding).
Inference only: no autograd; under CUDA autocast the caches keep what the model computes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

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


class _Compressor:
    """A ``Compress`` as the cached path calls it, its parameter-only tensors computed once
    (at the cache's creation) instead of at every call: ``taps`` (S, d, dv) and, for `tc`,
    ``kernel`` = the taps in window order (``kernel[i]`` multiplies the state K−1−i tokens
    back). It stands in for the module where a residual rule compresses the new state
    (``__call__``, ``taps()``, ``combine``: the same function as ``Compress.forward``)."""

    combine = staticmethod(Compress.combine)

    def __init__(self, module: Compress):
        self.module, self.kind = module, module.kind
        self._taps = module.taps()  # None for `none` (dv = 1) and `sum` (hc/mhc)
        self.keep = self._taps.shape[0] - 1 if self.kind == "tc" else 0  # cc and dv=1 read one token
        self.kernel = self._taps.flip(0) if self.kind == "tc" else None

    def taps(self) -> Tensor | None:
        return self._taps

    def last(self, window: Tensor) -> Tensor:
        """`tc`'s output (B, 1, d) at the last of ``window``'s L ≤ K states (B, L, d, dv):
        each tap's read sums the dv channels, then the taps' reads are summed."""
        return (window * self.kernel[-window.shape[1] :]).sum(-1).sum(1, keepdim=True)

    def __call__(self, state: Tensor) -> Tensor:
        if self.kind == "cc":  # as Compress.forward: its one tap (the mix)
            return (state * self._taps[0]).sum(-1)
        if self.kind == "tc":
            return self.combine([(state * tap).sum(-1) for tap in self._taps[: state.shape[1]]])
        return self.module(state)


@dataclass
class DecodeCache:
    """What ``decode_step`` needs from the tokens so far. ``tokens`` (B, L): the tokens whose
    positions the caches hold (the last ``block_size`` at most; a view of ``token_buf``,
    (B, block_size)); ``embed_hist`` (B, ≤K−1, d) for the `conv` expansion, ``readout_hist``
    for a `tc` readout. ``compressors`` (one per block, None for hc/mhc), ``readout`` and
    ``expand_kernel`` (K, d, dv) hold the model's parameter-only tensors, computed once."""

    layers: list[LayerCache]
    token_buf: Tensor
    block_size: int
    compressors: list[_Compressor | None]
    readout: _Compressor
    expand_kernel: Tensor | None = None
    length: int = 0  # positions held (the next token's position)
    embed_hist: Tensor | None = None
    readout_hist: Tensor | None = None

    @property
    def tokens(self) -> Tensor:
        return self.token_buf[:, : self.length]

    @property
    def full(self) -> bool:
        return self.length >= self.block_size


def _empty_cache(model: DeltaTransformer, idx: Tensor) -> DecodeCache:
    return DecodeCache(
        layers=[LayerCache() for _ in model.blocks],
        token_buf=idx.new_empty(idx.shape[0], model.config.block_size),
        block_size=model.config.block_size,
        compressors=[None if block.hyper else _Compressor(block.compress) for block in model.blocks],
        readout=_Compressor(model.readout),
        expand_kernel=model.expand.weight.movedim(-1, 0) if model.expand.conv else None,  # (K, d, dv)
    )


def _history(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    hist: Tensor | None,
    keep: int,
    last: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """A causal token convolution ``fn`` of new tokens ``x`` (B, T, ...) given the ``hist``
    of the inputs before them; returns its outputs at x's tokens and the last ``keep`` inputs.
    A history shorter than ``keep`` means the sequence starts there: ``fn`` pads with zeros
    exactly as the full forward does at token 0. For one new token ``last`` (when given)
    computes only its output from the window [history, x]."""
    if keep == 0:
        return fn(x), None
    full = x if hist is None else torch.cat([hist, x], dim=1)
    out = last(full) if last is not None and x.shape[1] == 1 else fn(full)[:, -x.shape[1] :]
    # a step's fresh window of ≤ keep + 1 inputs is kept as it is; a prompt's inputs are
    # copied (don't pin a long prompt's tensor, nor one the model's modules returned)
    tail = full[:, -keep:]
    return out, tail if hist is not None and full.shape[1] <= keep + 1 else tail.clone()


def _conv_last(kernel: Tensor, window: Tensor) -> Tensor:
    """The conv expansion's output (B, 1, d, dv) at the last of ``window``'s L ≤ K embeddings
    (B, L, d): Σ_i kernel[K−L+i]·window[i], ``kernel`` (K, d, dv) in window order."""
    return (window[..., None] * kernel[-window.shape[1] :]).sum(1, keepdim=True)


def _compress(compress: _Compressor, state: Tensor, hist: Tensor | None) -> tuple[Tensor, Tensor | None]:
    return _history(compress, state, hist, compress.keep, compress.last if compress.kind == "tc" else None)


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


def _block(
    block: Block,
    compress: _Compressor | None,
    state: Tensor,
    lc: LayerCache,
    cos: Tensor,
    sin: Tensor,
    pos: int,
    capacity: int,
) -> Tensor:
    """``Block.forward`` with caches, ``compress`` standing in for the block's compressor.
    For `tc` the MLP's input is compressed here, with its own history; `cc` and dv = 1 let
    the attention update compress it, as the model does (the fused kernel makes that read
    itself). hc/mhc read each token's own streams."""
    if block.hyper:
        x_in, mixing = block.rule_attn.read(state)
        h = _attend(block.attn, block.norm_attn(x_in), cos, sin, lc, pos, capacity)
        state = block.rule_attn.write(state, mixing, h)
        x_in, mixing = block.rule_mlp.read(state)
        return block.rule_mlp.write(state, mixing, block.mlp(block.norm_mlp(x_in)))
    x_in, lc.attn_hist = _compress(compress, state, lc.attn_hist)
    c = block.norm_attn(x_in)
    h = _attend(block.attn, c, cos, sin, lc, pos, capacity)
    tc = compress.kind == "tc"
    state, x_in, _ = block.rule_attn(state, x_in, c, h, compress=None if tc else compress)
    if tc:
        x_in, lc.mlp_hist = _compress(compress, state, lc.mlp_hist)
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
    last = partial(_conv_last, cache.expand_kernel) if keep else None
    state, cache.embed_hist = _history(model.expand, model.embed(idx), cache.embed_hist, keep, last)
    if cfg.state_dtype == "bfloat16":  # as DeltaTransformer.final_state
        state = state.to(torch.bfloat16)
    for block, compress, lc in zip(model.blocks, cache.compressors, cache.layers, strict=True):
        state = _block(block, compress, state, lc, cos, sin, pos, cfg.block_size)
    x, cache.readout_hist = _compress(cache.readout, state, cache.readout_hist)
    cache.token_buf[:, pos : pos + T] = idx
    cache.length = pos + T
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
    token = token.to(cache.token_buf.device, torch.long).reshape(-1, 1)
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
        late = stop is not None and _read_stop_late(idx.device)
        for step in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, generator)
            if stop is not None:
                token = torch.where(done, fill, token)
                hit = torch.isin(token, stop) & ~done
                fill, done = torch.where(hit, token, fill), done | hit
            new.append(token)
            if step + 1 == max_new_tokens:
                break
            finished = done.all() if stop is not None else None  # reading it waits for the device
            if finished is not None and not late and bool(finished):
                break
            if use_cache:
                logits = decode_step(model, token, cache)
            else:
                logits = _full_last(model, torch.cat([idx, *(t[:, None] for t in new)], dim=1)[:, -block:])
            if late and bool(finished):  # the step just queued is not needed
                break
        return torch.cat([idx, torch.stack(new, dim=1)], dim=1)
    finally:
        model.train(was_training)


def _read_stop_late(device: torch.device) -> bool:
    """Whether ``generate`` reads the stop check (a host-device sync) only after it queued the
    next step: on a GPU the device then computes that step while the host waits, instead of
    idling until the host queues it; on the CPU, which computes as it is called, that step
    would be computed in vain at the end."""
    return device.type != "cpu"


def _full_last(model: DeltaTransformer, idx: Tensor) -> Tensor:
    """The last position's logits (B, V) by a full forward (no cache)."""
    return F.linear(model.hidden(idx)[:, -1], model.embed.weight)
