"""Kopf wiring: which changes trigger a reconcile. The work is in reconcile.py.

No handler needs a finalizer, and none is used: children are garbage-collected through
their owner references, so deleting a job never waits for the operator (it may be down).
For the same reason there are no Kopf timers (they add finalizers): a periodic resync
task catches time-based transitions (image pull grace period, TTL).
"""

import asyncio
import logging

import kopf

from difftrain.contract import JOB_NAME_LABEL

log = logging.getLogger(__name__)

RESOURCE = ("difftrain.io", "v1alpha1", "diffusiontrainingjobs")
CHILDREN = {JOB_NAME_LABEL: kopf.PRESENT}


def configure(settings: kopf.OperatorSettings) -> None:
    """Keep Kopf's bookkeeping out of the job's status (which the CRD schema defines), and
    watch only the pods and Jobs that belong to jobs."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="difftrain.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="difftrain.io")
    settings.posting.level = logging.WARNING
    # Kopf applies a handler's label filter to what it receives: without these selectors the
    # API server would stream every pod and Job of the cluster to the operator.
    for group, plural in (("", "pods"), ("batch", "jobs")):
        settings.watching.label_selectors[group, "v1", plural] = JOB_NAME_LABEL


def register(
    registry: kopf.OperatorRegistry, resync_seconds: float, namespaces: list[str] | None = None
) -> None:
    """Register the handlers on ``registry``; they find the Controller in ``memo.controller``.
    ``namespaces`` limits the resync as Kopf's own namespaces limit the watches."""

    @kopf.on.event(*RESOURCE, registry=registry)
    async def job_changed(type, body, memo, **_):
        metadata, status = body["metadata"], body.get("status") or {}
        if type == "DELETED":
            memo.controller.metrics.forget(metadata["namespace"], metadata["name"])
            memo.controller.outputs.forget(metadata["namespace"], metadata["name"])
            return
        memo.controller.outputs.note(body)
        # Our own status writes come back as events; the spec did not change in those.
        if type == "MODIFIED" and status.get("observedGeneration") == metadata.get("generation"):
            return
        await _reconcile(memo, metadata["namespace"], metadata["name"])

    @kopf.on.event("batch", "v1", "jobs", labels=CHILDREN, registry=registry)
    @kopf.on.event("", "v1", "pods", labels=CHILDREN, registry=registry)
    async def child_changed(body, memo, **_):
        metadata = body["metadata"]
        await _reconcile(memo, metadata["namespace"], metadata["labels"][JOB_NAME_LABEL])

    @kopf.on.startup(registry=registry)
    async def start_resync(memo, **_):
        memo.resync = asyncio.create_task(_resync_forever(memo, resync_seconds, namespaces))

    @kopf.on.cleanup(registry=registry)
    async def stop_resync(memo, **_):
        memo.resync.cancel()


async def _reconcile(memo, namespace: str, name: str) -> None:
    try:
        await memo.controller.reconcile(namespace, name)
    except Exception:  # one job's trouble must not stop the others; the next trigger retries
        log.exception("reconciling %s/%s failed", namespace, name)


async def _resync_forever(memo, every: float, namespaces: list[str] | None) -> None:
    kube = memo.controller.kube
    while True:
        await asyncio.sleep(every)
        try:
            if namespaces:
                jobs = [j for ns in namespaces for j in await kube.list_training_jobs(ns)]
            else:
                jobs = await kube.list_training_jobs()
        except Exception:
            log.exception("listing DiffusionTrainingJobs failed")
            continue
        for job in jobs:
            memo.controller.outputs.note(job)
            await _reconcile(memo, job["metadata"]["namespace"], job["metadata"]["name"])
