"""Which layers (or heads) to make cheap: layer sensitivity, an attention cost model, and a planner under a budget.

    attnswap plan --variant window:w=256,sinks=4 --budget 0.5 --measure flops --context 1024 --out runs/plan
    attnswap distill --variant window:w=256,sinks=4 --layers 1,2,5,6 ...      # the plan's `layers`
    attnswap plan --swapped runs/duo/model --budget 0.5 --out runs/plan-heads  # a distilled duo: route its heads
    attnswap plan --objective recall --variant duo:w=256,sinks=4 --measure kv --budget 0.25 --context 8192 \
        --probe_length 2048 --model smollm2-135m --out runs/plan-recall      # keep the KV heads that retrieve

**Sensitivity** (``layer_sensitivity``): the variant, untrained, is swapped into ONE layer at a time, and that
model is compared with the original on validation blocks (WikiText-2 valid by default): KL(P_original ‖ P_swapped)
per token and top-1 agreement. A layer whose swap costs little KL untrained is the cheapest to give up.

**Cost model** (``head_costs``): attention's cost at context n as a fraction of full causal attention's, per head.
  measure=flops   exact counts of the (query, key) pairs a masked variant's mask allows at n, over the n(n+1)/2 of
                  the causal triangle (softmax attention spends 4·D FLOPs per pair: q·k and p·v). A linear variant
                  with m features spends 4·m·D per token (the state update and its read), so its fraction is
                  2m / (n + 1); its feature maps are not counted. NSA: per query, its top_k·block selected keys,
                  its window and one compressed summary per block, each capped by the causal prefix. Hybrid:
                  its window's pairs plus its linear scan over every token.
  measure=kv      the memory a generation keeps after n tokens over a full KV cache's. A mask: the keys the last
                  query can see, over n (window + sinks: (w + sinks) / n). Exact where a key out of sight stays
                  out of sight (windows, sinks, strides, full); an undercount for dilations and Longformer, whose
                  later queries see keys the last one does not. A linear variant: its state, m·(D + 1) floats,
                  over the cache's 2·D·n. Hybrid: its window's slots plus its linear state. NSA keeps every
                  key and its block summaries.
A layer's cost is the mean over its heads; a model's the mean over its layers (every layer has the same shape).

**Planner** (``choose_cheap_layers``): the set of cheap layers of least summed sensitivity whose cost is within
the budget: exact search over all 2^L subsets when L ≤ EXACT_LIMIT, else greedy by sensitivity per unit of cost
saved; ``plan.json`` also lists the best set of every size (``alternatives``: the plan of every other budget).
Summing single-layer KLs is an estimate (their effects interact); the distillation then measures the real
KL. **Heads** (``route_heads``): a distilled ``duo`` model keeps full attention in the heads whose gates are
highest, as many as the budget allows over the whole model, and is hardened so (one block mask per layer).
**Recall** (``--objective recall``, ``measure/recall_heads.py``): no training; on recall probes the teacher's own
attention says which KV heads fetch the token to predict from past the window, and those stay full, as many as the
budget allows; the rest become the duo's window. ``plan.json`` has the cost at 1k-8k by both measures; ``attnswap recall --swapped
OUT/model`` then measures what the routing kept.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from tqdm import tqdm

from attnswap.config import config_to_dict
from attnswap.data.recall_tasks import Vocabulary
from attnswap.data.tokens import WIKITEXT2_VALID, pack_blocks, refuse_test_source, token_stream
from attnswap.errors import AttnswapError
from attnswap.hf.attention import STATE_ATTR
from attnswap.hf.models import DEFAULT_MODEL, git_commit, load_model, load_tokenizer, max_positions, resolve_device
from attnswap.hf.saved import load, save
from attnswap.hf.swap import attention_modules, head_shape, swap, swapped_variant, unswap
from attnswap.measure.harden import write_csv
from attnswap.measure.recall import check_fits
from attnswap.measure.recall_heads import far_attention, kv_head_scores, probe_samples, route_kv_heads
from attnswap.plots import bar_plot
from attnswap.runs import atomic_write, holding_out_folder
from attnswap.train.losses import kl_divergence
from attnswap.variants import Variant, get_variant
from attnswap.variants.duo import DuoState
from attnswap.variants.duo import route_heads as route_duo_heads

log = logging.getLogger(__name__)

MEASURES = ("flops", "kv")
OBJECTIVES = ("kl", "recall")
EXACT_LIMIT = 12  # layers up to which every subset is tried (4096 subsets)


@dataclass
class PlanConfig:
    model: str = ""  # hub name or local directory; empty = the bundled teacher
    variant: str = "window:w=256,sinks=4"  # the cheap variant a layer may be swapped to
    budget: float = 0.5  # largest cost allowed, as a fraction of full attention's (see measure)
    measure: str = "flops"  # flops (attention FLOPs) or kv (memory kept for generation)
    context: int = 1024  # n, the context length the cost is counted at and the validation blocks' length
    data: str = WIKITEXT2_VALID  # validation text of the sensitivity sweep (never a test set)
    blocks: int = 8  # validation blocks of `context` tokens (objective recall: probe sequences of `context`)
    batch_size: int = 1
    swapped: str = ""  # a distilled duo model (attnswap distill's OUT/model): plan its heads instead of layers
    # kl: layers by the KL one swapped layer costs; recall: a duo variant's KV heads by what they retrieve
    objective: str = "kl"
    probe_length: int = 0  # objective recall: tokens of each probe sequence; 0 = context
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0  # seeds each untrained swap's state (random features, feature maps)
    out: str = "runs/plan"

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise AttnswapError(f"unknown objective {self.objective!r}; choose from: {', '.join(OBJECTIVES)}")
        if self.objective == "recall" and self.swapped:
            raise AttnswapError("--objective recall routes the teacher's heads itself; drop --swapped (or plan the "
                                "distilled duo's gates without --objective recall)")
        if self.measure not in MEASURES:
            raise AttnswapError(f"unknown measure {self.measure!r}; choose from: {', '.join(MEASURES)}")
        if not 0 < self.budget <= 1:
            raise AttnswapError(f"budget must be in (0, 1] (a fraction of full attention's cost), got {self.budget}")
        for key in ("context", "blocks", "batch_size"):
            if getattr(self, key) < 1:
                raise AttnswapError(f"{key} must be >= 1, got {key}={getattr(self, key)}")
        if self.probe_length < 0:
            raise AttnswapError(f"probe_length must be >= 0 (0 = context), got probe_length={self.probe_length}")


# --- cost model ----------------------------------------------------------------------------------
def head_costs(variant: "str | Variant", n: int, measure: str = "flops", state: nn.Module | None = None,
               heads: int = 1, head_dim: int = 64, layer: int = 0) -> torch.Tensor:
    """(H,) float64: each head's attention cost at context ``n`` as a fraction of full causal attention's.

    ``state``: the variant's learned state (a mixture's kept candidates, a duo's routing); None = a fresh one.
    ``layer``: which layer, for a variant whose pattern depends on it (a hybrid's wide layers).
    Counted on the CPU, with a copy of the state.
    """
    variant = get_variant(variant)
    if measure not in MEASURES:
        raise AttnswapError(f"unknown measure {measure!r}; choose from: {', '.join(MEASURES)}")
    state = variant.make_state(heads, head_dim) if state is None else copy.deepcopy(state).cpu()
    return variant.cost(n, measure, state, heads, head_dim, layer)


def model_cost(model: nn.Module, n: int, measure: str = "flops") -> float:
    """A (swapped) model's attention cost at context ``n`` as a fraction of full attention's: the mean over its
    layers of each layer's mean head cost, with its learned state; a layer left unswapped costs 1."""
    head_dim, heads = head_shape(model)
    costs = [1.0 if getattr(m, "attnswap_variant", None) is None else
             float(head_costs(m.attnswap_variant, n, measure, getattr(m, STATE_ATTR, None), heads, head_dim,
                              layer).mean())
             for layer, m in enumerate(attention_modules(model))]
    return sum(costs) / len(costs)


def assignment_cost(cheap_layers: Sequence[int], cheap_costs: Sequence[float]) -> float:
    """The model's cost, as a fraction of full attention: full layers cost 1, a cheap layer its cheap cost."""
    return sum(cheap_costs[i] if i in cheap_layers else 1.0 for i in range(len(cheap_costs))) / len(cheap_costs)


# --- the planner ---------------------------------------------------------------------------------
def choose_cheap_layers(sensitivity: Sequence[float], cheap_costs: Sequence[float], budget: float,
                        exact_limit: int = EXACT_LIMIT) -> list[int]:
    """The layers to make cheap: least summed sensitivity with ``assignment_cost`` ≤ ``budget``.

    Exact over every subset when there are at most ``exact_limit`` layers (of equal sensitivity, the one that
    changes fewer layers); otherwise greedy, taking layers in order of sensitivity per unit of cost saved until
    the budget is met.
    """
    layers = range(len(sensitivity))
    lowest = assignment_cost(layers, cheap_costs)
    if lowest > budget + 1e-12:
        raise AttnswapError(f"budget {budget} is below the cheapest assignment (every layer cheap costs "
                            f"{lowest:.4f}); raise the budget or choose a cheaper variant")
    if len(sensitivity) <= exact_limit:
        feasible = (subset for size in range(len(sensitivity) + 1) for subset in itertools.combinations(layers, size)
                    if assignment_cost(subset, cheap_costs) <= budget + 1e-12)
        best = min(feasible, key=lambda s: (sum(sensitivity[i] for i in s), len(s)))  # ties: fewer changes
        return sorted(best)
    saved = [max(1.0 - c, 1e-12) for c in cheap_costs]
    order = sorted(layers, key=lambda i: sensitivity[i] / saved[i])
    chosen: list[int] = []
    for i in order:
        if assignment_cost(chosen, cheap_costs) <= budget + 1e-12:
            break
        chosen.append(i)
    return sorted(chosen)


def best_plans(sensitivity: Sequence[float], cheap_costs: "float | Sequence[float]") -> list[dict[str, Any]]:
    """The best set of cheap layers at each of L+1 budgets, each with its cost and summed sensitivity. ``cheap_costs``:
    each layer's cost when cheap, or one cost for every layer. Budget k is what making the k cheapest layers cheap
    costs; when every layer costs the same, that is the best plan of every size 0..L."""
    costs = [cheap_costs] * len(sensitivity) if isinstance(cheap_costs, (int, float)) else list(cheap_costs)
    cheapest_first = sorted(range(len(costs)), key=lambda i: costs[i])
    plans = [choose_cheap_layers(sensitivity, costs, assignment_cost(cheapest_first[:k], costs))
             for k in range(len(sensitivity) + 1)]
    return [{"layers": p, "predicted_cost": assignment_cost(p, costs), "predicted_kl": sum(sensitivity[i] for i in p)}
            for p in plans]


@torch.no_grad()
def layer_sensitivity(model: nn.Module, variant: "str | Variant", blocks: torch.Tensor, batch_size: int = 1,
                      seed: int = 0, progress: bool = True) -> list[dict[str, float]]:
    """Per layer: KL(P_original ‖ P_swapped) per token and top-1 agreement with ONE layer swapped to ``variant``
    (untrained), on ``blocks`` (N, T) of token ids. ``model`` must be unswapped; it is left unswapped."""
    variant = get_variant(variant)
    if getattr(model, "attnswap_record", None) is not None:
        raise AttnswapError("layer_sensitivity needs the original model; unswap it first")
    n_layers = len(attention_modules(model))
    device = next(model.parameters()).device
    totals = torch.zeros(n_layers, 2, dtype=torch.float64)  # KL sum, agreements
    tokens = 0
    batches = blocks.split(batch_size)
    with tqdm(total=len(batches) * n_layers, desc="sensitivity", disable=not progress, dynamic_ncols=True) as bar:
        for ids in batches:
            ids = ids.to(device)
            teacher = model(input_ids=ids).logits.float()
            for layer in range(n_layers):
                torch.manual_seed(seed)  # an untrained state is the same whichever batch it sees
                swap(model, variant, layers=[layer])
                student = model(input_ids=ids).logits.float()
                unswap(model)
                kl = kl_divergence(student, teacher) * ids.numel()
                agree = (student.argmax(-1) == teacher.argmax(-1)).sum()
                totals[layer] += torch.stack([kl.double().cpu(), agree.double().cpu()])
                bar.update()
            tokens += ids.numel()
    return [{"layer": layer, "kl": float(kl) / tokens, "top1": float(agree) / tokens}
            for layer, (kl, agree) in enumerate(totals.tolist())]


# --- heads of a distilled duo --------------------------------------------------------------------
def duo_states(model: nn.Module) -> list[DuoState]:
    """The routing states of a swapped model whose variant routes heads, in layer order."""
    variant = swapped_variant(model)
    states = [getattr(m, STATE_ATTR) for m in attention_modules(model)
              if variant is not None and variant.routes_heads and getattr(m, "attnswap_variant", None) is variant]
    if not states:
        raise AttnswapError("no duo state found; plan heads on a model distilled with --variant duo")
    return states


def route_heads(model: nn.Module, budget: float, cheap_cost: float) -> list[list[bool]]:
    """Harden every duo layer of ``model`` in place (``variants.duo.route_heads`` over its states; the heads of
    layers without duo count as full). Returns the routing, per layer and head (True = full)."""
    states = duo_states(model)
    fixed = (len(attention_modules(model)) - len(states)) * states[0].gate.numel()  # heads that stay full anyway
    return route_duo_heads(states, budget, cheap_cost, fixed)


# --- the `attnswap plan` command -----------------------------------------------------------------
@holding_out_folder  # a second plan writing into the same folder is refused, not interleaved
def plan(config: PlanConfig) -> dict[str, Any]:
    """Write ``plan.json`` (+ CSV and a bar plot) for ``config``: a layer plan, or a head plan of a duo model."""
    device = resolve_device(config.device)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    commit = git_commit()  # now: the code that runs, even if the tree changes during a long sweep
    if config.objective == "recall":
        result = _plan_recall_heads(config, device, out)
    else:
        result = _plan_heads(config, device, out) if config.swapped else _plan_layers(config, device, out)
    result = {"kind": "plan", "config": config_to_dict(config), "git_commit": commit,
              "command": command_line(config), **result}
    atomic_write(out / "plan.json", json.dumps(result, indent=1) + "\n")
    log.info("wrote %s", out / "plan.json")
    return result


def _plan_layers(config: PlanConfig, device: torch.device, out: Path) -> dict[str, Any]:
    variant = get_variant(config.variant)  # a bad spec fails before any loading
    if variant.routes_heads:
        raise AttnswapError("duo routes heads, not layers: distil it (attnswap distill --variant duo --l1 ...), then "
                            "plan its heads with attnswap plan --swapped OUT/model")
    refuse_test_source(config.data, "validation")  # layers chosen on the test text would flatter every result
    name = config.model or DEFAULT_MODEL
    model = load_model(name, device=str(device), dtype=config.dtype)
    head_dim, heads = head_shape(model)
    n_layers = len(attention_modules(model))
    # Per layer: a variant may vary by layer (a hybrid's wide layers).
    cheap_costs = [float(head_costs(variant, config.context, config.measure, heads=heads, head_dim=head_dim,
                                    layer=layer).mean()) for layer in range(n_layers)]
    cheap = sum(cheap_costs) / n_layers
    blocks = pack_blocks(token_stream(config.data, load_tokenizer(name), split="validation"), config.context)
    sensitivity = layer_sensitivity(model, variant, blocks[: config.blocks], config.batch_size, config.seed)
    kl = [s["kl"] for s in sensitivity]
    chosen = choose_cheap_layers(kl, cheap_costs, config.budget)
    rows = [{**s, "cheap_cost": cheap_costs[s["layer"]], "cheap": s["layer"] in chosen} for s in sensitivity]
    write_csv(out / "sensitivity.csv", rows)
    bar_plot([f"L{s['layer']}" + (" ·cheap" if s["layer"] in chosen else "") for s in sensitivity],
             [s["kl"] for s in sensitivity], out / "sensitivity.png", "KL(original ‖ one layer swapped)",
             f"{variant.label}, untrained, one layer at a time ({len(blocks[: config.blocks])} blocks of "
             f"{config.context})")
    predicted = assignment_cost(chosen, cheap_costs)
    print(f"cheap layers {chosen} (full: {[i for i in range(n_layers) if i not in chosen]}), cost "
          f"{predicted:.4f} of full attention ({config.measure}, n={config.context}); distil them with:\n"
          f"  attnswap distill --variant '{variant.spec}' --layers {','.join(map(str, chosen)) or '(none)'}")
    return {"model": name, "variant": variant.spec, "search": "exact" if n_layers <= EXACT_LIMIT else "greedy",
            "layers": chosen, "full_layers": [i for i in range(n_layers) if i not in chosen],
            "cheap_cost": cheap, "predicted_cost": predicted,
            "predicted_kl": sum(kl[i] for i in chosen), "sensitivity": rows,
            "alternatives": best_plans(kl, cheap_costs),
            "tokens": int(blocks[: config.blocks].numel()), "files": ["sensitivity.csv", "sensitivity.png"]}


def _plan_heads(config: PlanConfig, device: torch.device, out: Path) -> dict[str, Any]:
    model = load(config.swapped, device=str(device), dtype=config.dtype)
    variant = swapped_variant(model)
    if variant is None or not variant.routes_heads:
        raise AttnswapError(f"{config.swapped} holds {variant.spec if variant else 'no swapped attention'}, not a "
                            "duo; plan heads on a model distilled with --variant duo")
    head_dim, heads = head_shape(model)
    cheap = float(head_costs(variant.cheap, config.context, config.measure, heads=1, head_dim=head_dim)[0])
    shares = [s.share().detach().cpu().tolist() for s in duo_states(model)]
    routing = route_heads(model, config.budget, cheap)
    layers = [m.layer_idx for m in attention_modules(model) if getattr(m, "attnswap_variant", None) is variant]
    rows = [{"layer": layer, "head": h, "gate": share, "full": full}
            for layer, layer_shares, layer_routes in zip(layers, shares, routing)
            for h, (share, full) in enumerate(zip(layer_shares, layer_routes))]
    write_csv(out / "heads.csv", rows)
    bar_plot([f"L{r['layer']}·h{r['head']}" + ("*" if r["full"] else "") for r in rows], [r["gate"] for r in rows],
             out / "gates.png", "gate (share of full attention)", "duo gates; * = kept full")
    full_heads = sum(r["full"] for r in rows)
    predicted = model_cost(model, config.context, config.measure)
    save(model, out / "model")
    print(f"{full_heads} of {len(rows)} heads keep full attention, cost {predicted:.4f} of full attention "
          f"({config.measure}, n={config.context}); hardened model: {out / 'model'}")
    return {"model": config.swapped, "variant": variant.spec, "heads": rows, "full_heads": routing,
            "cheap_cost": cheap, "predicted_cost": predicted, "hardened_model": str(out / "model"),
            "files": ["heads.csv", "gates.png", "model"]}


def _plan_recall_heads(config: PlanConfig, device: torch.device, out: Path) -> dict[str, Any]:
    variant = get_variant(config.variant)
    if not variant.routes_heads:
        raise AttnswapError(f"--objective recall routes heads between full attention and a window; give a duo "
                            f"variant, e.g. --variant duo:w=256,sinks=4 (got {variant.spec!r})")
    cheap = float(head_costs(variant.cheap, config.context, config.measure)[0])  # a mask's cost: any head shape
    route_kv_heads(torch.zeros(1), config.budget, cheap)  # a budget no routing meets fails before any work
    name = config.model or DEFAULT_MODEL
    probe_length = config.probe_length or config.context
    probes = probe_samples(Vocabulary.from_tokenizer(load_tokenizer(name)), probe_length, variant.cheap.params.w,
                           config.blocks, config.seed)
    model = load_model(name, device=str(device), dtype=config.dtype)
    check_fits(model, probe_length)
    heads = head_shape(model)[1]
    kv_heads = getattr(model.config, "num_key_value_heads", None) or heads
    shares = far_attention(model, probes, variant.cheap)
    scores, lost = kv_head_scores(shares["retrieval"], kv_heads), kv_head_scores(shares["lost"], kv_heads)
    full_kv = route_kv_heads(scores, config.budget, cheap)
    swap(model, variant)
    for module, flags in zip(attention_modules(model), full_kv):
        getattr(module, STATE_ATTR).harden(flags.repeat_interleave(heads // kv_heads).to(device))
    group = heads // kv_heads
    by_task = {key: kv_head_scores(value, kv_heads) for key, value in shares.items() if key.startswith("retrieval_")}
    rows = [{"layer": layer, "kv_head": g, "retrieval": float(scores[layer, g]), "lost": float(lost[layer, g]),
             **{key: float(value[layer, g]) for key, value in by_task.items()},
             "query_heads_retrieval": [round(float(x), 6) for x in shares["retrieval"][layer, g * group:(g + 1) * group]],
             "full": bool(full_kv[layer, g])}
            for layer in range(scores.shape[0]) for g in range(kv_heads)]
    write_csv(out / "heads.csv", rows)
    bar_plot([f"L{r['layer']}·kv{r['kv_head']}" + ("*" if r["full"] else "") for r in rows],
             [r["retrieval"] for r in rows], out / "heads.png",
             f"attention past a {variant.cheap.label} on the token to predict",
             f"recall probes of {probe_length} tokens; * = kept full")
    limit = min(max_positions(model) or 8192, 8192)
    lengths = sorted({config.context, limit, *(n for n in (1024, 2048, 4096) if n <= limit)})
    costs = {measure: {str(n): model_cost(model, n, measure) for n in lengths} for measure in MEASURES}
    predicted = costs[config.measure][str(config.context)]
    save(model, out / "model")
    print(f"{int(full_kv.sum())} of {full_kv.numel()} KV heads keep full attention, cost {predicted:.4f} of full "
          f"attention ({config.measure}, n={config.context}); hardened model: {out / 'model'}\n"
          f"  attnswap recall --model {name!r} --swapped {out / 'model'}")
    return {"model": name, "variant": variant.spec, "objective": "recall", "heads": rows,
            "full_kv_heads": full_kv.tolist(), "cheap_cost": cheap, "predicted_cost": predicted,
            "costs": costs, "probes": {"count": len(probes), "length": probe_length,
                                       "tokens": int(sum(p.ids.numel() for p in probes))},
            "hardened_model": str(out / "model"), "files": ["heads.csv", "heads.png", "model"]}


def command_line(config: PlanConfig) -> str:
    """The ``attnswap plan`` command that makes ``config``: its fields that differ from the defaults."""
    default = config_to_dict(PlanConfig())
    changed = [f"--{key} {json.dumps(value) if not isinstance(value, str) else repr(value)}"
               for key, value in config_to_dict(config).items() if value != default[key]]
    return " ".join(["attnswap plan", *changed])

