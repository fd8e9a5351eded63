"""Carry a distilled swap off a machine in a small file: only the tensors distillation changed, then rebuild it.

The device machine returns files of at most 16 MiB, and a saved 19 M-parameter model is 78 MB. What distillation
trains (the variant's state, the swapped layers' attention projections) is a few MB:

    python scripts/trained_delta.py export runs/x/distill/model delta.safetensors   # on the GPU machine
    python scripts/trained_delta.py import delta.safetensors --out runs/x-model     # here: teacher + delta, saved

``import`` loads the original model named in the file, swaps the same variant into the same layers, loads the
tensors and writes an ``attnswap.save`` folder (loadable by transformers, pipeline and lm-eval).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import attnswap
from attnswap.models import DEFAULT_MODEL, load_tokenizer


def export(model_dir: Path, out: Path, original: str) -> None:
    from safetensors.torch import save_file

    swapped = attnswap.load(model_dir)
    base = attnswap.load_model(original)
    base_state = base.state_dict()
    changed = {k: v.contiguous() for k, v in swapped.state_dict().items()
               if k not in base_state or not torch.equal(v, base_state[k].to(v.dtype))}
    info = swapped.config.attnswap
    save_file(changed, str(out), metadata={"original": original, "variant": info["variant"],
                                           "layers": json.dumps(info["layers"])})
    print(f"{len(changed)} tensors ({sum(v.numel() for v in changed.values()) / 1e6:.2f} M values) -> {out}")


def rebuild(delta: Path, out: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(delta), "pt") as handle:
        meta = handle.metadata()
    model = attnswap.load_model(meta["original"])
    attnswap.swap(model, meta["variant"], layers=json.loads(meta["layers"]))
    missing_from_model = set(load_file(str(delta))) - set(model.state_dict())
    assert not missing_from_model, f"{delta} holds tensors this model lacks: {sorted(missing_from_model)[:3]}"
    model.load_state_dict(load_file(str(delta)), strict=False)
    attnswap.save(model, out, tokenizer=load_tokenizer(meta["original"]))
    print(f"{meta['variant']} in layers {meta['layers']} of {meta['original']} -> {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exporting = sub.add_parser("export", help="a saved swap -> the tensors that differ from its original")
    exporting.add_argument("model_dir", type=Path)
    exporting.add_argument("out", type=Path)
    exporting.add_argument("--original", default=DEFAULT_MODEL)
    importing = sub.add_parser("import", help="original + those tensors -> an attnswap.save folder")
    importing.add_argument("delta", type=Path)
    importing.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "export":
        export(args.model_dir, args.out, args.original)
    else:
        rebuild(args.delta, args.out)


if __name__ == "__main__":
    main()
