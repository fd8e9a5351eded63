"""Checks of attnswap/measure/generate.py: identical models generate identical text; the table has every row."""

from __future__ import annotations

import json

import pytest

from attnswap import AttnswapError, load_model, load_tokenizer, original_attention, save, swap
from attnswap.config import load_config
from attnswap.measure.generate import GenerateConfig, generate_side_by_side, generate_text, generation_cases, read_prompts
from tests.conftest import tiny_tokenizer


@pytest.mark.parametrize("mode,seed", [("greedy", None), ("sampled", 7)])
def test_generation_with_full_equals_original(tiny_model, mode, seed):
    model, tokenizer = swap(tiny_model, "full"), tiny_tokenizer()
    swapped = generate_text(model, tokenizer, "w5 w6 w7 w8 w9", mode, seed, max_new_tokens=12)
    with original_attention(model):
        original = generate_text(model, tokenizer, "w5 w6 w7 w8 w9", mode, seed, max_new_tokens=12)
    assert len(original.split()) == 12
    assert swapped == original


def test_side_by_side_table_has_a_row_per_prompt_mode_and_seed(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w5 w6 w7\n\nw10 w11 w12 w13\n")
    config = GenerateConfig(model=str(tiny_model_dir), variant="full;window:w=2", prompts=str(prompts),
                            max_new_tokens=5, seeds=[0, 1], device="cpu", out=str(tmp_path / "gen"))
    rows = generate_side_by_side(config)
    assert [(r["prompt"], r["mode"], r["seed"]) for r in rows] == [
        ("w5 w6 w7", "greedy", None), ("w5 w6 w7", "sampled", 0), ("w5 w6 w7", "sampled", 1),
        ("w10 w11 w12 w13", "greedy", None), ("w10 w11 w12 w13", "sampled", 0), ("w10 w11 w12 w13", "sampled", 1),
    ]
    assert all(list(r["variants"]) == ["full", "window2"] for r in rows)
    assert all(r["variants"]["full"] == r["original"] for r in rows)
    saved = json.loads((tmp_path / "gen" / "generations.json").read_text())
    assert saved["rows"] == rows and saved["info"]["model"] == str(tiny_model_dir)
    markdown = (tmp_path / "gen" / "generations.md").read_text()
    assert "| prompt | mode | seed | original | full | window2 |" in markdown
    assert markdown.count("\n| w") == 6
    assert (tmp_path / "gen" / "generations.html").read_text().count("<tr>") == 7


def test_side_by_side_reads_saved_swapped_models(tiny_model_dir, tmp_path):
    model = swap(load_model(str(tiny_model_dir)), "window:w=2")
    save(model, tmp_path / "win2", tokenizer=load_tokenizer(str(tiny_model_dir)))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w5 w6 w7\n")
    config = GenerateConfig(swapped=str(tmp_path / "win2"), prompts=str(prompts), modes=["greedy"],
                            max_new_tokens=4, device="cpu", out=str(tmp_path / "gen"))
    (row,) = generate_side_by_side(config)
    assert list(row["variants"]) == ["window2 (win2)"]
    with pytest.raises(AttnswapError, match="not both"):
        generate_side_by_side(GenerateConfig(swapped=str(tmp_path / "win2"), variant="window:w=3"))


def test_generate_config_from_command_line_strings():
    config = load_config(GenerateConfig, overrides={"variant": "window:w=64,sinks=4;full", "seeds": "0,3",
                                                    "modes": "greedy"})
    assert config.variant == "window:w=64,sinks=4;full"
    assert config.seeds == [0, 3] and config.modes == ["greedy"]


def test_bad_modes_and_prompt_files_are_refused(tmp_path):
    with pytest.raises(AttnswapError, match="unknown generation mode 'beam'"):
        generation_cases(["w5"], ["beam"], [0])
    with pytest.raises(AttnswapError, match="needs at least one seed"):
        generation_cases(["w5"], ["sampled"], [])
    with pytest.raises(AttnswapError, match=str(tmp_path / "none.txt")):
        read_prompts(tmp_path / "none.txt")


def test_default_prompts_include_the_classics():
    prompts = read_prompts()
    assert len(prompts) == 5 and {"Hello, my name is", "The meaning of life is"} <= set(prompts)
