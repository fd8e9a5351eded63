"""tests/peer/attnswap_peer_plugin.py: every model built after install() is swapped once, outermost model only. It
patches PreTrainedModel for the whole process, so it runs in a child process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import torch, attnswap_peer_plugin as plugin
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForSequenceClassification
plugin.install()
plugin._state.counts = {"swapped": 0, "refused": 0}
gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32))
llama = LlamaForSequenceClassification(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))
for model in (gpt2, llama):
    assert model.config._attn_implementation == "attnswap", model.config._attn_implementation
    assert len(model.base_model._forward_pre_hooks) == 1, "swapped once, as a whole"
    assert getattr(model.base_model, "attnswap_record", None) is None or model.base_model is model
    assert all(p.requires_grad for p in model.parameters())
assert plugin._state.counts == {"swapped": 2, "refused": 0}, plugin._state.counts
print("ok")
"""


def test_the_plugin_swaps_each_built_model_once():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests" / "peer")]),
           "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
