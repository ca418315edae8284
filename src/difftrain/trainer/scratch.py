"""The node's scratch disk: room checked before large writes, and a full disk named.

In a pod, scratch is an emptyDir whose size limit (``spec.resources.scratchSize``) the
file system does not show: going over it gets the pod evicted. So before writing a
checkpoint or the model, the trainer checks both the limit (less what scratch already
holds) and the disk's free space, and fails with :class:`DiskFull`, naming the folder
and the size needed, instead of being evicted or failing with a raw ``OSError``.
"""

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from difftrain.errors import DiskFull

GIB = 2**30
_FULL = (errno.ENOSPC, errno.EDQUOT)
# A write that failed with less than this left on the disk failed for want of room.
_NEARLY_FULL = 2**20


def _size(folder: Path) -> int:
    total = 0
    for parent, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):  # gone meanwhile
                total += os.lstat(os.path.join(parent, name)).st_size
    return total


def _gib(count: int) -> str:
    return f"{count / GIB:.2f} GiB"


@dataclass(frozen=True)
class Scratch:
    """The scratch disk rooted at ``root`` (every process of the node shares it), with a
    size limit of ``limit`` bytes."""

    root: Path
    limit: int

    def room(self) -> int:
        """Bytes that may still be written."""
        self.root.mkdir(parents=True, exist_ok=True)
        return min(shutil.disk_usage(self.root).free, self.limit - _size(self.root))

    def _full(self, folder: Path, what: str, need: int, room: int) -> DiskFull:
        return DiskFull(
            f"no room in {folder} for {what}: it needs about {_gib(need)} and {_gib(room)} "
            f"is left (scratch limit {_gib(self.limit)}); raise spec.resources.scratchSize "
            "or give the node more disk"
        )

    def ensure_room(self, folder: Path, what: str, need: int) -> None:
        room = self.room()
        if need > room:
            raise self._full(folder, what, need, room)

    @contextlib.contextmanager
    def writing(self, folder: Path, what: str, need: int) -> Iterator[None]:
        """Check the room for ``need`` bytes, then turn a full disk while writing ``what``
        into :class:`DiskFull`. Libraries report it in their own ways (safetensors and
        torch.save do not raise OSError), so any error with a full disk counts."""
        self.ensure_room(folder, what, need)
        try:
            yield
        except Exception as error:
            full = isinstance(error, OSError) and error.errno in _FULL
            if full or shutil.disk_usage(self.root).free < max(need, _NEARLY_FULL):
                raise self._full(folder, what, need, max(0, self.room())) from error
            raise
