"""Interrupted distillation runs: Ctrl-C leaves a checkpoint that resumes, a second run on a busy folder is refused,
and a kill -9 during the final save leaves a model folder that is complete or refused in one line, never half."""

from __future__ import annotations

import contextlib
import json
import os
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
import attnswap.train.distill as distill
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


# --- SIGTERM and SIGINT during the final save; kill -9 and SIGTERM at random moments ---------------------------
# The real distill command whose final save, once it wrote the whole model into its temporary folder, gets
# KILL_SIGNAL from itself: the moment the old command exited -15 with model.<pid>.tmp left behind.
SIGNAL_IN_SAVE = """
import os, signal, sys, time
import attnswap.train.distill as distill
from attnswap import cli

real_save = distill.save

def save_then_signal(model, directory, tokenizer=None):
    real_save(model, directory, tokenizer)
    os.kill(os.getpid(), getattr(signal, os.environ["KILL_SIGNAL"]))
    for _ in range(6000):  # the signal arrives here (short sleeps: another thread may have taken it at the C level)
        time.sleep(0.01)

if os.environ.get("KILL_SIGNAL"):
    distill.save = save_then_signal
sys.exit(cli.main(sys.argv[1:]))
"""


def temporaries(folder) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp"))


@pytest.mark.parametrize("name", ["SIGTERM"])
def test_a_signal_during_the_final_save_exits_130_and_leaves_no_temporaries(tmp_path, name):
    a, out = make_assets(tmp_path), tmp_path / "run"
    args = distill_args(a, "--out", str(out))
    env = {**subprocess_env(tmp_path / "cache"), "KILL_SIGNAL": name}
    stopped = subprocess.run([sys.executable, "-c", SIGNAL_IN_SAVE, *args], env=env, capture_output=True, text=True,
                             timeout=180)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "Traceback" not in stderr_of(stopped) and stopped.stderr.strip().splitlines()[-1] == "interrupted"
    assert not temporaries(out) and not (out / "model").exists() and not (out / ".attnswap.lock").exists()
    assert (out / "checkpoint.json").is_file()

    code, _, stderr = run_cli([*args, "--resume", "true"])  # the last checkpoint finishes the run
    assert code == 0, stderr[-3000:]
    assert (out / "model" / "config.json").is_file() and not temporaries(out)


def stderr_of(result) -> str:
    return result.stderr


def trained_tensors_of(model_dir) -> dict:
    from safetensors.torch import load_file

    found = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        found.update({f"{file.name}/{k}": v for k, v in load_file(file).items()})
    return found


# A process that imports attnswap, transformers and torch once and forks a child per request, which runs the
# distill command: each trial then costs its run, not an interpreter start. It runs no torch op itself (and threads
# are 1), so the children fork from a process without thread pools. A request is a JSON line {"args", "log",
# "signal_in_save"}; the answer two lines: the child's pid, then its exit code (negative: killed by that signal).
ZYGOTE = """
import json, os, signal, sys, time
import attnswap.train.distill as distill
from attnswap import cli
import transformers.models.gpt2.modeling_gpt2, safetensors.torch  # noqa: F401 (loaded before the forks)

real_save = distill.save
print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    child = os.fork()
    if child == 0:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        if request["signal_in_save"]:
            def save_then_signal(model, directory, tokenizer=None, name=request["signal_in_save"]):
                real_save(model, directory, tokenizer)
                os.kill(os.getpid(), getattr(signal, name))
                for _ in range(6000):
                    time.sleep(0.01)
            distill.save = save_then_signal
        code = cli.main(request["args"])
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    print(child, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]), flush=True)
"""


class Zygote:
    def __init__(self, env: dict):
        self.process = subprocess.Popen([sys.executable, "-c", ZYGOTE], env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "ready"

    def start(self, args: list[str], log, signal_in_save: str | None = None) -> int:
        self.process.stdin.write(json.dumps({"args": args, "log": str(log), "signal_in_save": signal_in_save}) + "\n")
        self.process.stdin.flush()
        return int(self.process.stdout.readline())

    def exit_code(self) -> int:
        return int(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.mark.slow
def test_kills_at_random_moments_resume_bit_identically(tmp_path):
    """24 runs of one distillation, each stopped at a random moment by kill -9 or SIGTERM (18 runs), then inside its
    final save by kill -9, SIGTERM or SIGINT (6 runs), each next one resuming: every SIGTERM or SIGINT exits 130 (or -15 once the command
    had finished) with no temporaries; every kill -9 leaves a folder the next run resumes; the finished model equals
    an uninterrupted run's, tensor for tensor, and so does its KL."""
    import random

    import torch

    a = make_assets(tmp_path)
    zygote = Zygote(subprocess_env(tmp_path / "cache"))
    base = distill_args(a, "--steps", "24", "--ckpt-every", "1", "--eval-every", "4", "--warmup-steps", "2")
    try:
        reference = tmp_path / "reference"
        started = time.time()
        zygote.start([*base, "--out", str(reference)], tmp_path / "reference.log")
        assert zygote.exit_code() == 0, (tmp_path / "reference.log").read_text()[-3000:]
        lifetime = time.time() - started

        rng, out = random.Random(32), tmp_path / "killed"
        plans = [("SIGKILL", None), ("SIGTERM", None)] * 9
        rng.shuffle(plans)
        plans += [("SIGKILL", "save"), ("SIGTERM", "save"), ("SIGINT", "save")] * 2  # once the loop is done
        outcomes = []
        for trial, (name, moment) in enumerate(plans):
            args = [*base, "--out", str(out)] + (["--resume", "true"] if (out / "checkpoint.json").exists() else [])
            log = tmp_path / f"trial-{trial}.log"
            child = zygote.start(args, log, name if moment == "save" else None)
            if moment is None:
                time.sleep(rng.uniform(0.0, lifetime / 4))  # a few steps further each time
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, getattr(signal, name))
            code = zygote.exit_code()
            stderr = log.read_text()
            outcomes.append((name, moment, code))
            assert "Traceback" not in stderr, stderr[-3000:]
            finished = (out / "results.json").is_file()
            if name == "SIGKILL":
                assert code in (0, -signal.SIGKILL), stderr[-3000:]
            else:
                assert code in (0, 130) or (code == -signal.SIGTERM and finished), (code, stderr[-3000:])
                assert not temporaries(out) if out.exists() else True, temporaries(out)
            if out.exists():  # a model folder is whole or absent
                assert not (out / "model").exists() or (out / "model" / "config.json").is_file()

        args = [*base, "--out", str(out)] + (["--resume", "true"] if (out / "checkpoint.json").exists() else [])
        zygote.start(args, tmp_path / "last.log")
        assert zygote.exit_code() == 0, (tmp_path / "last.log").read_text()[-3000:]
    finally:
        zygote.close()
    print("trials (signal, moment, exit code):", outcomes)
    assert not temporaries(out), temporaries(out)
    assert sum(1 for _, moment, _ in outcomes if moment == "save") >= 6 and len(outcomes) >= 20
    interrupted = [o for o in outcomes if o[2] in (130, -signal.SIGKILL, -signal.SIGTERM)]
    assert len(interrupted) >= 10, outcomes  # most trials did stop the run
    expected, got = trained_tensors_of(reference / "model"), trained_tensors_of(out / "model")
    assert expected.keys() == got.keys()
    unequal = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not unequal, (unequal[:3], outcomes)
    ref_result, result = (json.loads((d / "results.json").read_text()) for d in (reference, out))
    assert result["kl_after"] == ref_result["kl_after"] and result["steps_done"] == ref_result["steps_done"] == 24


# --- resume compares content, not names -----------------------------------------------------------------------
def test_resume_is_refused_after_any_input_changed(tmp_path):
    """A checkpointed run, then each of: its weights, its training text's bytes, its dtype, its variant lr scale
    changed: --resume is refused naming the change, and the checkpoint is left as it was."""
    import shutil

    from safetensors.torch import load_file, save_file

    from tests.cli_helpers import digests

    a = make_assets(tmp_path)
    model, train, out = tmp_path / "own-model", tmp_path / "own-train.txt", tmp_path / "run"
    shutil.copytree(a.model, model)
    shutil.copy(a.train, train)
    args = distill_args(a, "--model", str(model), "--data", str(train), "--out", str(out), "--ckpt-every", "1")
    code, _, stderr = run_cli([*args, "--steps", "1"])
    assert code == 0, stderr[-3000:]
    checkpoint = digests(out / "checkpoint.json")

    def refused_with(expected: str, *extra: str) -> None:
        code, _, stderr = run_cli([*args, "--steps", "2", "--resume", "true", *extra])
        assert_refused(code, stderr, expected)
        assert digests(out / "checkpoint.json") == checkpoint

    # only the steps changed: it resumes... (checked last, as it moves the checkpoint on)
    weights = load_file(model / "model.safetensors")
    original = {k: v.clone() for k, v in weights.items()}
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    refused_with("model weights (")
    save_file(original, model / "model.safetensors", metadata={"format": "pt"})

    text = train.read_bytes()
    train.write_bytes(text.replace(b"w4", b"w5", 1))
    refused_with("training data (")
    train.write_bytes(text)

    refused_with("dtype='bfloat16' but the checkpoint", "--dtype", "bfloat16")
    refused_with("dtype (weights float32, autocast off -> weights float32, autocast bfloat16)", "--dtype", "bfloat16")
    refused_with("variant_lr_scale=2.0 but the checkpoint", "--variant-lr-scale", "2")
    refused_with("was made with variant_lr_scale=1.0, dtype='auto'", "--variant-lr-scale", "2", "--dtype", "bfloat16")

    # Content, not names: the same model and text moved elsewhere resume.
    moved_model, moved_train = tmp_path / "moved-model", tmp_path / "moved-train.txt"
    shutil.copytree(model, moved_model)
    shutil.copy(train, moved_train)
    code, _, stderr = run_cli([*args, "--model", str(moved_model), "--data", str(moved_train), "--steps", "2",
                               "--resume", "true"])
    assert code == 0, stderr[-3000:]
    assert "resuming from" in stderr


def test_a_tampered_checkpoint_is_named_before_the_run_announces_itself(tmp_path):
    from safetensors.torch import load_file, save_file

    a, out = make_assets(tmp_path), tmp_path / "run"
    args = distill_args(a, "--out", str(out), "--ckpt-every", "1")
    assert run_cli([*args, "--steps", "1"])[0] == 0
    record = json.loads((out / "checkpoint.json").read_text())
    tensors = load_file(out / record["tensors"])
    name = next(k for k in tensors if k.startswith("model/"))
    tensors[name] = tensors[name].flatten()[:3]
    save_file(tensors, out / record["tensors"])
    code, _, stderr = run_cli([*args, "--steps", "2", "--resume", "true"])
    assert_refused(code, stderr, "corrupt checkpoint")
    assert "distill config" not in stderr


class _SignalledInFinaliser:
    """Receives SIGTERM while its ``__del__`` runs, as a tokenizer's regex objects did in CI."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs between these bytecodes, inside the finaliser
            pass


def test_an_interrupt_swallowed_by_a_finaliser_still_stops_the_command(capfd):
    """Python drops a KeyboardInterrupt raised in ``__del__`` ("Exception ignored"); the command must still stop,
    soon and with no traceback printed, and one that finishes first is interrupted as it finishes."""
    from attnswap import cli

    hook, handler = sys.unraisablehook, signal.getsignal(signal.SIGTERM)
    started = time.time()
    with pytest.raises(KeyboardInterrupt), cli.sigterm_interrupts():
        doomed = _SignalledInFinaliser()
        del doomed
        time.sleep(5)  # the command goes on, here in a blocking call: the interrupt must reach it
    assert time.time() - started < 1 and "Traceback" not in capfd.readouterr().err
    assert sys.unraisablehook is hook and signal.getsignal(signal.SIGTERM) is handler

    started = time.time()
    with pytest.raises(KeyboardInterrupt), cli.sigterm_interrupts():
        doomed = _SignalledInFinaliser()
        del doomed
    assert time.time() - started < 1 and "Traceback" not in capfd.readouterr().err
