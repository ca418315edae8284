"""Which run a checkpoint belongs to, and whether this job may resume it.

Every checkpoint carries ``run.json``: the run's id, the job that wrote it, when, and the
training-relevant part of its spec (model, dataset, method blocks, training, and the
number of processes) with its hash. A run starts when a job trains from step 0; a
resumed job continues the run of its checkpoint. ``resume: auto`` resumes the newest
checkpoint only if its spec hash is this job's: the same manifest re-created (a new uid,
as a GitOps tool does) resumes, a changed learning rate or a different number of
processes is refused, naming the fields. Checkpoints of other runs are never resumed,
pruned or mixed with this run's.
"""

import datetime
import hashlib
import json
import uuid
from dataclasses import dataclass

from difftrain.errors import InvalidSpec

RECORD = "run.json"
# The spec groups that decide what a checkpoint's weights and optimiser state mean.
# checkpoints, validation, output, storage and runPolicy may change between attempts.
TRAINING_FIELDS = {
    "method",
    "model",
    "dataset",
    "lora",
    "dreambooth",
    "textual_inversion",
    "full",
    "training",
}
# The number of processes, under this name in run.json and as shown in messages.
PROCESSES = "processes"
_SHOWN = {PROCESSES: "processes (spec.resources.nodes times gpusPerNode)"}


def processes(spec) -> int:
    """Training processes of the job: the data order and random states are per process."""
    return spec.resources.nodes * max(1, spec.resources.gpus_per_node)


def training_spec(spec) -> dict:
    """The training-relevant spec as JSON, fields at their defaults left out (so that a
    field added with a default by a later version changes nothing). The length of the
    run (steps, epochs) is left out too: raising it continues a run to its new end."""
    relevant = spec.model_dump(
        mode="json", by_alias=True, exclude_defaults=True, include=TRAINING_FIELDS
    )
    for length in ("steps", "epochs"):
        relevant.get("training", {}).pop(length, None)
    relevant[PROCESSES] = processes(spec)
    return relevant


def spec_hash(relevant: dict) -> str:
    text = json.dumps(relevant, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


@dataclass(frozen=True)
class RunIdentity:
    """The run this job's processes write: its id and what identifies its spec."""

    id: str
    spec: dict
    job: dict  # namespace, name, uid of the job writing it now

    @property
    def spec_hash(self) -> str:
        return spec_hash(self.spec)

    def record(self, step: int) -> bytes:
        """``run.json`` of this run's checkpoint at ``step``."""
        saved = datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")
        record = {
            "run": self.id,
            "step": step,
            "savedAt": saved,
            "job": self.job,
            "specHash": self.spec_hash,
            "spec": self.spec,
        }
        return (json.dumps(record, indent=2) + "\n").encode()


def differences(old: dict, new: dict) -> list[str]:
    """``field old → new`` for each leaf that differs, in field order."""
    before, after = _leaves(old), _leaves(new)
    names = [*before, *(name for name in after if name not in before)]
    return [
        f"{_SHOWN.get(name, name)} {_shown(before.get(name))} → {_shown(after.get(name))}"
        for name in names
        if before.get(name) != after.get(name)
    ]


def _leaves(value: dict, prefix: str = "") -> dict:
    leaves = {}
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, dict) and item:
            leaves.update(_leaves(item, name + "."))
        else:
            leaves[name] = item
    return leaves


def _shown(value) -> str:
    return "(default)" if value is None else json.dumps(value)


def check_resumable(record: dict | None, current: dict, where: str) -> None:
    """Raise InvalidSpec unless the checkpoint at ``where`` with ``record`` (its
    ``run.json``; None when it has none) may be resumed by a job whose training spec is
    ``current``."""
    fix = (
        "give this job a new spec.output.uri, or set spec.checkpoints.resume: never to "
        "start afresh here (the existing checkpoints are kept)"
    )
    if record is None or "specHash" not in record:
        raise InvalidSpec(
            f"the newest checkpoint, {where}, has no {RECORD} telling which run wrote it, so "
            f"it cannot be resumed safely: {fix}"
        )
    if record["specHash"] == spec_hash(current):
        return
    changed = differences(record.get("spec", {}), current)
    job = record.get("job", {})
    writer = f"job {job.get('namespace')}/{job.get('name')}" if job else "another job"
    raise InvalidSpec(
        f"the newest checkpoint, {where}, was written by {writer} with a different training "
        f"spec: {'; '.join(changed) or 'its spec hash differs'}. Resuming it would continue "
        f"that run with its own weights, optimiser state and schedule: {fix}"
    )
