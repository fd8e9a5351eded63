"""Hostile and damaged inputs through the CLI: each is refused with exit code 2, at most 3 lines on stderr (the
log lines a command printed before it noticed included) and no traceback, and names what is wrong.

The CLI runs in-process (``attnswap.cli.main``) with the root logger writing to the captured stderr, as the real
command's ``logging.basicConfig`` does; two cases cross the process boundary to check that the two agree.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from attnswap.surgery import save, swap
from tests.cli_helpers import (ROOT, assert_refused, cli_command, distill_args, make_assets, run_cli,
                               subprocess_env)
from tests.conftest import tiny_gpt2, tiny_tokenizer


@pytest.fixture(scope="module")
def a(tmp_path_factory) -> SimpleNamespace:
    return make_assets(tmp_path_factory.mktemp("bad-inputs"))


def damaged(a: SimpleNamespace, name: str, damage, source: str | None = None) -> str:
    """A copy of the saved swapped model (or of ``source``) with ``damage(folder)`` applied."""
    folder = a.root / f"damaged-{name}"
    if not folder.exists():
        shutil.copytree(source or a.swapped, folder)
        damage(folder)
    return str(folder)


def with_variant_state(a: SimpleNamespace) -> str:
    """A saved mixture: a variant whose learned tensors live in attnswap.safetensors."""
    folder = a.root / "swapped-mixture"
    if not folder.exists():
        save(swap(tiny_gpt2(n_positions=64), "mixture"), folder, tiny_tokenizer())
    return str(folder)


def report_folder(a: SimpleNamespace, name: str, files: dict[str, bytes]) -> str:
    """A run folder holding ``files`` (relative path -> bytes), for report."""
    for relative, data in files.items():
        (a.root / name / relative).parent.mkdir(parents=True, exist_ok=True)
        (a.root / name / relative).write_bytes(data)
    return str(a.root / name)


def truncate(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def misshape(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    name = next(k for k in tensors if k.endswith("c_attn.weight"))
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def half_saved(folder: Path) -> None:
    """What a kill during a non-atomic save used to leave: weights and tokenizer, no config."""
    (folder / "config.json").unlink()


def eval_args(a, *args: str) -> list[str]:
    return ["eval", "--model", a.model, "--data", a.valid, "--gen-tokens", "0", "--edge-cases", "false",
            "--out", str(a.root / "eval-out"), "--device", "cpu", *args]


def generate_args(a, *args: str) -> list[str]:
    return ["generate", "--model", a.model, "--prompts", a.prompts, "--max-new-tokens", "2",
            "--out", str(a.root / "generate-out"), "--device", "cpu", *args]


# (id, arguments from the assets, a piece of the expected error line)
CASES = [
    # the command line and config files
    ("unknown_command", lambda a: ["frobnicate"], "unknown command 'frobnicate'"),
    ("unknown_key", lambda a: eval_args(a, "--frob", "1"), "unknown config key 'frob'"),
    ("wrong_type", lambda a: eval_args(a, "--stride", "abc"), "'stride' = 'abc' has the wrong type"),
    ("option_without_value", lambda a: ["eval", "--stride"], "option --stride needs a value"),
    ("unreadable_override", lambda a: eval_args(a, "--stride", "[1"), "'stride' = '[1' cannot be read"),
    ("stray_argument", lambda a: ["eval", "stray"], "unexpected argument 'stray'"),
    ("config_missing", lambda a: ["eval", "--config", str(a.root / "nope.yaml")], "config file not found"),
    ("config_not_yaml", lambda a: ["distill", "--config", str(a.root / "config_bad.yaml")], "is not valid YAML"),
    ("config_not_mapping", lambda a: ["distill", "--config", str(a.root / "config_list.yaml")], "must hold a mapping"),
    ("config_not_utf8", lambda a: ["distill", "--config", str(a.root / "config_not_utf8.yaml")], "is not UTF-8"),
    ("run_config_missing", lambda a: ["run", str(a.root / "nope.yaml")], "config file not found"),
    # variant specs
    ("unknown_variant", lambda a: eval_args(a, "--variant", "slidng_window"), "unknown variant"),
    ("duplicate_spec_key", lambda a: eval_args(a, "--variant", "window:w=8,w=16"), "'w' is given twice"),
    ("window_zero", lambda a: eval_args(a, "--variant", "window:w=0"), "window w must be >= 1"),
    ("spec_bad_value", lambda a: eval_args(a, "--variant", "window:w=abc"), "w='abc' is not a valid int"),
    ("layer_out_of_range", lambda a: ["swap", "--model", a.model, "--layers", "9", "--out",
                                      str(a.root / "swap-out")], "layer index 9 out of range"),
    # eval: values refused, not clamped; inputs and output checked before any work
    ("eval_batch_size_zero", lambda a: eval_args(a, "--batch-size", "0"), "batch_size must be >= 1"),
    ("eval_stride_zero", lambda a: eval_args(a, "--stride", "0"), "stride must be >= 1"),
    ("eval_max_tokens_negative", lambda a: eval_args(a, "--max-tokens", "-5"), "max_tokens must be >= 0"),
    ("eval_gen_tokens_negative", lambda a: eval_args(a, "--gen-tokens", "-1"), "gen_tokens must be >= 0"),
    ("eval_memory_saving_out_of_range", lambda a: eval_args(a, "--memory-saving", "30"), "memory_saving must be"),
    ("eval_context_too_long", lambda a: eval_args(a, "--context", "1000"), "exceeds the model's 64 positions"),
    ("eval_out_is_a_file", lambda a: eval_args(a, "--out", a.file), "is a file; give a folder path"),
    ("eval_out_under_a_file", lambda a: eval_args(a, "--out", a.file + "/sub"), "which is a file"),
    ("eval_data_missing", lambda a: eval_args(a, "--data", str(a.root / "nope.tokens")), "no eval text at"),
    ("eval_data_not_utf8", lambda a: eval_args(a, "--data", str(a.root / "not_utf8.txt")), "cannot read eval text"),
    ("eval_data_empty", lambda a: eval_args(a, "--data", str(a.root / "empty.txt")), "is empty"),
    ("eval_prompts_not_utf8", lambda a: eval_args(a, "--gen-tokens", "2", "--prompts",
                                                  str(a.root / "not_utf8.txt")), "is not UTF-8"),
    ("eval_model_missing", lambda a: eval_args(a, "--model", str(a.root / "nope")), "no model at"),
    ("swapped_truncated_safetensors", lambda a: eval_args(a, "--swapped", damaged(a, "truncated", truncate)),
     "model.safetensors is damaged"),
    ("swapped_wrong_shapes", lambda a: eval_args(a, "--swapped", damaged(a, "misshapen", misshape)),
     "shapes do not match config.json"),
    ("swapped_config_not_json", lambda a: eval_args(a, "--swapped", damaged(
        a, "config", lambda f: (f / "config.json").write_text("{not json"))), "config.json is not valid JSON"),
    ("swapped_empty_tokenizer_config", lambda a: eval_args(a, "--swapped", damaged(
        a, "tokenizer", lambda f: (f / "tokenizer_config.json").write_text(""))), "tokenizer_config.json is empty"),
    ("swapped_tokenizer_json_list", lambda a: eval_args(a, "--swapped", damaged(
        a, "tokenizer-list", lambda f: (f / "tokenizer.json").write_text("[]"))), "holds a JSON list"),
    ("swapped_truncated_variant_state", lambda a: eval_args(a, "--swapped", damaged(
        a, "state", lambda f: (f / "attnswap.safetensors").write_bytes(b"\x08"), with_variant_state(a))),
     "attnswap.safetensors"),
    ("swapped_half_saved", lambda a: eval_args(a, "--swapped", damaged(a, "half", half_saved)), "no saved model"),
    ("model_config_not_json", lambda a: eval_args(a, "--model", damaged(
        a, "model-config", lambda f: (f / "config.json").write_bytes(b"\xff\xfe"))), "config.json is not valid JSON"),
    # generate
    ("generate_max_new_tokens_negative", lambda a: generate_args(a, "--max-new-tokens", "-5"),
     "max_new_tokens must be >= 1"),
    ("generate_temperature_zero_sampled", lambda a: generate_args(a, "--temperature", "0"),
     "temperature must be > 0 for sampled generation"),
    ("generate_top_k_negative", lambda a: generate_args(a, "--top-k", "-1"), "top_k must be >= 0"),
    ("generate_unknown_mode", lambda a: generate_args(a, "--modes", "beam"), "unknown generation mode 'beam'"),
    ("generate_prompts_not_utf8", lambda a: generate_args(a, "--prompts", str(a.root / "not_utf8.txt")),
     "is not UTF-8"),
    ("generate_prompts_empty", lambda a: generate_args(a, "--prompts", str(a.root / "empty.txt")), "has no prompts"),
    ("generate_out_is_a_file", lambda a: generate_args(a, "--out", a.file), "is a file"),
    # distill
    ("distill_max_seconds_negative", lambda a: distill_args(a, "--max-seconds", "-5"), "max_seconds must be >= 0"),
    ("distill_resume_without_run", lambda a: distill_args(a, "--resume", "true", "--out", str(a.root / "typo")),
     "holds no run"),
    ("distill_out_is_a_file", lambda a: distill_args(a, "--out", a.file), "is a file"),
    ("distill_out_under_a_file", lambda a: distill_args(a, "--out", a.file + "/run"), "which is a file"),
    ("distill_data_not_utf8", lambda a: distill_args(a, "--data", str(a.root / "not_utf8.txt")),
     "is not UTF-8 text: byte 0xff at byte offset 6"),
    ("distill_data_missing", lambda a: distill_args(a, "--data", str(a.root / "nope.txt")), "no data at"),
    ("distill_test_data", lambda a: distill_args(a, "--data", str(ROOT / "data/wikitext-2/wiki.test.tokens")),
     "refusing to train on test data"),
    ("distill_bad_spec", lambda a: distill_args(a, "--variant", "window:w=8,w=16"), "given twice"),
    ("distill_seq_len_too_long", lambda a: distill_args(a, "--seq-len", "1000"), "exceeds the model's 64"),
    ("distill_damaged_model", lambda a: distill_args(a, "--model", damaged(a, "truncated", truncate)),
     "model.safetensors is damaged"),
    # the other commands' output paths and inputs
    ("swap_out_is_a_file", lambda a: ["swap", "--model", a.model, "--out", a.file], "is a file"),
    ("bench_out_is_a_file", lambda a: ["bench", "--model", a.model, "--out", a.file], "is a file"),
    ("bench_lengths_zero", lambda a: ["bench", "--model", a.model, "--lengths", "0"], "lengths must be positive"),
    ("bench_kernel_out_under_a_file", lambda a: ["bench-kernel", "--out", a.file + "/k"], "which is a file"),
    ("harden_out_is_a_file", lambda a: ["harden", "--swapped", a.swapped, "--out", a.file], "is a file"),
    ("harden_swapped_missing", lambda a: ["harden", "--swapped", str(a.root / "nope"), "--out",
                                          str(a.root / "harden-out")], "no saved model"),
    ("run_out_is_a_file", lambda a: ["run", str(write(a, "run.yaml", f"out: {a.file}\n"))], "is a file"),
    ("report_missing_folder", lambda a: ["report", str(a.root / "nope")], "does not exist"),
    ("report_out_is_a_file", lambda a: ["report", str(a.root), "--out", a.file], "is a file"),
    ("report_corrupt_bench_rows", lambda a: ["report", report_folder(a, "bad-bench", {
        "bench/bench_summary.json": b"{}", "bench/bench_results.jsonl": b'{"mode": "prefill"}\n{"mode": '}),
        "--out", str(a.root / "report-out")], "bench_results.jsonl (line 2"),
    ("report_metrics_not_utf8", lambda a: ["report", report_folder(a, "bad-metrics", {
        "distill/metrics.jsonl": b'{"step": 1, "loss": \xff}\n'}), "--out", str(a.root / "report-out")],
     "metrics.jsonl"),
    ("report_corrupt_json", lambda a: ["report", str(corrupt_run(a)), "--out", str(a.root / "report-out")],
     "corrupt result file"),
]


def write(a: SimpleNamespace, name: str, text: str) -> Path:
    (a.root / name).write_text(text)
    return a.root / name


def corrupt_run(a: SimpleNamespace) -> Path:
    run = a.root / "corrupt-run" / "eval"
    run.mkdir(parents=True, exist_ok=True)
    (run / "eval.json").write_text('{"stream": {"perplexity": ')
    return run.parent


def test_at_least_forty_cases():
    assert len(CASES) >= 40 and len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("make_args, expected", [(m, e) for _, m, e in CASES], ids=[n for n, _, _ in CASES])
def test_bad_input_is_refused_in_one_line(a, make_args, expected):
    code, _, stderr = run_cli(make_args(a))
    assert_refused(code, stderr, expected)


def test_refused_commands_leave_no_output_folder(a):
    """Checks come before any work: a refused run creates no --out (nor a lock in it)."""
    for args in (distill_args(a, "--variant", "window:w=8,w=16", "--out", str(a.root / "never-1")),
                 distill_args(a, "--data", str(a.root / "not_utf8.txt"), "--out", str(a.root / "never-2")),
                 eval_args(a, "--batch-size", "0", "--out", str(a.root / "never-3"))):
        assert run_cli(args)[0] == 2
    assert not any((a.root / f"never-{i}").exists() for i in (1, 2, 3))


def test_report_names_the_corrupt_file(a):
    code, _, stderr = run_cli(["report", str(corrupt_run(a)), "--out", str(a.root / "report-out")])
    assert code == 2 and str(a.root / "corrupt-run" / "eval" / "eval.json") in stderr


def test_the_real_process_agrees(a):
    """The same refusal from ``python -m attnswap.cli``, where whatever transformers or logging print counts too."""
    args = eval_args(a, "--swapped", damaged(a, "truncated", truncate))
    result = subprocess.run(cli_command(*args), capture_output=True, text=True, timeout=120, cwd=a.root,
                            env=subprocess_env())
    assert_refused(result.returncode, result.stderr, "model.safetensors is damaged")
