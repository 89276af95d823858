"""Convert checkpoints between the authors' DDL code and deepdelta (deepdelta.model.convert).

    python -m deepdelta.convert from-reference SRC --variant ddl_cc [--n-head 6] --out model.pt
    python -m deepdelta.convert to-reference SRC --out DIR

from-reference: SRC is a state_dict file of the authors' model (``torch.save``, or a
checkpoint holding one under ``state_dict``/``model``) or a Hugging Face ``save_pretrained``
folder (``pytorch_model.bin`` or ``model.safetensors``, and ``config.json``, which gives
``--n-head`` and ``--block-size``). Writes a deepdelta model file (config + weights) that
``load_model`` reads.

to-reference: SRC is a deepdelta run directory (its newest checkpoint), a Lightning ``.ckpt``
or a deepdelta model file. Writes ``pytorch_model.bin`` (the authors' state_dict) and
``config.json`` (the ``GPTConfig`` fields of the matching reference file) into DIR.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from deepdelta.model import DeltaTransformer, ModelConfig
from deepdelta.model.convert import VARIANTS, ConversionError, from_reference, to_reference

FORMAT = "deepdelta-model"
REFERENCE_FILES = {
    "additive": "gpt_base.py (GPTBase with the DDL files' attention)",
    "ddl": "DDL-vdim1-gpt-mha-rope.py",
    "ddl_cc": "DDL-gpt-mha-rope-CC-EC.py",
    "ddl_cc_repeat": "DDL-gpt-mha-rope-CC.py",
    "ddl_tc": "DDL-gpt-mha-rope-EC.py",
    "ddl_tc_repeat": "DDL-gpt-mha-rope.py",
}


def save_model(model: DeltaTransformer, path: Path) -> None:
    torch.save({"format": FORMAT, "config": model.config.to_dict(), "state_dict": model.state_dict()}, path)


def load_model(path: Path) -> DeltaTransformer:
    """A deepdelta model from a model file, a Lightning checkpoint or a run directory."""
    path = Path(path)
    if path.is_dir():
        from deepdelta.callbacks.checkpoint import find_last_checkpoint

        ckpt = find_last_checkpoint(path)
        if ckpt is None:
            raise ConversionError(f"{path}: no checkpoint under checkpoints/ (is it a run directory?)")
        path = ckpt
    blob = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(blob, dict) and blob.get("format") == FORMAT:
        config, state = blob["config"], blob["state_dict"]
    elif isinstance(blob, dict) and "hyper_parameters" in blob and "state_dict" in blob:
        config = blob["hyper_parameters"]["model"]
        state = {k.removeprefix("model."): v for k, v in blob["state_dict"].items() if k.startswith("model.")}
    else:
        raise ConversionError(f"{path}: neither a deepdelta model file nor a deepdelta Lightning checkpoint")
    model = DeltaTransformer(ModelConfig(**dict(config))).to(state["embed.weight"].dtype)  # as stored
    model.load_state_dict(state)
    return model.eval()


def _read_reference(src: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The authors' state_dict and, for a save_pretrained folder, its config.json."""
    config: dict[str, Any] = {}
    if src.is_dir():
        if (src / "config.json").is_file():
            config = json.loads((src / "config.json").read_text())
        if (src / "model.safetensors").is_file():
            from safetensors.torch import load_file

            return load_file(str(src / "model.safetensors")), config
        if not (src / "pytorch_model.bin").is_file():
            raise ConversionError(f"{src}: no pytorch_model.bin or model.safetensors in this folder")
        src = src / "pytorch_model.bin"
    blob = torch.load(src, map_location="cpu", weights_only=False)
    for key in ("state_dict", "model"):
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise ConversionError(f"{src}: not a state_dict (a dict of tensors)")
    return {k.removeprefix("_orig_mod."): v for k, v in blob.items()}, config


def reference_config(model: DeltaTransformer) -> dict[str, Any]:
    """The fields of the authors' ``GPTConfig`` that describe this model."""
    cfg = model.config
    out: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        hidden_size=cfg.d_model,
        head_dim=cfg.head_dim,
        block_size=cfg.block_size,
        ddl_k_eps=cfg.k_eps,
        ddl_beta_init=cfg.beta_init,
    )
    if cfg.dv > 1:
        out.update(
            ddl_value_channels=cfg.dv,
            ddl_state_shortconv_kernel_size=cfg.dv if cfg.compressor == "cc" else cfg.conv_kernel,
        )
        if cfg.expand == "conv":
            out["input_embed_shortconv_kernel_size"] = cfg.conv_kernel
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepdelta.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("from-reference", help="the authors' weights → a deepdelta model file")
    a.add_argument("src", type=Path)
    a.add_argument("--variant", required=True, help=" | ".join(VARIANTS))
    a.add_argument("--n-head", type=int, help="attention heads (default: config.json's num_attention_heads)")
    a.add_argument("--block-size", type=int, help="context length (default: config.json's block_size, else 1024)")
    a.add_argument("--out", type=Path, required=True)
    b = sub.add_parser("to-reference", help="a deepdelta run, checkpoint or model file → the authors' format")
    b.add_argument("src", type=Path)
    b.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if not args.src.exists():
            raise ConversionError(f"{args.src}: no such file or directory")
        if args.command == "from-reference":
            state, config = _read_reference(args.src)
            n_head = args.n_head or config.get("num_attention_heads")
            if not n_head:
                raise ConversionError("--n-head is needed (no config.json with num_attention_heads beside the weights)")
            block_size = args.block_size or config.get("block_size") or 1024
            model = from_reference(state, variant=args.variant, n_head=int(n_head), block_size=int(block_size))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            save_model(model, args.out)
            n = sum(p.numel() for p in model.parameters())
            print(f"wrote {args.out}: deepdelta variant {args.variant} (impl=reference), {n:,} parameters")
        else:
            model = load_model(args.src)
            state = to_reference(model)
            args.out.mkdir(parents=True, exist_ok=True)
            torch.save(state, args.out / "pytorch_model.bin")
            (args.out / "config.json").write_text(json.dumps(reference_config(model), indent=2) + "\n")
            print(f"wrote {args.out}/pytorch_model.bin and config.json ({len(state)} tensors)")
    except (ConversionError, OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
