"""The controller: observe a job's children, compute its status (pure), act.

Every trigger (the job changed, one of its Jobs or pods changed, the periodic resync)
ends in :meth:`Controller.reconcile` for that job, which reads the job fresh, under a
per-job lock, so two triggers never restart the same gang twice.
"""

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from difftrain import contract
from difftrain.api import profile
from difftrain.api.validation import validate_job
from difftrain.operator import admission, builders, progress
from difftrain.operator.builders import Defaults
from difftrain.operator.kube import ApiError, Kube
from difftrain.operator.metrics import OperatorMetrics
from difftrain.operator.outputs import OutputIndex
from difftrain.operator.status import (
    FAILURE_GRACE,
    TERMINAL,
    events,
    kueue_wait,
    missing_pods,
    next_status,
    observe,
    published,
    set_condition,
    timestamp,
    ttl_expired,
)

log = logging.getLogger(__name__)

_SPEC_KEYS = ("apiVersion", "kind", "metadata", "spec")


def _owned_by(child: dict, uid: str) -> bool:
    """Whether ``uid`` is ``child``'s controller (names repeat; uids do not)."""
    references = child.get("metadata", {}).get("ownerReferences") or []
    return any(r.get("uid") == uid and r.get("controller") for r in references)


# A Job younger than this is still making its pods, or Kueue its Workload: what they say
# of it is not read yet.
FAILED_CREATE_AFTER = timedelta(seconds=3)


def _age(obj: dict, now: datetime) -> timedelta:
    created = obj.get("metadata", {}).get("creationTimestamp")
    if not created:
        return timedelta(0)
    return now - datetime.fromisoformat(created.replace("Z", "+00:00"))


def _ever_created(status: dict) -> bool:
    """Whether the job's children were ever created (its first checks are behind it)."""
    return any(
        c.get("type") == "Created" and c.get("status") == "True"
        for c in status.get("conditions", [])
    )


def _finished(batch: dict) -> bool:
    return any(
        c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
        for c in batch.get("status", {}).get("conditions", []) or []
    )


@dataclass
class Controller:
    """Reconciles DiffusionTrainingJobs; ``clock`` is injectable for tests."""

    kube: Kube
    defaults: Defaults
    metrics: OperatorMetrics
    clock: object = lambda: datetime.now(UTC)
    grace: timedelta = FAILURE_GRACE  # how long a pod may wait on its image or Secrets
    namespaces: list[str] = field(default_factory=list)  # watched ones; empty for all
    outputs: OutputIndex = field(default_factory=OutputIndex)
    _locks: dict = field(default_factory=lambda: defaultdict(asyncio.Lock))

    async def reconcile(self, namespace: str, name: str) -> None:
        async with self._locks[namespace, name]:
            started = time.perf_counter()
            body = await self.kube.get_training_job(namespace, name)
            if body is None:
                self._locks.pop((namespace, name), None)
                self.metrics.forget(namespace, name)
                self.outputs.forget(namespace, name)
                return
            self.outputs.note(body)
            if body["metadata"].get("deletionTimestamp"):
                # Being deleted: the garbage collector is removing (or orphaning) the
                # children, which would otherwise look like a predecessor's to delete.
                return
            await self._reconcile(body, self.clock())
            self.metrics.reconcile_seconds.observe(time.perf_counter() - started)

    async def _reconcile(self, body: dict, now: datetime) -> None:
        body = await self._with_profile(body, now)
        if body is None:
            return
        metadata = body["metadata"]
        namespace, name = metadata["namespace"], metadata["name"]
        status = body.get("status") or {}
        job, problems = validate_job({key: body.get(key) for key in _SPEC_KEYS})
        if job is None:
            message = "; ".join(str(p) for p in problems)
            if status.get("profile"):
                kept = status["profile"]
                message += (
                    f" (the spec merged with DiffusionTrainingProfile {kept['name']}, "
                    f"generation {kept.get('generation')})"
                )
            new = self._failed(status, "InvalidSpec", message, metadata, now)
            policy = ((body.get("spec") or {}).get("runPolicy") or {}).get("cleanPodPolicy")
            await self._clean_up(body, status, new, policy or "Running")
            await self._publish(body, status, new, now)
            return
        if status.get("phase") in TERMINAL:
            self.metrics.observe(namespace, name, status)  # also after an operator restart
            if ttl_expired(job, status, now):
                log.info("deleting %s/%s: ttlSecondsAfterFinished has passed", namespace, name)
                await self.kube.delete_training_job(namespace, name)
            return
        attempt = status.get("attempt", 1)
        current = {"attempt": attempt, "restarts": 0, **status}
        batch_name = builders.job_name(name, attempt)
        batch = await self.kube.get_job(namespace, batch_name)
        if batch is not None and not _owned_by(batch, metadata["uid"]):
            await self._wait_for_predecessor(body, current, batch, now)
            return
        if batch is None and attempt == 1 and not _ever_created(status):
            refusal = await self._refusal(job, body)
            if refusal:
                new = self._failed(current, *refusal, metadata, now)
                await self._publish(body, status, new, now)
                return
        if batch is None:
            refused = await self._start_attempt(job, attempt, body, current, now)
            if refused:
                return
            batch = await self.kube.get_job(namespace, batch_name)
        else:
            await self._sync_suspend(job, batch)
        pods = await self.kube.list_pods(
            namespace, {contract.JOB_NAME_LABEL: name, contract.ATTEMPT_LABEL: str(attempt)}
        )
        # A predecessor's pods (a job deleted and re-created under this name) carry the
        # same labels until the garbage collector removes them: only this Job's count.
        pods = [pod for pod in pods if batch and _owned_by(pod, batch["metadata"]["uid"])]
        refused = None
        if batch and missing_pods(batch, pods) and _age(batch, now) > FAILED_CREATE_AFTER:
            refused = await self.kube.failed_create(namespace, batch["metadata"]["uid"])
        seen = observe(batch, pods, now, self.grace, refused)
        queue = job.spec.run_policy.queue_name
        if seen.reason == "WaitingForAdmission" and _age(batch, now) > FAILED_CREATE_AFTER:
            said = await self.kube.kueue_wait(namespace, queue, batch["metadata"]["uid"])
            seen = kueue_wait(seen, namespace, queue, said)
        new, action = next_status(job, current, seen, now)
        if new.get("phase") == "Running":
            await self._read_progress(job, pods, new, now)
        elif new.get("phase") == "Succeeded":
            finished = progress.finished_outputs(job.spec.output.uri, pods)
            new["outputs"] = {**new.get("outputs", {}), **finished}
        if action in ("restart", "preempted"):
            # Record the decision first: if the operator dies half-way, the next reconcile
            # finds attempt N+1 missing and finishes the restart, and never restarts twice.
            counter = "restarts" if action == "restart" else "preemptions"
            new["attempt"], new[counter] = attempt + 1, new.get(counter, 0) + 1
            await self._publish(body, status, new, now)
            (self.metrics.restarts if action == "restart" else self.metrics.preemptions).inc()
            await self._start_attempt(job, attempt + 1, body, new, now)
            return
        await self._clean_up(body, status, new, job.spec.run_policy.clean_pod_policy, batch)
        await self._publish(body, status, new, now)

    async def _with_profile(self, body: dict, now: datetime) -> dict | None:
        """``body`` with its spec merged with its profile (spec.profile): the profile's spec
        kept in status.profile, else the profile as it is now, which is then kept there so
        that the job's spec never changes again. None after saying why the profile cannot
        be read (the job waits; the next resync looks again)."""
        wanted = profile.named(body)
        status = body.get("status") or {}
        kept = status.get("profile")
        if wanted is None or (kept is None and status.get("phase") in TERMINAL):
            return body
        if kept is None:
            metadata = body["metadata"]
            try:
                found = await self.kube.get_profile(wanted)
                reason = "ProfileNotFound"
                message = (
                    f"DiffusionTrainingProfile {wanted} does not exist: create it, or fix "
                    "spec.profile; the job starts once it is there"
                )
            except ApiError as error:
                if error.status >= 500 or error.status == 429:
                    raise
                found, reason = None, "ProfileUnreadable"
                message = f"cannot read DiffusionTrainingProfile {wanted}: {error.detail}"
            if found is None:
                new = self._not_created(body, status, reason, message, now)
                await self._publish(body, status, new, now)
                return None
            kept = profile.snapshot(found)
            log.info(
                "%s/%s takes DiffusionTrainingProfile %s (generation %s)",
                metadata["namespace"],
                metadata["name"],
                wanted,
                kept.get("generation"),
            )
            await self.kube.patch_status(metadata["namespace"], metadata["name"], {"profile": kept})
        merged = profile.merge(body, kept.get("spec") or {})
        return {**merged, "status": {**status, "profile": kept}}

    async def _refusal(self, job, body: dict) -> tuple[str, str] | None:
        """(reason, message) when a new job must not start: what only a cluster checks,
        the platform's policy, another live job on its output. None when it may."""
        for reason, refused in (
            ("InvalidSpec", admission.problems(job)),
            ("NotAllowed", admission.policy_problems(job, self.defaults)),
        ):
            if refused:
                return reason, "; ".join(refused)
        holder = await self._output_holder(body)
        if holder:
            return "OutputInUse", (
                f"spec.output.uri {job.spec.output.uri} is in use by job "
                f"{holder.namespace}/{holder.name}; give this job an output.uri of its own, "
                "or delete that job and re-create this one"
            )
        return None

    async def _output_holder(self, body: dict):
        """Another live job writing this job's output, if any (see outputs.py)."""
        if not self.outputs.primed:
            namespaces = self.namespaces or [None]
            for namespace in namespaces:
                for other in await self.kube.list_training_jobs(namespace):
                    self.outputs.note(other)
            self.outputs.primed = True
        return self.outputs.holder(body)

    @staticmethod
    def _failed(status: dict, reason: str, message: str, metadata: dict, now) -> dict:
        """The job failed for good, before or without its children: an operator's check."""
        conditions = set_condition(
            status.get("conditions", []),
            "Failed",
            True,
            reason,
            message,
            now,
            metadata.get("generation"),
        )
        new = {**status, "phase": "Failed", "conditions": conditions}
        new.setdefault("completionTime", timestamp(now))
        return new

    async def _wait_for_predecessor(self, body: dict, status: dict, batch: dict, now) -> None:
        """The attempt's Job belongs to an earlier job of the same name (deleted, then
        re-created before the garbage collector was done): delete it, never adopt it, and
        say so until it is gone."""
        metadata = body["metadata"]
        found = batch["metadata"]
        if not found.get("deletionTimestamp"):
            await self.kube.delete_job(metadata["namespace"], found["name"], found["uid"])
        message = (
            f"waiting for Job {found['name']} of an earlier job named {metadata['name']} to go"
        )
        await self._publish(
            body,
            status,
            self._not_created(body, status, "WaitingForPredecessor", message, now),
            now,
        )

    def _not_created(self, body: dict, status: dict, reason: str, message: str, now) -> dict:
        """Pending, with Created False saying why the attempt's children are not there."""
        generation = body["metadata"].get("generation")
        conditions = set_condition(
            status.get("conditions", []), "Created", False, reason, message, now, generation
        )
        return {**status, "phase": status.get("phase") or "Pending", "conditions": conditions}

    async def _read_progress(self, job, pods: list[dict], status: dict, now: datetime) -> None:
        """Fill ``status`` from the main trainer's metrics; when they cannot be read, the
        last progress stays (with the time it was seen) and nothing else happens."""
        url = progress.main_pod_endpoint(pods)
        text = url and await self.kube.scrape(url, progress.SCRAPE_TIMEOUT_SECONDS)
        if not text:
            return
        found = progress.read(text, now, job.spec.output.uri)
        outputs = found.pop("outputs", None)
        status.update(found)
        if outputs:
            status["outputs"] = {**status.get("outputs", {}), **outputs}

    async def _start_attempt(self, job, attempt: int, body: dict, status: dict, now) -> bool:
        """Create attempt ``attempt``'s children, after removing the previous attempt's Job
        (its pods would otherwise keep running beside the new gang). A child left by an
        earlier job of this name is deleted first, and a create the API server refuses
        (RBAC, admission, quota) is published as the Created condition: both return True,
        and a later reconcile tries again."""
        namespace, name = job.metadata.namespace, job.metadata.name
        if attempt > 1:
            await self.kube.delete_job(namespace, builders.job_name(name, attempt - 1))
        for built in builders.children(job, attempt, self.defaults):
            manifest = builders.owned(built, job)
            kind, child = manifest["kind"], manifest["metadata"]["name"]
            try:
                # The first attempt creates what keeps its name over attempts (ConfigMap,
                # Service, NetworkPolicy), so that one already there is noticed: it is an
                # earlier job's, or this job's from an operator that stopped half-way.
                if attempt > 1 or kind == "Job":
                    await self.kube.apply(manifest)
                    continue
                if await self.kube.create(manifest):
                    continue
                found = await self.kube.get(manifest["apiVersion"], kind, namespace, child)
                if found is None or _owned_by(found, job.metadata.uid):
                    await self.kube.apply(manifest)
                    continue
                if not found["metadata"].get("deletionTimestamp"):
                    uid = found["metadata"]["uid"]
                    await self.kube.delete(manifest["apiVersion"], kind, namespace, child, uid)
                message = f"waiting for {kind} {child} of an earlier job named {name} to go"
                new = self._not_created(body, status, "WaitingForPredecessor", message, now)
                await self._publish(body, status, new, now)
                return True
            except ApiError as error:
                if error.status >= 500 or error.status == 429:
                    raise  # the API server's own trouble: the next trigger retries
                message = f"the API server refused {kind} {child}: {error.detail}"
                new = self._not_created(body, status, "CreateRefused", message, now)
                await self._publish(body, status, new, now)
                return True
        return False

    async def _clean_up(
        self, body: dict, old: dict, new: dict, policy: str, batch: dict | None = None
    ) -> None:
        """When the job ends, stop what still holds resources (spec.runPolicy.cleanPodPolicy).
        The Job controller itself stops the pods of a Job that completed or failed; a job
        the operator fails (an image that never pulls, a missing Secret, a spec refused
        late) still has a live Job, which is suspended (its running pods go, the finished
        ones stay) or, with All or under Kueue (which would resume it), deleted."""
        if new.get("phase") not in TERMINAL or old.get("phase") in TERMINAL or policy == "None":
            return
        metadata = body["metadata"]
        namespace = metadata["namespace"]
        if batch is None:
            name = builders.job_name(metadata["name"], old.get("attempt", 1))
            batch = await self.kube.get_job(namespace, name)
        if batch is None or not _owned_by(batch, metadata["uid"]):
            return
        name = batch["metadata"]["name"]
        queued = contract.QUEUE_LABEL in batch["metadata"].get("labels", {})
        if policy == "All" or (queued and not _finished(batch)):
            log.info("deleting Job %s/%s: the job has ended", namespace, name)
            await self.kube.delete_job(namespace, name, batch["metadata"]["uid"])
        elif not _finished(batch) and not batch.get("spec", {}).get("suspend"):
            log.info("suspending Job %s/%s: the job has ended, its pods go", namespace, name)
            await self.kube.set_job_suspended(namespace, name, True)

    async def _sync_suspend(self, job, batch: dict) -> None:
        """Follow spec.runPolicy.suspend, leaving admission to Kueue: a queued Job is only
        ever suspended here, never unsuspended (Kueue does that)."""
        policy = job.spec.run_policy
        suspended = bool(batch.get("spec", {}).get("suspend"))
        if policy.suspend and not suspended:
            await self.kube.set_job_suspended(
                job.metadata.namespace, batch["metadata"]["name"], True
            )
        elif not policy.suspend and suspended and not policy.queue_name:
            await self.kube.set_job_suspended(
                job.metadata.namespace, batch["metadata"]["name"], False
            )

    async def _publish(self, body: dict, old: dict, new: dict, now: datetime) -> None:
        """Write the status only when it changed, with an Event for each transition."""
        metadata = body["metadata"]
        namespace, name = metadata["namespace"], metadata["name"]
        new = published(new, now, metadata.get("generation"))
        self.metrics.observe(namespace, name, new)
        if new == old:
            return
        await self.kube.patch_status(namespace, name, new)
        for kind, reason, message in events(old, new):
            try:
                await self.kube.post_event(body, kind, reason, message, timestamp(now))
            except Exception:  # an Event is a courtesy: never fail a reconcile over it
                log.warning("could not post an event for %s/%s", namespace, name, exc_info=True)
        if new.get("phase") == "Failed" and old.get("phase") != "Failed":
            failed = next(c for c in new["conditions"] if c["type"] == "Failed")
            self.metrics.failures.labels(reason=failed["reason"]).inc()
