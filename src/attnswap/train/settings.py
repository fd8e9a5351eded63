"""What a distillation run is told: ``DistillConfig``, every setting with its default and its bounds."""

from __future__ import annotations

from dataclasses import dataclass

from attnswap.data.recall_tasks import TRAINING_MIN_LENGTH
from attnswap.data.tokens import DISTILL_TEXT, WIKITEXT2_VALID
from attnswap.data.wikitext_style import STYLES
from attnswap.train.losses import DEFAULT_CHUNK
from attnswap.variants.base import check

TRAINABLE = ("variant", "variant+mlp", "variant+attn", "variant+lora")

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
    # share of the training blocks that are synthetic recall sequences (copies at a distance, passkeys; data/
    # recall_tasks.py), drawn apart from the recall suite's and the probes': the teacher's retrieval, distilled
    recall_mix: float = 0.0
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
        check(0 <= self.recall_mix < 1, f"recall_mix must be in [0, 1) (a share of the training blocks), got "
                                         f"{self.recall_mix}")
        check(self.recall_mix == 0 or self.seq_len >= TRAINING_MIN_LENGTH,
              f"recall_mix needs seq_len >= {TRAINING_MIN_LENGTH} (a passkey and a distant copy per block), got "
              f"seq_len={self.seq_len}")
        check(self.data_style in STYLES, f"data_style must be one of {', '.join(STYLES)}; got {self.data_style!r}")
        check(self.trainable in TRAINABLE, f"trainable must be one of {', '.join(TRAINABLE)}; got {self.trainable!r}")
        check(self.dtype in ("auto", "float32", "bfloat16"),
              f"dtype must be auto, float32 or bfloat16; got {self.dtype!r}")
        check(self.parallel == "ddp", f"parallel={self.parallel!r} is not implemented yet; use ddp")
        check(self.max_seconds is None or self.max_seconds >= 0,
              f"max_seconds must be >= 0 (or left out for no limit), got max_seconds={self.max_seconds}")
