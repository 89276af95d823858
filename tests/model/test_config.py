"""ModelConfig: names and defaults of the ablation axes, validation, presets."""

from __future__ import annotations

import pytest

from deepdelta.model import ModelConfig


def test_defaults_follow_the_authors_code():
    cfg = ModelConfig()
    assert (cfg.residual, cfg.dv, cfg.map, cfg.compressor, cfg.expand) == ("ddl", 1, "k", "cc", "conv")
    assert (cfg.beta_max, cfg.beta_init, cfg.beta_hidden) == (2.0, 1.0, 0)
    assert cfg.impl == "reference" and cfg.k_eps == 1e-5 and cfg.conv_kernel == 4
    assert (cfg.value_source, cfg.value_squash, cfg.value_scale) == ("state", "sigmoid", 4.0)
    assert (cfg.qk_norm, cfg.norm_eps, cfg.compressor_init) == ("after_rope", 1e-5, "normal")
    assert (cfg.cc_form, cfg.gate_init, cfg.value_bias_init) == ("toeplitz", "normal", "uniform")


def test_impl_paper_follows_the_paper_text():
    cfg = ModelConfig(impl="paper")
    assert (cfg.value_source, cfg.value_squash, cfg.qk_norm, cfg.norm_eps) == ("context", "none", "before_rope", 1e-6)
    assert (cfg.compressor_init, cfg.cc_form, cfg.gate_init, cfg.value_bias_init) == ("identity", "mix", "zero", "zero")


def test_one_item_switches_alone():
    cfg = ModelConfig(impl="reference", norm_eps=1e-6)
    assert cfg.norm_eps == 1e-6 and cfg.value_source == "state" and cfg.qk_norm == "after_rope"
    # a v-map reads its value from the sublayer output under either impl
    assert ModelConfig(map="v").value_source == "context"


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(residual="additive"),
        dict(residual="write_only", dv=7),
        dict(map="v", compressor="tc", expand="repeat"),
        dict(beta_max=1.0, beta_init=0.5),
        dict(beta_max=2.0, beta_init=1.9, beta_hidden=16),
        dict(value_source="state", value_squash="sigmoid", value_scale=4.0),
    ],
)
def test_valid_values_are_accepted(kwargs):
    cfg = ModelConfig(**kwargs)
    for name, value in kwargs.items():
        assert getattr(cfg, name) == value


@pytest.mark.parametrize("dv", [1, 2])
def test_ec_is_an_alias_of_tc(dv):
    assert ModelConfig(compressor="ec", dv=dv).compressor == "tc"
    assert ModelConfig(compressor="ec", dv=dv) == ModelConfig(compressor="tc", dv=dv)


# (overrides, field named in the message, value as written there, a word of what is allowed)
INVALID = [
    (dict(dv=0), "dv", "0", ">= 1"),
    (dict(dv=-1), "dv", "-1", ">= 1"),
    (dict(dv=2.0), "dv", "2.0", "integer"),
    (dict(dv=True), "dv", "True", "integer"),
    (dict(residual="foo"), "residual", "'foo'", "additive | ddl | write_only"),
    (dict(map="x"), "map", "'x'", "k | v"),
    (dict(compressor="zz"), "compressor", "'zz'", "cc | tc"),
    (dict(expand="x"), "expand", "'x'", "conv | repeat"),
    (dict(value_source="x"), "value_source", "'x'", "context | state"),
    (dict(impl="authors"), "impl", "'authors'", "reference | paper"),
    (dict(qk_norm="never"), "qk_norm", "'never'", "after_rope | before_rope"),
    (dict(cc_form="dense"), "cc_form", "'dense'", "toeplitz | mix"),
    (dict(value_squash="tanh"), "value_squash", "'tanh'", "none | sigmoid"),
    (dict(beta_max=0), "beta_max", "0", "(0, 2]"),
    (dict(beta_max=-1.0), "beta_max", "-1.0", "(0, 2]"),
    (dict(beta_max=2.5), "beta_max", "2.5", "(0, 2]"),
    (dict(beta_init=2.0), "beta_init", "2.0", "(0, beta_max=2.0)"),
    (dict(beta_max=1.0, beta_init=1.0), "beta_init", "1.0", "(0, beta_max=1.0)"),
    (dict(beta_init=0.0), "beta_init", "0.0", "(0, beta_max=2.0)"),
    (dict(beta_hidden=-1), "beta_hidden", "-1", ">= 0"),
    (dict(conv_kernel=0), "conv_kernel", "0", ">= 1"),
    (dict(k_eps=0.0), "k_eps", "0.0", "> 0"),
    (dict(n_layer=0), "n_layer", "0", ">= 1"),
    (dict(d_model=100, n_head=3), "n_head", "3", "divisor of d_model=100"),
    (dict(d_model=128, n_head=4, head_dim=16), "head_dim", "16", "d_model/n_head = 32"),
    (dict(d_model=96, n_head=32, head_dim=3), "head_dim", "3", "even"),
]


@pytest.mark.parametrize("kwargs, field, shown, allowed", INVALID, ids=[str(c[0]) for c in INVALID])
def test_invalid_value_names_field_value_and_allowed(kwargs, field, shown, allowed):
    with pytest.raises(ValueError) as info:
        ModelConfig(**kwargs)
    msg = str(info.value)
    line = next((ln for ln in msg.splitlines() if ln.strip().startswith(f"{field}:")), None)
    assert line is not None, f"no line for {field!r} in:\n{msg}"
    assert f"got {shown}" in line
    assert "allowed" in line and allowed in line


def test_several_problems_are_reported_at_once():
    with pytest.raises(ValueError) as info:
        ModelConfig(dv=0, residual="foo", map="x", compressor="zz", beta_max=3.0, d_model=100, n_head=3)
    msg = str(info.value)
    for field in ("dv", "residual", "map", "compressor", "beta_max", "n_head"):
        assert f"{field}: got" in msg, f"{field} missing from:\n{msg}"


def test_presets_and_overrides():
    small = ModelConfig.preset("small")
    assert (small.n_layer, small.d_model, small.n_head, small.head_dim) == (12, 768, 6, 128)
    assert small.vocab_size == 50304 and small.block_size == 1024
    medium = ModelConfig.preset("medium", residual="additive")
    assert (medium.n_layer, medium.d_model, medium.n_head, medium.head_dim) == (24, 1024, 8, 128)
    assert medium.residual == "additive"
    assert small.mlp_hidden == 2048 and medium.mlp_hidden == 2730  # ⌊8d/3⌋
    with pytest.raises(ValueError, match="huge"):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError, match="dv: got 0"):
        ModelConfig.preset("small", dv=0)


def test_to_dict_round_trips():
    cfg = ModelConfig(residual="write_only", dv=4, map="v", compressor="ec", beta_hidden=8)
    d = cfg.to_dict()
    assert d["compressor"] == "tc" and d["dv"] == 4
    assert ModelConfig(**d) == cfg
