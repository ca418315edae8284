"""`helm install` of the chart on the real control plane, cluster-wide and per namespace:
the release installs, its operator Deployment becomes available (the Deployment and
ReplicaSet controllers make its pod, the scheduler binds it, kwok runs it), and each mode
grants its rights where it says."""

import json
import subprocess

import pytest
import yaml

from tests.cluster.build import ROOT
from tests.test_chart import helm

CHART = ROOT / "helm" / "difftrain"


def _helm(control_plane, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [helm(), f"--kubeconfig={control_plane.kubeconfig}", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result


def _install(control_plane, namespace: str, release: str, *values: str) -> None:
    """``helm install`` of the chart as ``release`` in ``namespace``, waiting for it."""
    _helm(
        control_plane,
        "install",
        release,
        str(CHART),
        "-n",
        namespace,
        "--wait",
        "--timeout=120s",
        *values,
    )


@pytest.fixture
def release(control_plane, namespace):
    """Uninstalls the release named ``ops`` in ``namespace`` after the test."""
    yield "ops"
    subprocess.run(
        [
            helm(),
            f"--kubeconfig={control_plane.kubeconfig}",
            "uninstall",
            "ops",
            "-n",
            namespace,
            "--wait",
            "--timeout=60s",
        ],
        capture_output=True,
    )


def _operator_account(control_plane, namespace: str) -> str:
    """The user the release's operator runs as, once its one Deployment is available."""
    (deployment,) = json.loads(
        control_plane.kubectl(
            "get",
            "deployment",
            "-n",
            namespace,
            "-l",
            "app.kubernetes.io/instance=ops",
            "-o",
            "json",
        ).stdout
    )["items"]
    assert deployment["status"].get("availableReplicas") == 1, deployment["status"]
    name = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    return f"system:serviceaccount:{namespace}:{name}"


def _can(control_plane, account: str, verb: str, resource: str, namespace: str, *more) -> bool:
    result = control_plane.kubectl(
        "auth", "can-i", verb, resource, "-n", namespace, f"--as={account}", *more, check=False
    )
    return result.stdout.strip() == "yes"


def test_cluster_wide_install_runs_the_operator_with_rights_everywhere(
    control_plane, namespace, release, tmp_path
):
    profile = f"{namespace}-gpu"  # the values' profiles, which the real API server checks
    values = {"profiles": {profile: {"resources": {"gpusPerNode": 4, "nodes": 2}}}}
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    _install(control_plane, namespace, release, "--values", str(tmp_path / "values.yaml"))

    found = json.loads(control_plane.kubectl("get", "dtp", profile, "-o", "json").stdout)
    assert found["spec"] == values["profiles"][profile]
    assert found["metadata"]["labels"]["app.kubernetes.io/instance"] == release

    account = _operator_account(control_plane, namespace)
    assert _can(control_plane, account, "create", "jobs.batch", "default")
    assert _can(
        control_plane,
        account,
        "patch",
        "diffusiontrainingjobs.difftrain.io",
        "kube-system",
        "--subresource=status",
    )
    assert _can(control_plane, account, "get", "diffusiontrainingprofiles.difftrain.io", "")


def test_namespaced_install_grants_rights_only_in_its_namespaces(control_plane, namespace, release):
    for team in ("team-red", "team-blue"):
        control_plane.kubectl("create", "namespace", team, check=False)

    _install(control_plane, namespace, release, "--set", "watchNamespaces={team-red,team-blue}")

    account = _operator_account(control_plane, namespace)
    assert _can(control_plane, account, "create", "jobs.batch", "team-red")
    assert _can(control_plane, account, "create", "jobs.batch", "team-blue")
    assert not _can(control_plane, account, "create", "jobs.batch", "default")
