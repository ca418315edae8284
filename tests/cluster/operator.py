"""The operator as the chart installs it, run by the tests: ``helm install`` makes its
ServiceAccount, RBAC and Deployment (whose pod kwok only pretends to run); the tests run
the Deployment's own command line as a local process, with the Deployment's environment
and a token for its ServiceAccount from the TokenRequest API, so the real RBAC authorizer
judges every request it makes and the audit log records them."""

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from difftrain.local import free_port
from tests.builders import MINIMAL_JOB, job, merge
from tests.cluster.build import ROOT
from tests.cluster.control_plane import ControlPlane, fetch
from tests.test_chart import helm

CHART = ROOT / "helm" / "difftrain"
RELEASE = "ops"
DTJ = "/apis/difftrain.io/v1alpha1/namespaces/{namespace}/diffusiontrainingjobs"
JOBS = "/apis/batch/v1/namespaces/{namespace}/jobs"
PODS = "/api/v1/namespaces/{namespace}/pods"


def wait_until(check, timeout: float = 30.0, every: float = 0.2, what: str = ""):
    """Poll ``check()`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout:.0f} s: {what or check.__doc__}")
        time.sleep(every)


@dataclass
class Operator:
    """One release of the chart and the operator process that runs as its account."""

    control_plane: ControlPlane
    namespace: str
    folder: Path
    values: list[str] = field(default_factory=list)  # helm --set arguments
    process: subprocess.Popen | None = None

    def install(self) -> "Operator":
        self.control_plane.kubectl("create", "namespace", self.namespace, check=False)
        command = [
            "install",
            RELEASE,
            str(CHART),
            "-n",
            self.namespace,
            "--wait",
            "--timeout=120s",
            "--set",
            "operator.resyncSeconds=1",
        ]
        for value in self.values:
            command += ["--set", value]
        self._helm(*command)
        (deployment,) = self.control_plane.api(
            "GET",
            f"/apis/apps/v1/namespaces/{self.namespace}/deployments"
            f"?labelSelector=app.kubernetes.io/instance={RELEASE}",
        )["items"]
        pod = self.pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        self.args, self.env = (
            container.get("args", []),
            {item["name"]: item["value"] for item in container.get("env", []) if "value" in item},
        )
        self.account = f"system:serviceaccount:{self.namespace}:{pod['serviceAccountName']}"
        token = self.control_plane.kubectl(
            "create",
            "token",
            pod["serviceAccountName"],
            "-n",
            self.namespace,
            "--duration=2h",
        ).stdout.strip()
        self.kubeconfig = self.control_plane.write_kubeconfig(
            self.folder / "kubeconfig", self.account, token
        )
        return self

    def start(self) -> "Operator":
        """Run the Deployment's command line here (its ports moved to free ones)."""
        args = self.arguments()
        self.log = self.folder / "operator.log"
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "difftrain.cli",
                    "operator",
                    *args,
                ],
                env={
                    **self.env,
                    "KUBECONFIG": str(self.kubeconfig),
                    "PATH": "/usr/bin:/bin",
                    "HOME": str(self.folder),
                },
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait_until(
            lambda: self.check_alive() or fetch(f"http://127.0.0.1:{self.health_port}/healthz"),
            60,
            what="the operator answers on /healthz",
        )
        return self

    def arguments(self) -> list[str]:
        """The Deployment's arguments, its ports moved to free ones (``metrics_port``,
        ``health_port``)."""
        self.metrics_port, self.health_port = free_port(), free_port()
        moved = ("--metrics-port=", "--health-port=")
        return [
            *(a for a in self.args if not a.startswith(moved)),
            f"--metrics-port={self.metrics_port}",
            f"--health-port={self.health_port}",
        ]

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(
                f"the operator exited with {self.process.returncode}:\n"
                f"{self.log.read_text()[-3000:]}"
            )

    def metrics(self) -> str:
        return fetch(f"http://127.0.0.1:{self.metrics_port}/metrics") or ""

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def uninstall(self) -> None:
        self._helm("uninstall", RELEASE, "-n", self.namespace, "--wait", "--timeout=60s")

    def requests(self) -> list[dict]:
        """The audit log's record of every request the operator made."""
        return self.control_plane.audit_events(self.account)

    def cluster_role(self) -> str:
        """The name of the ClusterRole bound to the operator's account."""
        _, _, namespace, name = self.account.split(":")
        bindings = self.control_plane.api(
            "GET", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings"
        )["items"]
        (found,) = [
            b["roleRef"]["name"]
            for b in bindings
            if {"kind": "ServiceAccount", "name": name, "namespace": namespace}
            in (b.get("subjects") or [])
        ]
        return found

    def granted(self) -> dict[str, set[tuple[str, str, str]]]:
        """(group, resource, verb) the account's bindings grant, by the namespace they
        hold in ("" for cluster-wide)."""
        rbac = "/apis/rbac.authorization.k8s.io/v1"
        _, _, namespace, name = self.account.split(":")

        def mine(binding: dict) -> bool:
            return any(
                s.get("kind") == "ServiceAccount"
                and s.get("name") == name
                and s.get("namespace") == namespace
                for s in binding.get("subjects") or []
            )

        found = [
            ("", b)
            for b in self.control_plane.api("GET", f"{rbac}/clusterrolebindings")["items"]
            if mine(b)
        ]
        found += [
            (b["metadata"]["namespace"], b)
            for b in self.control_plane.api("GET", f"{rbac}/rolebindings")["items"]
            if mine(b)
        ]
        granted = {}
        for scope, binding in found:
            ref = binding["roleRef"]
            path = (
                f"{rbac}/clusterroles/{ref['name']}"
                if ref["kind"] == "ClusterRole"
                else f"{rbac}/namespaces/{scope}/roles/{ref['name']}"
            )
            granted.setdefault(scope, set()).update(
                (group, resource, verb)
                for rule in self.control_plane.api("GET", path)["rules"]
                for group in rule["apiGroups"]
                for resource in rule["resources"]
                for verb in rule["verbs"]
            )
        return granted

    def _helm(self, *args: str) -> None:
        result = subprocess.run(
            [helm(), f"--kubeconfig={self.control_plane.kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr


def used_rights(requests: list[dict]) -> set[tuple[str, str, str, str]]:
    """(namespace, group, resource, verb) from audit events. A server-side apply that
    created its object (201) used ``create`` as well as ``patch``."""
    used = set()
    for event in requests:
        ref = event.get("objectRef") or {}
        if not ref.get("resource"):
            continue  # discovery and other non-resource URLs
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        row = (ref.get("namespace", ""), ref.get("apiGroup", ""), resource)
        used.add((*row, event["verb"]))
        if event["verb"] == "patch" and event.get("responseStatus", {}).get("code") == 201:
            used.add((*row, "create"))
    return used


def refused(requests: list[dict]) -> list[str]:
    """The requests the authorizer refused (not those admission refused, such as writes to
    a namespace being deleted), as readable lines."""
    return [
        f"{e['verb']} {e['requestURI']}: {e['responseStatus'].get('message', '')}"
        for e in requests
        if (e.get("annotations") or {}).get("authorization.k8s.io/decision") == "forbid"
    ]


# Rights no request uses: the API server checks them for the operator's requests.
# OwnerReferencesPermissionEnforcement asks for update on the owner's finalizers when a
# child sets blockOwnerDeletion (test_blocking_owner_deletion_needs_the_finalizers_right).
CHECKED_BY_ADMISSION = {("difftrain.io", "diffusiontrainingjobs/finalizers", "update")}


def unused_rights(used: set, granted: dict) -> set:
    """Rules no request used: a cluster-wide rule by a request anywhere, a Role's rule by
    a request in its namespace (less those admission checks)."""
    return {
        (scope, *rule)
        for scope, rules in granted.items()
        for rule in rules
        if rule not in CHECKED_BY_ADMISSION
        and not any(u[1:] == rule and (not scope or u[0] == scope) for u in used)
    }


def dump(value) -> str:
    return json.dumps(value, indent=1)[:4000]


class Cluster:
    """What a test does and reads in its namespace, as the admin."""

    def __init__(self, control_plane, namespace: str, operator: Operator):
        self.plane, self.namespace, self.operator = control_plane, namespace, operator

    def path(self, template: str, name: str = "") -> str:
        return template.format(namespace=self.namespace) + (f"/{name}" if name else "")

    def apply(self, manifest: dict) -> dict:
        """``kubectl apply`` of a DiffusionTrainingJob, as a user does; the object. A job
        with the builders' default output gets one of its own (the operator refuses a
        second live job on one output, across namespaces)."""
        name = manifest["metadata"]["name"]
        if manifest["spec"]["output"]["uri"] == MINIMAL_JOB["spec"]["output"]["uri"]:
            own = {"output": {"uri": f"s3://outputs/{self.namespace}/{name}"}}
            manifest = merge(manifest, {"spec": own})
        self.plane.kubectl("apply", "-n", self.namespace, "-f", "-", input=yaml.safe_dump(manifest))
        return self.dtj(name)

    def dtj(self, name: str = "demo") -> dict | None:
        return self.plane.api("GET", self.path(DTJ, name))

    def status(self, name: str = "demo") -> dict:
        return (self.dtj(name) or {}).get("status") or {}

    def condition(self, kind: str, name: str = "demo") -> dict:
        conditions = self.status(name).get("conditions", [])
        return next((c for c in conditions if c["type"] == kind and c["status"] == "True"), {})

    def wait_phase(self, phase: str, name: str = "demo", timeout: float = 30) -> dict:
        self.operator.check_alive()
        return wait_until(
            lambda: self.status(name).get("phase") == phase and self.status(name),
            timeout,
            what=f"{name} is {phase}: {dump(self.status(name))}",
        )

    def job(self, name: str) -> dict | None:
        return self.plane.api("GET", self.path(JOBS, name))

    def get(self, template: str, name: str) -> dict | None:
        return self.plane.api("GET", self.path(template, name))

    def pods(self, job_name: str = "demo", attempt: int | None = None) -> list[dict]:
        selector = f"difftrain.io/job-name={job_name}"
        if attempt is not None:
            selector += f",difftrain.io/attempt={attempt}"
        found = self.plane.api("GET", self.path(PODS) + f"?labelSelector={selector}")["items"]
        return [p for p in found if not p["metadata"].get("deletionTimestamp")]

    def running_pods(self, count: int, job_name: str = "demo", attempt: int = 1) -> list[dict]:
        def running():
            pods = self.pods(job_name, attempt)
            pods = [p for p in pods if p["status"].get("phase") == "Running"]
            return len(pods) == count and pods

        return wait_until(running, 30, what=f"{count} running pods of {job_name} a{attempt}")

    def annotate(self, pod: dict, annotations: dict) -> None:
        """Tell kwok how the pod ends (stages.yaml)."""
        self.plane.api(
            "PATCH",
            self.path(PODS, pod["metadata"]["name"]),
            {"metadata": {"annotations": annotations}},
            "application/merge-patch+json",
        )

    def index(self, pods: list[dict], index: int) -> dict:
        key = "batch.kubernetes.io/job-completion-index"
        return next(p for p in pods if p["metadata"]["annotations"][key] == str(index))

    def patch_dtj(self, spec: dict, name: str = "demo") -> None:
        self.plane.kubectl(
            "patch",
            "dtj",
            name,
            "-n",
            self.namespace,
            "--type=merge",
            "-p",
            json.dumps({"spec": spec}),
        )

    def events(self, name: str = "demo") -> list[dict]:
        found = self.plane.api("GET", self.path("/api/v1/namespaces/{namespace}/events"))
        return sorted(
            (
                e
                for e in found["items"]
                if e["involvedObject"].get("name") == name
                and e["involvedObject"].get("kind") == "DiffusionTrainingJob"
            ),
            key=lambda e: int(e["metadata"]["resourceVersion"]),  # the order they were written
        )

    def printed(self, name: str = "demo") -> dict[str, str]:
        """``kubectl get dtj -o wide``'s row for ``name``, by column."""
        text = self.plane.kubectl("get", "dtj", name, "-n", self.namespace, "-o", "wide").stdout
        header, row = text.splitlines()
        starts = [i for i, c in enumerate(header) if c != " " and (i == 0 or header[i - 1] == " ")]
        bounds = list(zip(starts, [*starts[1:], None], strict=True))
        return {header[a:b].strip(): row[a:b].strip() for a, b in bounds}


def tour(cluster: Cluster) -> None:
    """The operator's whole range of work in ``cluster``'s namespace: a job runs and
    expires (TTL), one crashes and restarts, one is suspended, one's pods are refused
    (a missing PriorityClass), one waits for a LocalQueue that does not exist, one for a
    profile that does not exist, and one is re-created over its orphaned children."""
    cluster.apply(job({"metadata": {"name": "orphan"}}))
    # Running pods: by then the garbage collector knows the Job's owner (orphaning a child
    # it has not seen yet leaves the child to be collected as dangling).
    cluster.running_pods(1, "orphan")
    cluster.plane.kubectl(
        "delete",
        "dtj",
        "orphan",
        "-n",
        cluster.namespace,
        "--cascade=orphan",
        "--wait=true",
        "--timeout=30s",
    )
    wait_until(
        lambda: not cluster.job("orphan-a1")["metadata"].get("ownerReferences"),
        what="orphan's Job is orphaned",
    )
    cluster.apply(
        job({"metadata": {"name": "done"}}, spec={"runPolicy": {"ttlSecondsAfterFinished": 0}})
    )
    cluster.apply(job({"metadata": {"name": "crash"}}))
    cluster.apply(job({"metadata": {"name": "pause"}}))
    cluster.apply(
        job(
            {"metadata": {"name": "refused"}},
            spec={"resources": {"priorityClassName": "no-such-class"}},
        )
    )
    cluster.plane.start_kueue()
    cluster.apply(
        job({"metadata": {"name": "queued"}}, spec={"runPolicy": {"queueName": "nowhere"}})
    )
    cluster.apply(job({"metadata": {"name": "profiled"}}, spec={"profile": "nowhere"}))
    orphan = cluster.apply(job({"metadata": {"name": "orphan"}}))
    (done,) = cluster.running_pods(1, "done")
    cluster.annotate(done, {"difftrain.test/exit-code": "0"})
    (crash,) = cluster.running_pods(1, "crash")
    cluster.annotate(crash, {"difftrain.test/exit-code": "137"})
    cluster.patch_dtj({"runPolicy": {"suspend": True}}, "pause")
    wait_until(lambda: cluster.dtj("done") is None, what="done expired")
    wait_until(lambda: cluster.job("crash-a2"), what="crash restarted")
    cluster.wait_phase("Suspended", "pause")
    wait_until(
        lambda: cluster.status("refused").get("reason") == "FailedCreate",
        what="refused's pods are refused",
    )
    wait_until(
        lambda: cluster.status("queued").get("reason") == "LocalQueueNotFound",
        what="queued's LocalQueue is missing",
    )
    wait_until(
        lambda: cluster.status("profiled").get("reason") == "ProfileNotFound",
        what="profiled's profile is missing",
    )
    wait_until(
        lambda: (
            (cluster.job("orphan-a1") or {})
            .get("metadata", {})
            .get("ownerReferences", [{}])[0]
            .get("uid")
            == orphan["metadata"]["uid"]
        ),
        what="orphan has a Job of its own",
    )
    time.sleep(1.5)  # a resync or so
