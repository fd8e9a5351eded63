"""Do later tokens change earlier predictions? A swapped model's logits for the first PREFIX tokens, alone and with
the rest of a TOTAL-token WikiText-2 test text after them (untrained swaps of the bundled teacher, CPU, fp32).

    python scripts/causality_check.py OUT.json [SPEC ...]

A causal model gives identical logits; the JSON records, per spec, the largest logit difference, the mean KL between
the two next-token distributions and the fraction of top-1 predictions that moved.
"""

import json
import sys
from pathlib import Path

import torch

import attnswap
from attnswap.models import DEFAULT_MODEL, REPO_ROOT, git_commit, load_model, load_tokenizer

PREFIX, TOTAL = 256, 1024


def main(out: str, specs: list[str]) -> None:
    tokenizer, model = load_tokenizer(DEFAULT_MODEL), load_model(DEFAULT_MODEL).eval()
    text = (REPO_ROOT / "data" / "wikitext-2" / "wiki.test.tokens").read_text()[:20000]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :TOTAL]
    rows = []
    for spec in specs:
        attnswap.swap(model, spec)
        with torch.no_grad():
            with_future = model(ids).logits[0, :PREFIX].float().log_softmax(-1)
            alone = model(ids[:, :PREFIX]).logits[0].float().log_softmax(-1)
        attnswap.unswap(model)
        rows.append({"variant": spec, "max_logprob_diff": (with_future - alone).abs().max().item(),
                     "mean_kl": (alone.exp() * (alone - with_future)).sum(-1).mean().item(),
                     "top1_moved": (with_future.argmax(-1) != alone.argmax(-1)).float().mean().item()})
        print(json.dumps(rows[-1]), flush=True)
    Path(out).write_text(json.dumps({"model": DEFAULT_MODEL, "prefix": PREFIX, "total": TOTAL, "device": "cpu",
                                     "torch": torch.__version__, "git_commit": git_commit(),
                                     "command": " ".join(sys.argv), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or ["performer:m=256", "hedgehog", "window:w=64,sinks=4", "mixture"])
