"""Golden parity files from the authors' Deep Delta Learning code (issue 16).

Runs the authors' public models (``yifanzhang-pro/deep-delta-learning``, commit ``2b55f25``,
the HF-style models under ``model/``) at a tiny shape in float64 on CPU and writes, for each of
the paper's six models, one file ``<out>/<variant>.pt`` that deepdelta's converter tests load.
Nothing here is imported by the package or the tests; the reference's code is never copied into
this repository (only into a temporary directory while this script runs).

Regenerate::

    git clone https://github.com/yifanzhang-pro/deep-delta-learning /tmp/ddl-ref
    git -C /tmp/ddl-ref checkout 2b55f25
    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 transformers pydantic
    /tmp/refvenv/bin/python tools/reference_golden.py /tmp/ddl-ref            # -> tests/golden/reference/

(Generated with torch 2.13.0+cpu, transformers 5.24.0, pydantic 2.14.4, Python 3.11.) The script
checks every ``model/*.py`` of the checkout against its git blob id at ``2b55f25`` and stops on a
mismatch unless ``--allow-other-commit`` is given.

Local patches (applied programmatically to a scratch copy of ``model/`` only)
---------------------------------------------------------------------------
1. ``pydantic_config.py``: ``_build_config_model`` resolves the config's field types with
   ``typing.get_type_hints(config_cls)``, which walks the whole MRO; on current transformers
   ``PretrainedConfig``'s own annotations hold forward references (``torch.dtype`` ...) that do not
   resolve in that module and raise ``NameError``. The patch resolves only the config class's own
   annotations (the ones the function goes on to use), in its module's namespace. Validation
   itself (strict bool/int/str, defaults filled in) is unchanged.
2. ``shortconv.py``: ``from causal_conv1d import causal_conv1d_fn`` (a CUDA-only package) is
   replaced by a pure-PyTorch ``causal_conv1d_fn`` with the semantics of the package's own
   reference implementation (``causal_conv1d_ref``): ``F.conv1d(x, weight[:, None, :], bias,
   padding=K - 1, groups=C)[..., :T]``, optional SiLU, output in the input dtype. Only the TC
   models (``DDL-gpt-mha-rope.py``, ``DDL-gpt-mha-rope-EC.py``) import it. The same function is what
   the reference's own KV-cache path (``ResidualShortConvCompressor.forward_with_past``) computes
   with ``F.conv1d`` and a zero left pad, so the tap order is the reference's: ``weight[c, K-1]``
   multiplies the current token, ``weight[c, K-1-s]`` the token ``s`` steps back.
3. Precision, for float64 goldens (not needed to import). The reference upcasts a few
   intermediates with ``.float()`` / ``dtype=torch.float32``: meant as bf16/fp32 -> fp32, but on
   float64 tensors it is a *down*cast to float32, which moves the float64 logits by 2e-7..6e-7
   (max-norm relative) and would make any 1e-10 parity test measure float32 rounding. So, in the
   copy that makes the golden numbers, these casts become ``.to(torch.promote_types(dtype,
   torch.float32))`` (fp32 for bf16/fp32 as before, float64 stays float64): ``rmsnorm.rms_norm`` /
   ``group_norm`` (input, weight, bias) and, in the five DDL files, the gate logits
   ``self.beta(context).float()`` (and the two-layer gate's) and the read-out
   ``torch.sum(k_rms * x, ..., dtype=torch.float32)``. Untouched: the RoPE tables (``inv_freq`` and
   the angles are float32 by construction; that is the reference's table, reproduced as is) and
   the ``.float()`` on the logits in the ``targets`` branch (not used for the golden loss). A
   second scratch copy with patches 1-2 only (the reference as it runs) gives each case's
   ``logits_as_is`` / ``loss_as_is`` / ``loss_reference_fp32`` for comparison.
No other file is changed; ``DDL_utils.py`` (triton) and the ``-accelerated`` variant are not imported.

The six models (verified by reading the files)
---------------------------------------------
- ``additive`` (the paper's baseline): not a model file in the repository. Built as a subclass of
  ``gpt_base.GPTBase`` with ``attention_cls`` = ``CausalSelfAttention`` of
  ``DDL-vdim1-gpt-mha-rope.py`` (the attention class is identical in all five DDL files) and
  ``config_class`` = that file's ``GPTConfig`` (its ``ddl_*`` fields are unused). ``GPTBase``
  supplies the rest: ``GPTBlock`` (pre-norm ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))``,
  ``gpt_base.SwiGLUMLP`` with hidden ``floor(8/3 d)``, RMSNorm eps ``rms_norm_eps`` default 1e-5),
  tied ``wte``/``lm_head``, ``ln_f`` and ``init_gpt_weights``. Parameter names therefore match the
  DDL files' backbone (``transformer.h.{i}.attn.*``, ``.mlp.c_fc1/c_fc2/c_proj``, ``.ln_1/.ln_2``).
- ``ddl`` (DDL, d_v = 1): ``DDL-vdim1-gpt-mha-rope.py`` (``DeepDeltaResidualVdim1``: scalar value,
  plain (B, T, d) stream, no compressor, no expansion).
- ``ddl_cc`` (DDL-CC, d_v = 4): ``DDL-gpt-mha-rope-CC-EC.py``: compressor
  ``ResidualShortConvCompressor`` with a (d, K) kernel convolved along the d_v axis ("same"
  padded, a per-feature d_v x d_v Toeplitz mix) and a read vector = channel compression;
  ``InputEmbedShortConvExpander`` (causal depthwise conv over tokens, d -> d*d_v) = EC.
- ``ddl_cc_repeat`` (DDL-CC w/o EC): ``DDL-gpt-mha-rope-CC.py``: the same compressor; the input is
  ``wte(idx)`` repeated over the d_v channels (no ``input_embed``).
- ``ddl_tc`` (DDL-TC): ``DDL-gpt-mha-rope-EC.py``: compressor ``ResidualShortConvCompressor`` with a
  ``shortconv.DepthwiseShortConv1d`` over the d*d_v channels along the token axis (causal) and a
  read vector = token compression; with ``InputEmbedShortConvExpander`` = EC.
- ``ddl_tc_repeat`` (DDL-TC w/o EC): ``DDL-gpt-mha-rope.py``: the same TC compressor, repeated input.

What is recorded
----------------
Shape: 2 layers, hidden_size 32, 2 heads x head_dim 16, vocab 64, block_size 32, d_v = 4 for
the expanded models; every other config field at the reference's default. Each model is
built under ``torch.manual_seed(0)`` with float64 as the default dtype (so the constructor's
init draws are float64), then ``.to(float64)`` (which, by ``Rotary._apply``, keeps
``inv_freq`` float32 and clears the RoPE cache, as the reference intends). Two cases:

- ``init``: the weights exactly as the constructor leaves them.
- ``perturbed``: every parameter (``named_parameters()`` order) plus N(0, s^2) noise from a
  ``torch.Generator`` seeded 1234, s = 0.5 * rms(parameter), or 0.05 where the parameter is
  all zero, so identity-initialised kernels, zero gate biases and unit norm gains are
  non-trivial.

Inputs: a (2, 17) token sequence from a generator seeded 0; ``tokens = seq[:, :-1]``,
``targets = seq[:, 1:]`` (next tokens). The forward is the reference's own
``model(tokens, output_all_seq=True)`` (targets ``None``), which returns the full (B, T, V)
logits in the model dtype; the loss is then ``F.cross_entropy(logits.reshape(-1, V),
targets.reshape(-1), ignore_index=-1)``, the reference's own loss expression (mean over all
B*T positions). (With ``targets`` passed, the reference casts the logits with ``.float()`` to
float32 before the loss; that value, from the unpatched-precision copy, is kept as
``loss_reference_fp32``.) Grads are d(loss)/d(p) for every ``named_parameters()`` entry (the tied
embedding once, under ``transformer.wte.weight``).

File layout: ``{"variant", "reference_file", "reference_commit": "2b55f25", "reference_blob",
"config": {...}, "notes": str, "param_shapes": {name: shape}, "versions": {...},
"cases": {"init": case, "perturbed": case}}``, case = ``{"state_dict", "tokens", "targets",
"logits", "loss", "grads", "logits_as_is", "loss_as_is", "loss_reference_fp32"}`` (the golden
numbers are ``logits``, ``loss`` and ``grads``, from the patch-3 copy); float tensors float64
(``loss_reference_fp32`` float32), contiguous and cloned. ``state_dict`` is the reference's
(``lm_head.weight`` present and equal to ``transformer.wte.weight``; the non-persistent RoPE
``inv_freq`` absent).

Checks made before writing: loss recomputed from the logits by log-softmax; every grad
finite and non-zero; the float32 reference loss within 1e-5; a fresh model loading the
saved ``state_dict`` reproduces the logits bit for bit, and a second forward is bit-identical;
the unpatched copy builds the same init weights and its logits are within 1e-5 of the golden ones.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REFERENCE_COMMIT = "2b55f25"

# git blob ids of model/*.py at 2b55f25 (`git ls-tree -r 2b55f25 model/`)
REFERENCE_BLOBS = {
    "DDL-gpt-mha-rope-CC-EC-accelerated.py": "876dda0d6e759e1ebbb4f74598ad2e57bff75546",
    "DDL-gpt-mha-rope-CC-EC.py": "9cc6eea9dc2958186eaa6fec50f33eecf7643514",
    "DDL-gpt-mha-rope-CC.py": "600f353ad60ee246037f250254647c26dffc79ac",
    "DDL-gpt-mha-rope-EC.py": "fbc5d0321dbcb457fe59334227d129d06503ad94",
    "DDL-gpt-mha-rope.py": "ebae0bf1e1b10a054cf18e8b71eaae960b1a1d5e",
    "DDL-vdim1-gpt-mha-rope.py": "d2cc586c8dae10d73e976bf2742f1ae58c8d1fb7",
    "DDL_utils.py": "f11b4fd831a1fb7bfd6fbc4d468e023db09d86ba",
    "activations.py": "dc853e209f3d3e375f4a42bd12fb393e2888174a",
    "gpt_base.py": "38e321f8454965aaf040612e13f65adf874d9199",
    "init_utils.py": "025598777f2e971efeef1a085c739bc53cf8e0e8",
    "kv_cache.py": "bdd13ba61410c5199d6cf956db2f346dd363b604",
    "kv_shift.py": "2499a070d132c236099ce2bcf229e2cc7784835a",
    "kv_shift_torch.py": "bbc0e172363f3434cf716b65d980cb9ce4ee11bb",
    "pydantic_config.py": "0c0f64e2ea6b0ffd38ebee6e85631103d426c609",
    "rmsnorm.py": "0a3802df378373bc8131fb59578358abb294c711",
    "rotary.py": "82cb6e43a547873ba0c2d1117e6e481042fa3d76",
    "shortconv.py": "968825fc083b78627a1f8dea7fe1baa150f7aa52",
}

PACKAGE = "_ddl_reference_f64"  # patches 1-3: the golden numbers
PACKAGE_ASIS = "_ddl_reference_asis"  # patches 1-2 only: the `*_as_is` numbers

VARIANTS = {
    "additive": "gpt_base.py",
    "ddl": "DDL-vdim1-gpt-mha-rope.py",
    "ddl_cc": "DDL-gpt-mha-rope-CC-EC.py",
    "ddl_cc_repeat": "DDL-gpt-mha-rope-CC.py",
    "ddl_tc": "DDL-gpt-mha-rope-EC.py",
    "ddl_tc_repeat": "DDL-gpt-mha-rope.py",
}

VARIANTS_DDL_FILES = [f for v, f in VARIANTS.items() if v != "additive"]

BASE_KWARGS: dict[str, Any] = dict(
    vocab_size=64, num_hidden_layers=2, num_attention_heads=2, hidden_size=32, head_dim=16, block_size=32
)
EXPANDED_KWARGS: dict[str, Any] = dict(ddl_value_channels=4)

BATCH, SEQ = 2, 16
TOKEN_SEED, INIT_SEED, NOISE_SEED = 0, 0, 1234
NOISE_REL, NOISE_ZERO = 0.5, 0.05

_PYDANTIC_OLD = "    resolved = get_type_hints(config_cls, include_extras=True)\n"
_PYDANTIC_NEW = (
    "    # local patch (tools/reference_golden.py): resolve only the class's own annotations\n"
    "    import sys as _sys\n"
    "\n"
    "    _ns = dict(vars(_sys.modules[config_cls.__module__]))\n"
    "    resolved = {k: (eval(v, _ns) if isinstance(v, str) else v) for k, v in raw_annotations.items()}\n"
)
_ACC = "torch.promote_types({}, torch.float32)"
_PRECISION_PATCHES = [
    (
        "rmsnorm.py",
        "    orig_dtype = x.dtype\n",
        f"    orig_dtype = x.dtype\n    _acc = {_ACC.format('orig_dtype')}\n",
        2,
    ),
    ("rmsnorm.py", "x_resid.float()", "x_resid.to(_acc)", 2),
    ("rmsnorm.py", "weight.float()", "weight.to(_acc)", 2),
    ("rmsnorm.py", "bias.float()", "bias.to(_acc)", 2),
] + [
    (f, old, new, 1)
    for f in VARIANTS_DDL_FILES
    for old, new in (
        ("self.beta(context).float()", f"self.beta(context).to({_ACC.format('context.dtype')})"),
        (
            "self.beta_out(torch.tanh(self.beta_in(context))).float()",
            f"self.beta_out(torch.tanh(self.beta_in(context))).to({_ACC.format('context.dtype')})",
        ),
        ("dtype=torch.float32)  # fp32", f"dtype={_ACC.format('x.dtype')})  # fp32"),
    )
]
_SHORTCONV_OLD = "from causal_conv1d import causal_conv1d_fn\n"
_SHORTCONV_NEW = """

def causal_conv1d_fn(x, weight, bias=None, activation=None, **unused):
    # local patch (tools/reference_golden.py): pure-PyTorch causal_conv1d (causal_conv1d_ref semantics)
    if unused.get("initial_states") is not None or unused.get("return_final_states"):
        raise NotImplementedError("causal_conv1d CPU fallback: initial/final states not supported")
    dtype_in = x.dtype
    x = x.to(weight.dtype)
    seqlen = x.shape[-1]
    dim, width = weight.shape
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=dim)[..., :seqlen]
    if activation in ("silu", "swish"):
        out = F.silu(out)
    return out.to(dtype=dtype_in)

"""

NOTES_COMMON = """\
Backbone (all six): tied embedding/LM head (state_dict has both transformer.wte.weight and
lm_head.weight, same values; named_parameters/grads list transformer.wte.weight only).
Attention (transformer.h.{i}.attn): c_q, c_k, c_v (n_head*head_dim, d), c_proj (d, n_head*head_dim),
no biases; q,k,v viewed (B,T,H,hd); RoPE (rotate-half layout: first half/second half of head_dim,
cos/sin float32 tables, see rotary.py) applied to q and k FIRST, then q_rms/k_rms
(RMSNorm(head_dim, eps=1e-5), weights (hd,)), then SDPA causal with scale 1/sqrt(hd); no output
gate, no groupnorm, no activations (q/k/v_activation None), no k/v shift. MLP: SwiGLU
c_proj(silu(c_fc1 x) * c_fc2 x), hidden floor(8/3*d) (=85 here), no biases. RMSNorm: eps 1e-5,
y = x * rsqrt(mean(x^2) + eps) * weight (eps inside the root, gain init 1, no bias), computed in
fp32 (float64 here: patch 3). ln_f before lm_head,
logits scale 1 (config has no `mup`). No dropout anywhere. Init (init_gpt_weights): lm_head/wte
N(0, 0.02); every other >=2-D parameter N(0, 0.5/sqrt(d)) except attn.c_proj/mlp.c_proj which
keep their constructor draw N(0, 0.5/sqrt(d)/sqrt(L)); 1-D params keep their constructor init
(norm gains 1, Linear biases PyTorch default U(+-1/sqrt(fan_in)) except beta.bias).
"""

NOTES = {
    "additive": """\
additive: assembled here (not a file of the repository) as class AdditiveGPT(gpt_base.GPTBase) with
attention_cls = CausalSelfAttention from DDL-vdim1-gpt-mha-rope.py and config_class = that file's
GPTConfig (ddl_* fields unused). Blocks are gpt_base.GPTBlock: x = x + attn(ln_1(x));
x = x + mlp(ln_2(x)) with mlp = gpt_base.SwiGLUMLP (same names/shapes as the DDL files' MLP);
ln_1/ln_2/ln_f eps = rms_norm_eps (absent -> 1e-5). GPTBase calls init_gpt_weights with the default
exclusions, then ties weights.
""",
    "ddl": """\
ddl (d_v=1): per block, x_norm = ln_1(x); k_in = attn(x_norm); x = ddl_attn(x, k_in, context=x_norm);
x_norm = ln_2(x); k_in = mlp(x_norm); x = ddl_mlp(x, k_in, context=x_norm). ddl_*:
k = rms_norm(k_in, eps=k_eps^2/d) / sqrt(d) (k_eps=1e-5), beta = 2*sigmoid(beta(context)) (beta: Linear(d,1)
with bias; bias init logit(ddl_beta_init/2) = logit(0.5) = 0, weight N(0, 0.5/sqrt(d))),
v = 4*sigmoid(v_proj(x)) with x the RAW (un-normalised) residual stream (v_proj: Linear(d,1) with bias,
weight N(0, 0.5/sqrt(d)), bias PyTorch default U(+-1/sqrt(d))), proj = k.x, x <- x + beta*(v - proj)*k.
Final: ln_f(x) -> lm_head.
""",
    "expanded": """\
{variant} (d_v=4, {comp} compressor, {inp} input): state X (B,T,d,dv). Per block ONE compressor
`transformer.h.{{i}}.compress` is used twice (before attn and before mlp):
x_in = compress(X); x_norm = ln_1(x_in); k_in = attn(x_norm); X = ddl_attn(X, k_in, v_in=x_in, context=x_norm);
x_in = compress(X); x_norm = ln_2(x_in); k_in = mlp(x_norm); X = ddl_mlp(X, k_in, v_in=x_in, context=x_norm).
ddl_*: k = rms_norm(k_in, eps=1e-10/d)/sqrt(d); beta = 2*sigmoid(beta(x_norm)) (Linear(d,1), bias 0 at init,
weight N(0,0.5/sqrt(d))); v = 4*sigmoid(v_proj(x_in)) in R^dv, x_in the UN-normalised compressor output
(v_proj Linear(d,dv) with bias; weight N(0,0.5/sqrt(d)), bias U(+-1/sqrt(d))); proj = k^T X (dv,);
X <- X + k (beta*(v - proj))^T. Output: x_out = readout(X) (a separate compressor of the same kind),
ln_f, lm_head. {comp_detail} {inp_detail}
""",
}

COMP_DETAIL = {
    "cc": (
        "CC compressor (compress / readout): weight (d,K=4), read (dv,). "
        "x_in[i] = sum_k read[k] sum_j W'[i,k,j] X[i,j] with W'[i,k,j] = weight[i, 1-k+j] (zero outside 0..3): "
        "W'[i] rows k=0..3 = [w1 w2 w3 0], [w0 w1 w2 w3], [0 w0 w1 w2], [0 0 w0 w1]. "
        "Init: weight redrawn N(0, 0.5/sqrt(d)) by init_gpt_weights (constructor's U(+-1/2) overwritten), read = 1/dv."
    ),
    "tc": (
        "TC compressor (compress / readout): compress.shortconv.weight (d*dv, K=4), read (dv,). "
        "X flattened to channels c = i*dv + j; causal depthwise conv along tokens: "
        "y[t,c] = sum_s weight[c, K-1-s] * X[t-s, c] (s=0..3, zero before t=0): weight[c,3] multiplies the "
        "current token. x_in[i] = sum_j read[j] y[t, i*dv+j]. Init: weight N(0, 0.5/sqrt(d)) (init_gpt_weights), "
        "read = 1/dv."
    ),
}
INP_DETAIL = {
    "conv": (
        "EC input: input_embed.conv.weight (d*dv, 1, K=4), nn.Conv1d(d, d*dv, groups=d) on the embedding "
        "left-padded K-1: X[t, i, j] = sum_s weight[i*dv + j, 0, K-1-s] * e[t-s, i]; weight[...,3] multiplies "
        "the current token. Init identity: weight = 0 except weight[:, 0, 3] = 1."
    ),
    "repeat": "Repeat input: X[t, i, j] = wte(idx)[t, i] for every j (no parameters).",
}


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def check_checkout(model_dir: Path, allow_other: bool) -> dict[str, str]:
    blobs = {}
    bad = []
    for name, expected in REFERENCE_BLOBS.items():
        path = model_dir / name
        if not path.is_file():
            bad.append(f"{name}: missing")
            continue
        blobs[name] = git_blob_id(path.read_bytes())
        if blobs[name] != expected:
            bad.append(f"{name}: blob {blobs[name]} != {expected}")
    if bad:
        msg = f"checkout differs from {REFERENCE_COMMIT}:\n  " + "\n  ".join(bad)
        if not allow_other:
            raise SystemExit(msg + "\n(pass --allow-other-commit to go on anyway)")
        print("WARNING: " + msg, file=sys.stderr)
    return blobs


def patch_copy(model_dir: Path, dest: Path, *, precision: bool) -> None:
    """Copy ``model/`` to ``dest`` (a package) and apply patches 1 and 2 (and 3 if ``precision``)."""
    shutil.copytree(model_dir, dest, ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "__init__.py").write_text("")
    patches = [
        ("pydantic_config.py", _PYDANTIC_OLD, _PYDANTIC_NEW, 1),
        ("shortconv.py", _SHORTCONV_OLD, _SHORTCONV_NEW, 1),
    ]
    if precision:
        patches += _PRECISION_PATCHES
    for fname, old, new, count in patches:
        path = dest / fname
        text = path.read_text()
        if text.count(old) != count:
            raise SystemExit(
                f"patch for {fname} does not apply: {old.strip()!r} found {text.count(old)}x, not {count}x"
            )
        path.write_text(text.replace(old, new))


def import_reference(package: str) -> dict[str, Any]:
    mods = {v: importlib.import_module(f"{package}.{f[:-3]}") for v, f in VARIANTS.items() if v != "additive"}
    gpt_base = importlib.import_module(f"{package}.gpt_base")
    vdim1 = mods["ddl"]

    class AdditiveGPT(gpt_base.GPTBase):
        config_class = vdim1.GPTConfig
        attention_cls = vdim1.CausalSelfAttention
        # transformers>=5 wants {target: source} here (GPTBase has the v4 list form); the tie is the same
        _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    builders: dict[str, Any] = {"additive": (vdim1.GPTConfig, AdditiveGPT)}
    builders["_validate"] = importlib.import_module(f"{package}.pydantic_config").validate_pretrained_config_kwargs
    for v, m in mods.items():
        builders[v] = (m.GPTConfig, m.GPT)
    return builders


def config_kwargs(variant: str) -> dict[str, Any]:
    kw = dict(BASE_KWARGS)
    if variant.startswith(("ddl_cc", "ddl_tc")):
        kw.update(EXPANDED_KWARGS)
    return kw


def build(builders: dict[str, Any], variant: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    cfg_cls, model_cls = builders[variant]
    kw = config_kwargs(variant)
    full = builders["_validate"](cfg_cls, dict(kw))
    cfg = cfg_cls(**kw)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(INIT_SEED)
        model = model_cls(cfg)
    finally:
        torch.set_default_dtype(prev)
    model = model.to(torch.float64)
    model.eval()  # no dropout in these models; eval only for definiteness
    return model, full


def run_case(model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    model.zero_grad(set_to_none=True)
    logits, _ = model(tokens, output_all_seq=True)
    V = logits.size(-1)
    loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-1)
    loss.backward()
    with torch.no_grad():
        logits2, _ = model(tokens, output_all_seq=True)
    assert logits.dtype == torch.float64 and loss.dtype == torch.float64
    assert torch.equal(logits.detach(), logits2), "forward not deterministic"
    ref = -torch.log_softmax(logits.detach(), -1).gather(-1, targets[..., None]).mean()
    assert abs(ref.item() - loss.item()) < 1e-13, (ref.item(), loss.item())
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        assert g is not None and g.dtype == torch.float64, name
        assert torch.isfinite(g).all() and g.abs().max() > 0, f"zero/nonfinite grad {name}"
        grads[name] = g.detach().clone().contiguous()
    return {
        "state_dict": {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
        "tokens": tokens.clone(),
        "targets": targets.clone(),
        "logits": logits.detach().clone().contiguous(),
        "loss": loss.detach().clone(),
        "grads": grads,
    }


def perturb(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(NOISE_SEED)
    with torch.no_grad():
        for _, p in model.named_parameters():
            rms = p.pow(2).mean().sqrt().item()
            scale = NOISE_REL * rms if rms > 0 else NOISE_ZERO
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def notes_for(variant: str, model: torch.nn.Module) -> str:
    if variant in ("additive", "ddl"):
        text = NOTES[variant]
    else:
        comp = "cc" if variant.startswith("ddl_cc") else "tc"
        inp = "repeat" if variant.endswith("_repeat") else "conv"
        text = NOTES["expanded"].format(
            variant=variant,
            comp=comp.upper(),
            inp="EC conv" if inp == "conv" else "repeated",
            comp_detail=COMP_DETAIL[comp],
            inp_detail=INP_DETAIL[inp],
        )
    shapes = "\n".join(f"  {n} {tuple(p.shape)}" for n, p in model.named_parameters())
    return f"{text}\n{NOTES_COMMON}\nnamed_parameters:\n{shapes}\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reference", type=Path, help="checkout of yifanzhang-pro/deep-delta-learning at 2b55f25")
    ap.add_argument("--out", type=Path, default=Path("tests/golden/reference"))
    ap.add_argument("--allow-other-commit", action="store_true")
    args = ap.parse_args()

    model_dir = args.reference / "model"
    blobs = check_checkout(model_dir, args.allow_other_commit)
    import pydantic
    import transformers

    versions = {
        "torch": str(torch.__version__),
        "transformers": str(transformers.__version__),
        "pydantic": str(pydantic.VERSION),
    }
    args.out.mkdir(parents=True, exist_ok=True)

    gen = torch.Generator().manual_seed(TOKEN_SEED)
    seq = torch.randint(0, BASE_KWARGS["vocab_size"], (BATCH, SEQ + 1), generator=gen)
    tokens, targets = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()

    with tempfile.TemporaryDirectory() as tmp:
        patch_copy(model_dir, Path(tmp) / PACKAGE, precision=True)
        patch_copy(model_dir, Path(tmp) / PACKAGE_ASIS, precision=False)
        sys.path.insert(0, tmp)
        builders = import_reference(PACKAGE)
        builders_asis = import_reference(PACKAGE_ASIS)
        for variant, fname in VARIANTS.items():
            model, full_cfg = build(builders, variant)
            cases = {"init": run_case(model, tokens, targets)}
            perturb(model)
            cases["perturbed"] = run_case(model, tokens, targets)
            for name, case in cases.items():
                sd = case["state_dict"]
                assert torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"])
                # a fresh model loading the state_dict gives the same logits, bit for bit
                fresh, _ = build(builders, variant)
                fresh.load_state_dict(sd, strict=True)
                # the unpatched-precision reference at the same weights (same constructor draws at init)
                asis, _ = build(builders_asis, variant)
                if name == "init":
                    assert all(torch.equal(v, sd[k]) for k, v in asis.state_dict().items()), "init differs"
                asis.load_state_dict(sd, strict=True)
                with torch.no_grad():
                    lg, _ = fresh(tokens, output_all_seq=True)
                    lg_asis, _ = asis(tokens, output_all_seq=True)
                    _, loss32 = asis(tokens, targets=targets)
                assert torch.equal(lg, case["logits"]), f"{variant}/{name}: reload differs"
                V = lg_asis.size(-1)
                case["logits_as_is"] = lg_asis.clone().contiguous()
                case["loss_as_is"] = F.cross_entropy(lg_asis.reshape(-1, V), targets.reshape(-1), ignore_index=-1)
                case["loss_reference_fp32"] = loss32.clone()
                rel = ((lg_asis - lg).abs().max() / lg.abs().max()).item()
                assert 0 < rel < 1e-5, (variant, name, rel)
                assert abs(loss32.item() - case["loss"].item()) < 1e-5
                print(f"  {variant}/{name}: precision patch moves the logits by {rel:.2e} (max-norm relative)")
            record = {
                "variant": variant,
                "reference_file": f"model/{fname}",
                "reference_commit": REFERENCE_COMMIT,
                "reference_blob": blobs.get(fname),
                "config": {k: v for k, v in full_cfg.items()},
                "config_kwargs": config_kwargs(variant),
                "notes": notes_for(variant, model),
                "param_shapes": {n: tuple(p.shape) for n, p in model.named_parameters()},
                "versions": versions,
                "cases": cases,
            }
            path = args.out / f"{variant}.pt"
            torch.save(record, path)
            torch.load(path, weights_only=True)  # plain types only: loadable without trusting pickles
            c0, c1 = cases["init"], cases["perturbed"]
            print(
                f"{variant:14s} {path.stat().st_size / 1024:7.1f} KiB  loss init {c0['loss'].item():.6f} "
                f"perturbed {c1['loss'].item():.6f} (ln V = {math.log(BASE_KWARGS['vocab_size']):.4f})"
            )
        sys.path.remove(tmp)


if __name__ == "__main__":
    main()
