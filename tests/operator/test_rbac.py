"""The chart's RBAC rules are exactly what the operator uses: every API request the
operator makes in a tour of its work is allowed, and every rule is used."""

import subprocess

import pytest
import yaml

from tests.operator.conftest import Operator, eventually
from tests.operator.test_operator import (
    DTJ,
    HARNESS,
    JOBS,
    NS,
    _get,
    _send,
    create,
    job_status,
    phase_of,
    pod,
)
from tests.test_chart import CHART, helm

pytestmark = pytest.mark.asyncio


def chart_rules(namespaces: list[str]) -> dict[str, set[tuple[str, str, str]]]:
    """(group, resource, verb) granted by the chart, by namespace ("" for cluster-wide)."""
    command = [helm(), "template", "ops", str(CHART)]
    for index, namespace in enumerate(namespaces):
        command += ["--set", f"watchNamespaces[{index}]={namespace}"]
    rendered = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    granted = {}
    for role in yaml.safe_load_all(rendered):
        if role and role["kind"] in ("Role", "ClusterRole"):
            namespace = role["metadata"].get("namespace", "") if role["kind"] == "Role" else ""
            granted[namespace] = {
                (group, resource, verb)
                for rule in role["rules"]
                for group in rule["apiGroups"]
                for resource in rule["resources"]
                for verb in rule["verbs"]
            }
    return granted


def operator_requests(k8s) -> set[tuple[str, str, str, str]]:
    """(namespace, group, resource, verb) of every request the operator made to the API
    (discovery, which needs no rules, left out)."""
    used = set()
    for request in k8s:
        if request.headers.get("User-Agent") == HARNESS or not getattr(
            request.resource, "plural", None
        ):
            continue
        resource = request.resource.plural + (
            f"/{request.subresource}" if request.subresource else ""
        )
        group, namespace = request.resource.group, request.namespace or ""
        for verb in _verbs(request):
            used.add((namespace, group, resource, verb))
    return used


def _verbs(request) -> list[str]:
    method = request.method.value
    if method == "GET":
        if request.name:
            return ["get"]
        return ["watch"] if request.params.get("watch") in ("true", "1") else ["list"]
    if method == "PATCH":
        applying = request.headers.get("Content-Type", "").startswith("application/apply-patch")
        return ["patch", "create"] if applying else ["patch"]  # apply may create
    return {"POST": ["create"], "PUT": ["update"], "DELETE": ["delete"]}[method]


async def _tour(k8s) -> None:
    """The operator's whole range of work: start, run, finish and expire a job; restart
    a crashed one; suspend and resume a third."""
    await create(k8s, "done", spec={"runPolicy": {"ttlSecondsAfterFinished": 0}})
    await create(k8s, "crash")
    await create(k8s, "pause")
    for name in ("done", "crash", "pause"):
        await eventually(lambda n=name: _get(k8s, "batch/v1/jobs", f"{n}-a1"))

    await pod(k8s, "done", 1, 0, "Running")
    await eventually(lambda: phase_of(k8s, "done") == "Running")
    await job_status(k8s, "done-a1", [("Complete", "Completed")])
    await eventually(lambda: _get(k8s, DTJ, "done") is None)  # TTL 0

    await pod(k8s, "crash", 1, 0, "Failed", exit_code=137, reason="OOMKilled")
    await job_status(k8s, "crash-a1", [("Failed", "BackoffLimitExceeded")])
    await eventually(lambda: _get(k8s, "batch/v1/jobs", "crash-a2"))
    await eventually(lambda: _get(k8s, "batch/v1/jobs", "crash-a1") is None)

    for suspend in (True, False):
        await _send(k8s, "PATCH", f"{JOBS}/pause", {"spec": {"runPolicy": {"suspend": suspend}}},
                    "application/merge-patch+json")  # fmt: skip
        await eventually(
            lambda s=suspend: _get(k8s, "batch/v1/jobs", "pause-a1")["spec"]["suspend"] is s
        )


def _compare(used: set, granted: dict) -> tuple[set, set]:
    """(requests no rule allows, rules no request uses). A ClusterRole's rules ("") hold
    in every namespace; a Role's only in its own."""
    cluster = granted.get("", set())

    def allowed(request) -> bool:
        namespace, *rule = request
        return tuple(rule) in cluster or (namespace and tuple(rule) in granted.get(namespace, ()))

    denied = {request for request in used if not allowed(request)}
    unused = {
        (scope, *rule)
        for scope, rules in granted.items()
        for rule in rules
        if not any(u[1:] == rule and (not scope or u[0] == scope) for u in used)
    }
    return denied, unused


@pytest.mark.resync(0.3)  # the TTL and the resync's listing of jobs
async def test_a_cluster_wide_operator_uses_exactly_its_cluster_role(k8s, operator):
    await _tour(k8s)

    granted = chart_rules([])
    denied, unused = _compare(operator_requests(k8s), granted)

    assert set(granted) == {""}
    assert denied == set(), "requests the chart's RBAC does not allow"
    assert unused == set(), "rules the operator never uses"


async def test_a_namespaced_operator_uses_exactly_its_roles(k8s):
    k8s.objects["v1/namespaces", None, NS] = {
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS},
    }  # fmt: skip
    running = Operator(str(k8s.url).rstrip("/"), resync_seconds=0.3, namespaces=[NS])
    await running.start()
    try:
        await _tour(k8s)
    finally:
        await running.stop()

    granted = chart_rules([NS])
    denied, unused = _compare(operator_requests(k8s), granted)

    # Its jobs' rights in its namespace only; cluster-wide, to watch Namespaces alone.
    assert granted[""] == {("", "namespaces", "list"), ("", "namespaces", "watch")}
    assert denied == set(), "requests the chart's RBAC does not allow"
    assert unused == set(), "rules the operator never uses"
