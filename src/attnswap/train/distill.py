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
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from attnswap.config import config_to_dict
from attnswap.data.tokens import (DISTILL_TEXT, WIKITEXT2_VALID, block_order, check_readable, pack_blocks, parse_hub,
                           refuse_test_source, resolve_path, source_digest, split_blocks, token_stream)
from attnswap.errors import AttnswapError
from attnswap.train.losses import DEFAULT_CHUNK, attention_cross_entropy, chunked_kl
from attnswap.hf.models import DEFAULT_MODEL, check_length, load_model, load_tokenizer, model_digest, resolve_device
from attnswap.runs import atomic_directory, atomic_write, disk_errors, remove_stale_temps, run_lock
from attnswap.hf.attention import STATE_ATTR
from attnswap.hf.saved import save
from attnswap.hf.swap import (attention_modules, l1_penalty, observe_attention, original_attention, swap,
                              variant_state_dict)
from attnswap.variants import Variant, get_variant
from attnswap.variants.base import check
from attnswap.validate import check_token_ids, contained_file, shown
from attnswap.variants.full import Full
from attnswap.data.wikitext_style import STYLES

log = logging.getLogger(__name__)
TRAINABLE = ("variant", "variant+mlp", "variant+attn", "variant+lora")
CKPT_JSON = "checkpoint.json"
# What a resumed run may change: how long it runs, when it logs, evaluates and checkpoints, how (not what) it computes,
# and where its inputs lie. Every other setting must equal its checkpoint's, and so must the content of what it reads
# (run_inputs): a model or text moved elsewhere resumes, one whose bytes changed does not.
RESUME_MAY_CHANGE = ("steps", "resume", "out", "log_every", "ckpt_every", "eval_every", "early_stop", "max_seconds",
                     "device", "compile", "kl_chunk", "model", "data", "val_data")  # the last three: by content


@dataclass
class DistillConfig:
    model: str = ""  # hub name or local directory; empty = the bundled teacher
    variant: str = "window:w=64,sinks=4"
    layers: list[int] | None = None  # default: every layer
    data: str = DISTILL_TEXT  # training text: a file, a directory or wikitext-103-raw-v1 (never a test set)
    # plain | wikitext: the training articles as they are, or rendered the way WikiText writes them (headings, split
    # punctuation, @-@, <unk>; attnswap.data.wikitext_style), to distil on the formatting that quality is measured on
    data_style: str = "plain"
    val_data: str = WIKITEXT2_VALID  # empty = hold out val_fraction of the training blocks
    val_fraction: float = 0.02
    steps: int = 500
    batch_size: int = 32  # sequences per optimizer micro-step over all ranks (32 x 1024: 400 k tokens/s on an H200)
    seq_len: int = 512
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0  # on matrices only; gates, biases and mixture logits are never decayed
    # The variant's own parameters (mixture logits, feature maps, gates) learn at lr × this. They are few and start
    # neutral; at the projections' lr a short run barely moves them (the mixture's weights: 3 % in 100 steps at 5e-4).
    variant_lr_scale: float = 1.0
    clip_grad: float = 1.0  # 0 = no clipping
    temperature: float = 1.0  # the KL is taken at this softmax temperature and scaled by T²
    l1: float = 0.0  # λ of the variant's sparsity penalty (the mixture's weights)
    # Stage 1 (attention transfer): the first transfer_steps steps train only the variant's own parameters to
    # reproduce each layer's full-attention output (MSE) on the teacher's q, k, v; for variants with an attention
    # matrix (feature maps), plus transfer_attn_ce × the cross-entropy of their attention weights to softmax's.
    transfer_steps: int = 0
    transfer_attn_ce: float = 0.0
    transfer_lr: float = 0.0  # stage 1's peak lr; 0 = lr. Each stage has its own warm-up and cosine decay
    # Stage 2 (end-to-end KL): stop once this many evaluations in a row did not lower the validation KL (0 = never);
    # the trained tensors of the best evaluation are what the run keeps.
    early_stop: int = 0
    kl_chunk: int = DEFAULT_CHUNK  # positions whose logits exist at once in the KL (see attnswap.train.losses)
    # torch.compile the model for the KL passes (teacher and student: two graphs), to cut the host work per step, which
    # bounds a fused-KL step on the H200 (82-83 ms at batch 8 and 32, benchmarks/results/distill_speed_h200). Equal
    # losses on the CPU (tests/test_recipe.py); 971 k tokens/s against 400 k eager for the window at batch 32, its loss
    # curve within 2.3 % of the eager one (H200, benchmarks/results/distill_speed_h200/f7a66e8); not measured with fla-core's kernels
    # inside, so it is off by default.
    compile: bool = False
    # variant (its own parameters only) | variant+mlp or variant+attn (also the MLPs or the attention projections
    # of the swapped layers; the default, as a window has no parameters) | variant+lora (LoRA on those projections)
    trainable: str = "variant+mlp"
    lora_r: int = 8
    seed: int = 0
    device: str = "auto"  # auto = cuda (this rank's GPU under torchrun) if visible, else cpu
    dtype: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU; or float32, bfloat16
    eval_every: int = 100  # 0 = only before and after
    eval_batches: int = 8
    ckpt_every: int = 100  # 0 = only at the end
    out: str = "runs/distill"
    resume: bool = False
    log_every: int = 10
    max_seconds: float | None = None  # stop (checkpointed, with results) once this much time has passed
    parallel: str = "ddp"  # under torchrun: every rank a whole replica, gradients averaged
    allow_partial: bool = False  # load a model whose weights do not all match its config (missing ones random)

    def __post_init__(self):
        for key in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "lora_r", "log_every"):
            check(getattr(self, key) >= 1, f"{key} must be >= 1, got {key}={getattr(self, key)}")
        for key in ("warmup_steps", "transfer_steps", "eval_every", "ckpt_every", "l1", "weight_decay", "clip_grad",
                    "transfer_attn_ce", "transfer_lr", "early_stop"):
            check(getattr(self, key) >= 0, f"{key} must be >= 0, got {key}={getattr(self, key)}")
        check(self.lr > 0, f"lr must be > 0, got lr={self.lr}")
        check(self.kl_chunk >= 1, f"kl_chunk must be >= 1, got kl_chunk={self.kl_chunk}")
        check(self.transfer_steps < self.steps or self.steps == 0,
              f"transfer_steps ({self.transfer_steps}) must be < steps ({self.steps}): stage 2 needs steps of its own")
        check(self.variant_lr_scale > 0, f"variant_lr_scale must be > 0, got variant_lr_scale={self.variant_lr_scale}")
        check(self.temperature > 0, f"temperature must be > 0, got temperature={self.temperature}")
        check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        check(self.data_style in STYLES, f"data_style must be one of {', '.join(STYLES)}; got {self.data_style!r}")
        check(self.trainable in TRAINABLE, f"trainable must be one of {', '.join(TRAINABLE)}; got {self.trainable!r}")
        check(self.dtype in ("auto", "float32", "bfloat16"),
              f"dtype must be auto, float32 or bfloat16; got {self.dtype!r}")
        check(self.parallel == "ddp", f"parallel={self.parallel!r} is not implemented yet; use ddp")
        check(self.max_seconds is None or self.max_seconds >= 0,
              f"max_seconds must be >= 0 (or left out for no limit), got max_seconds={self.max_seconds}")


# --- ranks ---------------------------------------------------------------------------------------
@dataclass
class Ranks:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun) and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor


def start_ranks(device: str) -> Ranks:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(0, 1, resolve_device(device))
    local_rank = int(os.environ["LOCAL_RANK"])
    if device in ("auto", "cuda"):
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    torch_device = resolve_device(device)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off: it hangs on some shared hosts
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
        dist.init_process_group("nccl", device_id=torch_device)
    else:
        dist.init_process_group("gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), torch_device)


@contextlib.contextmanager
def stop_requests():
    """A flag that SIGTERM (which torchrun forwards to every rank) or Ctrl-C (SIGINT) sets, so the loop can
    checkpoint and stop after the step it is in; a second Ctrl-C stops at once, as usual."""
    flag = {"stop": False, "signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def request(number, _frame):
        if flag["stop"] and number == signal.SIGINT:
            raise KeyboardInterrupt
        flag.update(stop=True, signal=signal.Signals(number).name)
        log.info("%s: stopping after this step with a checkpoint (Ctrl-C again to quit now)", flag["signal"])

    previous = {number: signal.signal(number, request) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


# --- teacher and student in one model ------------------------------------------------------------
@dataclass
class Pair:
    """The swapped model as student and, with its original attention and weights, as teacher."""

    model: nn.Module
    variant: Variant
    trainable: dict[str, nn.Parameter]
    autocast_dtype: torch.dtype | None
    lora: bool = False  # a peft model: the teacher runs with the adapters disabled
    attn_ce: float = 0.0  # weight of the attention-weight cross-entropy in the transfer stage
    compiled: nn.Module | None = None  # torch.compile of the base model (DistillConfig.compile), for the KL passes

    def autocast(self):
        device_type = next(self.model.parameters()).device.type
        return torch.autocast(device_type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    @property
    def head(self) -> nn.Module:
        return _unwrapped(self.model).get_output_embeddings()

    def hidden_states(self, ids: torch.Tensor, compiled: bool = True) -> torch.Tensor:
        """Final hidden states (B, T, D): the model without its LM head, so that no whole logits are made.
        ``compiled``: through the compiled base model where there is one."""
        base = self.compiled if compiled and self.compiled is not None else _unwrapped(self.model).base_model
        # Tokens alone: the swap's hook on the base model hands them a prepared mask saying the rows are whole
        # (hf.masks.whole_rows_mask). A mask of ones instead, when compiled, made a masked
        # variant's block mask per row and rebuilt at every call: 164 ms a compiled step of window 128 + 4 sinks at
        # batch 32, against 33.7 ms with the prepared mask (H200, benchmarks/results/distill_speed_h200/93d463d).
        with self.autocast():
            return base(input_ids=ids, use_cache=False).last_hidden_state

    @torch.no_grad()
    def teacher_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        with self.teacher():
            return self.hidden_states(ids)

    def kl(self, ids: torch.Tensor, temperature: float = 1.0,
           chunk: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
        """KL(teacher ‖ student) over the batch's positions (× T²) and the count of top-1 agreements, with no
        whole logits tensor (``chunked_kl``)."""
        teacher = self.teacher_hidden(ids)  # first: the teacher's weights are swapped in and out around it
        with self.autocast():
            return chunked_kl(self.hidden_states(ids), teacher, self.head, temperature, chunk)

    @contextlib.contextmanager
    def teacher(self):
        """The original model for the duration: original attention, original base weights (``original_attention``
        swaps back the tensors that ``attnswap_original_weights`` remembers), adapters off."""
        lora_off = self.model.disable_adapter() if self.lora else contextlib.nullcontext()
        with original_attention(_unwrapped(self.model)), lora_off:
            yield

    def transfer_loss(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 1 of the recipe: every swapped layer learns, at once, to reproduce full attention on the *teacher's*
        q, k, v (the teacher runs; no student hidden state is involved). Returns the mean over swapped layers of the
        output MSE and of the attention-weight cross-entropy (zero unless ``attn_ce`` and the variant defines
        ``probs``). No logits are computed. The variant runs in fp32 here: the loss compares small differences."""
        mse, ce = [], []

        def observer(module, _running, q, k, v, ctx, state):
            variant = getattr(module, "attnswap_variant", None)
            if variant is None:
                return
            q, k, v = q.detach().float(), k.detach().float(), v.detach().float()
            device_type = q.device.type
            # The teacher runs without a graph; only the variant's state learns here.
            with torch.enable_grad(), torch.autocast(device_type, enabled=False):
                target = _FULL.attend(q, k, v, ctx, None).float()
                mse.append(F.mse_loss(variant.attend(q, k, v, ctx, state).float(), target))
                if self.attn_ce and has_attention_matrix(variant):
                    ce.append(attention_cross_entropy(_FULL.probs(q, k, ctx, None), variant.probs(q, k, ctx, state)))

        with observe_attention(_unwrapped(self.model), observer), torch.no_grad(), self.teacher():
            self.hidden_states(ids, compiled=False)  # the observers collect losses as the layers run: eager only
        zero = torch.zeros((), device=ids.device)
        return torch.stack(mse).mean(), torch.stack(ce).mean() if ce else zero

    def train_variant_state(self, training: bool) -> None:
        """Variant state in train mode while learning (Performer redraws count training calls); dropout stays off."""
        for module in attention_modules(self.model):
            state = getattr(module, STATE_ATTR, None)
            if state is not None:
                state.train(training)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (whose LoRA layers sit in it), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def has_attention_matrix(variant: Variant) -> bool:
    """Whether the variant defines ``probs``, its implied attention matrix (all but those without one)."""
    return type(variant).probs is not Variant.probs


_FULL = Full()


def precision(config: DistillConfig, device: torch.device) -> tuple[str, torch.dtype | None]:
    """(dtype of the frozen weights, autocast dtype or None) for ``config.dtype`` on ``device``."""
    low_precision = config.dtype == "bfloat16" or (config.dtype == "auto" and device.type == "cuda")
    autocast = torch.bfloat16 if low_precision else None
    # Frozen weights in bf16 on a GPU (autocast computes in bf16 anyway); whatever trains is fp32.
    return ("bfloat16" if autocast is not None and device.type == "cuda" else "float32"), autocast


def build_pair(config: DistillConfig, device: torch.device) -> tuple[Pair, object]:
    """Load the teacher, swap in the variant, choose what trains. Returns (pair, tokenizer)."""
    name = config.model or DEFAULT_MODEL
    variant = get_variant(config.variant)  # a bad spec fails before any weights load
    weights_dtype, autocast = precision(config, device)
    model = load_model(name, device=str(device), dtype=weights_dtype, allow_partial=config.allow_partial)
    check_length(model, config.seq_len)
    torch.manual_seed(config.seed)  # the variant's initial state
    swap(model, variant, layers=config.layers, trainable="variant")
    teacher_weights = {}
    if config.trainable in ("variant+mlp", "variant+attn"):
        prefixes = _swapped_prefixes(model, config.trainable.removeprefix("variant+"))
        for param_name, param in model.named_parameters():
            if param_name.startswith(prefixes) and f".{STATE_ATTR}." not in f".{param_name}":
                teacher_weights[param_name] = param.detach().clone()
                param.data = param.data.float()
                param.requires_grad_(True)
    model.attnswap_original_weights = teacher_weights  # what original_attention swaps in for the teacher
    if config.trainable == "variant+lora":
        model = _add_lora(model, config.lora_r)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise AttnswapError(f"variant {variant.spec} has no learnable parameters; train something beside it: "
                            "--trainable variant+mlp, variant+attn or variant+lora")
    if config.transfer_steps and not any(f".{STATE_ATTR}." in f".{n}" for n in trainable):
        raise AttnswapError(f"transfer_steps needs a variant with learnable parameters and {variant.spec} has none; "
                            "set --transfer_steps 0")
    # The teacher and the student are two graphs of one compiled module: original_attention flips what dynamo guards on.
    compiled = torch.compile(_unwrapped(model).base_model) if config.compile else None
    pair = Pair(model, variant, trainable, autocast, config.trainable == "variant+lora", config.transfer_attn_ce,
                compiled)
    return pair, load_tokenizer(name)


def _swapped_prefixes(model: nn.Module, part: str) -> tuple[str, ...]:
    """Parameter-name prefixes of the swapped layers' attention modules (part="attn") or MLPs (part="mlp")."""
    names = {id(m): n for n, m in model.named_modules()}
    swapped = [names[id(m)] for m in attention_modules(model) if getattr(m, "attnswap_variant", None) is not None]
    return tuple(f"{name}." if part == "attn" else f"{name.rsplit('.', 1)[0]}.mlp." for name in swapped)


def _add_lora(model: nn.Module, rank: int) -> nn.Module:
    """LoRA on the projections of the swapped attention layers (LoLCATs' low-rank adaptation)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise AttnswapError("trainable=variant+lora needs peft: pip install 'attnswap[lora]'") from None
    targets = [
        f"{attn_name}.{child_name}"
        for attn_name, attn in model.named_modules()
        if getattr(attn, "attnswap_variant", None) is not None and hasattr(attn, "layer_idx")
        for child_name, child in attn.named_children()
        if child_name != STATE_ATTR and type(child).__name__ in ("Linear", "Conv1D")
    ]
    conv1d = any(type(module).__name__ == "Conv1D" for module in model.modules())  # GPT-2 stores weights transposed
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets, fan_in_fan_out=conv1d)
    model = get_peft_model(model, config)
    for param_name, param in model.named_parameters():  # peft froze everything but LoRA, the variant included
        if f".{STATE_ATTR}." in f".{param_name}":
            param.requires_grad_(True)
    return model


# --- losses ------------------------------------------------------------------------------------
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


# --- data --------------------------------------------------------------------------------------
def load_blocks(config: DistillConfig, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) blocks of seq_len tokens."""
    blocks = pack_blocks(token_stream(config.data, tokenizer, style=config.data_style), config.seq_len)
    if not config.val_data:
        return split_blocks(blocks, config.val_fraction, config.seed)
    return blocks, pack_blocks(token_stream(config.val_data, tokenizer, split="validation"), config.seq_len)


def batch_ids(blocks: torch.Tensor, config: DistillConfig, ranks: Ranks, step: int, micro: int) -> torch.Tensor:
    """This rank's slice of the global batch (step, micro): (batch_size / world, seq_len) token ids."""
    local = config.batch_size // ranks.world
    first = (step * config.grad_accum + micro) * config.batch_size + ranks.rank * local
    return blocks[block_order(blocks.shape[0], config.seed, first, local)].to(ranks.device)


# --- evaluation --------------------------------------------------------------------------------
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


# --- checkpoints -------------------------------------------------------------------------------
def trained_tensors(pair: Pair) -> dict[str, torch.Tensor]:
    """What a run changes: the variant's state and every trainable tensor, by state-dict name."""
    return {**variant_state_dict(pair.model), **{k: p.detach() for k, p in pair.trainable.items()}}


def save_checkpoint(out: Path, step: int, pair: Pair, optimizer: torch.optim.Optimizer, record: dict,
                    best: "BestSoFar") -> Path:
    """Tensors to ``checkpoint-<step>.safetensors``, then ``checkpoint.json`` naming them: each written atomically,
    and the JSON last, so a crash at any moment leaves the previous checkpoint whole."""
    from safetensors.torch import save_file

    names = list(pair.trainable)
    tensors = {f"model/{k}": v for k, v in trained_tensors(pair).items()}
    tensors.update({f"best/{k}": v for k, v in best.tensors.items()})
    record = {**record, "best": best.record()}
    optim_state = optimizer.state_dict()
    for index, state in optim_state["state"].items():
        for key, value in state.items():
            tensors[f"optim/{names[index]}/{key}"] = value
    tensors["rng/torch"] = torch.get_rng_state()
    if pair_device(pair).type == "cuda":
        tensors["rng/cuda"] = torch.cuda.get_rng_state(pair_device(pair))
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    tensor_file = out / f"checkpoint-{step:07d}.safetensors"
    _atomic(tensor_file, lambda tmp: save_file(tensors, str(tmp)))  # a full disk: one line (runs.disk_errors)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optim_state["param_groups"]]
    meta = {**record, "step": step, "tensors": tensor_file.name, "param_groups": groups}
    _atomic(out / CKPT_JSON, lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
    for old in out.glob("checkpoint-*.safetensors"):
        if old != tensor_file:
            old.unlink()
    return tensor_file


def _corrupt(path: Path, detail: str) -> AttnswapError:
    return AttnswapError(f"corrupt checkpoint {path}: {detail}; delete it or start without --resume")


def read_checkpoint(out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON record and the tensors of the checkpoint in ``out`` (safetensors only: nothing is unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = out / CKPT_JSON
    try:
        meta = json.loads(path.read_text())
        tensor_file = contained_file(out, meta["tensors"], f"checkpoint {path}")  # never a file outside the run
        tensors = load_file(str(tensor_file))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise _corrupt(path, f"unreadable record ({type(exc).__name__}: {shown(str(exc))})") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise _corrupt(path, f"unreadable tensors ({exc})") from None
    for key in ("step", "config", "param_groups"):
        if key not in meta:
            raise _corrupt(path, f"the record has no {key!r}")
    return meta, tensors


def restore_checkpoint(meta: dict, tensors: dict[str, torch.Tensor], pair: Pair, optimizer, path: Path) -> None:
    """Put the checkpoint's variant state, trained weights, optimizer state and RNG back."""
    model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    load_trained_tensors(pair, model_state, path)
    state = {}
    for index, name in enumerate(pair.trainable):
        prefix = f"optim/{name}/"
        entry = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if entry:
            state[index] = entry
    groups = optimizer.state_dict()["param_groups"]
    if len(meta["param_groups"]) != len(groups):
        raise _corrupt(path, "its optimizer groups do not match")
    groups = [{**group, **saved} for group, saved in zip(groups, meta["param_groups"])]  # saved lr etc., live params
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and pair_device(pair).type == "cuda":
        torch.cuda.set_rng_state(tensors["rng/cuda"], pair_device(pair))


def load_trained_tensors(pair: Pair, state: dict[str, torch.Tensor], path: Path) -> None:
    """Copy ``state`` (what ``trained_tensors`` returned) into the model, refusing tensors that do not fit it."""
    expected = set(trained_tensors(pair))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise _corrupt(path, f"its tensors do not match this model (missing {missing[:2]}, "
                             f"unexpected {unexpected[:2]})")
    current = pair.model.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            if current[key].shape != value.shape:
                raise _corrupt(path, f"{key} has shape {tuple(value.shape)}, the model {tuple(current[key].shape)}")
            current[key].copy_(value)  # state_dict tensors share storage with the parameters


class BestSoFar:
    """The best evaluation (lowest validation KL) of the swap as it started (step 0) and of stage 2: its step,
    figures and trained tensors (on the CPU), and how many evaluations since have not improved on it. Carried
    through checkpoints under ``best/``."""

    def __init__(self, record: dict, tensors: dict[str, torch.Tensor]):
        saved = record.get("best") or {}
        self.step, self.result, self.stale = saved.get("step"), saved.get("result"), saved.get("stale", 0)
        self.tensors = {k[len("best/"):]: v for k, v in tensors.items() if k.startswith("best/")}

    def update(self, step: int, result: dict[str, float], pair: Pair) -> None:
        if self.result is None or result["kl"] < self.result["kl"]:
            self.step, self.result, self.stale = step, result, 0
            self.tensors = {k: v.to("cpu", copy=True) for k, v in trained_tensors(pair).items()}
        else:
            self.stale += 1

    def record(self) -> dict:
        return {"step": self.step, "result": self.result, "stale": self.stale}


def pair_device(pair: Pair) -> torch.device:
    return next(pair.model.parameters()).device


def _atomic(path: Path, write) -> None:
    """``write(tmp)``, then ``tmp`` renamed to ``path``; on any error or signal the temporary is removed."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with disk_errors(path):
            write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def run_inputs(config: DistillConfig, device: torch.device) -> dict[str, str]:
    """The content a run depends on, as digests: the model's weights and tokenizer (file bytes), the training and
    validation texts (file bytes; a hub text by name and split), and the dtypes it computes in. Read from the files
    before anything loads, so a resume that would not continue the same run is refused first."""
    name = config.model or DEFAULT_MODEL
    weights_dtype, autocast = precision(config, device)
    return {"model weights": model_digest(name, "weights"), "tokenizer": model_digest(name, "tokenizer"),
            "training data": source_digest(config.data), "validation data": source_digest(config.val_data),
            "dtype": f"weights {weights_dtype}, autocast {str(autocast).removeprefix('torch.') if autocast else 'off'}"}


def _check_resumable(record: dict, config: DistillConfig, inputs: dict[str, str], path: Path) -> None:
    """Refuse to resume unless every setting outside RESUME_MAY_CHANGE and every input's content equal the
    checkpoint's; the error lists everything that changed."""
    saved, current = record["config"], config_to_dict(config)
    defaults = config_to_dict(DistillConfig())  # a key newer than the checkpoint had its default then
    settings = [key for key in current if key not in RESUME_MAY_CHANGE and saved.get(key, defaults[key]) != current[key]]
    problems = []
    if settings:
        problems.append(f"{', '.join(f'{k}={shown(current[k])}' for k in settings)} but the checkpoint {path} was made "
                        f"with {', '.join(f'{k}={shown(saved.get(k, defaults[k]))}' for k in settings)}")
    made_from = record.get("inputs")
    if made_from is None:
        log.warning("%s records no input digests (an older attnswap); resuming on the settings alone", path)
    else:
        changed = [f"{what} ({_short_digest(made_from.get(what))} -> {_short_digest(now)})"
                   for what, now in inputs.items() if made_from.get(what) != now]
        if changed:
            problems.append(f"since the checkpoint {path} was made, these inputs changed: {', '.join(changed)}")
    if problems:
        raise AttnswapError(f"--resume: {'; '.join(problems)}; use the same settings and inputs, or another --out")


def _short_digest(value: str | None) -> str:
    if value is None:
        return "unrecorded"
    return value[:12] if len(value) == 64 and all(c in "0123456789abcdef" for c in value) else value


# --- the run ------------------------------------------------------------------------------------
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
    vocabulary = _unwrapped(pair.model).get_input_embeddings().num_embeddings
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
            stopped_by = _agree_to_stop(requested["stop"], timed_out, ranks)
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
        _check_resumable(record, config, inputs, out / CKPT_JSON)
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


def _agree_to_stop(sigterm: bool, timed_out: bool, ranks: Ranks) -> str | None:
    """Why to stop now (a signal on any rank, or rank 0's clock), the same answer on every rank: one collective."""
    votes = ranks.sum(torch.tensor([float(sigterm), float(timed_out and ranks.main)], device=ranks.device)).tolist()
    return "signal" if votes[0] else "max_seconds" if votes[1] else None


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


def average_gradients(params: list[nn.Parameter], ranks: Ranks) -> None:
    """Mean of each gradient over ranks, in one collective (the trainable set is small: no bucketing needed)."""
    if ranks.world == 1 or not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    ranks.sum(flat)
    flat /= ranks.world
    for param, chunk in zip(params, flat.split([p.numel() for p in params])):
        param.grad.copy_(chunk.view_as(param.grad))


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
