"""attnswap: swap the attention of a pretrained causal LM for an efficient variant, distil it, measure it."""

from attnswap.errors import AttnswapError
from attnswap.hf.models import DEFAULT_MODEL, load_model, load_tokenizer
from attnswap.hf.saved import load, save
from attnswap.hf.swap import original_attention, swap, unswap
from attnswap.variants import VARIANTS, get_variant

__all__ = [
    "AttnswapError", "DEFAULT_MODEL", "VARIANTS", "get_variant", "load", "load_model", "load_tokenizer",
    "original_attention", "save", "swap", "unswap",
]
__version__ = "0.1.0"
