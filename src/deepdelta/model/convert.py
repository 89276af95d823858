"""Weights between the authors' DDL models and deepdelta's, both ways.

The authors' code (yifanzhang-pro/deep-delta-learning @ 2b55f25, ``model/``) names its six
models by file; deepdelta by variant:

| variant | the authors' file | the paper's name |
| --- | --- | --- |
| ``additive`` | ``gpt_base.GPTBase`` with the DDL files' attention | baseline |
| ``ddl`` | ``DDL-vdim1-gpt-mha-rope.py`` | DDL (dv = 1) |
| ``ddl_cc`` | ``DDL-gpt-mha-rope-CC-EC.py`` | DDL-CC |
| ``ddl_cc_repeat`` | ``DDL-gpt-mha-rope-CC.py`` | DDL-CC w/o EC |
| ``ddl_tc`` | ``DDL-gpt-mha-rope-EC.py`` | DDL-TC |
| ``ddl_tc_repeat`` | ``DDL-gpt-mha-rope.py`` | DDL-TC w/o EC |

A converted model is built with ``impl=reference`` (model/config.py), under which its logits
and gradients equal the authors' to ~1e-15 in float64 (tests/model/test_reference_parity.py).
Every deepdelta parameter is one reference tensor, or the concatenation of several (q, k, v;
the SwiGLU's two input maps), or a reshape (the token convolutions, stored (d·dv, K) there and
(d, dv, K) here, channel i·dv + j = (i, j)). The LM head is tied to the embedding in both.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from deepdelta.model.config import ModelConfig
from deepdelta.model.transformer import DeltaTransformer

# variant → the ModelConfig fields it fixes (dv, conv_kernel and the sizes come from shapes)
VARIANTS: dict[str, dict[str, Any]] = {
    "additive": dict(residual="additive"),
    "ddl": dict(residual="ddl"),
    "ddl_cc": dict(residual="ddl", compressor="cc", expand="conv"),
    "ddl_cc_repeat": dict(residual="ddl", compressor="cc", expand="repeat"),
    "ddl_tc": dict(residual="ddl", compressor="tc", expand="conv"),
    "ddl_tc_repeat": dict(residual="ddl", compressor="tc", expand="repeat"),
}
TIED = ("lm_head.weight", "transformer.wte.weight")


class ConversionError(ValueError):
    """A state_dict that does not fit the variant asked for; the message names the key."""


def _layout(model: DeltaTransformer) -> list[tuple[str, tuple[str, ...], tuple[int, ...] | None]]:
    """(deepdelta name, reference names, reference shape when it is a reshape) for every
    parameter: several reference names are concatenated along dim 0."""
    cfg = model.config
    out: list[tuple[str, tuple[str, ...], tuple[int, ...] | None]] = [
        ("embed.weight", ("transformer.wte.weight",), None)
    ]

    def compressor(ours: str, theirs: str) -> None:
        comp = model.get_submodule(ours)
        if comp.kind == "cc":
            out.extend([(f"{ours}.weight", (f"{theirs}.weight",), None), (f"{ours}.read", (f"{theirs}.read",), None)])
        elif comp.kind == "tc":
            shape = (cfg.d_model * cfg.dv, cfg.conv_kernel)
            out.extend(
                [
                    (f"{ours}.weight", (f"{theirs}.shortconv.weight",), shape),
                    (f"{ours}.read", (f"{theirs}.read",), None),
                ]
            )

    if model.expand.conv:
        out.append(("expand.weight", ("input_embed.conv.weight",), (cfg.d_model * cfg.dv, 1, cfg.conv_kernel)))
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}", f"transformer.h.{i}"
        compressor(f"{ours}.compress", f"{theirs}.compress")
        out += [
            (f"{ours}.norm_attn.weight", (f"{theirs}.ln_1.weight",), None),
            (f"{ours}.attn.qkv.weight", tuple(f"{theirs}.attn.c_{p}.weight" for p in "qkv"), None),
            (f"{ours}.attn.proj.weight", (f"{theirs}.attn.c_proj.weight",), None),
            (f"{ours}.attn.q_norm.weight", (f"{theirs}.attn.q_rms.weight",), None),
            (f"{ours}.attn.k_norm.weight", (f"{theirs}.attn.k_rms.weight",), None),
            (f"{ours}.norm_mlp.weight", (f"{theirs}.ln_2.weight",), None),
            (f"{ours}.mlp.gate_up.weight", (f"{theirs}.mlp.c_fc1.weight", f"{theirs}.mlp.c_fc2.weight"), None),
            (f"{ours}.mlp.proj.weight", (f"{theirs}.mlp.c_proj.weight",), None),
        ]
        if cfg.residual != "additive":
            for sub in ("attn", "mlp"):
                for p in ("weight", "bias"):
                    out.append((f"{ours}.rule_{sub}.gate.out.{p}", (f"{theirs}.ddl_{sub}.beta.{p}",), None))
                    out.append((f"{ours}.rule_{sub}.value.{p}", (f"{theirs}.ddl_{sub}.v_proj.{p}",), None))
    compressor("readout", "readout")
    out.append(("norm_out.weight", ("ln_f.weight",), None))
    return out


def _check_convertible(model: DeltaTransformer) -> None:
    cfg = model.config
    if cfg.map != "k" or cfg.beta_hidden or cfg.beta_max != 2 or cfg.residual == "write_only":
        raise ConversionError(
            "the authors' code has the k-map, a one-layer gate and beta_max=2 with the ddl or additive "
            f"residual only; this model has map={cfg.map!r}, beta_hidden={cfg.beta_hidden}, "
            f"beta_max={cfg.beta_max}, residual={cfg.residual!r}"
        )
    if cfg.dv > 1 and cfg.compressor == "cc" and cfg.cc_form != "toeplitz":
        raise ConversionError("the authors' cc is the Toeplitz form: cc_form='mix' has no reference weights")
    forward = dict(qk_norm="after_rope", norm_eps=1e-5)
    if cfg.residual == "ddl":
        forward.update(value_source="state", value_squash="sigmoid", value_scale=4.0)
    if differ := [f"{k}={getattr(cfg, k)!r} (reference: {v!r})" for k, v in forward.items() if getattr(cfg, k) != v]:
        raise ConversionError("the authors' code would compute another function: " + ", ".join(differ))


def to_reference(model: DeltaTransformer, tensors: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The authors' state_dict for a deepdelta model (trained with ``impl=reference``, or at
    least with its parametrisation: the k-map, the Toeplitz ``cc``, a one-layer gate).
    ``tensors``: deepdelta-named tensors to convert instead of the parameters (their
    gradients, say): only their names change, and the tied ``lm_head.weight`` is left out."""
    if tensors is None:
        _check_convertible(model)
    elif model.config.dv > 1 and model.config.compressor == "cc" and model.config.cc_form != "toeplitz":
        raise ConversionError("the authors' cc is the Toeplitz form: cc_form='mix' has no reference weights")
    source = tensors if tensors is not None else {n: p.detach() for n, p in model.named_parameters()}
    out: dict[str, Tensor] = {}
    for ours, theirs, shape in _layout(model):
        tensor = source[ours] if shape is None else source[ours].reshape(shape)
        for name, part in zip(theirs, tensor.chunk(len(theirs)), strict=True):
            out[name] = part.clone()
    if tensors is None:
        out["lm_head.weight"] = out["transformer.wte.weight"].clone()
    return out


def _infer(state_dict: dict[str, Tensor], variant: str, n_head: int, block_size: int) -> ModelConfig:
    def get(key: str) -> Tensor:
        if key not in state_dict:
            raise ConversionError(f"missing key {key!r} (variant {variant!r})")
        return state_dict[key]

    vocab_size, d = get("transformer.wte.weight").shape
    layers = {int(k.split(".")[2]) for k in state_dict if k.startswith("transformer.h.")}
    q_rows = get("transformer.h.0.attn.c_q.weight").shape[0]
    if q_rows % n_head or q_rows != d:
        raise ConversionError(
            f"n_head: got {n_head}; 'transformer.h.0.attn.c_q.weight' has {q_rows} rows and the model width is "
            f"{d}: deepdelta needs n_head·head_dim = d, with n_head dividing it"
        )
    fields: dict[str, Any] = dict(VARIANTS[variant], impl="reference", d_model=d, n_head=n_head)
    fields.update(head_dim=d // n_head, n_layer=len(layers), vocab_size=vocab_size, block_size=block_size)
    if variant != "additive":
        key = "transformer.h.0.ddl_attn.v_proj.weight"
        fields["dv"] = get(key).shape[0]
        if (fields["dv"] == 1) != (variant == "ddl"):
            raise ConversionError(
                f"{key!r} has {fields['dv']} row(s): dv={fields['dv']}, but variant {variant!r} is "
                + ("dv = 1" if variant == "ddl" else "dv > 1 (dv = 1 is variant 'ddl')")
            )
    if fields.get("compressor") == "tc":
        fields["conv_kernel"] = get("readout.shortconv.weight").shape[-1]
    if fields.get("expand") == "conv":
        fields["conv_kernel"] = get("input_embed.conv.weight").shape[-1]
    try:
        return ModelConfig(**fields)
    except ValueError as err:
        raise ConversionError(f"variant {variant!r}: the shapes give an invalid model: {err}") from None


def from_reference(
    state_dict: dict[str, Tensor], *, variant: str, n_head: int, block_size: int = 1024
) -> DeltaTransformer:
    """A deepdelta model holding the authors' weights, in eval mode and the state_dict's dtype.
    ``variant`` names which of the six it is (``VARIANTS``); the sizes, dv and kernel widths
    come from the shapes. Raises ``ConversionError`` naming the first key that is missing,
    unexpected or of the wrong shape."""
    if variant not in VARIANTS:
        raise ConversionError(f"variant: got {variant!r}, allowed: {' | '.join(VARIANTS)}")
    cfg = _infer(state_dict, variant, n_head, block_size)
    dtype = state_dict["transformer.wte.weight"].dtype
    model = DeltaTransformer(cfg).to(dtype)
    layout = _layout(model)
    expected = {name for _, theirs, _ in layout for name in theirs} | {"lm_head.weight"}
    if missing := sorted(expected - set(state_dict) - {"lm_head.weight"}):
        raise ConversionError(f"missing key {missing[0]!r} ({len(missing)} missing) for variant {variant!r}")
    if unexpected := sorted(set(state_dict) - expected):
        raise ConversionError(
            f"unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected) for variant {variant!r}"
        )
    if "lm_head.weight" in state_dict and not torch.equal(state_dict[TIED[0]], state_dict[TIED[1]]):
        raise ConversionError("'lm_head.weight' differs from 'transformer.wte.weight': the authors' models tie them")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for ours, theirs, shape in layout:
            want = [t.shape for t in (params[ours].reshape(shape) if shape else params[ours]).chunk(len(theirs))]
            for name, w in zip(theirs, want, strict=True):
                if state_dict[name].shape != w:
                    got = tuple(state_dict[name].shape)
                    raise ConversionError(f"shape of {name!r}: got {got}, expected {tuple(w)} for variant {variant!r}")
            tensor = torch.cat([state_dict[name] for name in theirs])
            params[ours].copy_(tensor.reshape(params[ours].shape))
    return model.eval()
