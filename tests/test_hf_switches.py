"""A swapped model under transformers' own switches: set_attn_implementation before and after a swap, every mask form
stock SDPA takes, cross-attention left stock, and heads other than the causal LM loaded from a saved swap. The oracle
is the unswapped model itself, on tiny random GPT-2, Llama, Mistral and Qwen2 built in memory."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import attnswap
from attnswap.errors import AttnswapError
from tests.test_dropin import ARCHS, VOCAB, build, custom_4d_mask

TOL = 1e-5  # fp32


def ids_and_padding(batch: int = 2, length: int = 9, pad: int = 3):
    ids = torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_set_attn_implementation_after_a_swap_runs_stock_and_back(arch, implementation):
    """After set_attn_implementation("sdpa"/"eager") a swapped model runs that stock implementation (the swap is
    bypassed, nothing of attnswap reaches transformers' mask code), and switching back restores the variant."""
    model = build(arch)
    ids, mask = ids_and_padding()
    model.set_attn_implementation(implementation)
    stock = model(ids, attention_mask=mask).logits, model(ids).logits
    model.set_attn_implementation("sdpa")
    attnswap.swap(model, "window:w=2,sinks=1")
    windowed = model(ids, attention_mask=mask).logits
    model.set_attn_implementation(implementation)
    assert model.config._attn_implementation == implementation
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, stock[0], atol=TOL, rtol=TOL)
    torch.testing.assert_close(model(ids).logits, stock[1], atol=TOL, rtol=TOL)  # the pre-hook stays out
    model.set_attn_implementation("attnswap")
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, windowed, atol=TOL, rtol=TOL)
    assert not torch.allclose(windowed[1], stock[0][1], atol=1e-3), "the window changes the logits"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_set_attn_implementation_before_a_swap_is_what_unswap_restores(arch):
    model = build(arch)
    model.set_attn_implementation("eager")
    ids, mask = ids_and_padding()
    eager = model(ids, attention_mask=mask).logits
    attnswap.swap(model, "full")
    real = mask.bool()  # a padded query sees no key: eager and SDPA answer it differently, and nothing reads it
    torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], eager[real], atol=TOL, rtol=TOL)
    attnswap.unswap(model)
    assert model.config._attn_implementation == "eager"
    assert torch.equal(model(ids, attention_mask=mask).logits, eager)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_output_attentions_equal_eager_weights(arch):
    """output_attentions=True on a swapped model returns the variant's attention matrix and computes the output from
    it, as eager does."""
    model = build(arch)
    model.set_attn_implementation("eager")
    ids, mask = ids_and_padding()
    stock = model(ids, attention_mask=mask, output_attentions=True).attentions
    attnswap.swap(model, "full", trainable="all")
    ours = model(ids, attention_mask=mask, output_attentions=True).attentions
    assert len(ours) == len(stock) == 2
    real = mask.bool()[:, None, :, None]  # padded queries' rows are undefined in both
    for got, want in zip(ours, stock):
        torch.testing.assert_close(got * real, want * real, atol=TOL, rtol=TOL)
    assert model(ids, attention_mask=mask).attentions is None
    outputs = model(ids, attention_mask=mask, output_attentions=True)
    outputs.attentions[0].retain_grad()
    outputs.logits.sum().backward()
    assert outputs.attentions[0].grad is not None, "the output is computed from the weights returned, as eager"


def float_bias_mask(kind: str, batch: int = 2, length: int = 9) -> torch.Tensor:
    """4-D float masks stock SDPA adds to the scores: 0/min (a mask), 0/min with a finite bias, and 0/1 floats."""
    allowed = custom_4d_mask(torch.bool)
    if kind == "zero_one":  # SDPA adds these too: a bias of 0 and 1, which masks nothing
        return allowed.float()
    additive = custom_4d_mask(torch.float32)
    if kind == "biased":
        bias = torch.randn(allowed.shape, generator=torch.Generator().manual_seed(8))
        additive = torch.where(allowed, bias, additive)
    return additive


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["bool", "additive", "biased", "zero_one"])
def test_full_takes_every_4d_mask_stock_sdpa_takes(arch, kind):
    model = build(arch)
    ids = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = custom_4d_mask(torch.bool) if kind == "bool" else float_bias_mask(kind)
    stock = model(ids, attention_mask=mask, use_cache=False).logits
    attnswap.swap(model, "full")
    torch.testing.assert_close(model(ids, attention_mask=mask, use_cache=False).logits, stock, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("kind", ["bool", "additive", "biased", "zero_one", "2d"])
def test_full_takes_masks_under_compile_fullgraph(kind):
    torch._dynamo.reset()
    model = build("llama")
    ids = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    if kind == "2d":
        mask = ids_and_padding()[1]
    else:
        mask = custom_4d_mask(torch.bool) if kind == "bool" else float_bias_mask(kind)
    stock = model(ids, attention_mask=mask, use_cache=False).logits
    attnswap.swap(model, "full")
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    got = compiled(ids, attention_mask=mask, use_cache=False).logits
    rows = slice(None) if kind != "2d" else (1,)  # a fully padded query row is undefined in both
    torch.testing.assert_close(got[rows], stock[rows], atol=TOL, rtol=TOL)


@pytest.mark.parametrize("kind", ["biased", "zero_one"])
def test_a_masked_variant_refuses_a_score_bias_naming_itself(kind):
    model = build("llama")
    attnswap.swap(model, "window:w=4,sinks=2")
    ids = torch.randint(2, VOCAB, (2, 9))
    with pytest.raises(AttnswapError, match=r"variant 'window:w=4,sinks=2' cannot apply a float 4-D attention mask"):
        model(ids, attention_mask=float_bias_mask(kind), use_cache=False)


def test_a_masked_variant_takes_a_0_min_float_mask_as_the_bool_one():
    model = build("llama")
    attnswap.swap(model, "window:w=4,sinks=2")
    ids = torch.randint(2, VOCAB, (2, 9))
    as_float = model(ids, attention_mask=float_bias_mask("additive"), use_cache=False).logits
    as_bool = model(ids, attention_mask=custom_4d_mask(torch.bool), use_cache=False).logits
    torch.testing.assert_close(as_float, as_bool, atol=TOL, rtol=TOL)


def gpt2_with_cross_attention():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, add_cross_attention=True,
                        bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = GPT2LMHeadModel(config)
    model.set_attn_implementation("sdpa")
    return model.eval()


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_cross_attention_is_left_stock(implementation):
    """GPT-2 with add_cross_attention: swap replaces the self-attention only; the cross-attention runs as the stock
    model runs it, with the encoder's padding."""
    model = gpt2_with_cross_attention()
    model.set_attn_implementation(implementation)
    ids, mask = ids_and_padding()
    encoder = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(9))
    encoder_mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])

    def run(m):
        return m(ids, attention_mask=mask, encoder_hidden_states=encoder, encoder_attention_mask=encoder_mask).logits

    stock = run(model)
    attnswap.swap(model, "full")
    assert all(not m.is_cross_attention for m in attnswap.hf.swap.attention_modules(model))
    real = mask.bool()  # a padded query sees no key: eager and SDPA answer it differently, and nothing reads it
    torch.testing.assert_close(run(model)[real], stock[real], atol=TOL, rtol=TOL)
    assert not hasattr(model.transformer.h[0].crossattention, "attnswap_variant")


def test_an_encoder_decoder_is_refused_in_one_line():
    from transformers import BartConfig, BartForConditionalGeneration

    model = BartForConditionalGeneration(BartConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
                                                    encoder_attention_heads=2, decoder_attention_heads=2,
                                                    encoder_ffn_dim=32, decoder_ffn_dim=32))
    with pytest.raises(AttnswapError, match="BartForConditionalGeneration is an encoder-decoder"):
        attnswap.swap(model, "full")
    assert model.config._attn_implementation != "attnswap"


@pytest.mark.parametrize("head", ["AutoModel", "AutoModelForSequenceClassification",
                                  "AutoModelForTokenClassification"])
def test_a_saved_swap_loads_into_other_heads_swapped(tmp_path, head):
    """A causal LM's saved swap loads into the other heads a user puts on its checkpoint, with the same swap; the
    transformer's hidden states equal the saved model's."""
    import transformers

    model = build("llama")
    attnswap.swap(model, "window:w=4,sinks=2")
    attnswap.save(model, tmp_path)
    loaded = getattr(transformers, head).from_pretrained(tmp_path, num_labels=3) if head != "AutoModel" else \
        transformers.AutoModel.from_pretrained(tmp_path)
    assert attnswap.hf.swap.swapped_variant(loaded).spec == "window:w=4,sinks=2"
    ids = torch.randint(2, VOCAB, (2, 9))
    want = model.model(ids).last_hidden_state
    got = loaded.base_model(ids).last_hidden_state
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)


def test_num_labels_reach_a_saved_classifiers_head(tmp_path):
    """num_labels given to the Auto class reaches the head: a saved 3-label classifier loads as 3 labels, refuses 5
    labels as a size mismatch, and with ignore_mismatched_sizes gets a fresh 5-label head."""
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    from tests.test_dropin import SMALL

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(**SMALL, num_labels=3)).eval()
    attnswap.swap(model, "full")
    model.save_pretrained(tmp_path)
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path).score.out_features == 3
    with pytest.raises(RuntimeError):
        AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=5)
    wider = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=5, ignore_mismatched_sizes=True)
    assert wider.score.out_features == 5 and attnswap.hf.swap.is_swapped(wider)
