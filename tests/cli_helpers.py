"""What the CLI tests share: tiny assets on disk (no network, seconds on a CPU) and running ``attnswap`` in-process."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable

from attnswap import cli
from attnswap.hf.saved import save
from attnswap.hf.swap import swap
from tests.conftest import tiny_gpt2, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
NOT_UTF8 = b"w4 w5 \xff\xfe w6\n"


def make_assets(root: Path) -> SimpleNamespace:
    """A tiny GPT-2 (64 positions) with its tokenizer, a saved swapped copy, texts, prompts and damaged files."""
    model_dir, swapped = root / "model", root / "swapped"
    tiny_gpt2(n_positions=64).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    save(swap(tiny_gpt2(n_positions=64), "window:w=4"), swapped, tiny_tokenizer())
    text = "\n\n".join(" ".join(f"w{4 + (i * 7 + j) % 93}" for j in range(40)) for i in range(40))
    (root / "train.txt").write_text(text)
    (root / "valid.txt").write_text(text)
    (root / "prompts.txt").write_text("w4 w5 w6\n")
    (root / "not_utf8.txt").write_bytes(NOT_UTF8)
    (root / "empty.txt").write_text("")
    (root / "a_file").write_text("not a folder\n")
    (root / "config_not_utf8.yaml").write_bytes(b"steps: \xff\n")
    (root / "config_bad.yaml").write_text("steps: [1,\n")
    (root / "config_list.yaml").write_text("- 1\n- 2\n")
    return SimpleNamespace(root=root, model=str(model_dir), swapped=str(swapped), train=str(root / "train.txt"),
                           valid=str(root / "valid.txt"), prompts=str(root / "prompts.txt"), file=str(root / "a_file"))


def digests(*roots: str | Path, skip: Iterable[str | Path] = ()) -> dict[str, str]:
    """sha256 of every file under ``roots`` (files or folders), by path; files under ``skip`` left out."""
    skipped = [Path(p).resolve() for p in skip]
    found = {}
    for root in map(Path, roots):
        for path in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            resolved = path.resolve()
            if not any(resolved == s or s in resolved.parents for s in skipped):
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def distill_args(a: SimpleNamespace, *args: str) -> list[str]:
    """A distillation of a few seconds on the tiny assets; later ``args`` override earlier ones."""
    return ["distill", "--model", a.model, "--data", a.train, "--val-data", a.valid, "--seq-len", "16",
            "--batch-size", "2", "--steps", "2", "--eval-batches", "1", "--out", str(a.root / "distill-out"),
            "--device", "cpu", *args]


def cli_command(*args: str) -> list[str]:
    """``attnswap ARGS`` as a process of its own (signals, locks, kill -9)."""
    return [sys.executable, "-m", "attnswap.cli", *args]


def subprocess_env(cache: Path | None = None) -> dict[str, str]:
    """One thread, offline, attnswap importable; the token cache in ``cache`` when given (kept out of the repo)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if cache is not None:
        env["ATTNSWAP_CACHE"] = str(cache)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``attnswap ARGS`` run in this process, logging to stderr as the CLI does."""
    out, err = io.StringIO(), io.StringIO()
    handler, root = logging.StreamHandler(err), logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(args)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return code, out.getvalue(), err.getvalue()


def assert_refused(code: int, stderr: str, expected: str) -> None:
    lines = stderr.strip().splitlines()
    assert code == 2, f"exit {code}, stderr:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr
    assert len(lines) <= 3, f"{len(lines)} lines on stderr:\n{stderr}"
    assert lines[-1].startswith("error: ") and expected in lines[-1], lines[-1]
    assert sum(line.startswith("error: ") for line in lines) == 1 and len(lines[-1]) < 600, stderr[-3000:]
