"""Live progress: the status fields read from a trainer's metrics (the trainer's own
Telemetry makes the exposition), and the operator filling them from a live endpoint."""

import asyncio
import math
from datetime import UTC, datetime

import pytest
from prometheus_client import generate_latest, start_http_server

from difftrain import contract
from difftrain.api.status import DiffusionTrainingJobStatus
from difftrain.local import free_port
from difftrain.operator import progress
from difftrain.trainer.telemetry import Telemetry
from tests.operator.conftest import eventually
from tests.operator.test_operator import DTJ, NS, _get, _send, create, phase_of

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def _trainer(rank: int = 0, **values) -> Telemetry:
    telemetry = Telemetry("ml", "demo", rank=rank, clock=lambda: 1000.0)
    telemetry.update(**values)
    return telemetry


def test_status_fields_from_the_main_process_metrics():
    trainer = _trainer(
        step=150, total_steps=600, epoch=3, loss=0.25, images_per_second=31.5, eta_seconds=5025.7
    )
    trainer.checkpoint_saved(100)
    trainer.samples_generated(150, 4)
    other = _trainer(rank=1, step=149, total_steps=600)  # another node's view
    text = generate_latest(trainer.registry).decode() + generate_latest(other.registry).decode()

    found = progress.read(text, NOW, "s3://runs/demo/")

    assert found == {
        "progress": {
            "step": 150,
            "totalSteps": 600,
            "percent": 25.0,
            "epoch": 3,
            "loss": 0.25,
            "imagesPerSecond": 31.5,
            "etaSeconds": 5025,
            "eta": "1h23m",
            "lastSeenTime": "2026-11-26T12:00:00Z",
        },
        "lastCheckpoint": {
            "step": 100,
            "uri": "s3://runs/demo/checkpoints/step-00000100",
            "time": "2026-11-26T12:00:00Z",
        },
        "outputs": {"samples": ["s3://runs/demo/samples/step-00000150"]},
    }


def test_the_newest_evaluation_goes_to_the_status():
    trainer = _trainer(step=300, total_steps=600)
    trainer.update(
        eval_fid=41.2345678,
        validation_loss=0.125,
        last_evaluation_step=300,
        last_evaluation_timestamp_seconds=NOW.timestamp() - 30.6,
    )

    found = progress.read(generate_latest(trainer.registry).decode(), NOW, "s3://runs/demo")

    assert found["evaluation"] == {
        "step": 300,
        "fid": 41.234568,
        "validationLoss": 0.125,
        "time": "2026-11-26T11:59:29Z",
    }
    assert DiffusionTrainingJobStatus.model_validate(found).evaluation.fid == 41.234568


def test_no_evaluation_in_the_status_before_the_first():
    trainer = _trainer(step=300, total_steps=600, eval_fid=1.0)

    found = progress.read(generate_latest(trainer.registry).decode(), NOW, "s3://runs/demo")

    assert "evaluation" not in found


def test_the_autoencoder_stages_checkpoints_are_in_its_folder():
    trainer = _trainer(step=20, total_steps=600, autoencoder_stage=1)
    trainer.checkpoint_saved(20)

    found = progress.read(generate_latest(trainer.registry).decode(), NOW, "s3://runs/demo")

    assert found["lastCheckpoint"]["uri"] == "s3://runs/demo/autoencoder/checkpoints/step-00000020"


def test_before_the_first_step_and_with_a_broken_loss():
    assert progress.read(generate_latest(_trainer().registry).decode(), NOW, "s3://b/") == {}

    found = progress.read(
        generate_latest(_trainer(step=1, total_steps=2, loss=math.nan).registry).decode(),
        NOW,
        "s3://b/",
    )

    assert "loss" not in found["progress"] and found["progress"]["percent"] == 50.0
    assert "lastCheckpoint" not in found and "outputs" not in found


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59, "59s"), (245, "4m05s"), (3600, "1h00m"), (90061, "25h01m")],
)
def test_human_duration(seconds, text):
    assert contract.human_duration(seconds) == text


def _pod(index: str, ip: str | None, port: int = 9400, phase: str = "Running") -> dict:
    return {
        "metadata": {"annotations": {contract.COMPLETION_INDEX: index}},
        "spec": {
            "containers": [
                {
                    "name": "trainer",
                    "ports": [
                        {"name": "rendezvous", "containerPort": 29500},
                        {"name": "metrics", "containerPort": port},
                    ],
                }
            ]
        },
        "status": {"phase": phase, **({"podIP": ip} if ip else {})},
    }


def test_the_endpoint_is_the_running_index_0_pods():
    assert progress.main_pod_endpoint([_pod("1", "10.0.0.2"), _pod("0", "10.0.0.1", 9401)]) == (
        "http://10.0.0.1:9401/metrics"
    )
    assert progress.main_pod_endpoint([_pod("0", None)]) is None
    assert progress.main_pod_endpoint([_pod("0", "10.0.0.1", phase="Pending")]) is None


async def _running_pod(k8s, port: int) -> None:
    """The attempt's pod, as the Job controller would make it (the Job owns it)."""
    pod = _pod("0", "127.0.0.1", port)
    pod["apiVersion"], pod["kind"] = "v1", "Pod"
    labels = {"difftrain.io/job-name": "demo", "difftrain.io/attempt": "1"}
    owner = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "name": "demo-a1",
        "controller": True,
        "uid": _get(k8s, "batch/v1/jobs", "demo-a1")["metadata"]["uid"],
    }
    pod["metadata"].update(name="demo-a1-0-x", namespace=NS, labels=labels, ownerReferences=[owner])
    await _send(k8s, "POST", f"/api/v1/namespaces/{NS}/pods", pod)


def _progress(k8s) -> dict:
    return (_get(k8s, DTJ, "demo") or {}).get("status", {}).get("progress", {})


@pytest.mark.asyncio
@pytest.mark.resync(0.3)  # progress is re-read on every resync
async def test_a_running_jobs_status_follows_its_trainer(k8s, operator):
    trainer = _trainer(step=50, total_steps=200, loss=0.5, eta_seconds=90)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=trainer.registry)
    try:
        await create(k8s)
        await eventually(lambda: _get(k8s, "batch/v1/jobs", "demo-a1"))
        await _running_pod(k8s, port)

        first = await eventually(lambda: _progress(k8s).get("step") == 50 and _progress(k8s))
        assert (first["percent"], first["eta"]) == (25.0, "1m30s")
        trainer.update(step=60)
        trainer.checkpoint_saved(60)
        trainer.update(
            validation_loss=0.25, last_evaluation_step=60, last_evaluation_timestamp_seconds=1e9
        )
        await eventually(lambda: _progress(k8s).get("step") == 60)
        status = _get(k8s, DTJ, "demo")["status"]
        assert status["lastCheckpoint"]["uri"].endswith("/checkpoints/step-00000060")
        assert status["evaluation"] == {
            "step": 60,
            "validationLoss": 0.25,
            "time": "2001-09-09T01:46:40Z",
        }
    finally:
        server.shutdown()
        thread.join(timeout=5)

    await asyncio.sleep(0.6)  # a scrape made just before the shutdown is published by now
    seen = _progress(k8s)["lastSeenTime"]
    await asyncio.sleep(1.0)  # several resyncs with the endpoint gone
    assert _progress(k8s)["step"] == 60 and _progress(k8s)["lastSeenTime"] == seen
    assert phase_of(k8s) == "Running"


def _finished(message: str, code: int = 0) -> dict:
    terminated = {"exitCode": code, "message": message}
    return {"status": {"containerStatuses": [{"state": {"terminated": terminated}}]}}


def test_a_succeeded_jobs_outputs_name_its_model_and_registered_version():
    said = '{"reason": "Succeeded", "outputs": {"registryVersion": "3"}}'
    pods = [_finished(""), _finished("not json"), _finished(said)]

    assert progress.finished_outputs("s3://bucket/out/", pods) == {
        "model": "s3://bucket/out/model",
        "registryVersion": "3",
    }
    assert progress.finished_outputs("s3://bucket/out", [_finished(said, code=1)]) == {
        "model": "s3://bucket/out/model"
    }
