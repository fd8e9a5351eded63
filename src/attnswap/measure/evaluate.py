"""Evaluate a swapped model against its own original attention: perplexity, KL, agreement, attention and
gradient fidelity, edge cases, and the research's pass/fail criteria.

Original and swapped share one set of weights: the original is the same model run inside
``original_attention``. Perplexity is the standard strided sliding-window method of the Hugging Face
perplexity guide: windows of ``context`` tokens every ``stride`` tokens, each scoring only the tokens
not scored before (the first window scores all but its first token), so every token is scored once
with at least ``context - stride`` tokens of context.

usage: attnswap eval --variant window:w=64,sinks=4 --max_tokens 20000
       attnswap eval --swapped runs/distill/final --out runs/eval
"""

from __future__ import annotations

import csv
import gzip
import inspect
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from attnswap.config import config_to_dict
from attnswap.errors import AttnswapError
from attnswap.hf.models import REPO_ROOT, check_length, max_positions
from attnswap.hf.swap import attention_modules, observe_attention, original_attention, swapped_variant
from attnswap.measure.generate import (generate_all, generation_cases, load_swapped, markdown_table, read_prompts,
                                       run_info, side_by_side_rows)
from attnswap.runs import atomic_write, holding_out_folder
from attnswap.validate import check_text_file
from attnswap.variants.base import check
from attnswap.variants.full import Full

DEFAULT_DATA = REPO_ROOT / "data" / "wikitext-2" / "wiki.test.tokens"
# Hub texts readable by name when online (config name of the `wikitext` dataset); the test split is scored.
HUB_TEXTS = ("wikitext-2-raw-v1", "wikitext-2-v1", "wikitext-103-raw-v1", "wikitext-103-v1")
FULL = Full()


@dataclass
class EvalConfig:
    model: str = ""  # hub name or local directory; empty = the bundled teacher
    variant: str = "full"  # variant spec swapped into `model`
    layers: list[int] | None = None  # the layers `variant` goes into (as distill's layers); default: every layer
    swapped: str = ""  # instead of model + variant: a directory written by attnswap.save
    data: str = str(DEFAULT_DATA)  # .tokens/.txt/.raw file (optionally .gz) or a hub name such as wikitext-2-raw-v1
    context: int = 0  # window length in tokens; 0 = the model's maximum
    stride: int = 512
    max_tokens: int = 0  # score only the first max_tokens tokens of the text; 0 = all
    batch_size: int = 1  # windows per forward pass
    device: str = "auto"
    dtype: str = "float32"
    attn_sample_len: int = 256  # tokens of the attention-MSE sample; 0 = skip
    grad_len: int = 256  # tokens of the gradient-cosine sample; 0 = skip
    edge_cases: bool = True
    out: str = "runs/eval"
    prompts: str = ""  # prompts for a few greedy generations side by side; empty = data/prompts.txt
    gen_tokens: int = 30  # new tokens per generation; 0 = no generations
    seed: int = 0  # seeds random variant state (e.g. random features) before the swap
    memory_saving: float | None = None  # peak-memory saving from `attnswap bench` (0.3 = 30 %); None = "see bench"

    def __post_init__(self):
        check(self.batch_size >= 1, f"batch_size must be >= 1, got batch_size={self.batch_size}")
        check(self.stride >= 1, f"stride must be >= 1, got stride={self.stride}")
        for key in ("context", "max_tokens", "attn_sample_len", "grad_len", "gen_tokens"):
            check(getattr(self, key) >= 0, f"{key} must be >= 0, got {key}={getattr(self, key)}")
        check(self.memory_saving is None or 0 <= self.memory_saving <= 1,
              f"memory_saving must be in [0, 1] (0.3 = 30 %), got memory_saving={self.memory_saving}")


# --- eval text ---------------------------------------------------------------------------------
def _read_text(source: str) -> str:
    """The whole text of a local file (.gz read transparently) or of a hub text's test split."""
    if source in HUB_TEXTS:
        return _read_hub_text(source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise AttnswapError(f"no eval text at {path}; give a .tokens/.txt/.raw file (.gz allowed) "
                            f"or a hub name ({', '.join(HUB_TEXTS)})")
    check_text_file(path, "eval text")  # UTF-8 without control bytes, or the offending offset
    try:
        with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")) as f:
            text = f.read()
    except (UnicodeDecodeError, OSError) as exc:
        raise AttnswapError(f"cannot read eval text {path}: {exc}") from None
    if not text.strip():
        raise AttnswapError(f"eval text {path} is empty; give a file with text in it")
    return text


def _read_hub_text(name: str) -> str:
    try:
        from datasets import load_dataset
    except ImportError:
        raise AttnswapError(f"reading {name!r} needs the datasets package: pip install 'attnswap[hub]'; "
                            f"offline, pass a local file such as {DEFAULT_DATA}") from None
    try:
        split = load_dataset("wikitext", name, split="test")
    except Exception as exc:  # datasets raises many types (connection, not found, cache); all mean "cannot read it"
        raise AttnswapError(f"cannot load {name!r} from the hub ({str(exc).splitlines()[0] if str(exc) else exc!r}); "
                            f"offline, pass a local file such as {DEFAULT_DATA}") from None
    return "\n\n".join(split["text"])  # as in the Hugging Face perplexity guide


def token_ids(tokenizer, text: str, max_tokens: int = 0) -> torch.Tensor:
    """(N,) int64 ids of the whole text, cut to the first ``max_tokens`` when it is > 0."""
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)
    ids = ids[:max_tokens] if max_tokens > 0 else ids
    if len(ids) < 2:
        raise AttnswapError(f"the eval text has {len(ids)} token(s); perplexity needs at least 2")
    return ids


# --- strided perplexity, KL and agreement ------------------------------------------------------
def strided_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored) per window: the last ``n_scored`` tokens of ids[begin:end] are scored."""
    if context < 2:
        raise AttnswapError(f"context must be >= 2 tokens to score anything, got context={context}")
    if not 1 <= stride <= context:
        raise AttnswapError(f"stride must be in 1..context ({context}), got stride={stride}")
    windows, prev_end = [], 0
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + context, n_tokens)
        new = end - prev_end  # tokens no earlier window scored
        windows.append((begin, end, min(new, end - begin - 1)))  # a window's first token has no context
        prev_end = end
        if end == n_tokens:
            break
    return windows


def _batches(windows: list[tuple[int, int, int]], batch_size: int):
    """Consecutive windows of equal length, at most ``batch_size`` at a time (only the last one is shorter)."""
    batch: list[tuple[int, int, int]] = []
    for window in windows:
        if batch and (len(batch) == batch_size or window[1] - window[0] != batch[0][1] - batch[0][0]):
            yield batch
            batch = []
        batch.append(window)
    if batch:
        yield batch


def _logits(model: nn.Module, ids: torch.Tensor, keep: int) -> torch.Tensor:
    """(B, keep, V) logits of the last ``keep`` positions; skips the LM head elsewhere where the model can."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return model(input_ids=ids, logits_to_keep=keep).logits
    return model(input_ids=ids).logits[:, -keep:]


@torch.no_grad()
def compare_stream(model: nn.Module, ids: torch.Tensor, context: int, stride: int, batch_size: int = 1,
                   progress: bool = True) -> dict[str, Any]:
    """Strided perplexity of original and swapped, and per-token KL / agreement / accuracy over the scored tokens.

    ``model`` is swapped; ``ids`` (N,) int64. KL is KL(P_original ‖ P_swapped) in nats per token.
    """
    check_length(model, context)
    device = next(model.parameters()).device
    windows = strided_windows(len(ids), context, stride)
    per_token: dict[str, list[torch.Tensor]] = {}  # name -> (n,) tensors, left on the device: no sync per window
    bar = tqdm(total=len(windows), desc="perplexity", unit="window", disable=not progress)
    for batch in _batches(windows, max(1, batch_size)):
        x = torch.stack([ids[begin:end] for begin, end, _ in batch]).to(device)  # (B, L)
        keep = max(n for _, _, n in batch) + 1
        logits = {"swapped": _logits(model, x, keep)}
        with original_attention(model):
            logits["original"] = _logits(model, x, keep)
        for row, (_, _, n) in enumerate(batch):
            targets = x[row, -n:]  # predicted by the logits one position earlier
            logp = {k: torch.log_softmax(v[row, -n - 1 : -1].float(), dim=-1) for k, v in logits.items()}  # (n, V)
            top1 = {k: v.argmax(dim=-1) for k, v in logp.items()}
            found = {
                "nll_original": -logp["original"].gather(1, targets[:, None])[:, 0],
                "nll_swapped": -logp["swapped"].gather(1, targets[:, None])[:, 0],
                "correct_original": top1["original"] == targets,
                "correct_swapped": top1["swapped"] == targets,
                "agree": top1["original"] == top1["swapped"],
                "kl": (logp["original"].exp() * (logp["original"] - logp["swapped"])).sum(-1),
            }
            for name, values in found.items():
                per_token.setdefault(name, []).append(values)
        bar.update(len(batch))
    bar.close()
    t = {name: torch.cat(parts).double().cpu() for name, parts in per_token.items()}  # the one sync
    accuracy = {k: float(t[f"correct_{k}"].mean()) for k in ("original", "swapped")}
    return {
        "tokens_scored": len(t["kl"]),
        "windows": len(windows),
        "context": context,
        "stride": stride,
        "perplexity": {k: math.exp(float(t[f"nll_{k}"].mean())) for k in ("original", "swapped")},
        "accuracy": {**accuracy, "ratio": accuracy["swapped"] / accuracy["original"] if accuracy["original"] else None},
        "kl": {"mean": float(t["kl"].mean()), "p50": float(t["kl"].quantile(0.5)),
               "p95": float(t["kl"].quantile(0.95)), "max": float(t["kl"].max())},
        "top1_agreement": float(t["agree"].mean()),
    }


# --- attention and gradient fidelity -----------------------------------------------------------
@torch.no_grad()
def attention_mse(model: nn.Module, ids: torch.Tensor) -> list[float | None]:
    """Per layer, mean squared difference of the (B, H, T, S) attention probabilities: full causal softmax vs
    the variant's implied matrix, both on the original model's q and k. None where a variant has no such matrix."""
    found: dict[int, float | None] = {}

    def observer(module, _variant, q, k, v, ctx, state):
        variant = getattr(module, "attnswap_variant", None) or FULL
        try:
            approx = variant.probs(q, k, ctx, state)
        except NotImplementedError:
            found[module.layer_idx] = None
            return
        found[module.layer_idx] = float(((FULL.probs(q, k, ctx, None) - approx) ** 2).mean())

    with observe_attention(model, observer), original_attention(model):
        model(input_ids=ids[None].to(next(model.parameters()).device))
    return [found.get(i) for i in range(len(attention_modules(model)))]


def projection_weights(module: nn.Module) -> list[nn.Parameter]:
    """An attention layer's input-projection weights: GPT-2's fused c_attn, or Llama-style q/k/v projections."""
    for names in (("c_attn",), ("q_proj", "k_proj", "v_proj"), ("qkv_proj",), ("query_key_value",)):
        if all(hasattr(module, n) for n in names):
            return [getattr(module, n).weight for n in names]
    return []


def gradient_cosine(model: nn.Module, ids: torch.Tensor) -> list[float | None]:
    """Per layer, cosine between d(LM loss)/d(input-projection weights) of the original and of the swapped model.

    requires_grad is switched on for those weights only, and restored afterwards.
    """
    per_layer = [projection_weights(m) for m in attention_modules(model)]
    weights = [w for ws in per_layer for w in ws]
    if not weights:
        return [None] * len(per_layer)
    before = [w.requires_grad for w in weights]
    x = ids[None].to(weights[0].device)

    def lm_loss() -> torch.Tensor:
        logits = model(input_ids=x).logits[0, :-1].float()  # (T-1, V)
        return torch.nn.functional.cross_entropy(logits, x[0, 1:])

    try:
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            # autograd.grad, not backward: no .grad is left behind on any parameter.
            swapped = torch.autograd.grad(lm_loss(), weights)
            with original_attention(model):
                original = torch.autograd.grad(lm_loss(), weights)
    finally:
        for w, flag in zip(weights, before):
            w.requires_grad_(flag)
    cosines: list[float | None] = []
    i = 0
    for ws in per_layer:
        if not ws:
            cosines.append(None)
            continue
        a = torch.cat([g.float().flatten() for g in original[i : i + len(ws)]])
        b = torch.cat([g.float().flatten() for g in swapped[i : i + len(ws)]])
        cosines.append(float(torch.nn.functional.cosine_similarity(a, b, dim=0)))
        i += len(ws)
    return cosines


# --- edge cases --------------------------------------------------------------------------------
@torch.no_grad()
def edge_case_checks(model: nn.Module, ids: torch.Tensor, max_len: int, pad_id: int) -> list[dict[str, Any]]:
    """Named inputs that break careless attention code; each reports whether the swapped model's logits are finite."""
    device = next(model.parameters()).device
    tokens = ids.repeat(math.ceil(max(max_len, 19) / len(ids)))[: max(max_len, 19)].to(device)
    length = 19  # not a multiple of any block size
    row = tokens[:length]
    real, pad = torch.ones(length, dtype=torch.long, device=device), torch.zeros(length, dtype=torch.long, device=device)

    def left_padded(n_pad: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids_row = torch.cat([torch.full((n_pad,), pad_id, device=device), row[: length - n_pad]])
        return ids_row, torch.cat([pad[:n_pad], real[: length - n_pad]])

    mixed = [left_padded(n) for n in (0, 5, 12)]
    right = (torch.cat([row[:11], torch.full((8,), pad_id, device=device)]), torch.cat([real[:11], pad[:8]]))
    cases = {
        "all_padding_row": (torch.stack([row, torch.full_like(row, pad_id)]), torch.stack([real, pad])),
        "mixed_padding": (torch.stack([r for r, _ in mixed] + [right[0]]), torch.stack([m for _, m in mixed] + [right[1]])),
        "repeated_token": (row[:1].repeat(length)[None], None),
        "length_1": (row[:1][None], None),
        "max_length": (tokens[:max_len][None], None),
    }
    results = []
    for name, (x, mask) in cases.items():
        logits = model(input_ids=x, attention_mask=mask).logits
        results.append({"check": name, "shape": list(x.shape), "finite": bool(torch.isfinite(logits).all())})
    return results


# --- criteria ----------------------------------------------------------------------------------
def criteria(stream: dict[str, Any], mse: list[float | None] | None, cosine: list[float | None] | None,
             memory_saving: float | None = None) -> list[dict[str, Any]]:
    """The research's success criteria, each met / not met (None: not measured)."""
    mse_known = [m for m in mse or [] if m is not None]
    cos_known = [c for c in cosine or [] if c is not None]

    def row(name, value, threshold, met, note=""):
        return {"criterion": name, "value": value, "threshold": threshold, "met": met, "note": note}

    accuracy = stream["accuracy"]
    worst_mse = max(mse_known) if mse_known else None
    worst_cos = min(cos_known) if cos_known else None
    return [
        row("next-token accuracy >= 95 % of original", accuracy["ratio"], 0.95,
            accuracy["swapped"] >= 0.95 * accuracy["original"]),  # no division: defined when both are 0
        row("attention MSE <= 1e-4 (worst layer)", worst_mse, 1e-4,
            None if worst_mse is None else worst_mse <= 1e-4, "" if mse_known else "n/a"),
        row("gradient cosine >= 0.95 (worst layer)", worst_cos, 0.95,
            None if worst_cos is None else worst_cos >= 0.95, "" if cos_known else "n/a"),
        row("KL(original || swapped) <= 0.001 nats/token (mean)", stream["kl"]["mean"], 1e-3,
            stream["kl"]["mean"] <= 1e-3),
        row("peak memory -30 %", memory_saving, 0.30, None if memory_saving is None else memory_saving >= 0.30,
            "see bench" if memory_saving is None else ""),
    ]


# --- the `attnswap eval` command ---------------------------------------------------------------
@holding_out_folder
def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Every measurement of the swapped model against its original; writes eval.json, eval.md, eval_layers.csv."""
    started = time.perf_counter()
    out = Path(config.out)  # checked and locked by holding_out_folder; inputs next: a typo fails before any work
    text = _read_text(config.data)
    prompts = read_prompts(config.prompts) if config.gen_tokens > 0 else []
    print("eval config: " + json.dumps(config_to_dict(config)))
    torch.manual_seed(config.seed)  # before the swap: random variant state (random features) is drawn there
    model, tokenizer, name = load_swapped(config.model, config.variant, config.swapped, config.device, config.dtype,
                                          config.layers)
    variant = swapped_variant(model)
    context = config.context or max_positions(model) or 0
    if context <= 0:
        raise AttnswapError("this model has no fixed maximum length; set --context (e.g. 4096)")
    check_length(model, context)
    ids = token_ids(tokenizer, text, config.max_tokens)
    print(f"{name} with {variant.spec}; {len(ids)} tokens of {config.data}; context {context}, stride {config.stride}")

    stream_started = time.perf_counter()
    stream = compare_stream(model, ids, context, config.stride, config.batch_size)
    stream["seconds"] = round(time.perf_counter() - stream_started, 1)
    ppl = stream["perplexity"]
    print(f"perplexity original: {ppl['original']:.2f}  swapped: {ppl['swapped']:.2f}")
    print(f"KL mean {stream['kl']['mean']:.4g}  top-1 agreement {100 * stream['top1_agreement']:.2f} %  "
          f"accuracy original {100 * stream['accuracy']['original']:.2f} %  swapped "
          f"{100 * stream['accuracy']['swapped']:.2f} %")

    attn_len, grad_len = min(config.attn_sample_len, len(ids), context), min(config.grad_len, len(ids), context)
    mse = attention_mse(model, ids[:attn_len]) if attn_len > 0 else None
    cosine = gradient_cosine(model, ids[:grad_len]) if grad_len > 1 else None  # a loss needs 2 tokens
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    edges = edge_case_checks(model, ids, context, pad_id) if config.edge_cases else []
    generations = []
    if config.gen_tokens > 0:
        cases = generation_cases(prompts, ["greedy"], [])
        with original_attention(model):
            original = generate_all(model, tokenizer, cases, config.gen_tokens, desc="generate original")
        swapped = generate_all(model, tokenizer, cases, config.gen_tokens, desc="generate swapped")
        generations = side_by_side_rows(cases, original, {variant.label: swapped})

    param = next(model.parameters())
    result = {
        "info": run_info(config, name, param.device, param.dtype),
        "variant": variant.spec,
        "label": variant.label,
        "data": config.data,
        "stream": stream,
        "attention_mse": {"sample_tokens": attn_len, "per_layer": mse},
        "gradient_cosine": {"sample_tokens": grad_len, "per_layer": cosine},
        "edge_cases": edges,
        "criteria": criteria(stream, mse, cosine, config.memory_saving),
        "generations": generations,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "eval.json", json.dumps(result, indent=1))
    atomic_write(out / "eval.md", markdown_summary(result))
    atomic_write(out / "eval_layers.csv", _layers_csv(mse, cosine, len(attention_modules(model))))
    print(f"wrote {out / 'eval.json'}, eval.md, eval_layers.csv in {result['seconds']} s")
    return result


def _layers_csv(mse, cosine, n_layers: int) -> str:
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["layer", "attention_mse", "grad_cosine"])
    for i in range(n_layers):
        writer.writerow([i, _na(mse[i] if mse else None, "g"), _na(cosine[i] if cosine else None, "g")])
    return text.getvalue()


def _na(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def markdown_summary(result: dict[str, Any]) -> str:
    """A short human-readable eval.md."""
    info, s = result["info"], result["stream"]
    ppl, acc = s["perplexity"], s["accuracy"]
    mark = {True: "met", False: "**not met**", None: "—"}
    lines = [
        f"# Evaluation: {result['label']} vs original",
        "",
        f"model `{info['model']}`, variant `{result['variant']}`, {info['device']}, {info['dtype']}; "
        f"text `{result['data']}`: {s['tokens_scored']} tokens scored, context {s['context']}, stride {s['stride']}.",
        "",
        "| | original | swapped |",
        "|---|---|---|",
        f"| perplexity | {ppl['original']:.2f} | {ppl['swapped']:.2f} |",
        f"| next-token accuracy | {100 * acc['original']:.2f} % | {100 * acc['swapped']:.2f} % |",
        "",
        f"KL(original ‖ swapped) per token: mean {s['kl']['mean']:.4g}, p50 {s['kl']['p50']:.4g}, "
        f"p95 {s['kl']['p95']:.4g} nats; top-1 agreement {100 * s['top1_agreement']:.2f} %.",
        "",
        "## Criteria",
        "",
        "| criterion | value | met |",
        "|---|---|---|",
        *(f"| {c['criterion']} | {_na(c['value'], '.4g')} | {c['note'] or mark[c['met']]} |"
          for c in result["criteria"]),
    ]
    mse, cos = result["attention_mse"]["per_layer"], result["gradient_cosine"]["per_layer"]
    if mse or cos:
        n_layers = len(mse or cos)
        lines += ["", f"## Per layer (attention sample {result['attention_mse']['sample_tokens']} tokens, "
                      f"gradient sample {result['gradient_cosine']['sample_tokens']} tokens)", "",
                  "| layer | attention MSE | gradient cosine |", "|---|---|---|"]
        lines += [f"| {i} | {_na(mse[i] if mse else None, '.3g')} | {_na(cos[i] if cos else None, '.4f')} |"
                  for i in range(n_layers)]
    if result["edge_cases"]:
        lines += ["", "## Edge cases (swapped model, logits finite?)", "",
                  " · ".join(f"{e['check']} {tuple(e['shape'])}: {'finite' if e['finite'] else '**NOT FINITE**'}"
                             for e in result["edge_cases"])]
    if result["generations"]:
        lines += ["", "## Greedy generations", "", markdown_table(result["generations"], [result["label"]])]
    lines += ["", f"torch {info['torch']}, transformers {info['transformers']}, {result['seconds']} s. "
                  f"Command: `{info['command']}`", ""]
    return "\n".join(lines)

