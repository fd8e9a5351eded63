"""attnswap: swap the attention of a pretrained causal LM for an efficient variant, distil it, measure it."""

from attnswap.errors import AttnswapError
from attnswap.models import DEFAULT_MODEL, load_model, load_tokenizer
from attnswap.surgery import load, original_attention, save, swap, unswap
from attnswap import hf_integration  # noqa: F401  (registers model_type attnswap with AutoModelForCausalLM)
from attnswap.variants import VARIANTS, get_variant

__all__ = [
    "AttnswapError", "DEFAULT_MODEL", "VARIANTS", "get_variant", "load", "load_model", "load_tokenizer",
    "original_attention", "save", "swap", "unswap",
]
__version__ = "0.1.0"
