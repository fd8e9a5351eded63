"""Teacher and student in one model: the swapped model as student and, with its original attention and weights,
as teacher (``original_attention``), so no second copy of the weights exists; the losses it trains on."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attnswap.errors import AttnswapError
from attnswap.hf.attention import STATE_ATTR
from attnswap.hf.models import DEFAULT_MODEL, check_length, load_model, load_tokenizer
from attnswap.hf.swap import attention_modules, observe_attention, original_attention, swap
from attnswap.train.losses import DEFAULT_CHUNK, attention_cross_entropy, chunked_kl
from attnswap.train.settings import DistillConfig
from attnswap.variants import Variant, get_variant
from attnswap.variants.full import Full

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
        return unwrapped(self.model).get_output_embeddings()

    def hidden_states(self, ids: torch.Tensor, compiled: bool = True) -> torch.Tensor:
        """Final hidden states (B, T, D): the model without its LM head, so that no whole logits are made.
        ``compiled``: through the compiled base model where there is one."""
        base = self.compiled if compiled and self.compiled is not None else unwrapped(self.model).base_model
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
        with original_attention(unwrapped(self.model)), lora_off:
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

        with observe_attention(unwrapped(self.model), observer), torch.no_grad(), self.teacher():
            self.hidden_states(ids, compiled=False)  # the observers collect losses as the layers run: eager only
        zero = torch.zeros((), device=ids.device)
        return torch.stack(mse).mean(), torch.stack(ce).mean() if ce else zero

    def train_variant_state(self, training: bool) -> None:
        """Variant state in train mode while learning (Performer redraws count training calls); dropout stays off."""
        for module in attention_modules(self.model):
            state = getattr(module, STATE_ATTR, None)
            if state is not None:
                state.train(training)

def unwrapped(model: nn.Module) -> nn.Module:
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
    compiled = torch.compile(unwrapped(model).base_model) if config.compile else None
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

def pair_device(pair: Pair) -> torch.device:
    return next(pair.model.parameters()).device
