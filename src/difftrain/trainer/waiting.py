"""Waiting for work that one process does alone, without the collective timeout.

While the main process uploads a checkpoint, takes samples or exports the model, the
others have nothing to do. Waiting for it inside a collective (a barrier, a gather, the
next step's all-reduce) would fail the whole group once the work outlasts the process
group's timeout (``spec.runPolicy.collectiveTimeoutSeconds``), and every attempt would
then fail at the same step. So they wait here instead: on counters in torchrun's own
key-value store, polled with no time limit. If the process doing the work fails, it
says so in the store and the waiting processes fail too, instead of waiting for ever;
if its whole node goes, the store goes with it and so does every wait.
"""

import logging
import time

from difftrain.errors import DifftrainError

log = logging.getLogger(__name__)

POLL_SECONDS = 0.1
_ABANDONED = "difftrain/abandoned"


class MainFailed(DifftrainError):
    """The process this one waited for failed; its own log has the cause."""

    reason = "MainProcessFailed"
    exit_code = 1


class Waiting:
    """Barriers of one run's processes, numbered in the order every process reaches them."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.count = 0

    @property
    def _store(self):
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()

    def barrier(self, label: str) -> None:
        """Return once every process has reached this barrier."""
        if self.world_size == 1:
            return
        self.count += 1
        key = f"difftrain/barrier/{self.count}/{label}"
        store = self._store
        store.add(key, 1)
        while store.add(key, 0) < self.world_size:
            if store.check([_ABANDONED]):
                what = store.get(_ABANDONED).decode()
                raise MainFailed(f"another process failed while {what}; its log has the cause")
            time.sleep(POLL_SECONDS)

    def alone(self, main: bool, what: str, work) -> None:
        """Run ``work()`` on the main process while the others wait for it here."""
        if main:
            try:
                work()
            except BaseException:
                self.abandon(what)
                raise
        self.barrier(what)

    def abandon(self, what: str) -> None:
        """Tell waiting processes that this one failed while doing ``what``."""
        if self.world_size > 1:
            try:
                self._store.set(_ABANDONED, what)
            except Exception:  # the store itself may be what failed
                log.warning("could not tell the other processes that %s failed", what)
