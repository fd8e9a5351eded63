"""Tiny random models built in memory: no network, no files, seconds on a CPU."""

from __future__ import annotations

import pytest
import torch

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def tiny_gpt2(n_layer: int = 2, n_head: int = 4, n_embd: int = 32, n_positions: int = 128, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=97, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, attn_implementation="sdpa")
    return GPT2LMHeadModel(config).eval()


def tiny_llama(n_layer: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layer,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


MODEL_FACTORIES = {"gpt2": tiny_gpt2, "llama": tiny_llama}


@pytest.fixture(params=sorted(MODEL_FACTORIES))
def tiny_model(request):
    return MODEL_FACTORIES[request.param]()


def random_batch(batch: int = 2, length: int = 19, vocab: int = 97, left_pad: int = 0, seed: int = 0):
    """Token ids and a 2-D attention mask; the first row is left-padded by ``left_pad`` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if left_pad:
        mask[0, :left_pad] = 0
        ids[0, :left_pad] = 0
    return ids, mask


def random_qkv(batch=2, heads=3, q_len=23, kv_len=None, dim=16, dtype=torch.float32, seed=0, requires_grad=False):
    """q (B, H, T, D), k/v (B, H, S, D) of fresh random values."""
    g = torch.Generator().manual_seed(seed)
    kv_len = kv_len or q_len
    make = lambda n: torch.randn(batch, heads, n, dim, generator=g).to(dtype).requires_grad_(requires_grad)  # noqa: E731
    return make(q_len), make(kv_len), make(kv_len)


def left_padded_keys(batch: int, kv_len: int, pads: list[int]) -> torch.Tensor:
    """key_valid (B, S) bool: row b's first pads[b] keys are padding."""
    key_valid = torch.ones(batch, kv_len, dtype=torch.bool)
    for row, pad in enumerate(pads):
        key_valid[row, :pad] = False
    return key_valid


def tiny_tokenizer():
    """A word-level tokenizer over the tiny models' 97 ids (words "w4" ... "w96"), built in memory, no files."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(4, 97)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny GPT-2 and its tokenizer saved to a directory, loadable by name like a real checkpoint."""
    directory = tmp_path / "tiny-gpt2"
    tiny_gpt2().save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def assert_attend_matches_reference(variant, dtype, kv_len: int = 23, q_lens=(23, 1, 4)):
    """The efficient path equals the dense reference on outputs and q/k/v gradients, with a left-padded row,
    for prefill (T = S), decode (T = 1) and a chunk (1 < T < S)."""
    from attnswap.variants import AttnContext

    for q_len in q_lens:
        q, k, v = random_qkv(q_len=q_len, kv_len=kv_len, dtype=dtype, requires_grad=True)
        key_valid = torch.ones(2, kv_len, dtype=torch.bool)
        key_valid[0, :4] = False
        ctx = AttnContext(scaling=0.3, key_valid=key_valid)
        fast, ref = variant.attend(q, k, v, ctx, None), variant.reference(q, k, v, ctx, None)
        torch.testing.assert_close(fast.float(), ref, rtol=0, atol=TOLERANCE[dtype])
        grads_fast = torch.autograd.grad(fast.float().square().sum(), (q, k, v))
        grads_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
        for name, g_fast, g_ref in zip("qkv", grads_fast, grads_ref):
            torch.testing.assert_close(g_fast.float(), g_ref.float(), rtol=0, atol=TOLERANCE[dtype] * 10,
                                       msg=f"d{name}")



@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A 2-layer Llama (4 query / 2 KV heads, 512 positions) over GPT-2's vocabulary, saved with the bundled
    teacher's tokenizer: what the recall suite's text generators need."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from attnswap.hf.models import DEFAULT_MODEL, load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
