"""Interrupted distillation runs: Ctrl-C leaves a checkpoint that resumes, a second run on a busy folder is refused,
and a kill -9 during the final save leaves a model folder that is complete or refused in one line, never half."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

import attnswap
from tests.cli_helpers import assert_refused, cli_command, distill_args, make_assets, run_cli, subprocess_env

# The real distill command, with its final save killed (SIGKILL) after it wrote part of the model: the moment a
# non-atomic save would leave a half-written model/.
KILLED_IN_SAVE = """
import os, signal, sys
import attnswap.distill as distill
from attnswap import cli

real_save = distill.save

def save_then_die(model, directory, tokenizer=None):
    real_save(model, directory, tokenizer)
    (directory / "config.json").unlink()  # as if killed before the last file was written
    os.kill(os.getpid(), signal.SIGKILL)

distill.save = save_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_a_concurrent_run_is_refused(tmp_path, monkeypatch):
    a, out = make_assets(tmp_path), tmp_path / "run"
    monkeypatch.setenv("ATTNSWAP_CACHE", str(tmp_path / "cache"))
    args = distill_args(a, "--out", str(out), "--ckpt-every", "0", "--eval-every", "0")
    first = subprocess.Popen(cli_command(*args, "--steps", "100000"), env=subprocess_env(tmp_path / "cache"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while first.poll() is None and time.time() < deadline and not (
            metrics.exists() and metrics.read_text().count('"loss"') >= 3):
        time.sleep(0.01)
    assert first.poll() is None, first.communicate()[1][-3000:]

    code, _, stderr = run_cli([*args, "--steps", "100000", "--seed", "1"])  # the same folder, while it runs
    assert_refused(code, stderr, f"in use by another run (pid {first.pid}")

    first.send_signal(signal.SIGINT)
    stderr = first.communicate(timeout=120)[1]
    assert first.returncode == 130, stderr[-3000:]
    assert "stopped by SIGINT" in stderr and "continue with --resume true" in stderr
    step = json.loads((out / "checkpoint.json").read_text())["step"]
    assert step >= 3 and not (out / "model").exists()

    code, _, stderr = run_cli([*args, "--steps", str(step + 2), "--resume", "true"])
    assert code == 0, stderr[-3000:]
    assert f"resuming from {out / 'checkpoint.json'} at step {step}" in stderr
    assert json.loads((out / "results.json").read_text())["steps_done"] == step + 2
    assert attnswap.load(out / "model").config.attnswap["variant"].startswith("window")


@pytest.mark.slow
def test_kill_during_the_final_save_leaves_no_half_written_model(tmp_path, monkeypatch):
    a, out = make_assets(tmp_path), tmp_path / "run"
    monkeypatch.setenv("ATTNSWAP_CACHE", str(tmp_path / "cache"))
    args = distill_args(a, "--out", str(out))
    killed = subprocess.run([sys.executable, "-c", KILLED_IN_SAVE, *args], env=subprocess_env(tmp_path / "cache"),
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (out / "model").exists() and list(out.glob("model.*.tmp")), sorted(p.name for p in out.iterdir())

    code, _, stderr = run_cli(["eval", "--swapped", str(out / "model"), "--model", a.model, "--out",
                               str(tmp_path / "eval")])
    assert_refused(code, stderr, f"no saved model at {out / 'model'}")

    code, _, stderr = run_cli([*args, "--resume", "true"])  # the checkpoint of the last step finishes the run
    assert code == 0, stderr[-3000:]
    assert not list(out.glob("*.tmp")), "stale temporaries were left"
    assert attnswap.load(out / "model").config.attnswap["variant"].startswith("window")
