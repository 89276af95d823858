"""The whole DeltaTransformer: the additive baseline against a hand-written pre-norm
Transformer, the full ablation grid (build, forward, backward, causality), initialisation
identities, probes and the paper's sizes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from deepdelta.model import DeltaTransformer, ModelConfig, count_parameters

F64 = torch.float64


# -- residual=additive, dv=1 is a plain pre-norm Transformer ---------------------------------


def reference_forward(model: DeltaTransformer, idx: torch.Tensor) -> tuple[torch.Tensor, set[str]]:
    """A standard pre-norm Transformer written out by hand with ``model``'s weights, in
    fp64: RMSNorm → attention (QK RMSNorm before or after RoPE as the config says, RoPE on
    the two halves of each head, explicit causal softmax) → add; RMSNorm → SwiGLU → add; final RMSNorm; tied head.
    Returns the logits and the names of the parameters it used."""
    cfg = model.config
    p = {name: t.detach().double() for name, t in model.named_parameters()}
    used: set[str] = set()

    def w(name):
        used.add(name)
        return p[name]

    def rmsnorm(x, gain):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * gain

    B, T = idx.shape
    H, Dh, d = cfg.n_head, cfg.head_dim, cfg.d_model
    inv_freq = 1.0 / cfg.rope_base ** (torch.arange(0, Dh, 2, dtype=F64) / Dh)
    angle = torch.arange(T, dtype=F64)[:, None] * inv_freq[None, :]  # (T, Dh/2)
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]

    def rope(x):  # (B, T, H, Dh)
        x1, x2 = x[..., : Dh // 2], x[..., Dh // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    x = w("embed.weight")[idx]
    for i in range(cfg.n_layer):
        pre = f"blocks.{i}."
        h = rmsnorm(x, w(pre + "norm_attn.weight"))
        q, k, v = (h @ w(pre + "attn.qkv.weight").T).split(d, dim=-1)
        q, k, v = (t.reshape(B, T, H, Dh) for t in (q, k, v))
        if cfg.qk_norm == "before_rope":
            q = rope(rmsnorm(q, w(pre + "attn.q_norm.weight")))
            k = rope(rmsnorm(k, w(pre + "attn.k_norm.weight")))
        else:
            q = rmsnorm(rope(q), w(pre + "attn.q_norm.weight"))
            k = rmsnorm(rope(k), w(pre + "attn.k_norm.weight"))
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(Dh)
        scores = scores.masked_fill(future, float("-inf"))
        probs = torch.exp(scores - scores.amax(-1, keepdim=True))
        probs = probs / probs.sum(-1, keepdim=True)
        y = torch.einsum("bhts,bshd->bthd", probs, v).reshape(B, T, d)
        x = x + y @ w(pre + "attn.proj.weight").T
        h = rmsnorm(x, w(pre + "norm_mlp.weight"))
        gate, up = (h @ w(pre + "mlp.gate_up.weight").T).split(cfg.mlp_hidden, dim=-1)
        x = x + (gate * torch.sigmoid(gate) * up) @ w(pre + "mlp.proj.weight").T
    x = rmsnorm(x, w("norm_out.weight"))
    return x @ w("embed.weight").T, used


@pytest.mark.parametrize("impl", ["reference", "paper"])
@pytest.mark.parametrize("seq_len", [1, 7, 16])
def test_additive_dv1_is_a_plain_prenorm_transformer(tiny, noisy, seq_len, impl):
    torch.manual_seed(0)
    model = noisy(DeltaTransformer(tiny(residual="additive", dv=1, n_layer=3, impl=impl)).double(), std=0.2)
    idx = torch.randint(0, 64, (3, seq_len))
    expected, used = reference_forward(model, idx)
    # nothing beyond the standard block: no biases, no extra branches, tied head
    assert used == {name for name, _ in model.named_parameters()}
    with torch.no_grad():
        logits = model(idx)
    assert logits.shape == (3, seq_len, 64) and logits.dtype == F64
    # the RoPE tables are built in fp32, hence ~1e-7 agreement rather than 1e-14
    assert_close(logits, expected, atol=2e-6, rtol=2e-6)


def test_reference_comparison_is_sensitive(tiny, noisy):
    """Guard against a vacuous reference test: a small change in one weight is visible."""
    torch.manual_seed(0)
    model = noisy(DeltaTransformer(tiny(residual="additive", dv=1)).double(), std=0.2)
    idx = torch.randint(0, 64, (2, 16))
    expected, _ = reference_forward(model, idx)
    with torch.no_grad():
        model.blocks[1].attn.k_norm.weight[3] += 1e-3
        assert (model(idx) - expected).abs().max() > 1e-5


# -- the whole ablation grid ------------------------------------------------------------------

GRID = list(
    itertools.product(
        ["additive", "ddl", "write_only"],  # residual
        [1, 2, 4],  # dv
        ["k", "v"],  # map
        ["cc", "tc"],  # compressor
        ["conv", "repeat"],  # expand
        [1.0, 2.0],  # beta_max
    )
)


@pytest.mark.parametrize(
    "residual, dv, map_, compressor, expand, beta_max",
    GRID,
    ids=[f"{r}-dv{dv}-{m}map-{c}-{e}-bmax{b:g}" for r, dv, m, c, e, b in GRID],
)
def test_grid_builds_runs_backward_and_is_causal(tiny, noisy, residual, dv, map_, compressor, expand, beta_max):
    cfg = tiny(
        residual=residual,
        dv=dv,
        map=map_,
        compressor=compressor,
        expand=expand,
        beta_max=beta_max,
        beta_init=beta_max / 2,
    )
    torch.manual_seed(0)
    # perturbed: token-conv taps beyond the identity and gate weights are non-zero, so a
    # future tap or a wrong gate would show
    model = noisy(DeltaTransformer(cfg), std=0.1)
    B, T, V = 2, cfg.block_size, cfg.vocab_size
    idx = torch.randint(0, V, (B, T))
    targets = torch.randint(0, V, (B, T))

    # forward and backward in the default fp32
    logits = model(idx)
    assert logits.shape == (B, T, V) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"

    # causality, in fp64 so that the check can be exact: replacing every token after t
    # (token t+1 included) leaves logits <= t unchanged, and does change position t+1
    model.double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        logits = model(idx)
        for t in (0, 5, T - 2):
            idx2 = idx.clone()
            idx2[:, t + 1 :] = torch.randint(0, V, (B, T - t - 1), generator=gen)
            idx2[:, t + 1] = (idx[:, t + 1] + 1) % V
            logits2 = model(idx2)
            assert_close(logits2[:, : t + 1], logits[:, : t + 1], atol=1e-12, rtol=0)
            assert (logits2[:, t + 1] - logits[:, t + 1]).abs().max() > 1e-6


def test_grid_parameter_sets(tiny):
    """The axes really change the model: branches, compressors and expansions exist
    exactly where the configuration asks for them."""

    def names(**kw):
        return {n for n, _ in DeltaTransformer(tiny(**kw)).named_parameters()}

    assert not any("rule_" in n for n in names(residual="additive", dv=4))
    assert any(n.endswith("rule_attn.key.weight") for n in names(map="v"))
    assert not any(".key." in n for n in names(map="k"))
    assert "expand.weight" in names(dv=2, expand="conv")
    assert "expand.weight" not in names(dv=2, expand="repeat")
    assert {"readout.mix", "blocks.0.compress.mix"} <= names(dv=2, compressor="cc", cc_form="mix")
    assert {"readout.weight", "readout.read", "blocks.0.compress.read"} <= names(dv=2, compressor="cc")
    assert {"readout.weight", "readout.read", "blocks.1.compress.weight"} <= names(dv=2, compressor="tc")
    assert not any("compress" in n or "readout" in n for n in names(dv=1, compressor="tc"))
    # one compressor per block, shared by its two sublayers, plus the readout
    assert sum(n.endswith("compress.mix") for n in names(dv=2, cc_form="mix")) == 2
    assert any("gate.hidden" in n for n in names(beta_hidden=4))


# -- identities at initialisation ---------------------------------------------------------------


@pytest.mark.parametrize("residual", ["additive", "ddl", "write_only"])
@pytest.mark.parametrize("compressor", ["cc", "tc"])
@pytest.mark.parametrize("dv", [2, 4])
def test_conv_expansion_equals_repeat_at_init(tiny, residual, compressor, dv):
    """Both impls: the conv expansion starts as the identity."""
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = {}
    for expand in ("conv", "repeat"):
        torch.manual_seed(123)
        model = DeltaTransformer(tiny(residual=residual, compressor=compressor, dv=dv, expand=expand))
        with torch.no_grad():
            logits[expand] = model(idx)
    assert_close(logits["conv"], logits["repeat"], atol=1e-6, rtol=0)
    # and the conv expansion is live: moving one tap moves the logits
    with torch.no_grad():
        torch.manual_seed(123)
        model = DeltaTransformer(tiny(residual=residual, compressor=compressor, dv=dv, expand="conv"))
        model.expand.weight[..., -2] += 0.5
        assert (model(idx) - logits["conv"]).abs().max() > 1e-4


@pytest.mark.parametrize("compressor", ["cc", "tc"])
@pytest.mark.parametrize("expand", ["conv", "repeat"])
@pytest.mark.parametrize("dv", [2, 4])
def test_additive_expanded_state_equals_dv1_at_init(tiny, compressor, expand, dv):
    """At init (impl=paper) every channel of an additive model holds the same stream and both
    compressors average, so dv > 1 reproduces the dv = 1 baseline exactly. (impl=reference
    draws the compressor kernels at random instead.)"""
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(7)
    base = DeltaTransformer(tiny(residual="additive", dv=1, impl="paper"))
    torch.manual_seed(7)
    wide = DeltaTransformer(tiny(residual="additive", dv=dv, compressor=compressor, expand=expand, impl="paper"))
    with torch.no_grad():
        assert_close(wide(idx), base(idx), atol=1e-5, rtol=1e-5)


def test_ec_alias_builds_tc(tiny):
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    out = {}
    for name in ("ec", "tc"):
        torch.manual_seed(0)
        model = DeltaTransformer(tiny(dv=2, compressor=name))
        assert model.config.compressor == "tc" and model.readout.kind == "tc"
        with torch.no_grad():
            out[name] = model(idx)
    assert torch.equal(out["ec"], out["tc"])


def test_init_scales(tiny):
    """Embeddings N(0, 0.02), matrices N(0, 0.5/√d), output projections ÷ √L."""
    cfg = tiny(d_model=256, n_head=4, head_dim=64, n_layer=4, vocab_size=2048, map="v")
    torch.manual_seed(0)
    model = DeltaTransformer(cfg)
    std = 0.5 / math.sqrt(cfg.d_model)
    assert math.isclose(model.embed.weight.std().item(), 0.02, rel_tol=0.02)
    assert math.isclose(model.blocks[0].attn.qkv.weight.std().item(), std, rel_tol=0.02)
    assert math.isclose(model.blocks[0].mlp.gate_up.weight.std().item(), std, rel_tol=0.02)
    assert math.isclose(model.blocks[0].rule_attn.key.weight.std().item(), std, rel_tol=0.02)
    for proj in (model.blocks[0].attn.proj, model.blocks[0].mlp.proj):
        assert math.isclose(proj.weight.std().item(), std / math.sqrt(cfg.n_layer), rel_tol=0.03)
    assert not any(m.bias is not None for m in (model.blocks[0].attn.qkv, model.blocks[0].mlp.proj))


def test_sequence_longer_than_block_size_is_rejected(tiny):
    model = DeltaTransformer(tiny())
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.bfloat16, F64])
def test_model_runs_in_other_parameter_dtypes(tiny, dtype):
    """A model cast to bf16 (or fp64) still runs; β stays at least fp32."""
    model = DeltaTransformer(tiny(dv=2, beta_hidden=4, gate_init="zero")).to(dtype)
    idx = torch.randint(0, 64, (2, 16))
    logits = model(idx)
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    probe = model.probe(idx)
    assert probe["0.attn"]["beta"].dtype == torch.float32
    assert_close(probe["0.attn"]["beta"], torch.ones(2, 16), atol=1e-6, rtol=0)


# -- probes --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(residual="ddl", dv=1),
        dict(residual="ddl", dv=4, compressor="tc", map="v"),
        dict(residual="write_only", dv=2, beta_hidden=8),
        dict(residual="ddl", dv=2, beta_max=1.0, beta_init=0.5),
        dict(residual="ddl", dv=2, beta_max=2.0, beta_init=0.2, beta_hidden=4),
    ],
    ids=str,
)
def test_probe_at_init(tiny, kw):
    cfg = tiny(**kw, gate_init="zero")
    torch.manual_seed(0)
    model = DeltaTransformer(cfg)
    B, T, d, dv = 3, 16, cfg.d_model, cfg.dv
    idx = torch.randint(0, 64, (B, T))
    with torch.no_grad():
        before = model(idx)
    probe = model.probe(idx)
    assert set(probe) == {f"{i}.{s}" for i in range(cfg.n_layer) for s in ("attn", "mlp")}
    for name, rec in probe.items():
        assert set(rec) == {"beta", "k_norm", "k_hat", "e_pre"}, name
        assert rec["beta"].shape == (B, T)
        assert rec["k_norm"].shape == (B, T)
        assert rec["k_hat"].shape == (B, T, d)
        assert rec["e_pre"].shape == (B, T, dv)
        assert all(not t.requires_grad for t in rec.values())
        # at initialisation every β is beta_init, for every token and sublayer
        assert_close(rec["beta"], torch.full((B, T), cfg.beta_init), atol=1e-6, rtol=0)
        # k̂ = k̃/sqrt(‖k̃‖² + ε²)
        expected_norm = rec["k_norm"] / torch.sqrt(rec["k_norm"] ** 2 + cfg.k_eps**2)
        assert_close(rec["k_hat"].norm(dim=-1), expected_norm, atol=1e-5, rtol=0)
    # recording is off again and costs nothing: rules hold nothing after a plain forward
    assert all(not r.record and r.last == {} for r in model.rules().values())
    with torch.no_grad():
        assert torch.equal(model(idx), before)
    assert all(r.last == {} for r in model.rules().values())


def test_probe_values_of_the_first_sublayer(tiny, noisy):
    """e_pre of layer 0's attention, recomputed from the expanded embedding by hand."""
    cfg = tiny(residual="ddl", dv=2, map="k", compressor="cc", impl="paper")
    torch.manual_seed(0)
    model = noisy(DeltaTransformer(cfg).double(), std=0.1)
    idx = torch.randint(0, 64, (2, 16))
    rec = model.probe(idx)["0.attn"]
    blk = model.blocks[0]
    with torch.no_grad():
        X = model.expand(model.embed(idx))
        x_in = blk.compress(X)
        c = blk.norm_attn(x_in)
        k = blk.attn(c, model.rope_cos[:16], model.rope_sin[:16])
        v = c @ blk.rule_attn.value.weight.T + blk.rule_attn.value.bias
        kh = k / torch.sqrt((k * k).sum(-1, keepdim=True) + cfg.k_eps**2)
        e_pre = torch.einsum("btd,btdv->btv", kh, X) - v
        beta = cfg.beta_max * torch.sigmoid(c @ blk.rule_attn.gate.out.weight[0] + blk.rule_attn.gate.out.bias)
    assert_close(rec["k_norm"].double(), k.norm(dim=-1), atol=1e-5, rtol=1e-5)
    assert_close(rec["k_hat"].double(), kh, atol=1e-6, rtol=1e-5)
    assert_close(rec["e_pre"].double(), e_pre, atol=1e-5, rtol=1e-5)
    assert_close(rec["beta"].double(), beta, atol=1e-6, rtol=1e-6)
    assert rec["beta"].std() > 0.01  # perturbed gate: β varies by token


@pytest.mark.parametrize("dv", [1, 4])
def test_probe_is_empty_for_additive(tiny, dv):
    model = DeltaTransformer(tiny(residual="additive", dv=dv))
    assert model.probe(torch.randint(0, 64, (2, 8))) == {}
    assert all(not r.record for r in model.rules().values())


def test_probe_turns_recording_off_even_on_error(tiny):
    model = DeltaTransformer(tiny())
    with pytest.raises(ValueError):
        model.probe(torch.zeros(1, 99, dtype=torch.long))  # longer than block_size
    assert all(not r.record and r.last == {} for r in model.rules().values())


# -- the paper's sizes -----------------------------------------------------------------------------


def test_small_preset_has_124m_parameters():
    cfg = ModelConfig.preset("small")
    torch.manual_seed(0)
    counts = count_parameters(DeltaTransformer(cfg))
    assert abs(counts["total"] - 124e6) / 124e6 < 0.01, counts
    assert counts["non_embedding"] == counts["total"] - 50304 * 768


def test_medium_preset_has_353m_parameters():
    cfg = ModelConfig.preset("medium")
    with torch.device("meta"):  # shapes only: no memory, no init cost
        counts = count_parameters(DeltaTransformer(cfg))
    assert abs(counts["total"] - 353e6) / 353e6 < 0.01, counts
    assert counts["non_embedding"] == counts["total"] - 50304 * 1024


BF16_STATE = {
    "ddl-dv1": dict(residual="ddl", dv=1),
    "ddl-cc-ec-dv4": dict(residual="ddl", dv=4, compressor="cc", expand="conv"),
    "ddl-tc-rep-dv2": dict(residual="ddl", dv=2, compressor="tc", expand="repeat"),
    "write_only-cc-dv2": dict(residual="write_only", dv=2),
    "additive-cc-dv2": dict(residual="additive", dv=2),
}


@pytest.mark.parametrize("kernel", ["plain", "fused"])
@pytest.mark.parametrize("overrides", BF16_STATE.values(), ids=BF16_STATE.keys())
def test_bf16_state_model_tracks_fp32_state(tiny, noisy, overrides, kernel):
    """state_dtype=bfloat16 stores the state in bf16 and computes like the fp32-state model
    up to bf16 rounding of the state: loss and gradients close, both kernels alike."""
    cfg = tiny(kernel=kernel, **overrides)
    ref = noisy(DeltaTransformer(cfg), std=0.1)
    model = DeltaTransformer(ModelConfig(**{**cfg.to_dict(), "state_dtype": "bfloat16"}))
    model.load_state_dict(ref.state_dict())
    idx, targets = torch.randint(0, cfg.vocab_size, (2, 2, 16), generator=torch.Generator().manual_seed(0)).unbind(0)
    assert model.final_state(idx).dtype == torch.bfloat16
    assert ref.final_state(idx).dtype == torch.float32
    grads = []
    for m in (ref, model):
        loss = m.loss(idx, targets)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
        assert torch.isfinite(loss)
    assert_close(model.loss(idx, targets), ref.loss(idx, targets), rtol=1e-2, atol=1e-2)
    assert torch.isfinite(grads[1]).all()
    assert ((grads[1] - grads[0]).norm() / grads[0].norm()).item() < 3e-2


def test_state_dtype_is_validated():
    with pytest.raises(ValueError, match=r"state_dtype: got 'fp8', allowed: float32 \| bfloat16"):
        ModelConfig(state_dtype="fp8")
