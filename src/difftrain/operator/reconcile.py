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
from datetime import UTC, datetime

from difftrain.api.validation import validate_job
from difftrain.operator import builders, progress
from difftrain.operator.builders import Defaults
from difftrain.operator.kube import Kube
from difftrain.operator.metrics import OperatorMetrics
from difftrain.operator.status import (
    TERMINAL,
    events,
    next_status,
    observe,
    set_condition,
    timestamp,
    ttl_expired,
)

log = logging.getLogger(__name__)

_SPEC_KEYS = ("apiVersion", "kind", "metadata", "spec")


@dataclass
class Controller:
    """Reconciles DiffusionTrainingJobs; ``clock`` is injectable for tests."""

    kube: Kube
    defaults: Defaults
    metrics: OperatorMetrics
    clock: object = lambda: datetime.now(UTC)
    _locks: dict = field(default_factory=lambda: defaultdict(asyncio.Lock))

    async def reconcile(self, namespace: str, name: str) -> None:
        async with self._locks[namespace, name]:
            started = time.perf_counter()
            body = await self.kube.get_training_job(namespace, name)
            if body is None:
                self._locks.pop((namespace, name), None)
                self.metrics.forget(namespace, name)
                return
            await self._reconcile(body, self.clock())
            self.metrics.reconcile_seconds.observe(time.perf_counter() - started)

    async def _reconcile(self, body: dict, now: datetime) -> None:
        metadata = body["metadata"]
        namespace, name = metadata["namespace"], metadata["name"]
        status = body.get("status") or {}
        job, problems = validate_job({key: body.get(key) for key in _SPEC_KEYS})
        if job is None:
            message = "; ".join(str(p) for p in problems)
            new = self._invalid(status, message, metadata.get("generation"), now)
            await self._publish(body, status, new, now)
            return
        if status.get("phase") in TERMINAL:
            self.metrics.observe(namespace, name, status)  # also after an operator restart
            if ttl_expired(job, status, now):
                log.info("deleting %s/%s: ttlSecondsAfterFinished has passed", namespace, name)
                await self.kube.delete_training_job(namespace, name)
            return
        attempt = status.get("attempt", 1)
        batch_name = builders.job_name(name, attempt)
        batch = await self.kube.get_job(namespace, batch_name)
        if batch is None:
            await self._start_attempt(job, attempt)
            batch = await self.kube.get_job(namespace, batch_name)
        else:
            await self._sync_suspend(job, batch)
        pods = await self.kube.list_pods(
            namespace, {builders.JOB_NAME_LABEL: name, builders.ATTEMPT_LABEL: str(attempt)}
        )
        new, action = next_status(job, {"attempt": attempt, "restarts": 0, **status},
                                  observe(batch, pods, now), now)  # fmt: skip
        if new.get("phase") == "Running":
            await self._read_progress(job, pods, new, now)
        if action == "restart":
            # Record the decision first: if the operator dies half-way, the next reconcile
            # finds attempt N+1 missing and finishes the restart, and never restarts twice.
            new["attempt"], new["restarts"] = attempt + 1, new["restarts"] + 1
            await self._publish(body, status, new, now)
            self.metrics.restarts.inc()
            await self._start_attempt(job, attempt + 1)
            return
        await self._publish(body, status, new, now)

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

    async def _start_attempt(self, job, attempt: int) -> None:
        """Create attempt ``attempt``'s children, after removing the previous attempt's Job
        (its pods would otherwise keep running beside the new gang)."""
        if attempt > 1:
            previous = builders.job_name(job.metadata.name, attempt - 1)
            await self.kube.delete_job(job.metadata.namespace, previous)
        for manifest in builders.children(job, attempt, self.defaults):
            await self.kube.apply(manifest)

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

    @staticmethod
    def _invalid(status: dict, message: str, generation: int | None, now: datetime) -> dict:
        conditions = set_condition(
            status.get("conditions", []), "Failed", True, "InvalidSpec", message, now, generation
        )
        new = {**status, "phase": "Failed", "conditions": conditions}
        new.setdefault("completionTime", timestamp(now))
        return new

    async def _publish(self, body: dict, old: dict, new: dict, now: datetime) -> None:
        """Write the status only when it changed, with an Event for each transition."""
        metadata = body["metadata"]
        namespace, name = metadata["namespace"], metadata["name"]
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
