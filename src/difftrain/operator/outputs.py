"""Which job holds which output: two live jobs writing one ``spec.output.uri`` would prune
and overwrite each other's checkpoints, so the second is refused before it creates
anything. The trainer refuses it too (an owner record in the output); this catches it at
admission, with a condition naming the other job.

The index is filled from the jobs the operator sees (watch events, resyncs, reconciles),
and once from a full list before its first answer, so a restarted operator knows every
job that already holds an output.
"""

from dataclasses import dataclass, field

from difftrain.operator.status import TERMINAL


@dataclass(frozen=True)
class Holder:
    namespace: str
    name: str
    uid: str
    created: str  # metadata.creationTimestamp: RFC 3339 in UTC, so it sorts as text
    started: bool  # its children exist (or did): it holds the output whatever its age
    ended: bool


def output_key(uri: str) -> str:
    return uri.rstrip("/")


@dataclass
class OutputIndex:
    primed: bool = False
    _jobs: dict[tuple[str, str], tuple[str, Holder]] = field(default_factory=dict)

    def note(self, body: dict) -> None:
        """Record a job as it now is (any body the operator received)."""
        metadata, status = body.get("metadata", {}), body.get("status") or {}
        uri = ((body.get("spec") or {}).get("output") or {}).get("uri")
        key = (metadata.get("namespace", ""), metadata.get("name", ""))
        if not uri or not metadata.get("uid"):
            return
        started = any(
            c.get("type") == "Created" and c.get("status") == "True"
            for c in status.get("conditions", [])
        ) or bool(status.get("attempt"))
        holder = Holder(
            *key,
            metadata["uid"],
            metadata.get("creationTimestamp", ""),
            started,
            status.get("phase") in TERMINAL,
        )
        self._jobs[key] = (output_key(uri), holder)

    def forget(self, namespace: str, name: str) -> None:
        self._jobs.pop((namespace, name), None)

    def holder(self, body: dict) -> Holder | None:
        """The live job that holds ``body``'s output before it, if any: one that started,
        else an older one (by creation, then name) that has not been refused."""
        metadata = body["metadata"]
        mine = output_key(body["spec"]["output"]["uri"])
        me = (metadata.get("creationTimestamp", ""), metadata["namespace"], metadata["name"])
        for uri, other in self._jobs.values():
            if uri != mine or other.uid == metadata["uid"] or other.ended:
                continue
            if other.started or (other.created, other.namespace, other.name) < me:
                return other
        return None
