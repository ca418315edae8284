"""The operator image (``make images``) on the real control plane: run as its Deployment
runs it (the chart's arguments and environment, the chart's ServiceAccount token, user
1000, a read-only root filesystem with the Deployment's emptyDirs writable), it answers
its liveness and readiness probes and turns a job into its Job and running pods, as the
operator run from the checkout does."""

import shutil
import subprocess

import pytest

from tests.builders import job
from tests.cluster.control_plane import fetch
from tests.cluster.operator import Cluster, Operator, wait_until
from tests.images import build, podman

IMAGE = build.IMAGES["operator"]


@pytest.fixture
def operator_in_image(control_plane, namespace, tmp_path):
    if shutil.which("podman") is None or not build.exists(IMAGE):
        pytest.fail(f"no {IMAGE}: run `make images`")
    operator = Operator(control_plane, f"{namespace}-ops", tmp_path / "operator")
    (tmp_path / "operator").mkdir()
    operator.install()
    # The token's kubeconfig, readable by the container's user.
    kube = tmp_path / "kube"
    kube.mkdir()
    shutil.copy(operator.kubeconfig, kube / "config")
    (kube / "config").chmod(0o644)
    pod = operator.pod
    empty = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
    writable = [
        podman.empty_dir(tmp_path / "volumes" / m["name"], m["mountPath"])
        for m in pod["containers"][0]["volumeMounts"]
        if m["name"] in empty
    ]
    name = f"difftrain-operator-{namespace}"
    command = podman.run_command(
        IMAGE,
        *operator.arguments(),
        name=name,
        env={**operator.env, "KUBECONFIG": "/var/run/difftrain/config"},
        mounts=[f"{kube}:/var/run/difftrain:ro", *writable],  # writable: the pod's emptyDirs
    )
    log = tmp_path / "operator.log"
    with log.open("w") as out:
        operator.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    operator.log = log
    try:
        yield operator
    finally:
        podman.remove(name)
        operator.process.wait(timeout=30)
        operator.uninstall()


def test_the_operator_image_runs_a_job_through_the_real_controllers(
    control_plane, namespace, operator_in_image
):
    operator = operator_in_image
    health = f"http://127.0.0.1:{operator.health_port}/healthz"
    wait_until(
        lambda: operator.check_alive() or fetch(health),
        120,
        what=f"the operator in its image answers on /healthz: {operator.log}",
    )
    cluster = Cluster(control_plane, namespace, operator)

    cluster.apply(job(spec={"resources": {"nodes": 2}}))

    pods = cluster.running_pods(2)
    status = cluster.wait_phase("Running")
    assert status["attempt"] == 1
    assert {p["spec"]["containers"][0]["name"] for p in pods} == {"trainer"}
    assert "difftrain_operator_reconcile_duration_seconds" in operator.metrics()
    assert fetch(health)  # the liveness and readiness probes' endpoint, still answering
