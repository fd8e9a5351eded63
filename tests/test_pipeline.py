"""pipeline.py: `attnswap run` chains swap -> distil -> eval -> generate -> bench -> report on a tiny model."""

from __future__ import annotations

import json
import random

import yaml

from attnswap.cli import main


def _text(path, n_docs, seed):
    rng = random.Random(seed)
    docs = [" ".join(f"w{rng.randrange(4, 97)}" for _ in range(120)) for _ in range(n_docs)]
    path.write_text("\n\n".join(docs))
    return str(path)


def test_run_writes_summary_sweeps_and_report(tmp_path, tiny_model_dir):
    train, valid = _text(tmp_path / "train.txt", 20, 0), _text(tmp_path / "valid.txt", 4, 1)
    evaluation = _text(tmp_path / "eval.txt", 3, 2)
    config = {
        "name": "tiny", "model": str(tiny_model_dir), "device": "cpu", "out": str(tmp_path / "run"),
        "variants": ["window:w=4,sinks=1", "window:w=8,sinks=1"], "evaluate_untrained": True,
        "distill": {"layers": [1], "steps": 3, "seq_len": 32, "batch_size": 2, "trainable": "variant+attn", "eval_every": 0,
                    "eval_batches": 1, "ckpt_every": 0, "data": train, "val_data": valid},
        "eval": {"data": evaluation, "max_tokens": 200, "context": 64, "stride": 32, "attn_sample_len": 16,
                 "grad_len": 16, "gen_tokens": 0},
        "generate": {"max_new_tokens": 3, "seeds": [0], "prompts": _text(tmp_path / "prompts.txt", 1, 3)},
        "bench": {"lengths": [32, 64], "modes": ["train"], "repeats": 1, "warmup": 0, "profile_length": 32,
                  "dtype": "float32"},
        "bench_length": 64,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 0
    out = tmp_path / "run"
    summary = json.loads((out / "summary.json").read_text())
    assert [r["label"] for r in summary["rows"]] == ["window4_sinks1", "window8_sinks1"]
    for row in summary["rows"]:
        # The original side is the same untouched model before and after distillation.
        assert row["trained"]["perplexity_original"] == row["untrained"]["perplexity_original"]
        assert "time_vs_sdpa" in row["train_step"]
        # The untrained swap is the one distillation starts from: the variant in layer 1 only.
        untrained = json.loads((out / row["label"] / "eval-untrained" / "eval.json").read_text())
        assert untrained["info"]["config"]["layers"] == [1]
    sweep = json.loads((out / "window_sweep_trained.json").read_text())["rows"]
    assert sorted(r["w"] for r in sweep) == [4, 8]
    assert (out / "summary.md").read_text().count("| window") == 4
    html = (out / "report" / "report.html").read_text()
    assert "Window sweep" in html and "data:image/png;base64," in html
