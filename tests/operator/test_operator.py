"""The operator under Kopf against an emulated API server. Tests play the Job controller
and the kubelet by writing Job and pod status, and check what the operator does."""

import asyncio
import json

import aiohttp
import pytest

from tests.builders import job
from tests.operator.conftest import Operator, eventually

NS = "ml"
DTJ = "difftrain.io/v1alpha1/diffusiontrainingjobs"
JOBS = f"/apis/{DTJ.rsplit('/', 1)[0]}/namespaces/{NS}/diffusiontrainingjobs"
pytestmark = pytest.mark.asyncio


def _get(k8s, resource: str, name: str, namespace: str = NS) -> dict | None:
    key = (k8s.resource(resource), namespace, name)
    if key not in k8s.objects or k8s.objects[key].deleted:
        return None
    return k8s.objects[key].raw


# The tests' own requests say who they are, so that the operator's can be told apart.
HARNESS = "difftrain-tests"


async def _send(k8s, method: str, path: str, body=None, content_type="application/json"):
    async with aiohttp.ClientSession(str(k8s.url)) as session:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type, "User-Agent": HARNESS}
        async with session.request(method, path, data=data, headers=headers) as response:
            assert response.status < 300, await response.text()
            return await response.json()


async def create(k8s, name="demo", spec=None, patch=None, namespace=NS):
    manifest = job({"metadata": {"name": name, **(patch or {})}}, spec=spec)
    return await _send(k8s, "POST", JOBS.replace(f"/{NS}/", f"/{namespace}/"), manifest)


async def job_status(k8s, name: str, conditions: list[tuple[str, str]], active: int = 0):
    body = {
        "status": {
            "active": active,
            "conditions": [
                {"type": kind, "status": "True", "reason": reason} for kind, reason in conditions
            ],
        }
    }
    await _send(k8s, "PATCH", f"/apis/batch/v1/namespaces/{NS}/jobs/{name}/status", body,
                "application/merge-patch+json")  # fmt: skip


async def pod(k8s, job_name: str, attempt: int, index: int, phase: str, exit_code=None,
              reason="Error", message=""):  # fmt: skip
    state = (
        {"running": {}}
        if exit_code is None
        else {"terminated": {"exitCode": exit_code, "reason": reason, "message": message}}
    )
    await _send(k8s, "POST", f"/api/v1/namespaces/{NS}/pods", {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"{job_name}-a{attempt}-{index}-x", "namespace": NS, "labels": {
            "difftrain.io/job-name": job_name, "difftrain.io/attempt": str(attempt)}},
        "status": {"phase": phase, "containerStatuses": [{"name": "trainer", "state": state}]},
    })  # fmt: skip


def phase_of(k8s, name="demo"):
    return (_get(k8s, DTJ, name) or {}).get("status", {}).get("phase")


def condition(k8s, kind: str, name="demo") -> dict:
    conditions = (_get(k8s, DTJ, name) or {}).get("status", {}).get("conditions", [])
    return next((c for c in conditions if c["type"] == kind), {})


async def test_create_makes_children_with_owner_references(k8s, operator):
    created = await create(k8s)

    trainer = await eventually(lambda: _get(k8s, "batch/v1/jobs", "demo-a1"))
    config = _get(k8s, "v1/configmaps", "demo-config")
    service = _get(k8s, "v1/services", "demo")
    owner = {"apiVersion": "difftrain.io/v1alpha1", "kind": "DiffusionTrainingJob",
             "name": "demo", "uid": created["metadata"]["uid"], "controller": True,
             "blockOwnerDeletion": True}  # fmt: skip
    for child in (trainer, config, service):
        assert child["metadata"]["ownerReferences"] == [owner]
    await eventually(lambda: phase_of(k8s) == "Pending")
    assert condition(k8s, "Created")["status"] == "True"
    assert "finalizers" not in _get(k8s, DTJ, "demo")["metadata"]  # deletion never waits


async def test_running_then_succeeded(k8s, operator):
    await create(k8s)
    await eventually(lambda: _get(k8s, "batch/v1/jobs", "demo-a1"))

    await pod(k8s, "demo", 1, 0, "Running")
    await eventually(lambda: phase_of(k8s) == "Running")
    await job_status(k8s, "demo-a1", [("Complete", "Completed")])

    await eventually(lambda: phase_of(k8s) == "Succeeded")
    status = _get(k8s, DTJ, "demo")["status"]
    assert status["startTime"] <= status["completionTime"]
    assert condition(k8s, "Running")["status"] == "False"
    events = await eventually(lambda: len(_objects(k8s, "v1/events")) == 3
                              and _objects(k8s, "v1/events"))  # fmt: skip
    assert [(e.raw["type"], e.raw["reason"]) for e in events] == [
        ("Normal", "JobCreated"),
        ("Normal", "Training"),
        ("Normal", "Completed"),
    ]


def _objects(k8s, resource):
    return [o for key, o in k8s.objects.items() if key[0] == k8s.resource(resource)
            and not o.deleted]  # fmt: skip


async def test_dataset_error_fails_without_restart(k8s, operator):
    await create(k8s)
    await eventually(lambda: _get(k8s, "batch/v1/jobs", "demo-a1"))

    message = '{"reason": "DatasetError", "message": "the dataset has no images"}'
    await pod(k8s, "demo", 1, 0, "Failed", exit_code=3, message=message)
    await job_status(k8s, "demo-a1", [("Failed", "PodFailurePolicy")])

    await eventually(lambda: phase_of(k8s) == "Failed")
    assert condition(k8s, "Failed")["reason"] == "DatasetError"
    assert condition(k8s, "Failed")["message"] == "the dataset has no images"
    await asyncio.sleep(0.5)  # time for a wrong restart to show
    assert _get(k8s, "batch/v1/jobs", "demo-a2") is None
    assert operator.metrics.failures.labels(reason="DatasetError")._value.get() == 1
    labels = {"namespace": NS, "job": "demo", "reason": "DatasetError"}
    assert operator.metrics.registry.get_sample_value("difftrain_operator_job_failed", labels) == 1


async def test_crash_restarts_the_gang_as_a_new_attempt(k8s, operator):
    await create(k8s, spec={"resources": {"nodes": 2}})
    await eventually(lambda: _get(k8s, "batch/v1/jobs", "demo-a1"))

    await pod(k8s, "demo", 1, 0, "Running")
    await pod(k8s, "demo", 1, 1, "Failed", exit_code=137, reason="OOMKilled")
    await job_status(k8s, "demo-a1", [("Failed", "BackoffLimitExceeded")])

    second = await eventually(lambda: _get(k8s, "batch/v1/jobs", "demo-a2"))
    assert second["spec"]["template"]["spec"]["containers"][0]["env"][3] == {
        "name": "PET_MASTER_ADDR",
        "value": "demo-a2-0.demo",
    }
    await eventually(lambda: _get(k8s, "batch/v1/jobs", "demo-a1") is None)  # deleted
    status = await eventually(lambda: _get(k8s, DTJ, "demo")["status"].get("restarts") == 1
                              and _get(k8s, DTJ, "demo")["status"])  # fmt: skip
    assert (status["attempt"], status["phase"]) == (2, "Restarting")
    assert condition(k8s, "Restarting")["reason"] == "OOMKilled"
    restarts = {"namespace": NS, "job": "demo"}
    assert (
        operator.metrics.registry.get_sample_value("difftrain_operator_job_restarts", restarts) == 1
    )
    config = _get(k8s, "v1/configmaps", "demo-config")
    assert '"attempt": 2' in config["data"]["job.json"]


async def test_too_many_restarts_fail_the_job(k8s, operator):
    await create(k8s, spec={"runPolicy": {"maxRestarts": 1}})
    for attempt in (1, 2):
        await eventually(lambda a=attempt: _get(k8s, "batch/v1/jobs", f"demo-a{a}"))
        await pod(k8s, "demo", attempt, 0, "Failed", exit_code=1, message="Traceback")
        await job_status(k8s, f"demo-a{attempt}", [("Failed", "BackoffLimitExceeded")])

    await eventually(lambda: phase_of(k8s) == "Failed")
    assert condition(k8s, "Failed")["reason"] == "MaxRestartsExceeded"
    assert _get(k8s, "batch/v1/jobs", "demo-a3") is None


async def test_suspend_and_resume(k8s, operator):
    await create(k8s)
    await eventually(lambda: _get(k8s, "batch/v1/jobs", "demo-a1"))

    path = f"{JOBS}/demo"
    await _send(k8s, "PATCH", path, {"spec": {"runPolicy": {"suspend": True}}},
                "application/merge-patch+json")  # fmt: skip
    await eventually(lambda: _get(k8s, "batch/v1/jobs", "demo-a1")["spec"]["suspend"] is True)
    await eventually(lambda: phase_of(k8s) == "Suspended")

    await _send(k8s, "PATCH", path, {"spec": {"runPolicy": {"suspend": False}}},
                "application/merge-patch+json")  # fmt: skip
    await eventually(lambda: _get(k8s, "batch/v1/jobs", "demo-a1")["spec"]["suspend"] is False)
    await eventually(lambda: phase_of(k8s) == "Pending")


async def test_kueue_admission_is_left_to_kueue(k8s, operator):
    await create(k8s, spec={"runPolicy": {"queueName": "team-a"}})
    trainer = await eventually(lambda: _get(k8s, "batch/v1/jobs", "demo-a1"))
    assert trainer["spec"]["suspend"] is True
    await eventually(lambda: condition(k8s, "Suspended").get("reason") == "WaitingForAdmission")
    assert phase_of(k8s) == "Pending"

    # Kueue admits the workload by unsuspending the Job; the operator must not undo it.
    await _send(k8s, "PATCH", f"/apis/batch/v1/namespaces/{NS}/jobs/demo-a1",
                {"spec": {"suspend": False}}, "application/merge-patch+json")  # fmt: skip
    await pod(k8s, "demo", 1, 0, "Running")

    await eventually(lambda: phase_of(k8s) == "Running")
    await asyncio.sleep(0.5)
    assert _get(k8s, "batch/v1/jobs", "demo-a1")["spec"]["suspend"] is False


@pytest.mark.resync(0.3)  # the TTL runs out with no event to say so
async def test_ttl_deletes_the_finished_job(k8s, operator):
    await create(k8s, spec={"runPolicy": {"ttlSecondsAfterFinished": 0}})
    await eventually(lambda: _get(k8s, "batch/v1/jobs", "demo-a1"))

    await job_status(k8s, "demo-a1", [("Complete", "Completed")])

    await eventually(lambda: _get(k8s, DTJ, "demo") is None)
    deletes = [r for r in k8s if r.method.value == "DELETE" and r.name == "demo"]
    assert len(deletes) >= 1


async def test_invalid_spec_fails_without_children(k8s, operator):
    # The CRD's schema would refuse this; an API server without the CRD's rules would not.
    await create(k8s, spec={"training": {"learningRate": 0}})

    await eventually(lambda: phase_of(k8s) == "Failed")
    assert condition(k8s, "Failed")["reason"] == "InvalidSpec"
    assert condition(k8s, "Failed")["message"] == "spec.training.learningRate: must be > 0 (got 0)"
    assert _get(k8s, "batch/v1/jobs", "demo-a1") is None
    assert _get(k8s, "v1/configmaps", "demo-config") is None


async def test_operator_restart_creates_no_duplicates(k8s, operator):
    await create(k8s)
    await eventually(lambda: _get(k8s, "batch/v1/jobs", "demo-a1"))
    await operator.stop()

    await operator.start()
    await pod(k8s, "demo", 1, 0, "Running")
    await eventually(lambda: phase_of(k8s) == "Running")

    applies = [r for r in k8s if r.method.value == "PATCH" and r.url.path.endswith("/jobs/demo-a1")
               and "apply-patch" in r.headers.get("Content-Type", "")]  # fmt: skip
    assert len(applies) == 1
    assert [
        key[2]
        for key, o in k8s.objects.items()
        if key[0] == k8s.resource("batch/v1/jobs") and not o.deleted
    ] == ["demo-a1"]


async def test_a_burst_of_jobs_all_get_children(k8s, operator):
    names = [f"burst-{index}" for index in range(50)]

    await asyncio.gather(*(create(k8s, name) for name in names))

    await eventually(lambda: all(_get(k8s, "batch/v1/jobs", f"{n}-a1") for n in names), 60)
    await eventually(lambda: all(phase_of(k8s, n) == "Pending" for n in names), 30)
    assert operator.metrics.jobs.labels(namespace=NS, phase="Pending")._value.get() == 50


async def test_an_operator_for_some_namespaces_leaves_the_others_alone(k8s):
    for namespace in (NS, "other"):
        k8s.objects["v1/namespaces", None, namespace] = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": namespace},
        }
    running = Operator(str(k8s.url).rstrip("/"), resync_seconds=0.2, namespaces=[NS])
    await running.start()
    try:
        await create(k8s, "mine")
        await create(k8s, "theirs", namespace="other")

        await eventually(lambda: _get(k8s, "batch/v1/jobs", "mine-a1"))
        await asyncio.sleep(0.6)  # a few resyncs too
        assert _get(k8s, "batch/v1/jobs", "theirs-a1", namespace="other") is None
        assert "status" not in _get(k8s, DTJ, "theirs", namespace="other")
    finally:
        await running.stop()
