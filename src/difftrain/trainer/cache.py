"""A node-local cache: the first process on a node fills an entry, the others wait for it.

Entries are folders completed by a marker file, created under an exclusive file lock, so
several local ranks (or a rerun after a crash) never see a half-written entry.
"""

import fcntl
import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

MARKER = ".complete"


def cached_folder(cache: Path, key: str, fill: Callable[[Path], None]) -> Path:
    """The folder for ``key`` under ``cache``, calling ``fill(folder)`` once if needed."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = cache / digest
    if (folder / MARKER).exists():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (folder / MARKER).exists():
            shutil.rmtree(folder, ignore_errors=True)  # an earlier, interrupted fill
            folder.mkdir()
            fill(folder)
            (folder / MARKER).write_text(key + "\n")
    return folder
