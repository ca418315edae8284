"""One live job writes an output at a time: the owner record ``OUTPUT/owner.json``.

The main process takes the record before writing anything, with a conditional write
(create only if absent, replace only if unchanged), renews it every
:data:`HEARTBEAT_SECONDS` and deletes it when the job ends or stops. Whether a record
found there may be taken (:func:`judge`):

- it is this job's own (same uid): a later attempt takes it from an earlier one, whose
  pods the operator has given up; an earlier attempt never takes it back;
- it is a job of the same namespace and name but another uid: the job was deleted and
  created again (a GitOps re-create) and the old pods are still stopping, so wait for
  them to let go;
- it has not been renewed for :data:`STALE_SECONDS`: its holder is gone, take it over;
- otherwise another job is writing the output: refuse, naming it.

Local runs (no uid) are told apart by machine and job name.
"""

import datetime
import json
import logging
import socket
import threading
import time
from dataclasses import asdict, dataclass

from difftrain.errors import DifftrainError, StorageUnavailable
from difftrain.storage import Conflict, Store

log = logging.getLogger(__name__)

RECORD = "owner.json"
HEARTBEAT_SECONDS = 60
STALE_SECONDS = 600
WAIT_POLL_SECONDS = 5


class OutputInUse(DifftrainError):
    """Another job writes this output; two runs would mix up their checkpoints."""

    reason = "OutputInUse"
    exit_code = 2


@dataclass(frozen=True)
class Holder:
    """A job's claim on an output."""

    namespace: str
    name: str
    uid: str
    attempt: int
    host: str

    @classmethod
    def of(cls, config) -> "Holder":
        return cls(config.namespace, config.name, config.uid, config.attempt, socket.gethostname())

    @classmethod
    def parse(cls, found: dict) -> "Holder":
        return cls(**{key: found[key] for key in cls.__dataclass_fields__})

    @property
    def job(self) -> str:
        return f"{self.namespace}/{self.name}"

    def same_job(self, other: "Holder") -> bool:
        if self.uid or other.uid:
            return self.uid == other.uid
        return (self.host, self.job) == (other.host, other.job)  # local runs


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _record(holder: Holder, now: datetime.datetime) -> bytes:
    return json.dumps({**asdict(holder), "heartbeat": now.isoformat()}, indent=2).encode()


def judge(found: dict, holder: Holder, now: datetime.datetime) -> str:
    """``take``, ``wait`` or ``refuse`` the record ``found`` for ``holder`` (see above)."""
    other = Holder.parse(found)
    age = (now - datetime.datetime.fromisoformat(found["heartbeat"])).total_seconds()
    if other.same_job(holder):
        return "take" if other.attempt <= holder.attempt else "refuse"
    if age > STALE_SECONDS:
        return "take"
    if other.job == holder.job and other.uid != holder.uid:
        return "wait"
    return "refuse"


def _refusal(store: Store, found: dict, holder: Holder, now: datetime.datetime) -> OutputInUse:
    age = int((now - datetime.datetime.fromisoformat(found["heartbeat"])).total_seconds())
    other = f"job {found['namespace']}/{found['name']} (uid {found['uid'] or 'none, local'}"
    if Holder.parse(found).same_job(holder):
        return OutputInUse(
            f"{store.uri} is held by attempt {found['attempt']} of this job, newer than this "
            f"attempt {holder.attempt}: this attempt has been replaced and stops"
        )
    return OutputInUse(
        f"{store.uri} is being written by {other}, on {found['host']}), last seen {age} s "
        f"ago: two jobs writing one output would mix up their checkpoints. Give this job "
        f"its own spec.output.uri (or delete the other job); a holder silent for "
        f"{STALE_SECONDS} s is taken over"
    )


class Lease:
    """This job's hold on an output, renewed in the background until released."""

    def __init__(self, store: Store, holder: Holder, tag: str):
        self.store, self.holder, self.tag = store, holder, tag
        self.lost = False  # another job took it: this one must stop writing
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="owner-record", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self.tag = self.store.write_if(RECORD, _record(self.holder, _now()), self.tag)
            except Conflict:
                log.error("%s/%s was taken over by another job", self.store.uri, RECORD)
                self.lost = True
                return
            except StorageUnavailable as error:  # try again at the next beat
                log.warning("cannot renew %s/%s: %s", self.store.uri, RECORD, error)

    def release(self) -> None:
        """Stop renewing and delete the record if it is still this job's."""
        self._stop.set()
        self._thread.join()
        if self.lost:
            return
        try:
            _, tag = self.store.read_tagged(RECORD)
            if tag == self.tag:
                self.store.delete([RECORD])
        except FileNotFoundError:
            pass


def take(store: Store, holder: Holder) -> Lease:
    """Hold ``store`` for ``holder``, waiting for a re-created job's predecessor; raises
    :class:`OutputInUse` when another live job holds it."""
    waited = False
    while True:
        now = _now()
        try:
            return Lease(store, holder, store.write_if(RECORD, _record(holder, now), None))
        except Conflict:
            pass
        try:
            data, tag = store.read_tagged(RECORD)
        except FileNotFoundError:
            continue  # released meanwhile
        try:
            found = json.loads(data)
            verdict = judge(found, holder, now)
        except (ValueError, KeyError, TypeError):
            log.warning("%s/%s is not an owner record; replacing it", store.uri, RECORD)
            found, verdict = None, "take"
        if verdict == "refuse":
            raise _refusal(store, found, holder, now)
        if verdict == "wait":
            if not waited:
                log.warning(
                    "%s is held by an earlier job of the same name (uid %s); waiting "
                    "for it to stop",
                    store.uri,
                    found["uid"],
                )
                waited = True
            time.sleep(WAIT_POLL_SECONDS)
            continue
        if found is not None and not Holder.parse(found).same_job(holder):
            log.warning(
                "taking over %s from job %s/%s, silent since %s",
                store.uri,
                found["namespace"],
                found["name"],
                found["heartbeat"],
            )
        try:
            return Lease(store, holder, store.write_if(RECORD, _record(holder, now), tag))
        except Conflict:
            continue  # someone else moved first: look again
