"""A folder written by attnswap loads with its variant through plain transformers in a fresh process, or fails loudly."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, pipeline

import attnswap

SPEC = "window:w=4,sinks=1"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    # GPT-2's vocabulary, so that the bundled tokenizer can drive it through pipeline().
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(1))
    stock = model(ids).logits
    attnswap.swap(model, SPEC)
    directory = attnswap.save(model, tmp_path_factory.mktemp("saved") / "model")
    return directory, ids, stock, attnswap.load(directory)(ids).logits


def fresh_process(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1] if len(sys.argv) > 1 else {dir!r}{kwargs})
torch.save(model(torch.load({ids!r})).logits, {out!r})
"""


def test_plain_from_pretrained_in_a_fresh_process_is_refused_or_runs_the_variant(saved, tmp_path):
    directory, ids, stock, swapped = saved
    assert not torch.allclose(swapped, stock, atol=1e-3)  # the variant changes this model's output
    torch.save(ids, tmp_path / "ids.pt")
    out = tmp_path / "logits.pt"
    plain = fresh_process(LOAD.format(dir=str(directory), kwargs="", ids=str(tmp_path / "ids.pt"), out=str(out)))
    assert plain.returncode != 0 and "trust_remote_code" in plain.stderr  # refused: never full attention
    remote = fresh_process(LOAD.format(dir=str(directory), kwargs=", trust_remote_code=True",
                                       ids=str(tmp_path / "ids.pt"), out=str(out)))
    assert remote.returncode == 0, remote.stderr[-2000:]
    torch.testing.assert_close(torch.load(out), swapped, atol=1e-6, rtol=1e-6)


def test_from_pretrained_after_import_attnswap_runs_the_variant(saved):
    directory, ids, _, swapped = saved
    model = AutoModelForCausalLM.from_pretrained(directory)
    assert attnswap.hf.swap.swapped_variant(model).spec == attnswap.get_variant(SPEC).spec
    torch.testing.assert_close(model(ids).logits, swapped, atol=1e-6, rtol=1e-6)


def test_save_pretrained_of_a_swapped_model_round_trips(saved, tmp_path):
    directory, ids, _, swapped = saved
    attnswap.load(directory).save_pretrained(tmp_path / "again")
    torch.testing.assert_close(attnswap.load(tmp_path / "again")(ids).logits, swapped, atol=1e-6, rtol=1e-6)


def test_a_layer_saved_with_a_variant_never_runs_full_attention(saved):
    directory, ids, _, _ = saved
    model = attnswap.load(directory)
    del model.transformer.h[0].attn.attnswap_variant  # as if loaded some way that could not apply the variant
    with pytest.raises(attnswap.AttnswapError, match="carries none"):
        model(ids)


def test_pipeline_runs_the_variant(saved):
    directory, *_ = saved
    generator = pipeline("text-generation", model=str(directory), tokenizer=attnswap.DEFAULT_MODEL)
    assert attnswap.hf.swap.swapped_variant(generator.model).spec == attnswap.get_variant(SPEC).spec
    assert generator("Hello world", max_new_tokens=3, do_sample=False)[0]["generated_text"].startswith("Hello world")


EVERY_WAY = """
import json, sys, torch
directory, ids_file, concrete_name = sys.argv[1:4]
ids, outcome = torch.load(ids_file), {}
import transformers
concrete = getattr(transformers, concrete_name)
try:  # before attnswap is imported: transformers itself must refuse the folder
    concrete.from_pretrained(directory)(ids)
    outcome["concrete_without_import"] = "ran"
except Exception as exc:
    outcome["concrete_without_import"] = str(exc).splitlines()[0]
import attnswap
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
logits = {"load": attnswap.load(directory)(ids).logits,
          "auto": AutoModelForCausalLM.from_pretrained(directory)(ids).logits}
model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
logits["auto_with_info"] = model(ids).logits
outcome["missing"] = sorted(info["missing_keys"])
outcome["bf16"] = str(AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).dtype)
heads = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=3)
outcome["classifier"] = [type(heads).__name__, heads.config.num_labels, attnswap.hf.swap.is_swapped(heads)]
try:
    concrete.from_pretrained(directory)(ids)
    outcome["concrete_with_import"] = "ran"
except Exception as exc:
    outcome["concrete_with_import"] = str(exc).splitlines()[0]
torch.save(logits, ids_file + ".logits")
print(json.dumps(outcome))
"""


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_every_way_of_loading_a_saved_swap_in_a_fresh_process_equals_it_or_fails_loudly(family, tmp_path):
    import json

    from tests.conftest import MODEL_FACTORIES

    model = attnswap.swap(MODEL_FACTORIES[family](), SPEC)
    ids = torch.randint(3, 97, (2, 24), generator=torch.Generator().manual_seed(2))
    expected = model(ids).logits
    stock = attnswap.unswap(MODEL_FACTORIES[family]())(ids).logits
    assert not torch.allclose(expected, stock, atol=1e-4)  # so "equals the saved model" means "runs the variant"
    directory = attnswap.save(model, tmp_path / "model")
    torch.save(ids, tmp_path / "ids.pt")
    concrete = type(model).__name__
    run = subprocess.run([sys.executable, "-c", EVERY_WAY, str(directory), str(tmp_path / "ids.pt"), concrete],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    outcome = json.loads(run.stdout.strip().splitlines()[-1])
    for way, logits in torch.load(str(tmp_path / "ids.pt") + ".logits").items():
        torch.testing.assert_close(logits, expected, atol=1e-6, rtol=1e-6, msg=f"{way} differs from the saved model")
    assert "attn_implementation=\"attnswap\"" in outcome["concrete_without_import"]  # refused by transformers
    assert "load the folder with attnswap.load" in outcome["concrete_with_import"]  # refused by attnswap, one line
    assert outcome["missing"] == [] and outcome["bf16"] == "torch.bfloat16"
    assert outcome["classifier"] == [concrete.replace("LMHeadModel", "ForSequenceClassification").replace(
        "ForCausalLM", "ForSequenceClassification"), 3, True]
