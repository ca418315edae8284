"""The control plane itself: a real version, and a Job runs on kwok's fake nodes through
the real Job controller and scheduler, ending as its pods' annotations say."""

import json
import time

import pytest
import yaml

from tests.cluster.build import KUBERNETES


def _job(name: str, annotations: dict) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"annotations": annotations},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "main", "image": "example.invalid/none"}],
                },
            },
        },
    }


def _wait_for(control_plane, namespace, kind, name, condition, timeout=60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        found = json.loads(
            control_plane.kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout
        )
        if condition(found):
            return found
        assert time.monotonic() < deadline, json.dumps(found.get("status"), indent=1)
        time.sleep(0.5)


def _pod_of(control_plane, namespace, job: str) -> dict:
    pods = json.loads(
        control_plane.kubectl(
            "get", "pods", "-n", namespace, "-l", f"job-name={job}", "-o", "json"
        ).stdout
    )
    (pod,) = pods["items"]
    return pod


def test_the_api_server_reports_the_version_it_was_built_as(control_plane):
    version = json.loads(control_plane.kubectl("version", "-o", "json").stdout)

    assert version["serverVersion"]["gitVersion"] == KUBERNETES


def test_fake_nodes_are_ready_with_gpus(control_plane):
    nodes = json.loads(control_plane.kubectl("get", "nodes", "-o", "json").stdout)["items"]

    assert len(nodes) == 2
    for node in nodes:
        ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
        assert ready == "True" and node["status"]["allocatable"]["nvidia.com/gpu"] == "8"


@pytest.mark.parametrize(
    ("annotations", "phase", "code"),
    [
        ({"difftrain.test/exit-code": "0"}, "Succeeded", 0),
        ({"difftrain.test/exit-code": "3", "difftrain.test/message": "no images"}, "Failed", 3),
        ({"difftrain.test/disrupt": "true"}, "Failed", 143),
    ],
    ids=["success", "exit-3", "disrupted"],
)
def test_a_job_runs_on_a_fake_node_and_ends_as_annotated(
    control_plane, namespace, annotations, phase, code
):
    control_plane.kubectl(
        "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(_job("work", annotations))
    )

    done = "Complete" if phase == "Succeeded" else "Failed"
    _wait_for(
        control_plane,
        namespace,
        "job",
        "work",
        lambda job: any(
            c["type"] == done and c["status"] == "True"
            for c in job.get("status", {}).get("conditions", [])
        ),
    )
    pod = _pod_of(control_plane, namespace, "work")
    assert pod["spec"]["nodeName"].startswith("kwok-node-")  # bound by the scheduler
    assert pod["status"]["phase"] == phase
    (status,) = pod["status"]["containerStatuses"]
    assert status["state"]["terminated"]["exitCode"] == code
    assert status["state"]["terminated"].get("message", "") == annotations.get(
        "difftrain.test/message", ""
    )
    conditions = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
    assert (conditions.get("DisruptionTarget") == "True") == (
        "difftrain.test/disrupt" in annotations
    )


def test_deleting_a_job_removes_its_pods_through_the_garbage_collector(control_plane, namespace):
    control_plane.kubectl(
        "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(_job("long", {}))
    )
    _wait_for(
        control_plane,
        namespace,
        "job",
        "long",
        lambda job: job.get("status", {}).get("active") == 1,
    )

    control_plane.kubectl(
        "delete", "job", "long", "-n", namespace, "--cascade=background", "--wait=false"
    )

    deadline = time.monotonic() + 60
    while control_plane.kubectl(
        "get", "pods", "-n", namespace, "-l", "job-name=long", "-o", "name"
    ).stdout.strip():
        assert time.monotonic() < deadline, "the job's pod outlived it"
        time.sleep(0.5)


def test_missing_binaries_are_named_with_the_command_that_builds_them(tmp_path, monkeypatch):
    from tests.cluster import build

    monkeypatch.setattr(build, "CACHE", tmp_path / "cache")

    with pytest.raises(build.BuildError) as raised:
        build.binaries(build=False)

    message = str(raised.value)
    assert f"{tmp_path / 'cache' / f'kubernetes-{KUBERNETES}' / 'bin'} is missing" in message
    assert "make cluster-binaries" in message
    assert not (tmp_path / "cache").exists()  # nothing was built
