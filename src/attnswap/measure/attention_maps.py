"""Attention maps: the probabilities of the original and the swapped model over one text, for the report."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from attnswap.hf.swap import observe_attention, swapped_variant
from attnswap.measure.generate import load_swapped
from attnswap.variants.full import Full


def compute_attention_maps(text: str, model: str = "", variant: str = "", swapped: str = "",
                           device: str = "cpu") -> dict[str, Any]:
    """Attention probabilities (layers, heads, T, S) of the original and the swapped model for ``text``: the
    ``model`` swapped to ``variant``, or the saved swap ``swapped``; arrays the report draws."""
    loaded, tokenizer, _ = load_swapped(model, variant, swapped, device, "float32")
    ids = tokenizer(text, return_tensors="pt").input_ids.to(loaded.device)  # (1, T)
    original_probs, swapped_probs, full = [], [], Full()

    def observer(module, layer_variant, q, k, v, ctx, state):
        original_probs.append(full.probs(q, k, ctx, None)[0].cpu())  # (H, T, S)
        swapped_probs.append(layer_variant.probs(q, k, ctx, state)[0].detach().cpu())

    with torch.no_grad(), observe_attention(loaded, observer):
        loaded(input_ids=ids)
    return {"original": torch.stack(original_probs).numpy(), "variant": torch.stack(swapped_probs).numpy(),
            "tokens": np.array([t.replace("Ġ", "·") for t in tokenizer.convert_ids_to_tokens(ids[0])]),
            "variant_label": np.array(swapped_variant(loaded).label)}
