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
- ``check_output_dir(path)``: refuse an output path that is a file, sits under a file or cannot be written, before a
  command computes anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from attnswap.errors import AttnswapError

log = logging.getLogger(__name__)
LOCK_FILE = ".attnswap.lock"
TEMP_SUFFIX = ".tmp"
R = TypeVar("R")


# --- the run lock -------------------------------------------------------------------------------
@contextlib.contextmanager
def run_lock(folder: str | Path) -> Iterator[Path]:
    """Hold ``folder``'s lock for the duration (creating the folder, and removing it again if the run left it
    empty); another live holder is refused by pid."""
    folder = Path(folder)
    check_output_dir(folder)
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
        with run_lock(config.out):
            return command(config)

    return locked


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
    if final.exists():
        os.replace(final, replaced)
    os.replace(building, final)
    _remove(replaced)


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
def check_output_dir(path: str | Path, key: str = "out") -> Path:
    """``path`` as a folder a command may create and write into; refused in one line if it is a file, sits under
    a file or cannot be written. Creates nothing."""
    path = Path(path).expanduser()
    if not str(path).strip():
        raise AttnswapError(f"--{key} is empty; give a folder for the results")
    if path.exists() and not path.is_dir():
        raise AttnswapError(f"--{key} {path} is a file; give a folder path (a new or existing folder)")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise AttnswapError(f"--{key} {path} lies under {existing}, which is a file; choose a path under a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AttnswapError(f"--{key} {path}: cannot write in {existing} (permission denied); choose another path")
    return path
