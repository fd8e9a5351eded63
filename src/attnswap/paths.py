"""Where attnswap's files are, and what a set of files holds: a leaf module every layer may import."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = str(REPO_ROOT / "models" / "teacher-gpt2-19m")  # bundled: runs with no network


def default_cache_dir() -> Path:
    return Path(os.environ.get("ATTNSWAP_CACHE", REPO_ROOT / ".cache" / "attnswap"))


def files_digest(files: list[Path], names: bool = True) -> str:
    """sha256 of the files' bytes in order, and of their names unless ``names`` is False."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0" if names else b"\0")
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
