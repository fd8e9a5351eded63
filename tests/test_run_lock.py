"""runs.py: one run per folder (a second is refused naming the first's pid), stale locks taken over, atomic folders,
stale temporaries removed, output paths checked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from attnswap.errors import AttnswapError
from attnswap.runs import LOCK_FILE, atomic_directory, check_output_dir, remove_stale_temps, run_lock
from tests.cli_helpers import assert_refused, distill_args, make_assets, run_cli

# Another run's lock as runs.py takes it (pid written, flock held), in a process that needs no torch to start.
HOLDER = """
import fcntl, os, sys, time
handle = open(sys.argv[1], "a+")
fcntl.flock(handle, fcntl.LOCK_EX)
handle.write(f"{os.getpid()}\\n"); handle.flush()
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """A live process holding ``tmp_path/run``'s lock; killed with SIGKILL at the end if still running."""
    folder = tmp_path / "run"
    folder.mkdir()
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder / LOCK_FILE)], stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().strip() == "locked"
    yield folder, process
    if process.poll() is None:
        process.kill()
        process.wait()


def test_a_second_run_on_a_locked_folder_is_refused_naming_the_first(holder, tmp_path):
    folder, process = holder
    a = make_assets(tmp_path)
    code, _, stderr = run_cli(distill_args(a, "--out", str(folder)))
    assert_refused(code, stderr, f"in use by another run (pid {process.pid}")
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE], "the refused run wrote into the folder"
    with pytest.raises(AttnswapError, match=f"pid {process.pid}"):
        with run_lock(folder):
            pass


def test_a_lock_left_by_a_killed_run_is_taken_over(holder, caplog):
    folder, process = holder
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (folder / LOCK_FILE).read_text().strip() == str(process.pid)  # kill -9 left the lock file behind
    with caplog.at_level("WARNING"), run_lock(folder) as lock:
        assert lock.read_text().strip() == str(os.getpid())
    assert f"stale lock {folder / LOCK_FILE} of pid {process.pid}" in caplog.text
    assert not (folder / LOCK_FILE).exists()


def test_the_lock_is_released_and_taken_again(tmp_path):
    with run_lock(tmp_path / "run") as lock:
        assert lock.read_text().strip() == str(os.getpid())
        with pytest.raises(AttnswapError, match=f"pid {os.getpid()}"):  # even from this process
            with run_lock(tmp_path / "run"):
                pass
        (tmp_path / "run" / "results.json").write_text("{}")
    assert not lock.exists()
    with run_lock(tmp_path / "run"):
        pass


def test_a_run_that_wrote_nothing_leaves_no_folder(tmp_path):
    with pytest.raises(RuntimeError):
        with run_lock(tmp_path / "new" / "run"):
            raise RuntimeError("refused before any output")
    assert not (tmp_path / "new" / "run").exists()


def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path):
    final = tmp_path / "model"
    with atomic_directory(final) as building:
        (building / "weights").write_text("1")
        assert not final.exists()
    assert (final / "weights").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as building:
            (building / "weights").write_text("half")
            raise RuntimeError("killed mid-write")
    assert (final / "weights").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with atomic_directory(final) as building:
        (building / "weights").write_text("2")
    assert (final / "weights").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / "model.123.tmp").mkdir()
    (tmp_path / "model.123.tmp" / "config.json").write_text("{")
    (tmp_path / "checkpoint.json.tmp").write_text("{")
    (tmp_path / "checkpoint.json").write_text("{}")
    removed = remove_stale_temps(tmp_path)
    assert [p.name for p in removed] == ["checkpoint.json.tmp", "model.123.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.json"]


@pytest.mark.parametrize("make_path, message", [
    (lambda f: f, "is a file"),
    (lambda f: f / "below", "which is a file"),
    (lambda f: f.parent / "", None),
    (lambda f: f.parent / "new" / "deeper", None),
], ids=["file", "under_a_file", "existing_folder", "new_folders"])
def test_check_output_dir(tmp_path, make_path, message):
    file = tmp_path / "a_file"
    file.write_text("x")
    path = make_path(file)
    if message is None:
        assert check_output_dir(path) == path and not (tmp_path / "new").exists()  # creates nothing
    else:
        with pytest.raises(AttnswapError, match=message):
            check_output_dir(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_check_output_dir_refuses_a_read_only_folder(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(AttnswapError, match="permission denied"):
        check_output_dir(tmp_path / "ro" / "run")


@pytest.mark.parametrize("command", ["eval", "generate", "bench", "bench-kernel", "harden", "run"])
def test_every_command_that_writes_a_folder_holds_its_lock(tmp_path, command):
    """Two evaluations (or benchmarks, ...) into one folder would interleave their files as two distills did."""
    args = {"harden": ["--swapped", str(tmp_path / "nope")], "run": [str(tmp_path / "run.yaml")]}.get(command, [])
    (tmp_path / "run.yaml").write_text(f"out: {tmp_path / 'busy'}\n")
    with run_lock(tmp_path / "busy"):
        code, _, stderr = run_cli([command, *args] + ([] if command == "run" else ["--out", str(tmp_path / "busy")]))
    assert_refused(code, stderr, f"in use by another run (pid {os.getpid()}")


def test_atomic_files_replace_a_folder_whole_or_not_at_all(tmp_path):
    from attnswap.runs import atomic_files

    folder = tmp_path / "swap"
    with atomic_files(folder) as building:
        (building / "model.safetensors").write_text("1")
        (building / "config.json").write_text("{}")
    with pytest.raises(KeyboardInterrupt):
        with atomic_files(folder) as building:
            (building / "model.safetensors").write_text("half")
            raise KeyboardInterrupt  # a signal mid-save: the old files stay, no temporary is left
    assert (folder / "model.safetensors").read_text() == "1" and (folder / "config.json").is_file()
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


def test_signals_held_defers_sigterm_until_the_renames_are_done(tmp_path):
    from attnswap.runs import signals_held

    arrived = []
    previous = signal.signal(signal.SIGTERM, lambda *_: arrived.append("now"))
    try:
        with signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            arrived.append("renamed")
        assert arrived == ["renamed", "now"]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_output_paths_never_overlap_inputs(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for out, relation in ((model, "is the input"), (model / "sub", "lies inside"), (tmp_path, "contains")):
        with pytest.raises(AttnswapError, match=relation):
            check_output_dir(out, inputs={"model": str(model)})
    check_output_dir(model / "report", inputs={"run_dirs": [str(model)]}, allow_inside=True)
    with pytest.raises(AttnswapError, match="--out is empty"):
        check_output_dir("")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(AttnswapError, match="cannot follow its symlinks"):
        check_output_dir(tmp_path / "loop")
