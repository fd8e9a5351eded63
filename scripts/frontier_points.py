"""Frontier points (quality against attention cost) from `attnswap run` folders: one point per distilled variant.

    python scripts/frontier_points.py benchmarks/results/recipe_h200/*/recipe_* --out benchmarks/results/recipe_h200/frontier.json

Quality comes from each row's eval.json (WikiText-2 test, swapped against the original model), tokens and GPU
seconds from its distill results.json, and the attention cost at the eval's context from attnswap.measure.plan.model_cost
on the saved swap's variant and layers (fresh state: the costs of every variant here do not depend on training).
The original model is added as the point (cost 1, ratio 1). Runs whose model weights are not kept still work: the
cost needs only the variant, its layers and the original model's config.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import AutoConfig

from attnswap.measure.plan import assignment_cost, head_costs


def layer_costs(model: str, variant: str, layers: list[int] | None, n: int) -> float:
    """Mean over the model's layers: swapped layers at the variant's cost, the others at full attention's."""
    config = AutoConfig.from_pretrained(model)
    heads, n_layers = config.num_attention_heads, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    cheap = [float(head_costs(variant, n, "flops", None, heads, head_dim, layer).mean())
             for layer in range(n_layers)]
    return assignment_cost(range(n_layers) if layers is None else layers, cheap)


def points_of(run: Path) -> list[dict]:
    summary = json.loads((run / "summary.json").read_text())
    points = []
    for row in summary["rows"]:
        folder = run / row["label"]
        evaluated = json.loads((folder / "eval" / "eval.json").read_text())
        trained = json.loads((folder / "distill" / "results.json").read_text())
        stream, context = evaluated["stream"], evaluated["info"]["config"]["context"]
        layers = trained["config"]["layers"]
        points.append({
            "label": f"{row['label']}{'' if layers is None else ' layers ' + ','.join(map(str, layers))} [{run.name}]",
            "group": "routing by layer" if layers is not None else row["variant"].split(":")[0],
            "teacher": summary["model"], "ppl": stream["perplexity"]["swapped"],
            "teacher_ppl": stream["perplexity"]["original"], "kl": stream["kl"]["mean"],
            "top1": stream["top1_agreement"], "attn_cost": layer_costs(summary["model"], row["variant"], layers, context),
            "tokens": trained["tokens_seen"], "gpu_seconds": trained.get("train_seconds"),
            "command": f"python -m attnswap.cli run configs/experiments/{summary['name']}.yaml --device cuda "
                       f"(results: {run})",
        })
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    points = [p for run in args.runs for p in points_of(run)]
    teacher = points[0]
    points.insert(0, {"label": "original (full attention)", "group": "original", "teacher": teacher["teacher"],
                      "ppl": teacher["teacher_ppl"], "teacher_ppl": teacher["teacher_ppl"], "kl": 0.0, "top1": 1.0,
                      "attn_cost": 1.0, "tokens": 0, "gpu_seconds": 0.0, "command": "attnswap eval (the original)"})
    args.out.write_text(json.dumps({"command": "python scripts/frontier_points.py " + " ".join(map(str, args.runs))
                                    + f" --out {args.out}", "points": points}, indent=1))
    for p in points:
        print(f"{p['label']:<60} cost {p['attn_cost']:.3f}  ppl {p['ppl']:.2f} ({p['ppl'] / p['teacher_ppl']:.3f}x)"
              f"  KL {p['kl']:.4f}  top-1 {p['top1']:.3f}")


if __name__ == "__main__":
    main()
