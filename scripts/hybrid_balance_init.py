"""Which initial balance keeps an untrained hybrid at least as good as the plain window of the same w? Perplexity, KL
and top-1 agreement on WikiText-2 validation of untrained swaps of the bundled teacher (CPU, fp32), for the window
and for the hybrid with every layer's balance beta set to each value given.

    python scripts/hybrid_balance_init.py OUT.json W SINKS CONTEXT TOKENS BETA [BETA ...]

The JSON records the command, the commit and one row per setting (attnswap.evaluate.compare_stream's figures).
"""

import json
import sys
import time
from pathlib import Path

import torch

import attnswap
from attnswap.evaluate import compare_stream, token_ids
from attnswap.models import DEFAULT_MODEL, REPO_ROOT, git_commit, load_model, load_tokenizer
from attnswap.surgery import attention_modules


def main(out: str, w: int, sinks: int, context: int, tokens: int, betas: list[float]) -> None:
    tokenizer, model = load_tokenizer(DEFAULT_MODEL), load_model(DEFAULT_MODEL).eval()
    ids = token_ids(tokenizer, (REPO_ROOT / "data" / "wikitext-2" / "wiki.valid.tokens").read_text(), tokens)
    settings = [(f"window:w={w},sinks={sinks}", None)]
    settings += [(f"hybrid:w={w},sinks={sinks}", beta) for beta in betas]
    rows = []
    for spec, beta in settings:
        attnswap.swap(model, spec)
        if beta is not None:
            with torch.no_grad():
                for module in attention_modules(model):
                    module.attnswap.balance.fill_(beta)
        started = time.perf_counter()
        stream = compare_stream(model, ids, context, context, progress=False)
        attnswap.unswap(model)
        rows.append({"variant": spec, "balance": beta, "perplexity": stream["perplexity"], "kl": stream["kl"]["mean"],
                     "top1_agreement": stream["top1_agreement"], "tokens_scored": stream["tokens_scored"],
                     "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(rows[-1]), flush=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"model": DEFAULT_MODEL, "data": "data/wikitext-2/wiki.valid.tokens",
                                     "context": context, "stride": context, "device": "cpu", "dtype": "float32",
                                     "torch": torch.__version__, "git_commit": git_commit(),
                                     "command": " ".join(["python", *sys.argv]), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    if len(sys.argv) < 7:
        sys.exit(__doc__)
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
         [float(b) for b in sys.argv[6:]])
