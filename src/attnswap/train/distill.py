"""Distil a swapped model back to its original: KL between the original's and the swapped model's next tokens.

The teacher is the same model run with its original attention (``original_attention``): no second copy of the
weights. Optionally the run starts with an attention-transfer stage (Hedgehog, https://arxiv.org/abs/2402.04347;
LoLCATs, https://arxiv.org/abs/2410.10254): for ``transfer_steps`` steps each swapped layer learns to reproduce
the full-attention output on the teacher's own q, k, v, before the end-to-end KL stage.

    attnswap distill --variant mixture --steps 500 --out runs/mixture
    attnswap distill --config configs/distill_window64_sinks4.yaml --resume true
    torchrun --nproc_per_node 4 -m attnswap.cli distill --config configs/distill_window64_sinks4.yaml

Under torchrun every rank holds the whole model and a disjoint shard of each global batch (``batch_size`` is
global); gradients of the trainable tensors are averaged once per step, so N ranks follow the loss curve of one
process with the same ``batch_size``. Rank 0 writes ``metrics.jsonl``, checkpoints and results.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from attnswap.config import config_to_dict
from attnswap.data.recall_tasks import Vocabulary, training_sequences
from attnswap.data.tokens import (block_order, check_readable, pack_blocks, parse_hub, refuse_test_source, resolve_path,
                                  split_blocks, token_stream)
from attnswap.errors import AttnswapError
from attnswap.hf.attention import STATE_ATTR
from attnswap.hf.models import DEFAULT_MODEL
from attnswap.hf.saved import save
from attnswap.hf.swap import l1_penalty
from attnswap.runs import atomic_directory, atomic_write, disk_errors, remove_stale_temps, run_lock
from attnswap.train.checkpoints import (CKPT_JSON, BestSoFar, check_resumable, load_trained_tensors, read_checkpoint,
                                        restore_checkpoint, run_inputs, save_checkpoint)
from attnswap.train.pair import Pair, build_pair, unwrapped
from attnswap.train.ranks import Ranks, agree_to_stop, average_gradients, start_ranks, stop_requests
from attnswap.train.settings import DistillConfig
from attnswap.validate import check_token_ids
from attnswap.variants import get_variant


log = logging.getLogger(__name__)


def learning_rate(step: int, config: DistillConfig) -> float:
    """Per stage (transfer, then KL): linear warm-up, then cosine from the stage's lr down to lr * min_lr_ratio."""
    if step < config.transfer_steps:
        return _warmup_cosine(step, config.transfer_steps, config.transfer_lr or config.lr, config)
    return _warmup_cosine(step - config.transfer_steps, config.steps - config.transfer_steps, config.lr, config)


def _warmup_cosine(step: int, steps: int, peak: float, config: DistillConfig) -> float:
    warmup = min(config.warmup_steps, steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(pair: Pair, config: DistillConfig) -> torch.optim.AdamW:
    """AdamW over three groups: the variant's own parameters (at lr × variant_lr_scale, never decayed), the other
    matrices (decayed) and the other vectors. Each group's ``lr_scale`` multiplies the scheduled lr."""
    own = f".{STATE_ATTR}."
    variant = [p for name, p in pair.trainable.items() if own in name]
    matrices = [p for name, p in pair.trainable.items() if own not in name and p.dim() >= 2]
    others = [p for name, p in pair.trainable.items() if own not in name and p.dim() < 2]
    groups = [{"params": variant, "weight_decay": 0.0, "lr_scale": config.variant_lr_scale},
              {"params": matrices, "weight_decay": config.weight_decay, "lr_scale": 1.0},
              {"params": others, "weight_decay": 0.0, "lr_scale": 1.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=(0.9, 0.95))


def load_blocks(config: DistillConfig, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) blocks of seq_len tokens; ``recall_mix`` of the training blocks are synthetic recall
    sequences, added to the text's (validation stays text)."""
    blocks = pack_blocks(token_stream(config.data, tokenizer, style=config.data_style), config.seq_len)
    if not config.val_data:
        blocks, validation = split_blocks(blocks, config.val_fraction, config.seed)
    else:
        validation = pack_blocks(token_stream(config.val_data, tokenizer, split="validation"), config.seq_len)
    if config.recall_mix:
        count = round(config.recall_mix / (1 - config.recall_mix) * blocks.shape[0])
        synthetic = training_sequences(Vocabulary.from_tokenizer(tokenizer), config.seq_len, count, config.seed)
        blocks = torch.cat([blocks, synthetic.to(blocks.dtype)])
    return blocks, validation


def batch_ids(blocks: torch.Tensor, config: DistillConfig, ranks: Ranks, step: int, micro: int) -> torch.Tensor:
    """This rank's slice of the global batch (step, micro): (batch_size / world, seq_len) token ids."""
    local = config.batch_size // ranks.world
    first = (step * config.grad_accum + micro) * config.batch_size + ranks.rank * local
    return blocks[block_order(blocks.shape[0], config.seed, first, local)].to(ranks.device)


@torch.no_grad()
def evaluate_blocks(pair: Pair, blocks: torch.Tensor, config: DistillConfig, ranks: Ranks) -> dict[str, float]:
    """KL(teacher ‖ student) at T=1 and top-1 agreement per token, over the first eval_batches batches."""
    pair.train_variant_state(False)
    n_blocks = min(blocks.shape[0], config.eval_batches * config.batch_size)
    mine = torch.arange(ranks.rank, n_blocks, ranks.world)
    totals = torch.zeros(3, dtype=torch.float64, device=ranks.device)  # KL sum, agreements, tokens
    ones = torch.ones((), dtype=torch.float64, device=ranks.device)
    for chunk in mine.split(max(1, config.batch_size // ranks.world)):
        ids = blocks[chunk].to(ranks.device)
        kl, agree = pair.kl(ids)
        totals += torch.stack([kl.double() * ids.numel(), agree.double(), ones * ids.numel()])
    kl_sum, agree_sum, tokens = ranks.sum(totals).tolist()  # host sync
    return {"kl": kl_sum / tokens, "top1": agree_sum / tokens}


class Metrics:
    """``metrics.jsonl`` on rank 0: one JSON line per step and per evaluation."""

    def __init__(self, path: Path, enabled: bool, keep_until: int | None):
        self.path, self.enabled = path, enabled
        if enabled and keep_until is not None and path.is_file():  # drop what a killed run wrote after its checkpoint
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= keep_until]
            atomic_write(path, "".join(line + "\n" for line in kept))
        elif enabled:
            atomic_write(path, "")

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf  # a line cut short by the kill


def distill(config: DistillConfig) -> dict:
    """Train ``config.variant`` inside ``config.model`` to match the original; returns (and writes) results.json."""
    ranks = start_ranks(config.device)
    try:
        locked = run_lock(config.out, inputs=_read_paths(config)) if ranks.main else contextlib.nullcontext()
        with locked:  # rank 0 speaks for the job
            return _distill(config, ranks)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _distill(config: DistillConfig, ranks: Ranks) -> dict:
    out = Path(config.out)
    record, tensors, inputs = _open_run(config, ranks, out)

    # --- teacher, student, data, optimizer
    pair, tokenizer = build_pair(config, ranks.device)
    # On the device once (tens of MB): a host-to-device copy per step would wait for the GPU every step.
    train_blocks, val_blocks = (blocks.to(ranks.device) for blocks in load_blocks(config, tokenizer))
    vocabulary = unwrapped(pair.model).get_input_embeddings().num_embeddings
    for what, blocks in (("training", train_blocks), ("validation", val_blocks)):
        check_token_ids(blocks, vocabulary, f"the {what} tokens of {config.data if what == 'training' else config.val_data}"
                                            f" (tokenizer or token cache)")
    optimizer = make_optimizer(pair, config)
    if record:  # a damaged checkpoint is named before the run announces itself
        restore_checkpoint(record, tensors, pair, optimizer, out / CKPT_JSON)
    _announce_run(config, ranks, out, record)
    start_step = record.get("step", 0)
    metrics = Metrics(out / "metrics.jsonl", ranks.main, start_step if record else None)
    before = record.get("before") or evaluate_blocks(pair, val_blocks, config, ranks)
    best = BestSoFar(record, tensors)
    if not record:
        metrics.write({"step": 0, "val_kl": before["kl"], "val_top1": before["top1"]})
        best.update(0, before, pair)  # training that only makes things worse keeps the swap as it started
    tokens_per_step = config.batch_size * config.grad_accum * config.seq_len

    # --- the loop: train, log, evaluate, checkpoint
    step, started, stopped_by = start_step, time.time(), None
    progress = _progress(config, start_step, ranks)
    with stop_requests() as requested:
        while step < config.steps and stopped_by is None:
            loss, parts = train_step(pair, optimizer, train_blocks, config, ranks, step)
            step += 1
            elapsed = time.time() - started
            tokens_per_s = (step - start_step) * tokens_per_step / max(elapsed, 1e-9)
            metrics.write({"step": step, "loss": loss, **parts, "lr": learning_rate(step - 1, config),
                           "tokens": step * tokens_per_step, "tokens_per_s": tokens_per_s, "elapsed_s": elapsed})
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:.0f}")
            if ranks.main and (step % config.log_every == 0 or step == config.steps):
                log.info("step %d/%d loss %.5f lr %.2e %.0f tok/s", step, config.steps, loss,
                         learning_rate(step - 1, config), tokens_per_s)
            if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                result = evaluate_blocks(pair, val_blocks, config, ranks)
                metrics.write({"step": step, "val_kl": result["kl"], "val_top1": result["top1"]})
                if step > config.transfer_steps:
                    best.update(step, result, pair)
            timed_out = config.max_seconds is not None and elapsed >= config.max_seconds
            stopped_by = agree_to_stop(requested["stop"], timed_out, ranks)
            if stopped_by is None and config.early_stop and best.stale >= config.early_stop:
                stopped_by = "early_stop"  # every rank evaluated the same all-reduced KL: no vote needed
            due = step == config.steps or (config.ckpt_every and step % config.ckpt_every == 0)
            if ranks.main and (stopped_by or due):
                save_checkpoint(out, step, pair, optimizer, {
                    "config": config_to_dict(config), "inputs": inputs, "before": before, "world_size": ranks.world,
                    "data": {"samples_seen": step * config.batch_size * config.grad_accum,
                             "train_blocks": train_blocks.shape[0]},
                    "scheduler": {"kind": "warmup+cosine", "next_lr": learning_rate(step, config)},
                }, best)
    progress.close()
    if stopped_by == "signal":
        log.info("stopped by %s at step %d; checkpoint in %s; continue with --resume true",
                 requested["signal"] or "a signal to another rank", step, out)
        raise KeyboardInterrupt

    # --- results
    after = evaluate_blocks(pair, val_blocks, config, ranks)
    metrics.write({"step": step, "val_kl": after["kl"], "val_top1": after["top1"]})
    kept_step = step
    if best.result is not None and best.result["kl"] < after["kl"]:  # keep the best evaluation's tensors
        load_trained_tensors(pair, best.tensors, out / CKPT_JSON)
        after, kept_step = best.result, best.step
        log.info("keeping step %d, the lowest validation KL (%.4f)", kept_step, after["kl"])
    results = _results(config, pair, ranks, before, after, step, stopped_by, out)
    results["kept_step"] = kept_step
    results["train_seconds"] = time.time() - started
    results["tokens_per_s"] = (step - start_step) * tokens_per_step / max(results["train_seconds"], 1e-9)
    if ranks.device.type == "cuda":
        results["peak_memory_mib"] = torch.cuda.max_memory_allocated(ranks.device) / 2**20
    if ranks.main:
        # A kill mid-save leaves no half-written model/; SIGTERM or Ctrl-C here (KeyboardInterrupt, see cli) removes the
        # temporary folder and exits 130, and the last checkpoint finishes the run with --resume true.
        with atomic_directory(out / "model") as building, disk_errors(out / "model"):
            save(pair.model.merge_and_unload() if pair.lora else pair.model, building, tokenizer)
        atomic_write(out / "results.json", json.dumps(results, indent=1))
        log.info("KL %.4f -> %.4f, top-1 agreement %.3f -> %.3f; model in %s",
                 before["kl"], after["kl"], before["top1"], after["top1"], out / "model")
    return results


def _read_paths(config: DistillConfig) -> dict[str, str]:
    """What the run reads, as paths (the teacher's folder, the texts), which its --out may not overlap."""
    paths = {"model": config.model or DEFAULT_MODEL}
    for key in ("data", "val_data"):
        source = getattr(config, key)
        if source and parse_hub(source, None) is None:
            paths[key] = str(resolve_path(source))
    return paths


def _open_run(config: DistillConfig, ranks: Ranks, out: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """Check the run can start (or continue) in ``out``: (the checkpoint to resume from, or ({}, {}), and the
    digests of its inputs, ``run_inputs``)."""
    if config.batch_size % ranks.world:
        raise AttnswapError(f"batch_size {config.batch_size} does not split over {ranks.world} ranks; "
                            f"use a multiple of {ranks.world}")
    get_variant(config.variant)  # a bad spec, a missing or unreadable text: refused before any weights load
    refuse_test_source(config.data)
    for source in (config.data, config.val_data):
        check_readable(source)
    has_checkpoint = (out / CKPT_JSON).exists()
    if has_checkpoint and not config.resume:
        raise AttnswapError(f"{out} already holds a run ({CKPT_JSON}); pass --resume true or choose another --out")
    if config.resume and not has_checkpoint:
        raise AttnswapError(f"--resume true, but {out} holds no run (no {CKPT_JSON}); check --out, or drop --resume "
                            "to start a new run there")
    record, tensors = read_checkpoint(out) if has_checkpoint else ({}, {})
    inputs = run_inputs(config, ranks.device)
    if record:
        check_resumable(record, config, inputs, out / CKPT_JSON)
    if ranks.main:
        remove_stale_temps(out)  # what a killed save left; under the run lock, so no live writer's
    return record, tensors, inputs


def _announce_run(config: DistillConfig, ranks: Ranks, out: Path, record: dict) -> None:
    """The resolved config, printed and written to ``config.yaml`` once every input has loaded."""
    if not ranks.main:
        return
    import yaml

    log.info("distill config:\n%s", "\n".join(f"  {k}: {v}" for k, v in config_to_dict(config).items()))
    atomic_write(out / "config.yaml", yaml.safe_dump(config_to_dict(config), sort_keys=False))
    if record:
        log.info("resuming from %s at step %d", out / CKPT_JSON, record["step"])


def train_step(pair: Pair, optimizer, blocks: torch.Tensor, config: DistillConfig, ranks: Ranks,
               step: int) -> tuple[float, dict[str, float]]:
    """One optimizer update over grad_accum micro-batches; returns the loss averaged over ranks and its parts."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, config) * group["lr_scale"]
    transfer = step < config.transfer_steps
    pair.train_variant_state(True)
    sums = torch.zeros(4, device=ranks.device)  # loss, KL or attention MSE, attention CE, L1
    zero = torch.zeros((), device=ranks.device)
    for micro in range(config.grad_accum):
        ids = batch_ids(blocks, config, ranks, step, micro)
        if transfer:
            main_loss, attn_ce = pair.transfer_loss(ids)
        else:
            main_loss, attn_ce = pair.kl(ids, config.temperature, config.kl_chunk)[0], zero
        penalty = l1_penalty(pair.model) if config.l1 else None
        loss = main_loss + config.transfer_attn_ce * attn_ce
        if penalty is not None:
            loss = loss + config.l1 * penalty
        (loss / config.grad_accum).backward()
        parts = [loss, main_loss, attn_ce, zero if penalty is None else penalty]
        sums += torch.stack([part.detach().float() for part in parts])
    params = [p for p in pair.trainable.values() if p.grad is not None]
    average_gradients(params, ranks)
    sums = ranks.sum(sums) / (ranks.world * config.grad_accum)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.clip_grad or float("inf"))
    loss, main, attn_ce, penalty = sums.tolist()  # host sync, once per step
    grad_norm = grad_norm.item()
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise AttnswapError(f"training diverged at step {step + 1}: loss {loss}, gradient norm {grad_norm}; "
                            f"the last good checkpoint is in {config.out}; lower --lr or use --dtype float32")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    parts = {"attn_mse": main, "attn_ce": attn_ce} if transfer else {"kl": main}
    return loss, {**parts, "l1": penalty, "grad_norm": grad_norm}


def _progress(config: DistillConfig, start_step: int, ranks: Ranks):
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal, nothing in log files (log_every lines there).
    return tqdm(total=config.steps, initial=start_step, desc="distill", unit="step",
                disable=None if ranks.main else True)


def _results(config, pair, ranks, before, after, step, stopped_by, out) -> dict:
    import transformers

    device = ranks.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "teacher": config.model or DEFAULT_MODEL, "variant": pair.variant.spec, "label": pair.variant.label,
        "kl_before": before["kl"], "kl_after": after["kl"], "top1_before": before["top1"], "top1_after": after["top1"],
        "steps_done": step, "tokens_seen": step * config.batch_size * config.grad_accum * config.seq_len,
        "token_budget": config.steps * config.batch_size * config.grad_accum * config.seq_len,
        "stopped_by": stopped_by, "seed": config.seed, "world_size": ranks.world, "device": device_name,
        "torch": torch.__version__, "transformers": transformers.__version__, "command": " ".join(sys.argv),
        "model_dir": str(out / "model"), "config": config_to_dict(config),
    }
