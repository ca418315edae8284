"""A DiffusionTrainingJob's status, computed from what the operator observes.

Pure functions: :func:`observe` reads the current attempt's batch Job and its pods,
:func:`next_status` turns that into the new status and the one action to take. Time is
an argument, so the same observation always gives the same answer.
"""

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from difftrain.api.job import DiffusionTrainingJob

# How long an image may fail to pull before the job fails (a typo never heals; a slow
# registry does).
IMAGE_PULL_GRACE = timedelta(minutes=5)
PULL_FAILURES = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName")
# The kubelet cannot make the container (a missing Secret or ConfigMap key, most often).
CONFIG_FAILURES = ("CreateContainerConfigError", "CreateContainerError")
PERMANENT_REASONS = {2: "InvalidSpec", 3: "DatasetError", 4: "StorageAccessDenied"}
TERMINAL = ("Succeeded", "Failed")
CONDITION_TYPES = (
    "Created", "Unschedulable", "Running", "Restarting", "Suspended", "Succeeded", "Failed"
)  # fmt: skip

State = Literal["missing", "waiting", "suspended", "pending", "running", "succeeded", "failed"]
Action = Literal["none", "restart"]


@dataclass(frozen=True)
class Observation:
    """What the current attempt is doing, with a CamelCase reason and a message."""

    state: State
    reason: str = ""
    message: str = ""
    permanent: bool = False  # a failure that restarting will not fix


def timestamp(now: datetime) -> str:
    """RFC 3339 in UTC with a Z, as the API server writes times."""
    return now.isoformat().replace("+00:00", "Z")


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _condition(obj: dict, kind: str) -> dict | None:
    for condition in obj.get("status", {}).get("conditions", []) or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return condition
    return None


def _terminated(pod: dict) -> dict | None:
    for container in pod.get("status", {}).get("containerStatuses", []) or []:
        state = container.get("state", {}).get("terminated")
        if state and state.get("exitCode", 0) != 0:
            return state
    return None


def _trainer_message(terminated: dict) -> tuple[str | None, str]:
    """(reason, message) from the trainer's JSON termination message, if it wrote one."""
    text = (terminated.get("message") or "").strip()
    try:
        found = json.loads(text)
        return found.get("reason"), str(found.get("message", ""))
    except (ValueError, AttributeError):
        return None, text


def failure(pods: list[dict]) -> Observation:
    """Why the attempt failed, from its pods' terminated containers."""
    for pod in pods:
        terminated = _terminated(pod)
        if terminated is None:
            continue
        code = terminated.get("exitCode")
        reason, message = _trainer_message(terminated)
        # The trainer's own reason counts even if a launcher changed the exit code.
        if code in PERMANENT_REASONS or reason in PERMANENT_REASONS.values():
            return Observation("failed", reason or PERMANENT_REASONS[code], message, True)
        if terminated.get("reason") == "OOMKilled":
            return Observation("failed", "OOMKilled", message or "the trainer ran out of memory")
        detail = f": {message}" if message else ""
        return Observation("failed", "Error", f"exit code {code}{detail}")
    return Observation("failed", "Error", "the attempt failed without a terminated container")


def _pending(pods: list[dict], now: datetime) -> Observation:
    for pod in pods:
        for container in pod.get("status", {}).get("containerStatuses", []) or []:
            waiting = container.get("state", {}).get("waiting") or {}
            if waiting.get("reason") in PULL_FAILURES:
                image = container.get("image", "")
                message = f"cannot pull image {image}: {waiting.get('message', '')}".rstrip(": ")
                created = pod.get("metadata", {}).get("creationTimestamp")
                expired = created and now - _time(created) > IMAGE_PULL_GRACE
                return Observation(
                    "failed" if expired else "pending",
                    waiting["reason"],
                    message,
                    permanent=bool(expired),
                )
            if waiting.get("reason") in CONFIG_FAILURES:
                return Observation("pending", waiting["reason"], waiting.get("message", ""))
        for condition in pod.get("status", {}).get("conditions", []) or []:
            if (
                condition.get("type") == "PodScheduled"
                and condition.get("reason") == "Unschedulable"
            ):
                return Observation("pending", "Unschedulable", condition.get("message", ""))
    return Observation("pending", "PodsStarting", "waiting for the pods to start")


def observe(batch_job: dict | None, pods: list[dict], now: datetime) -> Observation:
    """What the attempt's Job (None if absent) and its pods say."""
    if batch_job is None:
        return Observation("missing", "Creating", "creating the attempt's Job")
    if _condition(batch_job, "Complete"):
        return Observation("succeeded", "Completed", "training finished")
    failed = _condition(batch_job, "Failed") or _condition(batch_job, "FailureTarget")
    if failed:
        if failed.get("reason") == "DeadlineExceeded":
            return Observation(
                "failed",
                "DeadlineExceeded",
                "the attempt ran past spec.runPolicy.activeDeadlineSeconds",
                True,
            )
        return failure(pods)
    if batch_job.get("spec", {}).get("suspend"):
        labels = batch_job.get("metadata", {}).get("labels", {})
        if "kueue.x-k8s.io/queue-name" in labels:
            return Observation(
                "waiting",
                "WaitingForAdmission",
                f"queued in Kueue queue {labels['kueue.x-k8s.io/queue-name']}",
            )
        return Observation("suspended", "Suspended", "suspended by spec.runPolicy.suspend")
    # A pod that ended while the Job goes on was replaced (an eviction, which the Job's
    # podFailurePolicy ignores) or finished its part: the live pods tell the state.
    live = [p for p in pods if p.get("status", {}).get("phase") not in ("Succeeded", "Failed")]
    running = [p for p in live if p.get("status", {}).get("phase") == "Running"]
    if running and len(running) == len(live):
        return Observation("running", "Training", f"{len(running)} pods running")
    return _pending(live, now)


def set_condition(
    conditions: list[dict], kind: str, status: bool, reason: str, message: str,
    now: datetime, generation: int | None,
) -> list[dict]:  # fmt: skip
    """``conditions`` with ``kind`` set; its lastTransitionTime changes only when its
    status does."""
    value = "True" if status else "False"
    old = next((c for c in conditions if c["type"] == kind), None)
    changed_at = old["lastTransitionTime"] if old and old["status"] == value else None
    new = {
        "type": kind,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": changed_at or timestamp(now),
    }
    if generation is not None:
        new["observedGeneration"] = generation
    others = [c for c in conditions if c["type"] != kind]
    return sorted([*others, new], key=lambda c: CONDITION_TYPES.index(c["type"]))


def _phase_and_action(job: DiffusionTrainingJob, status: dict, seen: Observation):
    """(phase, the condition that is True, reason, message, action)."""
    restarts = status.get("restarts", 0)
    if seen.state == "succeeded":
        return "Succeeded", "Succeeded", seen.reason, seen.message, "none"
    if seen.state == "failed":
        if seen.permanent:
            return "Failed", "Failed", seen.reason, seen.message, "none"
        limit = job.spec.run_policy.max_restarts
        if restarts >= limit:
            message = (
                f"gave up after {restarts} restarts; last failure: {seen.reason}: {seen.message}"
            )
            return "Failed", "Failed", "MaxRestartsExceeded", message, "none"
        message = f"restart {restarts + 1} of {limit} after {seen.reason}: {seen.message}"
        return "Restarting", "Restarting", seen.reason, message, "restart"
    if seen.state == "running":
        return "Running", "Running", seen.reason, seen.message, "none"
    if seen.state == "suspended":
        return "Suspended", "Suspended", seen.reason, seen.message, "none"
    if seen.state == "waiting":
        return "Pending", "Suspended", seen.reason, seen.message, "none"
    if restarts:  # a new attempt is starting: still restarting until it runs
        return "Restarting", "Restarting", seen.reason, seen.message, "none"
    return "Pending", None, seen.reason, seen.message, "none"


def next_status(
    job: DiffusionTrainingJob, status: dict, seen: Observation, now: datetime
) -> tuple[dict, Action]:
    """The new status of ``job`` (whose current status is ``status``), and what to do."""
    phase, active, reason, message, action = _phase_and_action(job, status, seen)
    generation = job.metadata.generation
    created = seen.state != "missing"
    conditions = set_condition(
        status.get("conditions", []), "Created", created,
        "JobCreated" if created else reason,
        "the attempt's Job exists" if created else message, now, generation,
    )  # fmt: skip
    wanted = {kind: kind == active for kind in CONDITION_TYPES[2:]}
    wanted["Unschedulable"] = seen.reason == "Unschedulable"
    for kind, true in wanted.items():
        old = next((c for c in conditions if c["type"] == kind), None)
        still_true = true and old and old["status"] == "True"
        if still_true and seen.state != "failed":
            continue  # keep why it became true (e.g. the failure behind a restart)
        if true or (old and old["status"] == "True"):  # set, or clear one that was set
            conditions = set_condition(conditions, kind, true, reason, message, now, generation)
    if seen.state == "pending":  # say what Running waits for
        conditions = set_condition(conditions, "Running", False, reason, message, now, generation)
    stamp = timestamp(now)
    new = {**status, "phase": phase, "conditions": conditions}
    if generation is not None:
        new["observedGeneration"] = generation
    if phase == "Running" and not status.get("startTime"):
        new["startTime"] = stamp
    if phase in TERMINAL and not status.get("completionTime"):
        new["completionTime"] = stamp
    return new, action


WARNING_CONDITIONS = ("Unschedulable", "Restarting", "Failed")


def events(old: dict, new: dict) -> list[tuple[str, str, str]]:
    """The Events (type, reason, message) for going from status ``old`` to ``new``: one
    for each condition that became True, in condition order, and one for every further
    restart (Restarting stays True from one failed attempt to the next). Several can come
    at once: a reconcile may find the pods already running when it creates the Job."""
    before = {c["type"]: c for c in old.get("conditions", []) if c["status"] == "True"}
    found = []
    for condition in new.get("conditions", []):
        kind = condition["type"]
        if condition["status"] != "True":
            continue
        restarted = kind == "Restarting" and new.get("restarts", 0) > old.get("restarts", 0)
        if kind not in before or restarted:
            level = "Warning" if kind in WARNING_CONDITIONS else "Normal"
            found.append((level, condition["reason"], condition["message"]))
    return found


def ttl_expired(job: DiffusionTrainingJob, status: dict, now: datetime) -> bool:
    """Whether a finished job has outlived spec.runPolicy.ttlSecondsAfterFinished."""
    ttl = job.spec.run_policy.ttl_seconds_after_finished
    done = status.get("completionTime")
    if ttl is None or status.get("phase") not in TERMINAL or not done:
        return False
    return now >= _time(done) + timedelta(seconds=ttl)
