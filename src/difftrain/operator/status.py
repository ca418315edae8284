"""A DiffusionTrainingJob's status, computed from what the operator observes.

Pure functions: :func:`observe` reads the current attempt's batch Job and its pods,
:func:`next_status` turns that into the new status and the one action to take. Time is
an argument, so the same observation always gives the same answer.
"""

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from difftrain import contract
from difftrain.api.cluster import MAX_ATTEMPTS
from difftrain.api.job import DiffusionTrainingJob

# How long a pod may wait on its image or its Secrets before the job fails (a typo never
# heals; a slow registry or a Secret an operator of its own is about to write does). The
# operator's --failure-grace-seconds changes it.
FAILURE_GRACE = timedelta(minutes=5)
PULL_FAILURES = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName")
# The kubelet cannot make the container (a missing Secret or ConfigMap key, most often).
CONFIG_FAILURES = ("CreateContainerConfigError", "CreateContainerError")
TERMINAL = ("Succeeded", "Failed")
CONDITION_TYPES = (
    "Created",
    "Unschedulable",
    "Running",
    "Restarting",
    "Suspended",
    "Succeeded",
    "Failed",
    "Ready",
    "Reconciling",
    "Stalled",
)
# The conditions of the kstatus conventions (Flux's health checks, kubectl wait), which
# sum up the others: see summary_conditions. They make no Events of their own.
SUMMARY_TYPES = ("Ready", "Reconciling", "Stalled")

State = Literal["missing", "waiting", "suspended", "pending", "running", "succeeded", "failed"]
Action = Literal["none", "restart", "preempted"]


@dataclass(frozen=True)
class Observation:
    """What the current attempt is doing, with a CamelCase reason and a message."""

    state: State
    reason: str = ""
    message: str = ""
    permanent: bool = False  # a failure that restarting will not fix
    preempted: bool = False  # a pod was disrupted and the others stopped cleanly


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


def _disruption(pod: dict) -> dict | None:
    for condition in pod.get("status", {}).get("conditions", []) or []:
        if condition.get("type") == "DisruptionTarget" and condition.get("status") == "True":
            return condition
    return None


def _preemption(pods: list[dict]) -> Observation | None:
    """A failed attempt that a disruption began (preemption, node drain, eviction) and
    that every other pod left cleanly: it stopped on SIGTERM after checkpointing (143),
    or had not failed at all."""
    disrupted = [pod for pod in pods if _disruption(pod)]
    if not disrupted:
        return None
    others = [_terminated(pod) for pod in pods if not _disruption(pod)]
    if any(t and t.get("exitCode") != contract.STOPPED_EXIT_CODE for t in others):
        return None
    condition = _disruption(disrupted[0])
    name = disrupted[0].get("metadata", {}).get("name", "a pod")
    cause = ": ".join(filter(None, (condition.get("reason"), condition.get("message"))))
    return Observation(
        "failed",
        "Preempted",
        f"pod {name} was disrupted ({cause or 'DisruptionTarget'})",
        preempted=True,
    )


def failure(pods: list[dict]) -> Observation:
    """Why the attempt failed, from its pods' terminated containers: a preemption, else a
    permanent failure of any pod, else the first failure of a pod that was not disrupted."""
    preempted = _preemption(pods)
    if preempted:
        return preempted
    ordered = sorted(pods, key=lambda pod: _disruption(pod) is not None)
    found = []
    for pod in ordered:
        terminated = _terminated(pod)
        if terminated is None:
            continue
        code = terminated.get("exitCode")
        reason, message = _trainer_message(terminated)
        # The trainer's own reason counts even if a launcher changed the exit code.
        permanent = contract.PERMANENT_EXIT_CODES
        if code in permanent or reason in permanent.values():
            return Observation("failed", reason or permanent[code], message, True)
        if terminated.get("reason") == "OOMKilled":
            message = message or "the trainer ran out of memory"
            found.append(Observation("failed", "OOMKilled", message))
        else:
            detail = f": {message}" if message else ""
            found.append(Observation("failed", "Error", f"exit code {code}{detail}"))
    if found:
        return found[0]
    return Observation("failed", "Error", "the attempt failed without a terminated container")


def _pending(pods: list[dict], now: datetime, grace: timedelta) -> Observation:
    for pod in pods:
        created = pod.get("metadata", {}).get("creationTimestamp")
        expired = bool(created and now - _time(created) > grace)
        for container in pod.get("status", {}).get("containerStatuses", []) or []:
            waiting = container.get("state", {}).get("waiting") or {}
            reason = waiting.get("reason")
            if reason in PULL_FAILURES:
                image = container.get("image", "")
                message = f"cannot pull image {image}: {waiting.get('message', '')}".rstrip(": ")
            elif reason in CONFIG_FAILURES:
                message = waiting.get("message", "")
            else:
                continue
            if expired:
                message += f" (for over {_duration(grace)})"
            return Observation("failed" if expired else "pending", reason, message, expired)
        for condition in pod.get("status", {}).get("conditions", []) or []:
            if (
                condition.get("type") == "PodScheduled"
                and condition.get("reason") == "Unschedulable"
            ):
                return Observation("pending", "Unschedulable", condition.get("message", ""))
    return Observation("pending", "PodsStarting", "waiting for the pods to start")


def _duration(span: timedelta) -> str:
    seconds = int(span.total_seconds())
    return f"{seconds // 60} minutes" if seconds >= 120 and seconds % 60 == 0 else f"{seconds} s"


def missing_pods(batch_job: dict, pods: list[dict]) -> bool:
    """Whether a running Job has fewer live pods than it wants (the API server may be
    refusing them: its Events then say why)."""
    if batch_job.get("spec", {}).get("suspend") or any(
        _condition(batch_job, kind) for kind in ("Complete", "Failed", "FailureTarget")
    ):
        return False
    live = [p for p in pods if p.get("status", {}).get("phase") not in ("Succeeded", "Failed")]
    return len(live) < batch_job.get("spec", {}).get("parallelism", 1)


def kueue_wait(seen: Observation, namespace: str, queue: str, said: tuple[str, str]):
    """The waiting Observation with what Kueue said of it (Kube.kueue_wait)."""
    reason, message = said
    if reason == "KueueNotFound":
        message = (
            f"queued for Kueue queue {queue}, but Kueue is not installed (its API is "
            "not served): install Kueue, or remove spec.runPolicy.queueName"
        )
        return Observation("waiting", reason, message)
    if reason == "LocalQueueNotFound":
        message = (
            f"LocalQueue {queue} does not exist in namespace {namespace}: create it, "
            "or fix spec.runPolicy.queueName"
        )
        return Observation("waiting", reason, message)
    if message:
        return Observation("waiting", seen.reason, f"{seen.message}: {message}")
    return seen


def observe(
    batch_job: dict | None,
    pods: list[dict],
    now: datetime,
    grace: timedelta = FAILURE_GRACE,
    refused: str | None = None,
) -> Observation:
    """What the attempt's Job (None if absent) and its pods say; a pod that cannot start
    for longer than ``grace`` (its image, its Secrets) fails the job. ``refused`` is why
    the API server refuses the Job's pods (its newest FailedCreate Event), if it does."""
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
        if contract.QUEUE_LABEL in labels:
            return Observation(
                "waiting",
                "WaitingForAdmission",
                f"queued in Kueue queue {labels[contract.QUEUE_LABEL]}",
            )
        return Observation("suspended", "Suspended", "suspended by spec.runPolicy.suspend")
    # A pod that ended while the Job goes on was replaced (an eviction, which the Job's
    # podFailurePolicy ignores) or finished its part: the live pods tell the state.
    live = [p for p in pods if p.get("status", {}).get("phase") not in ("Succeeded", "Failed")]
    running = [p for p in live if p.get("status", {}).get("phase") == "Running"]
    if running and len(running) == len(live) and not refused:
        return Observation("running", "Training", f"{len(running)} pods running")
    pending = _pending([p for p in live if p not in running], now, grace)
    if refused and pending.reason == "PodsStarting":
        return Observation("pending", "FailedCreate", refused)
    return pending


def set_condition(
    conditions: list[dict],
    kind: str,
    status: bool,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None,
) -> list[dict]:
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


@dataclass(frozen=True)
class Decision:
    """What an observation means for a job: its phase, the condition that is True (None
    while nothing has happened yet), why, and the one action to take."""

    phase: str
    active: str | None
    reason: str
    message: str
    action: Action


def decide(job: DiffusionTrainingJob, status: dict, seen: Observation) -> Decision:
    """What ``seen`` means for ``job``, whose current status is ``status``."""
    restarts = status.get("restarts", 0)
    if seen.state == "succeeded":
        return Decision("Succeeded", "Succeeded", seen.reason, seen.message, "none")
    if seen.state == "failed" and status.get("attempt", 1) >= MAX_ATTEMPTS:
        message = f"{MAX_ATTEMPTS} attempts used; last failure: {seen.reason}: {seen.message}"
        return Decision("Failed", "Failed", "TooManyAttempts", message, "none")
    if seen.preempted:
        number = status.get("preemptions", 0) + 1
        message = f"restart after preemption {number} (not counted in maxRestarts): {seen.message}"
        return Decision("Restarting", "Restarting", seen.reason, message, "preempted")
    if seen.state == "failed":
        if seen.permanent:
            return Decision("Failed", "Failed", seen.reason, seen.message, "none")
        limit = job.spec.run_policy.max_restarts
        if restarts >= limit:
            message = (
                f"gave up after {restarts} restarts; last failure: {seen.reason}: {seen.message}"
            )
            return Decision("Failed", "Failed", "MaxRestartsExceeded", message, "none")
        message = f"restart {restarts + 1} of {limit} after {seen.reason}: {seen.message}"
        return Decision("Restarting", "Restarting", seen.reason, message, "restart")
    if seen.state == "running":
        return Decision("Running", "Running", seen.reason, seen.message, "none")
    if seen.state == "suspended":
        return Decision("Suspended", "Suspended", seen.reason, seen.message, "none")
    if seen.state == "waiting":
        return Decision("Pending", "Suspended", seen.reason, seen.message, "none")
    if restarts or status.get("preemptions"):  # a new attempt starts: restarting till it runs
        return Decision("Restarting", "Restarting", seen.reason, seen.message, "none")
    return Decision("Pending", None, seen.reason, seen.message, "none")


def next_status(
    job: DiffusionTrainingJob, status: dict, seen: Observation, now: datetime
) -> tuple[dict, Action]:
    """The new status of ``job`` (whose current status is ``status``), and what to do."""
    decided = decide(job, status, seen)
    reason, message = decided.reason, decided.message
    generation = job.metadata.generation
    created = seen.state != "missing"
    conditions = set_condition(
        status.get("conditions", []),
        "Created",
        created,
        "JobCreated" if created else reason,
        "the attempt's Job exists" if created else message,
        now,
        generation,
    )
    wanted = {kind: kind == decided.active for kind in CONDITION_TYPES[2:]}
    wanted["Unschedulable"] = seen.reason == "Unschedulable"
    for kind, true in wanted.items():
        old = next((c for c in conditions if c["type"] == kind), None)
        still_true = true and old and old["status"] == "True"
        if still_true and kind == "Restarting" and seen.state != "failed":
            continue  # keep the failure behind a restart while the new attempt starts
        if true or (old and old["status"] == "True"):  # set, or clear one that was set
            conditions = set_condition(conditions, kind, true, reason, message, now, generation)
    if seen.state == "pending":  # say what Running waits for
        conditions = set_condition(conditions, "Running", False, reason, message, now, generation)
    stamp = timestamp(now)
    new = {**status, "phase": decided.phase, "conditions": conditions}
    if generation is not None:
        new["observedGeneration"] = generation
    if decided.phase == "Running" and not status.get("startTime"):
        new["startTime"] = stamp
    if decided.phase in TERMINAL and not status.get("completionTime"):
        new["completionTime"] = stamp
    return new, decided.action


WARNING_CONDITIONS = ("Unschedulable", "Restarting", "Failed")
# Reasons a job waits that are worth an Event when they first appear (a False condition
# says them): the cluster refused something, or the job waits on something outside it.
WAIT_EVENTS = {
    "WaitingForPredecessor": "Normal",
    "CreateRefused": "Warning",
    "FailedCreate": "Warning",
    "CreateContainerConfigError": "Warning",
    "CreateContainerError": "Warning",
    "LocalQueueNotFound": "Warning",
    "KueueNotFound": "Warning",
    "ProfileNotFound": "Warning",
    "ProfileUnreadable": "Warning",
}
# The condition whose reason sums up a phase (status.reason, the REASON column).
_TELLING = ("Failed", "Succeeded", "Restarting", "Suspended", "Unschedulable", "Running")


def summary_reason(status: dict) -> str:
    """Why the job is in its phase, in one word: the reason of the first True condition
    of Failed, Succeeded, Restarting, Suspended, Unschedulable, Running; else what the
    attempt waits for (Running's or Created's False reason)."""
    conditions = {c["type"]: c for c in status.get("conditions", [])}
    for kind in _TELLING:
        if conditions.get(kind, {}).get("status") == "True":
            return conditions[kind].get("reason", "")
    for kind in ("Created", "Running"):
        condition = conditions.get(kind, {})
        if condition.get("status") == "False" and (
            kind == "Running" or condition.get("reason") in WAIT_EVENTS
        ):
            return condition.get("reason", "")
    return conditions.get("Created", {}).get("reason", "")


def published(status: dict, now: datetime, generation: int | None) -> dict:
    """``status`` as the operator writes it: with its one-word reason and the kstatus
    conditions that sum it up."""
    reason = summary_reason(status)
    return summary_conditions({**status, "reason": reason}, now, generation)


def summary_conditions(status: dict, now: datetime, generation: int | None) -> dict:
    """``status`` (with its one-word ``reason``) with the kstatus conditions set from its
    phase: Ready is True once the job succeeded (its work is done; ``kubectl wait
    --for=condition=Ready`` waits for that), Reconciling True while it is on its way
    (Pending, Running, Restarting), Stalled True once it failed. Suspended is none of
    them: Ready False, says why. Each carries the reason and message of the condition
    that tells the phase."""
    phase = status.get("phase") or "Pending"
    reason = status.get("reason") or phase
    telling = next(
        (c for c in status.get("conditions", []) if c.get("reason") == reason),
        {"message": ""},
    )
    message = telling.get("message", "")
    wanted = {
        "Ready": phase == "Succeeded",
        "Reconciling": phase in ("Pending", "Running", "Restarting"),
        "Stalled": phase == "Failed",
    }
    conditions = status.get("conditions", [])
    for kind, true in wanted.items():
        why = reason if true or kind == "Ready" else phase
        said = message if true or kind == "Ready" else f"the job is {phase.lower()}"
        conditions = set_condition(conditions, kind, true, why, said, now, generation)
    return {**status, "conditions": conditions}


def events(old: dict, new: dict) -> list[tuple[str, str, str]]:
    """The Events (type, reason, message) for going from status ``old`` to ``new``: one
    for each condition that became True, in condition order, and one for every further
    restart (Restarting stays True from one failed attempt to the next). Several can come
    at once: a reconcile may find the pods already running when it creates the Job."""
    before = {c["type"]: c for c in old.get("conditions", []) if c["status"] == "True"}
    found = []
    for condition in new.get("conditions", []):
        kind = condition["type"]
        if condition["status"] != "True" or kind in SUMMARY_TYPES:
            continue
        restarted = kind == "Restarting" and any(
            new.get(count, 0) > old.get(count, 0) for count in ("restarts", "preemptions")
        )
        if kind not in before or restarted:
            level = "Warning" if kind in WARNING_CONDITIONS else "Normal"
            found.append((level, condition["reason"], condition["message"]))
    was = {c["type"]: (c["status"], c.get("reason")) for c in old.get("conditions", [])}
    for condition in new.get("conditions", []):
        reason = condition.get("reason")
        state = (condition["status"], reason)
        if (
            condition["type"] not in SUMMARY_TYPES
            and reason in WAIT_EVENTS
            and was.get(condition["type"]) != state
            and not any(found_reason == reason for _, found_reason, _ in found)
        ):
            found.append((WAIT_EVENTS[reason], reason, condition["message"]))
    return found


def ttl_expired(job: DiffusionTrainingJob, status: dict, now: datetime) -> bool:
    """Whether a finished job has outlived spec.runPolicy.ttlSecondsAfterFinished."""
    ttl = job.spec.run_policy.ttl_seconds_after_finished
    done = status.get("completionTime")
    if ttl is None or status.get("phase") not in TERMINAL or not done:
        return False
    return now >= _time(done) + timedelta(seconds=ttl)
