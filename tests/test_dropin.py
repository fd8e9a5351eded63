"""A swapped model is a drop-in: every attention call transformers makes gets the stock answer (``full``) or the
variant's own reference composed with the model's mask (``window``), on tiny random GPT-2, Llama, Mistral and Qwen2."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

import attnswap
from attnswap.errors import AttnswapError
from attnswap.hf.masks import ModelMask, whole_rows_mask
from attnswap.hf.swap import observe_attention

TOL = 1e-5  # fp32
VOCAB = 64
WINDOW = "window:w=4,sinks=2"
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def build(arch: str, sliding_window: int | None = None):
    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                           bos_token_id=0, eos_token_id=1, pad_token_id=1))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SMALL))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**SMALL, sliding_window=sliding_window or 5))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**SMALL, use_sliding_window=sliding_window is not None,
                                             sliding_window=sliding_window, max_window_layers=0))
    model.set_attn_implementation("sdpa")
    return model.eval()


ARCHS = ["gpt2", "llama", "mistral", "qwen2"]


def swapped_and_stock(model, spec: str, fn):
    """fn(model) with the variant swapped in, then with the stock sdpa model."""
    attnswap.swap(model, spec)
    try:
        ours = fn(model)
    finally:
        attnswap.unswap(model)
    return ours, fn(model)


@pytest.fixture
def attend_matches_reference():
    """An observer that checks, at every attention call, that the efficient path equals the dense reference."""
    calls = []

    def check(module, variant, q, k, v, ctx, state):
        got = variant.attend(q, k, v, ctx, state).float()
        want = variant.reference(q, k, v, ctx, state)
        torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
        calls.append(ctx)

    return check, calls


def packed_inputs():
    lengths = (7, 5, 6)
    ids = torch.randint(2, VOCAB, (1, sum(lengths)), generator=torch.Generator().manual_seed(1))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    return ids, position_ids, lengths


def assert_each_document_alone(model, packed_logits, ids, lengths):
    start = 0
    for n in lengths:
        alone = model(ids[:, start:start + n], use_cache=False).logits
        torch.testing.assert_close(packed_logits[:, start:start + n], alone, atol=TOL, rtol=TOL)
        start += n


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", ["full", WINDOW, "longformer:w=4,global_tokens=1"])
def test_packed_sequences_equal_each_sequence_alone(arch, spec):
    model = build(arch)
    ids, position_ids, lengths = packed_inputs()
    attnswap.swap(model, spec)
    assert_each_document_alone(model, model(ids, position_ids=position_ids, use_cache=False).logits, ids, lengths)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
@pytest.mark.parametrize("spec", ["full", WINDOW, "hedgehog"])
def test_packed_sequences_under_a_config_window_that_does_not_bind(arch, spec):
    """A config window wider than the row: the model's mask is still more than causal, it holds the documents. (It
    was once taken for plain causal attention, and every variant attended across documents.)"""
    model = build(arch, sliding_window=32)
    ids, position_ids, lengths = packed_inputs()
    attnswap.swap(model, spec)
    assert_each_document_alone(model, model(ids, position_ids=position_ids, use_cache=False).logits, ids, lengths)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("spec", ["hedgehog", "hybrid:w=3,sinks=2", "hybrid:w=2,sinks=1,wide_w=6,wide_layers=1"])
def test_linear_variants_take_packed_rows_as_documents(arch, spec, attend_matches_reference):
    """Hedgehog and the hybrid take packed rows as documents (the model's mask says no more than them): each
    document alone, and the efficient path equals the dense reference at every call. The learned maps and balance
    are moved off their start, so that the hybrid's far part weighs in (its delayed keys cross documents)."""
    model = build(arch)
    ids, position_ids, lengths = packed_inputs()
    attnswap.swap(model, spec)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".attnswap." in name:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    check, calls = attend_matches_reference
    with observe_attention(model, check):
        packed = model(ids, position_ids=position_ids, use_cache=False).logits
    assert calls and all(ctx.documents is not None and ctx.documents.tolist() == [[0] * 7 + [1] * 5 + [2] * 6]
                         for ctx in calls)
    assert_each_document_alone(model, packed, ids, lengths)


def test_hedgehog_refuses_packed_rows_it_cannot_take_as_documents():
    """A config window that binds within a document, or positions that do not restart at 0: the model's mask says
    more than documents, so it is refused rather than read as them."""
    ids, position_ids, _ = packed_inputs()
    model = build("mistral", sliding_window=5)  # binds within the 7-token document
    attnswap.swap(model, "hedgehog")
    with pytest.raises(AttnswapError, match="cannot apply this model's own mask"):
        model(ids, position_ids=position_ids, use_cache=False)
    model = build("llama")
    attnswap.swap(model, "hedgehog")
    with pytest.raises(AttnswapError, match="cannot apply this model's own mask"):
        model(ids, position_ids=position_ids + 3, use_cache=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_full_packed_equals_stock_sdpa(arch):
    model = build(arch)
    ids, position_ids, _ = packed_inputs()
    ours, stock = swapped_and_stock(model, "full", lambda m: m(ids, position_ids=position_ids, use_cache=False).logits)
    torch.testing.assert_close(ours, stock, atol=TOL, rtol=TOL)


def padded_prompt():
    ids = torch.randint(2, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return ids.masked_fill(mask == 0, 1), mask


def greedy(model, cache_implementation: str | None):
    ids, mask = padded_prompt()
    return model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=1,
                          cache_implementation=cache_implementation)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_with_static_cache_equals_dynamic_cache_and_sdpa(arch):
    model = build(arch)
    stock = greedy(model, None)
    attnswap.swap(model, "full")
    assert torch.equal(greedy(model, "static"), stock)
    assert torch.equal(greedy(model, "dynamic"), stock)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_window_static_cache_scores_equal_dynamic_cache(arch, attend_matches_reference):
    model = build(arch)
    attnswap.swap(model, WINDOW)
    ids, mask = padded_prompt()
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=1, output_scores=True,
                  return_dict_in_generate=True)
    check, calls = attend_matches_reference
    with observe_attention(model, check):
        static = model.generate(ids, cache_implementation="static", **kwargs)
    dynamic = model.generate(ids, **kwargs)
    assert any(ctx.q_positions is not None for ctx in calls)  # the static cache's queries were placed by offset
    assert torch.equal(static.sequences, dynamic.sequences)
    for a, b in zip(static.scores, dynamic.scores):
        torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)


def custom_4d_mask(dtype):
    """A block-causal mask (two documents of 4 and 5 tokens), as a caller would build it."""
    doc = torch.tensor([0] * 4 + [1] * 5)
    allowed = (doc[:, None] == doc[None, :]) & torch.ones(9, 9, dtype=torch.bool).tril()
    allowed = allowed[None, None].expand(2, 1, 9, 9)
    if dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32], ids=["bool", "float"])
def test_full_with_a_4d_mask_equals_sdpa(arch, dtype):
    model = build(arch)
    ids = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = custom_4d_mask(dtype)
    ours, stock = swapped_and_stock(model, "full", lambda m: m(ids, attention_mask=mask, use_cache=False).logits)
    torch.testing.assert_close(ours, stock, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_window_with_a_4d_mask_equals_its_reference(arch, attend_matches_reference):
    model = build(arch)
    attnswap.swap(model, WINDOW)
    ids = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    check, calls = attend_matches_reference
    with observe_attention(model, check):
        model(ids, attention_mask=custom_4d_mask(torch.bool), use_cache=False)
    assert calls and all(ctx.model_mask is not None for ctx in calls)


def test_a_float_4d_mask_with_a_bias_is_refused_for_a_masked_variant():
    model = build("llama")
    attnswap.swap(model, WINDOW)
    ids = torch.randint(2, VOCAB, (2, 9))
    with pytest.raises(AttnswapError, match="boolean 4-D mask"):
        model(ids, attention_mask=custom_4d_mask(torch.float32) + 0.5, use_cache=False)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_a_model_with_sliding_window_equals_sdpa(arch):
    model = build(arch, sliding_window=5)
    ids, mask = padded_prompt()
    ids = torch.cat([ids, ids], dim=1)
    mask = torch.cat([mask, torch.ones_like(mask)], dim=1)
    ours, stock = swapped_and_stock(model, "full", lambda m: m(ids, attention_mask=mask).logits)
    torch.testing.assert_close(ours[:, 2:], stock[:, 2:], atol=TOL, rtol=TOL)
    ours, stock = swapped_and_stock(model, "full", lambda m: greedy(m, "dynamic"))
    assert torch.equal(ours, stock)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_window_under_the_models_sliding_window_equals_its_reference(arch, attend_matches_reference):
    model = build(arch, sliding_window=5)
    attnswap.swap(model, "window:w=8,sinks=2")  # the model's window of 5 binds inside ours
    ids = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    check, calls = attend_matches_reference
    with observe_attention(model, check):
        model(ids)
    assert calls and all(ctx.model_mask is not None for ctx in calls)


def test_window_packed_equals_its_reference(attend_matches_reference):
    model = build("llama")
    attnswap.swap(model, WINDOW)
    ids, position_ids, _ = packed_inputs()
    check, calls = attend_matches_reference
    with observe_attention(model, check):
        model(ids, position_ids=position_ids, use_cache=False)
    assert calls and all(ctx.q_positions is not None and ctx.q_positions.dim() == 2 for ctx in calls)


@pytest.mark.parametrize("spec", ["performer:m=16", "nsa:block=4,top_k=2,window=4"])
def test_variants_that_cannot_honour_a_mask_refuse_it(spec):
    model = build("llama")
    attnswap.swap(model, spec)
    ids, position_ids, _ = packed_inputs()
    with pytest.raises(AttnswapError, match="cannot apply this model's own mask"):
        model(ids, position_ids=position_ids, use_cache=False)
    with pytest.raises(AttnswapError, match="StaticCache"):
        greedy(model, "static")


@pytest.mark.parametrize("spec", ["full", WINDOW])
def test_compiled_fullgraph_forward_equals_eager(spec):
    model = build("llama")
    attnswap.swap(model, spec)
    ids, mask = padded_prompt()
    eager = model(ids, attention_mask=mask).logits
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(ids, attention_mask=mask).logits, eager, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_whole_rows_mask_equals_no_mask_eager_and_compiled(arch):
    """distill hands the model a prepared mask saying its rows are whole: the same logits as no mask and as a mask of
    ones, compiled with fullgraph too; refused (None) where the config's sliding window binds within the rows."""
    model = build(arch, sliding_window=8)
    attnswap.swap(model, WINDOW)
    ids = torch.randint(2, VOCAB, (2, 8), generator=torch.Generator().manual_seed(5))
    mask = whole_rows_mask(model.config, ids)
    assert isinstance(mask, ModelMask) and mask.function is None and mask.padding is None
    windowed = arch in ("mistral", "qwen2")
    assert (whole_rows_mask(model.config, torch.cat([ids, ids], dim=1)) is None) == windowed
    want = model(ids).logits
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, want, atol=TOL, rtol=TOL)
    torch.testing.assert_close(model(ids, attention_mask=torch.ones_like(ids)).logits, want, atol=TOL, rtol=TOL)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(ids, attention_mask=mask).logits, want, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("spec", ["full", WINDOW, "hedgehog", "hybrid:w=4,sinks=1"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_compiled_call_with_tokens_alone_equals_eager(arch, spec):
    """model(ids, use_cache=False) under torch.compile(fullgraph=True): traced, transformers cannot rule out packed rows
    and composes a packing mask, which Hedgehog and the hybrid refused; the swap now says the rows are whole."""
    torch._dynamo.reset()  # each case compiles a new model through the same code objects: keep under the limit
    model = build(arch)
    ids = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(6))
    stock = model(ids, use_cache=False).logits
    attnswap.swap(model, spec)
    eager = model(ids, use_cache=False).logits
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(ids, use_cache=False).logits, eager, atol=TOL, rtol=TOL)
    if spec == "full":
        torch.testing.assert_close(eager, stock, atol=TOL, rtol=TOL)
    attnswap.unswap(model)
    assert not model.base_model._forward_pre_hooks, "unswap removes the hook"


def test_mixture_refuses_packed_sequences():
    model = build("llama")
    attnswap.swap(model, "mixture:candidates=win4+sink2")
    ids, position_ids, _ = packed_inputs()
    with pytest.raises(AttnswapError, match="cannot apply this model's own mask"):
        model(ids, position_ids=position_ids, use_cache=False)


@pytest.mark.parametrize("case", ["packed", "sliding_window", "4d_mask", "static_cache"])
def test_window_flex_kernel_under_the_models_mask_equals_its_reference(case):
    """The block-sparse path (what CUDA runs) evaluates transformers' mask functions inside FlexAttention; here
    uncompiled flex on CPU, with the block mask built as on the GPU."""
    from attnswap.kernels import flex

    model = build("mistral" if case == "sliding_window" else "llama", sliding_window=5)
    attnswap.swap(model, WINDOW)
    checked = []

    def check(module, variant, q, k, v, ctx, state):
        index_mask, _, _ = variant.index_mask(q, k, ctx, state)
        block_mask = flex.build_block_mask(index_mask, q.shape[0], q.shape[1], q.shape[-2], k.shape[-2], "cpu",
                                           block_size=4)
        with torch.no_grad():
            out = flex.flex_masked_attention(q, k, v, block_mask, ctx.scaling, backend=None)
        torch.testing.assert_close(out.float(), variant.reference(q, k, v, ctx, state), atol=TOL, rtol=TOL)
        checked.append(ctx)

    ids = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    with observe_attention(model, check), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the uncompiled path's "materializes the full scores" notice
        if case == "packed":
            model(*packed_inputs()[:1], position_ids=packed_inputs()[1], use_cache=False)
        elif case == "sliding_window":
            model(ids)
        elif case == "4d_mask":
            model(ids, attention_mask=custom_4d_mask(torch.bool), use_cache=False)
        else:
            greedy(model, "static")
    assert checked and (case == "static_cache" or all(ctx.model_mask is not None for ctx in checked))


def test_packed_documents_are_read_only_from_a_mask_that_says_exactly_them():
    from attnswap.hf.masks import packed_documents

    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]])

    def within_documents(b, h, q, kv):
        return (kv <= q) & (doc[b, q] == doc[b, kv])

    assert packed_documents(within_documents, positions).tolist() == doc.tolist()
    assert packed_documents(lambda b, h, q, kv: kv <= q, positions) is None, "attends across documents"
    windowed = lambda b, h, q, kv: within_documents(b, h, q, kv) & (q - kv < 3)  # noqa: E731
    assert packed_documents(windowed, positions) is None, "a window that binds in the last document"
    ahead = lambda b, h, q, kv: (doc[b, q] == doc[b, kv]) & (kv <= q + 1)  # noqa: E731
    assert packed_documents(ahead, positions) is None, "sees the next token"
    assert packed_documents(within_documents, positions + 1) is None, "positions that do not start at 0"
