"""Hostile and damaged inputs through the CLI: each is refused with exit code 2, at most 3 lines on stderr (the
log lines a command printed before it noticed included) and no traceback, and names what is wrong.

The CLI runs in-process (``attnswap.cli.main``) with the root logger writing to the captured stderr, as the real
command's ``logging.basicConfig`` does; two cases cross the process boundary to check that the two agree.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from attnswap.hf.saved import save

from attnswap.hf.swap import swap
from tests.cli_helpers import (ROOT, assert_refused, cli_command, digests, distill_args, make_assets, run_cli,
                               subprocess_env)
from tests.conftest import tiny_gpt2, tiny_tokenizer


@pytest.fixture(scope="module")
def a(tmp_path_factory) -> SimpleNamespace:
    cache = tmp_path_factory.mktemp("token-cache")  # the token cache outside the assets and the repository
    previous = os.environ.get("ATTNSWAP_CACHE")
    os.environ["ATTNSWAP_CACHE"] = str(cache)
    yield make_assets(tmp_path_factory.mktemp("bad-inputs"))
    if previous is None:
        del os.environ["ATTNSWAP_CACHE"]
    else:
        os.environ["ATTNSWAP_CACHE"] = previous


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
    ("eval_data_not_utf8", lambda a: eval_args(a, "--data", str(a.root / "not_utf8.txt")),
     "eval text"),
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


# --- the cases of issue 32: values past real bounds, outputs over inputs, models that do not load whole ---------
def model_copy(a: SimpleNamespace, name: str, damage) -> str:
    """A copy of the plain tiny GPT-2 folder with ``damage(folder)`` applied."""
    return damaged(a, name, damage, source=a.model)


def edit_config(**changes):
    def damage(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
    return damage


def edit_weights(drop: str | None = None, add: str | None = None):
    def damage(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / "model.safetensors")
        if drop:
            del tensors[next(k for k in tensors if k.endswith(drop))]
        if add:
            tensors[add] = torch.zeros(4)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return damage


def text_file(a: SimpleNamespace, name: str, data: bytes) -> str:
    (a.root / name).write_bytes(data)
    return str(a.root / name)


def data_folder(a: SimpleNamespace) -> str:
    folder = a.root / "data-folder"
    folder.mkdir(exist_ok=True)
    shutil.copy(a.train, folder / "train.txt")
    return str(folder)


def symlink_loop(a: SimpleNamespace) -> str:
    loop = a.root / "loop"
    if not os.path.lexists(loop):
        os.symlink(loop, loop)
    return str(loop)


def checkpoint_run(a: SimpleNamespace, name: str, record: dict, tensors: bytes | None = None) -> str:
    """A run folder holding ``record`` as its checkpoint.json (and ``tensors`` as checkpoint.safetensors)."""
    folder = a.root / name
    folder.mkdir(exist_ok=True)
    (folder / "checkpoint.json").write_text(json.dumps(record))
    if tensors is not None:
        (folder / "checkpoint.safetensors").write_bytes(tensors)
    return str(folder)


LAUGHS = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10) if i else ', '.join(['x'] * 10)}]\n"
                 for i in range(6)) + "layers: [*l5, *l5, *l5, *l5, *l5, *l5, *l5, *l5, *l5, *l5]\n"
SWAP = ["swap", "--device", "cpu"]

ISSUE_CASES = [
    # numbers against real bounds
    ("seed_past_64_bits", lambda a: distill_args(a, "--seed", str(10**30)), "seed=1000000000000000000000000000000 "
     "does not fit in 64 bits"),
    ("seed_negative", lambda a: distill_args(a, "--seed", "-1"), "seed must be in 0..2**63-1"),
    ("batch_size_past_64_bits", lambda a: distill_args(a, "--batch-size", str(10**30)), "batch_size="),
    ("batch_size_past_memory", lambda a: distill_args(a, "--batch-size", str(10**15)),
     "more tokens than this machine's"),
    ("seq_len_times_batch_past_memory", lambda a: eval_args(a, "--batch-size", "1000000", "--context", str(10**12)),
     "context=1000000000000 at batch_size 1000000"),
    ("lr_inf", lambda a: distill_args(a, "--lr", "inf"), "lr=inf is not a finite number"),
    ("lr_nan", lambda a: distill_args(a, "--lr", "nan"), "lr=nan is not a finite number"),
    ("lr_overflowing", lambda a: distill_args(a, "--lr", "1e400"), "lr=inf is not a finite number"),
    ("temperature_huge_integer", lambda a: distill_args(a, "--temperature", "9" * 400), "is beyond any float"),
    ("integer_past_4300_digits", lambda a: distill_args(a, "--steps", "9" * 5000), "config key 'steps'"),
    # devices against what torch offers
    ("device_tpu", lambda a: distill_args(a, "--device", "tpu"), "device 'tpu' is not one this machine offers"),
    ("device_meta", lambda a: eval_args(a, "--device", "meta"), "device 'meta' is not one this machine offers"),
    ("device_cuda_index", lambda a: swap_args(a, "--device", "cuda:7"), "cuda:7"),
    ("device_garbage", lambda a: eval_args(a, "--device", "gpu please"), "is not one this machine offers"),
    # YAML
    ("yaml_duplicate_key", lambda a: ["distill", "--config", str(write(a, "dup.yaml", "steps: 3\nlr: 1\nsteps: 5\n"))],
     "key 'steps' is given twice (lines 1 and 3)"),
    ("yaml_billion_laughs", lambda a: ["distill", "--config", str(write(a, "laughs.yaml", LAUGHS))],
     "its aliases expand to more than 100,000 values"),
    ("override_billion_laughs", lambda a: distill_args(a, "--layers", LAUGHS.replace("\n", "\n")),
     "config key 'layers'"),
    # variant specs
    ("performer_m_10_30", lambda a: eval_args(a, "--variant", f"performer:m={10**30}"), "out of range; give a value in"),
    ("performer_m_10_12", lambda a: eval_args(a, "--variant", f"performer:m={10**12}"), "out of range; give a value in"),
    ("performer_m_past_features", lambda a: eval_args(a, "--variant", "performer:m=100000"),
     "(m in 1..16384), got m=100000"),
    ("hybrid_wide_layers_duplicate", lambda a: eval_args(a, "--variant", "hybrid:w=4,wide_w=8,wide_layers=1+1"),
     "wide_layers=1+1 names 1 twice"),
    # config.json fields, and a config that does not match its weights
    ("config_n_embd_string", lambda a: eval_args(a, "--model", model_copy(a, "n-embd", edit_config(n_embd="abc"))),
     "n_embd='abc' must be an integer in 1..2**31-1"),
    ("config_model_type_number", lambda a: eval_args(a, "--model", model_copy(a, "type-num", edit_config(model_type=7))),
     "model_type=7 must be a string"),
    ("config_relabelled_llama", lambda a: eval_args(a, "--model", model_copy(a, "llama", edit_config(
        model_type="llama"))), "describes"),
    ("config_more_layers", lambda a: eval_args(a, "--model", model_copy(a, "n-layer-3", edit_config(n_layer=3))),
     "config and weights disagree"),
    ("config_fewer_layers", lambda a: eval_args(a, "--model", model_copy(a, "n-layer-1", edit_config(n_layer=1))),
     "weight(s) unused"),
    ("weights_missing", lambda a: eval_args(a, "--model", model_copy(a, "missing", edit_weights(drop="h.1.ln_1.bias"))),
     "weight(s) missing (randomly initialised)"),
    ("weights_extra", lambda a: eval_args(a, "--model", model_copy(a, "extra", edit_weights(add="transformer.extra"))),
     "1 weight(s) unused, e.g. transformer.extra"),
    ("swapped_weights_missing", lambda a: eval_args(a, "--swapped", damaged(a, "swapped-missing", edit_weights(
        drop="h.1.ln_1.bias"))), "weight(s) missing"),
    ("swap_weights_missing", lambda a: swap_args(a, "--model", model_copy(a, "missing", edit_weights(
        drop="h.1.ln_1.bias"))), "or pass --allow-partial true"),
    ("distill_weights_extra", lambda a: distill_args(a, "--model", model_copy(a, "extra", edit_weights(
        add="transformer.extra"))), "does not load whole"),
    # nothing given is overwritten: --out never equals, contains or lies inside an input
    ("swap_out_is_the_model", lambda a: swap_args(a, "--out", a.model), "is the input --model"),
    ("swap_out_inside_the_model", lambda a: swap_args(a, "--out", a.model + "/swapped"), "lies inside the input"),
    ("swap_out_above_the_model", lambda a: swap_args(a, "--out", str(a.root)), "contains the input --model"),
    ("swap_out_empty", lambda a: swap_args(a, "--out", ""), "--out is empty"),
    ("swap_out_symlink_loop", lambda a: swap_args(a, "--out", symlink_loop(a)), "cannot follow its symlinks"),
    ("swap_out_through_symlink_to_model", lambda a: swap_args(a, "--out", link_to(a, "model-link", a.model)),
     "is the input --model"),
    ("distill_out_is_the_data", lambda a: distill_args(a, "--data", data_folder(a), "--out", data_folder(a)),
     "is the input --data"),
    ("distill_out_is_the_model", lambda a: distill_args(a, "--out", a.model), "is the input --model"),
    ("eval_out_is_the_swapped_model", lambda a: eval_args(a, "--swapped", a.swapped, "--out", a.swapped),
     "is the input --swapped"),
    ("eval_out_above_the_data", lambda a: eval_args(a, "--out", str(a.root)), "contains the input"),
    ("report_out_is_the_run", lambda a: ["report", run_folder(a), "--out", run_folder(a)], "is the input --run_dirs"),
    ("report_out_above_the_run", lambda a: ["report", run_folder(a), "--out", str(a.root)], "contains the input"),
    ("report_out_holds_results", lambda a: ["report", run_folder(a), "--out", run_folder(a) + "/eval"],
     "holds result files (eval.json)"),
    # training text is text
    ("data_nul_bytes", lambda a: distill_args(a, "--data", text_file(a, "nul.txt", b"\0" * 3000)),
     "holds control byte 0x00 at byte offset 0"),
    ("data_control_byte_midway", lambda a: distill_args(a, "--data", text_file(a, "ctl.txt", b"w4 w5\n" * 100 + b"\x1b[0m")),
     "holds control byte 0x1b at byte offset 600"),
    ("data_undecodable_midway", lambda a: distill_args(a, "--data", text_file(a, "latin1.txt", b"w4 w5\n" * 50 + "café w4\n".encode("latin-1"))),
     "byte 0xe9 at byte offset 303"),
    ("data_cut_character", lambda a: distill_args(a, "--data", text_file(a, "cut.txt", b"w4 w5 " + "é".encode()[:1])),
     "ends inside a character at byte offset"),
    ("data_folder_with_a_nul_file", lambda a: distill_args(a, "--data", nul_folder(a)), "holds control byte 0x00"),
    ("eval_text_nul_bytes", lambda a: eval_args(a, "--data", text_file(a, "nul.txt", b"\0" * 3000)),
     "eval text"),
    # checkpoints
    ("checkpoint_path_escapes_the_run", lambda a: distill_args(a, "--resume", "true", "--out", checkpoint_run(
        a, "escape-run", {"step": 1, "config": {}, "param_groups": [], "tensors": "../model/model.safetensors"})),
     "is not a plain file name inside"),
    ("checkpoint_absolute_path", lambda a: distill_args(a, "--resume", "true", "--out", checkpoint_run(
        a, "absolute-run", {"step": 1, "config": {}, "param_groups": [], "tensors": a.model + "/model.safetensors"})),
     "is not a plain file name inside"),
    ("checkpoint_tampered_tensors", lambda a: distill_args(a, "--resume", "true", "--out", checkpoint_run(
        a, "tampered-run", {"step": 1, "config": {}, "param_groups": [], "tensors": "checkpoint.safetensors"},
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")), "corrupt checkpoint"),
]


def swap_args(a: SimpleNamespace, *args: str) -> list[str]:
    return [*SWAP, "--model", a.model, "--variant", "window:w=4", "--out", str(a.root / "swap-out"), *args]


def link_to(a: SimpleNamespace, name: str, target: str) -> str:
    link = a.root / name
    if not os.path.lexists(link):
        os.symlink(target, link)
    return str(link)


def run_folder(a: SimpleNamespace) -> str:
    return report_folder(a, "a-run", {"eval/eval.json": json.dumps({"variant": "full"}).encode()})


def nul_folder(a: SimpleNamespace) -> str:
    folder = a.root / "nul-folder"
    folder.mkdir(exist_ok=True)
    (folder / "a.txt").write_text("w4 w5\n")
    (folder / "b.txt").write_bytes(b"w4\0w5\n")
    return str(folder)


def write(a: SimpleNamespace, name: str, text: str) -> Path:
    (a.root / name).write_text(text)
    return a.root / name


def corrupt_run(a: SimpleNamespace) -> Path:
    run = a.root / "corrupt-run" / "eval"
    run.mkdir(parents=True, exist_ok=True)
    (run / "eval.json").write_text('{"stream": {"perplexity": ')
    return run.parent


ALL_CASES = CASES + ISSUE_CASES


def test_every_case_has_a_name_of_its_own():
    assert len(ALL_CASES) >= 100 and len({name for name, _, _ in ALL_CASES}) == len(ALL_CASES)


def out_of(args: list[str]) -> str | None:
    return args[len(args) - 1 - args[::-1].index("--out") + 1] if "--out" in args else None


@pytest.mark.parametrize("make_args, expected", [(m, e) for _, m, e in ALL_CASES], ids=[n for n, _, _ in ALL_CASES])
def test_bad_input_is_refused_in_one_line(a, make_args, expected):
    """Exit 2, one error line naming what is wrong, no traceback, and every file the command was given (the whole
    asset folder but this case's --out) byte-identical afterwards."""
    args = make_args(a)
    out = out_of(args)
    before = digests(a.root, skip=[out] if out and out != str(a.root) and Path(out).is_dir()
                     and not any(Path(out) == Path(p) for p in (a.model, a.swapped)) else [])
    code, _, stderr = run_cli(args)
    assert_refused(code, stderr, expected)
    after = digests(*before)  # the same files: none removed, none changed
    assert after == before, sorted(k for k in before if after.get(k) != before[k])


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


# --- every field of every command: past 64 bits, not finite, a device torch does not offer ----------------------
def field_cases() -> list[tuple[str, str, str, str]]:
    """(command, field, value, expected) for every int, float and device field of every command's config."""
    import dataclasses
    import importlib
    import typing

    from attnswap.cli import COMMANDS

    cases = []
    for command, (module_name, config_name, _function, _positional) in COMMANDS.items():
        config_cls = getattr(importlib.import_module(module_name), config_name)
        hints = typing.get_type_hints(config_cls)
        for field in dataclasses.fields(config_cls):
            kinds = {hints[field.name], *typing.get_args(hints[field.name])}
            kinds |= {inner for kind in list(kinds) for inner in typing.get_args(kind)}
            flag = f"--{field.name.replace('_', '-')}"
            if field.name == "device":
                cases.append((command, flag, "tpu", "device 'tpu' is not one this machine offers"))
            elif bool in kinds:
                continue
            elif int in kinds:
                cases.append((command, flag, str(2**64), f"{field.name}=18446744073709551616 does not fit in 64 bits"))
            elif float in kinds:
                cases.append((command, flag, "-inf", f"{field.name}=-inf is not a finite number"))
    return cases


FIELD_CASES = field_cases()


def test_every_command_has_field_rows():
    assert {command for command, *_ in FIELD_CASES} >= {"swap", "distill", "eval", "generate", "bench", "report"}
    assert len(FIELD_CASES) >= 60


@pytest.mark.parametrize("command, flag, value, expected", FIELD_CASES,
                         ids=[f"{c}{f}" for c, f, _, _ in FIELD_CASES])
def test_every_numeric_field_is_bounded(a, command, flag, value, expected):
    code, _, stderr = run_cli([command, flag, value, "--out", str(a.root / "field-out")])
    assert_refused(code, stderr, expected)
    assert not (a.root / "field-out").exists()


# --- ranges, property-based --------------------------------------------------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from attnswap.config import load_config  # noqa: E402
from attnswap.train.distill import DistillConfig  # noqa: E402
from attnswap.errors import AttnswapError  # noqa: E402
from attnswap.validate import INT64_MAX, check_text_file, memory_bytes  # noqa: E402
from attnswap.variants import get_variant  # noqa: E402

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def refused(overrides: dict[str, str]) -> str | None:
    """The error line load_config (what the CLI calls with the raw strings) gives ``overrides``, or None."""
    try:
        load_config(DistillConfig, None, overrides)
    except AttnswapError as exc:
        return str(exc)
    return None


@FAST
@given(st.one_of(st.integers(), st.integers(-2, 2**70), st.sampled_from([0, INT64_MAX, INT64_MAX + 1, -1])))
def test_seed_accepted_exactly_in_0_to_2_63(seed):
    error = refused({"seed": str(seed)})
    if 0 <= seed <= INT64_MAX:
        assert error is None and load_config(DistillConfig, None, {"seed": str(seed)}).seed == seed
    else:
        assert error is not None and "seed" in error and len(error) < 300


@FAST
@given(st.integers(1, 2**70))
def test_batch_size_accepted_exactly_within_memory(batch_size):
    error = refused({"batch_size": str(batch_size)})
    fits = batch_size <= INT64_MAX and batch_size * 512 <= memory_bytes() // 8  # seq_len 512, int64 ids
    assert (error is None) == fits, error
    if not fits:
        assert "batch_size" in error or "seq_len" in error


@FAST
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_lr_accepted_exactly_when_finite_and_positive(lr):
    error = refused({"lr": repr(lr)})
    if math.isfinite(lr) and lr > 0:
        assert error is None, error
    else:
        assert error is not None and "lr" in error


@FAST
@given(st.integers(-2**80, 2**80))
def test_performer_features_accepted_exactly_in_range(m):
    try:
        get_variant(f"performer:m={m}")
        accepted = True
    except AttnswapError as exc:
        accepted = False
        assert "m" in str(exc) and ("1..16384" in str(exc) or "out of range" in str(exc))
    assert accepted == (1 <= m <= 16384)


@FAST
@given(st.lists(st.integers(0, 5), min_size=1, max_size=5))
def test_hybrid_wide_layers_refused_exactly_when_repeated(layers):
    spec = f"hybrid:w=4,wide_w=8,wide_layers={'+'.join(map(str, layers))}"
    try:
        get_variant(spec)
        accepted = True
    except AttnswapError as exc:
        accepted = False
        assert "twice" in str(exc)
    assert accepted == (len(set(layers)) == len(layers))


@FAST
@given(st.binary(max_size=200))
def test_text_refused_at_the_first_bad_byte(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_bytes(data)
    control = next((i for i, byte in enumerate(data) if byte < 0x20 and byte not in b"\t\n\x0c\r" or byte == 0x7f),
                   None)
    try:
        data.decode("utf-8")
        undecodable = None
    except UnicodeDecodeError as exc:
        undecodable = exc
    try:
        check_text_file(path)
        error = None
    except AttnswapError as exc:
        error = str(exc)
    if control is not None:
        assert error is not None and f"control byte 0x{data[control]:02x} at byte offset {control:,}" in error
    elif undecodable is not None:
        assert error is not None
        assert f"at byte offset {undecodable.start:,}" in error, error
    else:
        assert error is None


def test_a_poisoned_token_cache_is_refused(tmp_path):
    import numpy as np

    from attnswap.data.tokens import token_stream

    (tmp_path / "t.txt").write_text("w4 w5 w6\n\nw7 w8\n")
    tokenizer = tiny_tokenizer()
    token_stream(tmp_path / "t.txt", tokenizer, cache_dir=tmp_path / "cache")
    (cache,) = (tmp_path / "cache").glob("tokens-*.npy")
    np.save(cache, np.array([4, 5, 10_000], dtype=np.int32))
    with pytest.raises(AttnswapError, match=r"holds token id 10000, outside the vocabulary 0\.\.96"):
        token_stream(tmp_path / "t.txt", tokenizer, cache_dir=tmp_path / "cache")


# --- nothing given is overwritten ---------------------------------------------------------------------------------
def test_no_command_writes_into_its_own_input(a):
    """swap, distill, eval and report pointed at their own input folders are refused; every input's sha256 stays,
    and so it does when each runs into a fresh folder."""
    run = run_folder(a)
    inputs = digests(a.model, a.swapped, a.train, a.valid, run)
    for args in (swap_args(a, "--out", a.model), distill_args(a, "--out", a.model),
                 distill_args(a, "--data", data_folder(a), "--out", data_folder(a)),
                 eval_args(a, "--out", a.model), eval_args(a, "--swapped", a.swapped, "--out", a.swapped),
                 ["report", run, "--out", run]):
        code, _, stderr = run_cli(args)
        assert_refused(code, stderr, "a run never writes where it reads")
    assert digests(*inputs) == inputs

    fresh = a.root / "fresh"
    for args in (swap_args(a, "--out", str(fresh / "swap")),
                 distill_args(a, "--out", str(fresh / "distill")),
                 eval_args(a, "--variant", "window:w=4", "--max-tokens", "200", "--stride", "32", "--attn-sample-len", "16",
                           "--grad-len", "16", "--out", str(fresh / "eval")),
                 ["report", str(fresh), run, "--out", str(a.root / "fresh-report")]):
        code, _, stderr = run_cli(args)
        assert code == 0, stderr[-3000:]
    assert digests(*inputs) == inputs
    assert not list(fresh.rglob("*.tmp")) and not list(fresh.rglob(".attnswap.lock"))
    assert (fresh / "eval" / "eval.json").is_file() and (a.root / "fresh-report" / "report.html").is_file()


def test_a_model_without_a_tokenizer_is_saved_without_one(a, tmp_path):
    from attnswap.hf.models import load_tokenizer

    bare = tmp_path / "bare"
    shutil.copytree(a.model, bare, ignore=lambda _d, names: [n for n in names if "token" in n or n in (
        "vocab.json", "merges.txt")])
    code, stdout, stderr = run_cli(swap_args(a, "--model", str(bare), "--out", str(tmp_path / "swapped")))
    assert code == 0, stderr[-3000:]
    assert "no tokenizer" in stdout
    saved = json.loads((tmp_path / "swapped" / "config.json").read_text())
    assert saved["attnswap"]["tokenizer"] is False
    assert not any((tmp_path / "swapped" / name).exists() for name in ("tokenizer.json", "tokenizer_config.json",
                                                                         "vocab.json"))
    with pytest.raises(AttnswapError, match="was saved without one"):
        load_tokenizer(str(tmp_path / "swapped"))


def test_two_swaps_into_one_folder_take_turns(a, tmp_path):
    """swap holds its --out's lock: a second swap while the first runs is refused."""
    from attnswap.runs import run_lock

    with run_lock(tmp_path / "busy"):
        code, _, stderr = run_cli(swap_args(a, "--out", str(tmp_path / "busy")))
    assert_refused(code, stderr, "is in use by another run")


def test_a_full_disk_is_one_line(a, tmp_path, monkeypatch):
    import errno

    from safetensors import SafetensorError

    import attnswap.runs as runs

    def full(*_args, **_kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                              'left on device" })')

    monkeypatch.setattr("safetensors.torch.save_file", full)
    out = tmp_path / "full"
    code, _, stderr = run_cli(distill_args(a, "--out", str(out)))
    lines = stderr.strip().splitlines()  # after the run's own log lines: the disk filled while it ran
    assert code == 2 and "Traceback" not in stderr and sum(line.startswith("error:") for line in lines) == 1
    assert lines[-1].startswith("error: the disk is full writing"), lines[-1]
    assert not list(out.glob("*.tmp")) and not (out / "checkpoint.json").exists()

    def no_space(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", no_space)
    with pytest.raises(AttnswapError, match="the disk is full writing"):
        runs.atomic_write(tmp_path / "eval.json", "{}")
    assert not list(tmp_path.glob("eval.json*"))
