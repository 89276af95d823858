"""ModelConfig: every ablation axis of the paper, validated once, plus size presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

HYPER = ("hc", "mhc")  # the Hyper-Connection rules (docs/hyper_connections.md)
RESIDUALS = ("additive", "ddl", "write_only", *HYPER)
MAPS = ("k", "v")
COMPRESSORS = ("cc", "tc")
COMPRESSOR_ALIASES = {"ec": "tc"}  # "EC along tokens", an earlier revision's name for tc
EXPANDS = ("conv", "repeat")
VALUE_SOURCES = ("context", "state")
VALUE_SQUASHES = ("none", "sigmoid")
KERNELS = ("plain", "fused")
STATE_DTYPES = ("float32", "bfloat16")
QK_NORMS = ("after_rope", "before_rope")
COMPRESSOR_INITS = ("normal", "identity")
CC_FORMS = ("toeplitz", "mix")
GATE_INITS = ("normal", "zero")
VALUE_BIAS_INITS = ("uniform", "zero")

# Where the authors' code (yifanzhang-pro/deep-delta-learning @ 2b55f25, `model/`) and the
# paper's text (arXiv 2601.00417, appendix A) disagree, an `impl` gives every such field its
# default; each field can still be set alone. Proven against the authors' code by the golden
# parity tests (tests/model/test_reference_parity.py). Numbers are the README's table rows.
IMPLS: dict[str, dict[str, Any]] = {
    "reference": dict(
        value_source="state",  # 1: v = 4·σ(W_v·x_in + b_v), x_in un-normalised
        value_squash="sigmoid",
        qk_norm="after_rope",  # 2: RoPE first, then the q/k RMSNorm
        norm_eps=1e-5,  # 3: every RMSNorm
        compressor_init="normal",  # 4: compressor kernels N(0, 0.5/√d), read vector 1/dv
        cc_form="toeplitz",  # 5: cc = read · ("same"-padded Toeplitz of a d×dv kernel)
        gate_init="normal",  # 6: W_β ~ N(0, 0.5/√d)
        value_bias_init="uniform",  # 7: b_v ~ U(±1/√d), PyTorch's default
    ),
    "paper": dict(
        value_source="context",  # v = W_v·c + b_v, c = RMSNorm(x_in)
        value_squash="none",
        qk_norm="before_rope",
        norm_eps=1e-6,
        compressor_init="identity",  # tc identity taps, cc a plain average
        cc_form="mix",  # one d×dv mix
        gate_init="zero",  # β = β0 for every token at init
        value_bias_init="zero",
    ),
}

# The paper's sizes (spec "Backbone") and a CPU-sized default.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=4, n_head=4, head_dim=32, d_model=128, vocab_size=256, block_size=128),
    "small": dict(n_layer=12, n_head=6, head_dim=128, d_model=768, vocab_size=50304, block_size=1024),
    "medium": dict(n_layer=24, n_head=8, head_dim=128, d_model=1024, vocab_size=50304, block_size=1024),
}


@dataclass
class ModelConfig:
    # residual rule and state (spec §1-§6)
    residual: str = "ddl"
    dv: int = 1
    map: str = "k"
    compressor: str = "cc"
    expand: str = "conv"
    conv_kernel: int = 4  # token-conv kernel of `tc` and of `conv` expansion
    # gate β = β_max·σ(·); β starts at beta_init for every token (default β_max/2:
    # 1.0, the paper's β0, for β_max=2)
    beta_max: float = 2.0
    beta_init: float | None = None
    beta_hidden: int = 0
    # hc / mhc (Hyper-Connections, mHC; docs/hyper_connections.md): dv is the number of streams n,
    # the compressor is replaced by each sublayer's learned read and the readout sums the streams.
    # hc_dynamic: the input-dependent (dynamic) part of the weights on top of the static ones
    hc_dynamic: bool = True
    mhc_sinkhorn_iters: int = 20  # mHC's t_max
    # mHC's init: read (1-ε)·e_k + ε/n, mixing (1-ε)·I + ε/n (σ and Sinkhorn cannot reach 0 or 1)
    mhc_init_eps: float = 0.1
    # `impl` sets the defaults of the fields marked "impl" (None: take the impl's value):
    # reference (the authors' code) | paper (the paper's text); see IMPLS
    impl: str = "reference"
    # value branch (impl): the paper text reads v from the normalised context c, unbounded;
    # the reference code reads the un-normalised compressor output x_in and bounds it (scale·σ).
    # A v-map always reads v from the sublayer output (value_source=context).
    value_source: str | None = None
    value_squash: str | None = None
    value_scale: float = 4.0
    # initialisation and parametrisation (impl): see IMPLS
    compressor_init: str | None = None
    cc_form: str | None = None
    gate_init: str | None = None
    value_bias_init: str | None = None
    k_eps: float = 1e-5
    # how the update runs (the same function): `plain` the ops of model/ops.py, which
    # torch.compile fuses with their neighbours; `fused` one hand-written Triton kernel per
    # update (model/fused.py): on an H100 about 6% faster with `cc` at dv = 2 and 4 (5% more
    # memory), as fast with `tc`, slower at dv = 1 (docs/benchmarks.md)
    kernel: str = "plain"
    # storage of the state X between sublayers. float32: the parameters' precision (fp32, or
    # fp64 for an fp64 model). bfloat16: the state and its gradient are stored in bf16 and every
    # update is computed in fp32 and rounded once (as Megatron-LM keeps its residual stream
    # unless --fp32-residual-connection). With kernel=fused the saved states halve (dv=4 on an
    # H100: 1.33x -> 1.19x the additive peak memory, and 0.63x -> 0.68x the additive tok/s);
    # with the plain ops it needs more memory.
    # A numerics choice: the residual stream is rounded to bf16 (docs/benchmarks.md)
    state_dtype: str = "float32"
    # backbone
    n_layer: int = 4
    n_head: int = 4
    head_dim: int = 32
    d_model: int = 128
    vocab_size: int = 256
    block_size: int = 128
    rope_base: float = 10000.0
    norm_eps: float | None = None  # impl: every RMSNorm's eps
    qk_norm: str | None = None  # impl: the q/k RMSNorm after RoPE (reference) or before (paper)

    def __post_init__(self) -> None:
        self.compressor = COMPRESSOR_ALIASES.get(self.compressor, self.compressor)
        for name, value in IMPLS.get(self.impl, {}).items():
            if getattr(self, name) is None:
                setattr(self, name, "context" if name == "value_source" and self.map == "v" else value)
        if self.beta_init is None and isinstance(self.beta_max, (int, float)):
            self.beta_init = self.beta_max / 2
        errors = self.problems()
        if errors:
            raise ValueError("invalid ModelConfig:\n  " + "\n  ".join(errors))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"model preset: got {name!r}, allowed: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def problems(self) -> list[str]:
        """Every invalid field at once, each naming the value and what is allowed."""
        errs: list[str] = []

        def choice(name: str, allowed: tuple[str, ...], extra: str = "") -> None:
            value = getattr(self, name)
            if value not in allowed:
                errs.append(f"{name}: got {value!r}, allowed: {' | '.join(allowed)}{extra}")

        def integer(name: str, low: int) -> bool:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                errs.append(f"{name}: got {value!r}, allowed: an integer >= {low}")
                return False
            return True

        if self.impl not in IMPLS:
            errs.append(f"impl: got {self.impl!r}, allowed: {' | '.join(IMPLS)}")
            return errs
        choice("residual", RESIDUALS)
        choice("map", MAPS)
        choice("compressor", COMPRESSORS, " (ec is an alias of tc)")
        choice("expand", EXPANDS)
        choice("value_source", VALUE_SOURCES)
        choice("value_squash", VALUE_SQUASHES)
        choice("kernel", KERNELS)
        choice("state_dtype", STATE_DTYPES)
        choice("qk_norm", QK_NORMS)
        choice("compressor_init", COMPRESSOR_INITS)
        choice("cc_form", CC_FORMS)
        choice("gate_init", GATE_INITS)
        choice("value_bias_init", VALUE_BIAS_INITS)
        integer("dv", 1)
        integer("conv_kernel", 1)
        integer("beta_hidden", 0)
        integer("mhc_sinkhorn_iters", 1)
        if not isinstance(self.hc_dynamic, bool):
            errs.append(f"hc_dynamic: got {self.hc_dynamic!r}, allowed: true | false")
        if not (isinstance(self.mhc_init_eps, (int, float)) and 0 < self.mhc_init_eps < 1):
            errs.append(f"mhc_init_eps: got {self.mhc_init_eps!r}, allowed: a number in (0, 1)")
        if self.residual in HYPER and self.kernel == "fused":
            errs.append(
                f"kernel: got 'fused' with residual={self.residual!r}, allowed: 'plain' "
                "(the fused kernel implements the ddl and write_only updates only)"
            )
        ok = all([integer(n, 1) for n in ("n_layer", "n_head", "head_dim", "d_model", "vocab_size", "block_size")])
        if not (isinstance(self.beta_max, (int, float)) and 0 < self.beta_max <= 2):
            errs.append(
                f"beta_max: got {self.beta_max!r}, allowed: a number in (0, 2] "
                "(2: up to reflection, 1: up to projection)"
            )
        elif not (isinstance(self.beta_init, (int, float)) and 0 < self.beta_init < self.beta_max):
            errs.append(
                f"beta_init: got {self.beta_init!r}, allowed: a number in (0, beta_max={self.beta_max}) "
                "(open: the gate is a sigmoid)"
            )
        if self.map == "v" and self.value_source != "context":
            errs.append(
                f"value_source: got {self.value_source!r} with map='v', allowed: 'context' "
                "(a v-map reads v from the sublayer output)"
            )
        for name in ("k_eps", "value_scale", "norm_eps", "rope_base"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0):
                errs.append(f"{name}: got {value!r}, allowed: a number > 0")
        if ok:
            if self.d_model % self.n_head:
                errs.append(f"n_head: got {self.n_head}, allowed: a divisor of d_model={self.d_model}")
            elif self.n_head * self.head_dim != self.d_model:
                errs.append(
                    f"head_dim: got {self.head_dim}, allowed: d_model/n_head = {self.d_model // self.n_head} "
                    f"(n_head·head_dim must equal d_model={self.d_model})"
                )
            if self.head_dim % 2:
                errs.append(f"head_dim: got {self.head_dim}, allowed: an even number (RoPE rotates pairs)")
        return errs

    @property
    def mlp_hidden(self) -> int:
        return 8 * self.d_model // 3  # SwiGLU hidden ⌊8d/3⌋
