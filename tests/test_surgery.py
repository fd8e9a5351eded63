"""Swap, unswap, save and load on tiny GPT-2 and Llama models built in memory."""

from __future__ import annotations

import pytest
import torch

import attnswap
from attnswap.errors import AttnswapError
from attnswap.hf.swap import attention_modules, original_attention, variant_state_dict
from attnswap.variants import VARIANTS
from tests.conftest import random_batch, tiny_gpt2

LOGIT_TOL = 1e-5


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def _max_diff_on_real_tokens(a, b, mask):
    return (a - b)[mask.bool()].abs().max().item()


@pytest.mark.parametrize("left_pad", [0, 6], ids=["no_padding", "left_padding"])
def test_full_reproduces_original_logits(tiny_model, left_pad):
    ids, mask = random_batch(left_pad=left_pad)
    original = _logits(tiny_model, ids, mask)
    attnswap.swap(tiny_model, "full")
    assert _max_diff_on_real_tokens(_logits(tiny_model, ids, mask), original, mask) <= LOGIT_TOL


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv_cache", "no_cache"])
def test_full_reproduces_original_generation(tiny_model, use_cache):
    ids, mask = random_batch(batch=2, length=7, left_pad=3)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=use_cache,
                  output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    original = tiny_model.generate(ids, **kwargs)
    attnswap.swap(tiny_model, "full")
    swapped = tiny_model.generate(ids, **kwargs)
    assert torch.equal(original.sequences, swapped.sequences)
    for step_original, step_swapped in zip(original.scores, swapped.scores):
        assert (step_original - step_swapped).abs().max().item() <= LOGIT_TOL


# Parameters that make each masked variant see every causal key of a sequence of <= 32 tokens.
FULL_EQUIVALENT = ["window:w=64", "window:w=32,sinks=4", "window:w=1,sinks=40"]


@pytest.mark.parametrize("spec", FULL_EQUIVALENT)
def test_masked_variant_covering_everything_equals_full(tiny_model, spec):
    ids, mask = random_batch(length=32, left_pad=5)
    original = _logits(tiny_model, ids, mask)
    attnswap.swap(tiny_model, spec)
    assert _max_diff_on_real_tokens(_logits(tiny_model, ids, mask), original, mask) <= LOGIT_TOL


def test_unswap_restores_bit_identical_logits(tiny_model):
    ids, mask = random_batch(left_pad=4)
    original = _logits(tiny_model, ids, mask)
    attnswap.swap(tiny_model, "window:w=3,sinks=1")
    assert not torch.equal(_logits(tiny_model, ids, mask), original)
    attnswap.unswap(tiny_model)
    assert torch.equal(_logits(tiny_model, ids, mask), original)
    assert tiny_model.config._attn_implementation == "sdpa"
    assert not hasattr(tiny_model.config, "attnswap")


def test_original_attention_runs_the_teacher_with_the_same_weights(tiny_model):
    ids, mask = random_batch(left_pad=4)
    original = _logits(tiny_model, ids, mask)
    n_params = sum(p.numel() for p in tiny_model.parameters())
    attnswap.swap(tiny_model, "window:w=2")
    with original_attention(tiny_model):
        teacher = _logits(tiny_model, ids, mask)
    assert _max_diff_on_real_tokens(teacher, original, mask) <= LOGIT_TOL
    assert sum(p.numel() for p in tiny_model.parameters()) == n_params  # no second copy
    assert not torch.allclose(_logits(tiny_model, ids, mask), original)


def test_save_load_round_trip_is_bit_identical(tmp_path, tiny_model):
    ids, mask = random_batch(left_pad=2)
    attnswap.swap(tiny_model, "window:w=5,sinks=2", layers=[1])
    before = _logits(tiny_model, ids, mask)
    attnswap.save(tiny_model, tmp_path / "m")
    loaded = attnswap.load(tmp_path / "m")
    assert loaded.config.attnswap == {"variant": "window:w=5,sinks=2", "layers": [1],
                                      "original_attn_implementation": "sdpa"}
    assert torch.equal(_logits(loaded, ids, mask), before)


def test_only_variant_parameters_are_trainable_after_swap():
    model = tiny_gpt2()
    attnswap.swap(model, "window:w=4")
    assert not any(p.requires_grad for p in model.parameters())  # window learns nothing
    attnswap.swap(model, "window:w=4", trainable="all")
    assert all(p.requires_grad for p in model.parameters())
    attnswap.unswap(model)
    assert all(p.requires_grad for p in model.parameters())


def test_swap_of_a_layer_subset_leaves_other_layers_original():
    model = tiny_gpt2(n_layer=3)
    attnswap.swap(model, "window:w=2", layers=[0, 2])
    swapped = [getattr(m, "attnswap_variant", None) is not None for m in attention_modules(model)]
    assert swapped == [True, False, True]
    assert variant_state_dict(model) == {}


@pytest.mark.parametrize("spec, message", [
    ("slidng_window:w=4", "unknown variant 'slidng_window'"),
    ("window:w=0", "w must be >= 1"),
    ("window:w=-3", "w must be >= 1"),
    ("window:size=4", "has no parameter 'size'"),
    ("window:w=four", "not a valid int"),
    ("window:w", "expected key=value"),
])
def test_bad_specs_are_refused_with_one_clear_line(spec, message):
    with pytest.raises(AttnswapError, match=message):
        attnswap.swap(tiny_gpt2(), spec)


def test_layer_index_out_of_range_is_refused():
    with pytest.raises(AttnswapError, match="layer index 5 out of range"):
        attnswap.swap(tiny_gpt2(n_layer=2), "window:w=4", layers=[0, 5])


def test_load_refuses_a_corrupt_variant_checkpoint(tmp_path):
    from torch import nn

    from attnswap.variants.window import Window

    class LearnedWindow(Window):  # a window with one learnable tensor, to exercise the state file
        name = "learned_window_test"

        def make_state(self, num_heads, head_dim):
            state = nn.Module()
            state.gain = nn.Parameter(torch.ones(num_heads))
            return state

    attnswap.variants.register(LearnedWindow)
    try:
        model = attnswap.swap(tiny_gpt2(), LearnedWindow())
        assert [n for n, p in model.named_parameters() if p.requires_grad] == [
            "transformer.h.0.attn.attnswap.gain", "transformer.h.1.attn.attnswap.gain"]
        attnswap.save(model, tmp_path / "m")
        (tmp_path / "m" / "attnswap.safetensors").write_bytes(b"not a safetensors file")
        with pytest.raises(AttnswapError, match="corrupt checkpoint"):
            attnswap.load(tmp_path / "m")
    finally:
        attnswap.variants.VARIANTS.pop(LearnedWindow.name)


def test_original_attention_restores_distilled_base_weights(tiny_model):
    """After distillation trained base weights, original_attention must still run the untouched original."""
    from tests.conftest import MODEL_FACTORIES

    ids, mask = random_batch(left_pad=3)
    original_logits = _logits(tiny_model, ids, mask)
    attnswap.swap(tiny_model, "window:w=3", trainable="all")
    with torch.no_grad():
        for param in tiny_model.parameters():
            param.add_(0.01)  # stands in for distillation moving MLP / projection weights
    pristine = MODEL_FACTORIES[tiny_model.config.model_type if tiny_model.config.model_type in MODEL_FACTORIES
                               else "llama"]()
    changed = attnswap.hf.swap.keep_original_weights(tiny_model, pristine)
    assert changed
    with original_attention(tiny_model):
        assert _max_diff_on_real_tokens(_logits(tiny_model, ids, mask), original_logits, mask) <= LOGIT_TOL
    assert not torch.allclose(_logits(tiny_model, ids, mask)[mask.bool()], original_logits[mask.bool()])


# Every registered variant with parameters small enough for the tiny models (n_embd 32, 4 heads of 8).
CAUSAL_SPECS = ["full", "window:w=5,sinks=2", "longformer:w=5,global_tokens=2,global_stride=16", "mixture",
                "performer:m=16,chunk=8", "hedgehog:chunk=8", "duo:w=5,sinks=2", "hybrid:w=5,sinks=2,chunk=8"]


def test_every_variant_registered_is_covered_by_the_causality_test():
    assert {spec.partition(":")[0] for spec in CAUSAL_SPECS} | {"nsa"} == set(VARIANTS)


@pytest.mark.parametrize("spec", CAUSAL_SPECS)
def test_later_tokens_never_change_earlier_predictions(tiny_model, spec):
    """A causal LM's prediction at position t must not depend on tokens after t. (NSA is exempt: it selects
    blocks per query block, so it is causal at block granularity only, tested in test_nsa.py.)"""
    attnswap.swap(tiny_model, spec)
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = tiny_model(ids).logits[:, :20]
        prefix = tiny_model(ids[:, :20]).logits
    torch.testing.assert_close(whole, prefix, rtol=0, atol=1e-4)
