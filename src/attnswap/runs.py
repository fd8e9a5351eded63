"""Run folders that two processes cannot share, output paths checked before any work, folders a kill cannot leave
half written.

- ``run_lock(folder)`` (``holding_out_folder`` for a command): the folder's ``.attnswap.lock`` holds the pid of the
  run using it, under an exclusive ``flock``. The kernel drops a flock when its process dies, ``kill -9`` included,
  so a lock whose flock is free is stale whatever pid it names (and a reused pid cannot keep it alive): the next
  run takes it over. (An O_EXCL file alone would need the pid to judge staleness, and two runs taking over the
  same stale file could both win.)
- ``atomic_directory(final)``: build a folder under a temporary name beside ``final``, then rename it into place.
  A kill leaves either the previous folder, the new one, or (between the two renames) none: never half of one.
- ``remove_stale_temps(folder)``: what killed writers left behind (``*.tmp``); call it while holding the lock.
- ``check_output_dir(path, inputs)``: refuse an output path that is empty, a file, under a file, through a symlink
  loop, not writable, or equal to, inside or above any of the command's inputs, before a command computes anything.
- ``atomic_write(path, data)`` and ``atomic_files(folder)``: files written under a temporary name and renamed into
  place; a signal (SIGINT, SIGTERM) or a full disk mid-write leaves the previous file and no temporary.
- ``signals_held()``: SIGINT and SIGTERM wait while a few renames run, so a kill never lands between two of them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from attnswap.errors import AttnswapError
from attnswap.validate import check_disjoint, real_path

log = logging.getLogger(__name__)
LOCK_FILE = ".attnswap.lock"
TEMP_SUFFIX = ".tmp"
R = TypeVar("R")
# Config fields that name what a command reads: its output folder may not be, hold or sit inside any of them.
INPUT_FIELDS = ("model", "swapped", "data", "val_data", "prompts", "map_text", "run_dirs")


# --- the run lock -------------------------------------------------------------------------------
@contextlib.contextmanager
def run_lock(folder: str | Path, inputs: dict[str, Any] | None = None) -> Iterator[Path]:
    """Hold ``folder``'s lock for the duration (creating the folder, and removing it again if the run left it
    empty); another live holder is refused by pid. ``inputs``: as for ``check_output_dir``."""
    folder = check_output_dir(folder, inputs=inputs)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    handle = _acquire(lock)
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)  # before the flock goes: a waiter then finds the path gone and starts afresh
        handle.close()
        if created and not any(folder.iterdir()):  # a run refused before it wrote anything leaves no trace
            folder.rmdir()


def holding_out_folder(command: Callable[[Any], R]) -> Callable[[Any], R]:
    """Decorate a command ``command(config)`` so that it runs holding the lock of ``config.out``."""
    @functools.wraps(command)
    def locked(config: Any) -> R:
        with run_lock(config.out, inputs=command_inputs(config)):
            return command(config)

    return locked


def command_inputs(config: Any) -> dict[str, Any]:
    """The fields of ``config`` that name what the command reads (INPUT_FIELDS), by name; an empty ``model`` is the
    bundled teacher."""
    from attnswap.paths import DEFAULT_MODEL

    found = {name: getattr(config, name) for name in INPUT_FIELDS if getattr(config, name, None)}
    if hasattr(config, "model") and not config.model:
        found["model"] = DEFAULT_MODEL
    return found


def _acquire(lock: Path):
    """An open handle on ``lock`` holding its flock, with this pid written in it."""
    while True:
        handle = open(lock, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise AttnswapError(f"{lock.parent} is in use by another run (pid {holder}, lock {lock}); wait for it "
                                "to end or choose another --out") from None
        if _same_file(handle, lock):
            break
        handle.close()  # the holder released (unlinked) the file after we opened it: lock the new one
    handle.seek(0)
    stale = handle.read().strip()
    if stale:
        log.warning("taking over the stale lock %s of pid %s, which is no longer running", lock, stale)
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _same_file(handle, path: Path) -> bool:
    try:
        return os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


# --- atomic folders and stale temporaries -------------------------------------------------------
@contextlib.contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; when the block ends without an error it replaces
    ``final`` (any previous one is removed), else it is deleted."""
    final = Path(final)
    building = final.with_name(f"{final.name}.{os.getpid()}{TEMP_SUFFIX}")
    replaced = final.with_name(f"{final.name}.{os.getpid()}.old{TEMP_SUFFIX}")
    for leftover in (building, replaced):
        _remove(leftover)
    building.mkdir(parents=True)
    try:
        yield building
    except BaseException:
        _remove(building)
        raise
    with signals_held():
        if final.exists():
            os.replace(final, replaced)
        os.replace(building, final)
        _remove(replaced)


@contextlib.contextmanager
def atomic_files(folder: str | Path, last: str = "config.json") -> Iterator[Path]:
    """Yield an empty temporary folder inside ``folder``; when the block ends without an error, every file in it
    replaces its namesake in ``folder``: ``last`` removed first and moved in last, so that a reader, which looks for
    ``last``, finds the old files or the new ones, never a mix. On an error (a signal, a full disk) nothing changes
    and the temporary folder is removed."""
    folder = Path(folder)
    building = folder / f"saving.{os.getpid()}{TEMP_SUFFIX}"
    _remove(building)
    building.mkdir(parents=True)
    try:
        with disk_errors(folder):
            yield building
    except BaseException:
        _remove(building)
        raise
    with signals_held():
        names = sorted(p.name for p in building.iterdir())
        (folder / last).unlink(missing_ok=True)
        for name in sorted(names, key=lambda n: n == last):
            target = folder / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(building / name, target)
        building.rmdir()


def atomic_write(path: str | Path, data: str | bytes | Callable[[Path], object]) -> Path:
    """Write ``data`` (text, bytes, or a function that writes the file it is given) to ``path`` under a temporary
    name, then rename it into place; on any error or signal the temporary is removed."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    try:
        with disk_errors(path):
            if callable(data):
                data(tmp)
            elif isinstance(data, bytes):
                tmp.write_bytes(data)
            else:
                tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def disk_errors(where: str | Path) -> Iterator[None]:
    """A full disk (or quota) while writing under ``where``: one line instead of safetensors' or the OS's error."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as exc:
        full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
        if not full and not any(s in str(exc) for s in ("No space left", "os error 28", "Disk quota")):
            raise
        raise AttnswapError(f"the disk is full writing {where} ({str(exc).splitlines()[0][:120]}); free some space "
                            "or choose another --out, then run the command again") from None


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait for the duration (recorded, not lost), then arrive. Handlers, not a signal mask: a
    mask holds only this thread, and the kernel hands a process's signal to any thread that does not block it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {number: signal.signal(number, lambda number, _frame: pending.append(number))
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if pending:
            signal.raise_signal(pending[0])


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the ``*.tmp`` files and folders directly in ``folder`` (left by killed writers); returns them.
    Only safe while holding ``folder``'s run lock: a live writer's temporaries look the same."""
    stale = sorted(Path(folder).glob(f"*{TEMP_SUFFIX}"))
    for path in stale:
        _remove(path)
    if stale:
        log.info("removed %d stale temporary file(s) in %s: %s", len(stale), folder,
                 ", ".join(p.name for p in stale))
    return stale


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# --- output paths -------------------------------------------------------------------------------
def check_output_dir(path: str | Path, key: str = "out", inputs: dict[str, Any] | None = None,
                     allow_inside: bool = False) -> Path:
    """``path`` as a folder a command may create and write into; refused in one line if it is empty, a file, sits
    under a file, runs through a symlink loop or cannot be written, or is equal to, inside or above one of
    ``inputs`` (field -> path(s) the command reads; ``allow_inside``: see ``validate.check_disjoint``). Creates
    nothing."""
    if not str(path).strip():  # Path("") is "." : an empty --out would write into the working directory
        raise AttnswapError(f"--{key} is empty; give a folder for the results")
    path = Path(path).expanduser()
    real_path(path, key)  # a symlink loop, refused before exists() reads it as absent
    if os.path.lexists(path) and not path.exists():
        raise AttnswapError(f"--{key} {path} is a broken symlink; remove it or give another folder")
    if path.exists() and not path.is_dir():
        raise AttnswapError(f"--{key} {path} is a file; give a folder path (a new or existing folder)")
    check_disjoint(path, inputs or {}, key, allow_inside)
    existing = path
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        raise AttnswapError(f"--{key} {path} lies under {existing}, which is a file; choose a path under a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AttnswapError(f"--{key} {path}: cannot write in {existing} (permission denied); choose another path")
    return path
