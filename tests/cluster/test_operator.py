"""The operator end to end on the real control plane. One operator process runs for the
module, cluster-wide, as the chart's ServiceAccount; each test applies jobs with kubectl in
a namespace of its own. The real Job controller makes the pods, the scheduler binds them
to kwok's nodes and kwok runs them, ending them as the test annotates them (stages.yaml);
the garbage collector removes what a deleted job owned."""

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml

from tests.builders import job
from tests.cluster.control_plane import kubectl_binary
from tests.cluster.operator import (
    JOBS,
    Cluster,
    Operator,
    dump,
    refused,
    tour,
    unused_rights,
    used_rights,
    wait_until,
)

NETWORK_POLICIES = "/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies"
# A pod that cannot start (its image, its Secrets) fails its job after this many seconds.
GRACE_SECONDS = 5


@pytest.fixture(scope="module")
def operator(control_plane, tmp_path_factory):
    running = Operator(
        control_plane,
        "difftrain-system",
        tmp_path_factory.mktemp("operator"),
        values=[
            f"operator.failureGraceSeconds={GRACE_SECONDS}",
            "policy.allowedImages={registry.example/ml/*}",
            "policy.allowedServiceAccounts={robot}",
        ],
    )
    running.install().start()
    try:
        yield running
    finally:
        running.stop()
        running.uninstall()


@pytest.fixture
def cluster(control_plane, namespace, operator):
    return Cluster(control_plane, namespace, operator)


def demo(**spec) -> dict:
    return job(spec=spec or None)


def test_a_job_runs_to_success_through_the_real_controllers(cluster):
    created = cluster.apply(demo(resources={"nodes": 2}))

    trainer = wait_until(lambda: cluster.job("demo-a1"), what="the attempt's Job")
    owner = {
        "apiVersion": "difftrain.io/v1alpha1",
        "kind": "DiffusionTrainingJob",
        "name": "demo",
        "uid": created["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    config = cluster.get("/api/v1/namespaces/{namespace}/configmaps", "demo-config")
    service = cluster.get("/api/v1/namespaces/{namespace}/services", "demo")
    policy = cluster.get(NETWORK_POLICIES, "demo")  # the chart turns them on
    for child in (trainer, config, service, policy):
        assert child["metadata"]["ownerReferences"] == [owner]
    assert policy["spec"]["podSelector"] == {"matchLabels": {"difftrain.io/job-name": "demo"}}
    assert trainer["spec"]["completionMode"] == "Indexed"
    pods = cluster.running_pods(2)
    assert {p["spec"]["nodeName"] for p in pods} <= {"kwok-node-0", "kwok-node-1"}
    # The label by which Katib's primaryPodLabels find the main process's pod
    # (examples/katib-sweep.yaml).
    index = "batch.kubernetes.io/job-completion-index"
    assert {p["metadata"]["labels"][index] for p in pods} == {"0", "1"}
    cluster.wait_phase("Running")
    assert cluster.printed()["PHASE"] == "Running"

    # The main process says, on its way out, which version the registry gave the model.
    said = json.dumps({"reason": "Succeeded", "outputs": {"registryVersion": "7"}})
    cluster.annotate(cluster.index(pods, 1), {"difftrain.test/exit-code": "0"})
    cluster.annotate(
        cluster.index(pods, 0), {"difftrain.test/exit-code": "0", "difftrain.test/message": said}
    )

    # kstatus's Ready: what `kubectl wait` and Flux's health checks wait for.
    waited = cluster.plane.kubectl(
        "wait", "--for=condition=Ready", "dtj/demo", "-n", cluster.namespace, "--timeout=60s"
    )
    assert "condition met" in waited.stdout
    status = cluster.wait_phase("Succeeded")
    assert status["startTime"] <= status["completionTime"]
    output = created["spec"]["output"]["uri"]
    assert status["outputs"]["model"] == f"{output}/model"
    assert status["outputs"]["registryVersion"] == "7"
    assert cluster.condition("Succeeded")
    row = cluster.printed()
    assert (row["PHASE"], row["METHOD"], row["RESTARTS"]) == ("Succeeded", "lora", "0")
    reasons = wait_until(
        lambda: (r := [e["reason"] for e in cluster.events()]) and "Completed" in r and r,
        what="a Completed event",
    )
    assert reasons == ["JobCreated", "Training", "Completed"]
    assert "finalizers" not in cluster.dtj()["metadata"]  # deleting never waits on us


def test_exit_code_3_fails_the_job_as_a_dataset_error_with_no_restart(cluster):
    cluster.apply(demo(resources={"nodes": 2}))
    pods = cluster.running_pods(2)

    message = '{"reason": "DatasetError", "message": "the dataset has no images"}'
    cluster.annotate(
        cluster.index(pods, 1), {"difftrain.test/exit-code": "3", "difftrain.test/message": message}
    )

    cluster.wait_phase("Failed")
    failed = cluster.condition("Failed")
    assert (failed["reason"], failed["message"]) == ("DatasetError", "the dataset has no images")
    stalled = cluster.condition("Stalled")  # kstatus: Failed
    assert (stalled["reason"], stalled["message"]) == ("DatasetError", "the dataset has no images")
    # The Job controller's own rule ended it (FailureTarget first, then Failed).
    reasons = {c["reason"] for c in cluster.job("demo-a1")["status"]["conditions"]}
    assert "PodFailurePolicy" in reasons
    time.sleep(1.5)  # a resync or so: time for a wrong restart to show
    assert cluster.job("demo-a2") is None
    labels = f'job="demo",namespace="{cluster.namespace}",reason="DatasetError"'
    assert f"difftrain_operator_job_failed{{{labels}}} 1.0" in cluster.operator.metrics()
    # kubectl difftrain, run by kubectl itself (a plugin on the PATH).
    status = _plugin(cluster, "status", "demo", "-n", cluster.namespace)
    assert status.returncode == 0, status.stderr
    assert "Phase:       Failed (DatasetError)" in status.stdout
    assert re.search(r"Failed +True +DatasetError +\S+ +the dataset has no images", status.stdout)
    assert re.search(r"Stalled +True +DatasetError", status.stdout)
    events = _plugin(cluster, "events", "demo", "-n", cluster.namespace)
    assert events.returncode == 0, events.stderr
    said = [line.split()[1:3] for line in events.stdout.splitlines()[1:]]
    assert ["Normal", "JobCreated"] in said and ["Warning", "DatasetError"] in said
    missing = _plugin(cluster, "status", "nothing", "-n", cluster.namespace)
    assert missing.returncode == 1
    assert missing.stderr.strip() == (
        f'kubectl difftrain: diffusiontrainingjob "nothing" not found in namespace '
        f"{cluster.namespace}"
    )


def _plugin_env(cluster) -> dict:
    """kubectl finds the plugin the package installs beside the interpreter, as on a
    user's PATH."""
    path = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    return {**os.environ, "PATH": path, "KUBECONFIG": str(cluster.plane.kubeconfig)}


def _plugin_command(cluster, *args: str) -> list[str]:
    return [kubectl_binary(), "difftrain", *args]


def _plugin(cluster, *args: str):
    """``kubectl difftrain ARGS``, run to its end."""
    return subprocess.run(
        _plugin_command(cluster, *args),
        capture_output=True,
        text=True,
        timeout=60,
        env=_plugin_env(cluster),
    )


def test_kubectl_difftrain_samples_downloads_the_newest_grid(cluster, tmp_path, s3_env, two_runs):
    """With the S3 server's credentials and endpoint in the environment (s3_env)."""
    from difftrain.storage import S3Settings, open_store

    bucket = s3_env.create_bucket("plugin-samples")
    settings = S3Settings(endpoint=s3_env.endpoint, path_style=True)
    open_store(f"s3://{bucket}/runs/a", settings).upload_tree(two_runs[0], "")
    storage = {"endpoint": s3_env.endpoint, "pathStyle": True}
    cluster.apply(demo(output={"uri": f"s3://{bucket}/runs/a"}, storage=storage))

    newest = _plugin(cluster, "samples", "demo", "-n", cluster.namespace, "-o", str(tmp_path))
    chosen = _plugin(
        cluster,
        "samples",
        "demo",
        "-n",
        cluster.namespace,
        "--step",
        "2",
        "-o",
        str(tmp_path),
    )
    absent = _plugin(cluster, "samples", "demo", "-n", cluster.namespace, "--step", "3")

    assert newest.returncode == 0, newest.stderr
    grids = two_runs[0] / "samples"
    got = tmp_path / "demo-step-00000004-grid.png"
    assert got.read_bytes() == (grids / "step-00000004" / "grid.png").read_bytes()
    assert chosen.returncode == 0, chosen.stderr
    assert (tmp_path / "demo-step-00000002-grid.png").is_file()
    assert absent.returncode == 1
    assert absent.stderr.strip() == (
        "kubectl difftrain: --step 3: no samples at that step; there are samples at steps 2, 4"
    )


def test_a_merged_spec_the_models_refuse_fails_naming_the_profile(cluster):
    """The CRD checks the job's own fields; with the profile's 11 nodes, this name no
    longer fits the pods' hostnames, which only the merged spec shows."""
    name = f"{cluster.namespace}-wide"
    platform = profile(name, resources={"nodes": 11})
    cluster.plane.kubectl("apply", "-f", "-", input=yaml.safe_dump(platform))
    try:
        long = "x" * 56
        cluster.apply(job({"metadata": {"name": long}}, spec={"profile": name}))
        status = cluster.wait_phase("Failed", long)
    finally:
        cluster.plane.kubectl("delete", "dtp", name, "--wait=false")

    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert failed["message"].startswith("metadata.name: is too long")
    assert failed["message"].endswith(
        f"(the spec merged with DiffusionTrainingProfile {name}, generation 1)"
    )
    assert cluster.job(f"{long}-a1") is None


def test_kubectl_difftrain_logs_prefixes_each_nodes_lines(cluster):
    """kwok's kubelet API serves every trainer container the control plane's one log file
    (ClusterLogs), through the API server as a kubelet's would be."""
    cluster.plane.log("step 1 loss 0.5", "step 2 loss 0.4")
    cluster.apply(demo(resources={"nodes": 2}))
    cluster.running_pods(2)

    every = _plugin(cluster, "logs", "demo", "-n", cluster.namespace, "--tail", "2")
    one = _plugin(cluster, "logs", "demo", "-n", cluster.namespace, "--node", "1", "--tail", "1")
    absent = _plugin(cluster, "logs", "demo", "-n", cluster.namespace, "--node", "5")
    gone = _plugin(cluster, "logs", "demo", "-n", cluster.namespace, "--attempt", "2")
    follow = subprocess.Popen(
        _plugin_command(cluster, "logs", "demo", "-n", cluster.namespace, "-f", "--node", "0"),
        stdout=subprocess.PIPE,
        text=True,
        env=_plugin_env(cluster),
    )
    try:
        time.sleep(2)  # the stream is open
        cluster.plane.log("step 3 loss 0.3")
        lines = []
        reader = threading.Thread(target=lambda: lines.extend(follow.stdout), daemon=True)
        reader.start()
        wait_until(
            lambda: any("step 3" in line for line in lines),
            what="the followed log shows the new line",
        )
    finally:
        follow.terminate()
        follow.wait(timeout=10)

    assert every.returncode == 0, every.stderr
    assert every.stdout.splitlines() == [
        "[node 0] step 1 loss 0.5",
        "[node 0] step 2 loss 0.4",
        "[node 1] step 1 loss 0.5",
        "[node 1] step 2 loss 0.4",
    ]
    assert one.stdout.splitlines() == ["[node 1] step 2 loss 0.4"]
    assert absent.returncode == 1
    assert absent.stderr.strip() == "kubectl difftrain: --node 5: attempt 1 has nodes 0, 1"
    assert gone.returncode == 1
    assert "demo has no pods of attempt 2" in gone.stderr
    assert "[node 0] step 3 loss 0.3\n" in lines


def test_a_crash_restarts_the_whole_gang_as_attempt_2(cluster):
    cluster.apply(demo(resources={"nodes": 2}))
    pods = cluster.running_pods(2)

    cluster.annotate(
        cluster.index(pods, 1),
        {"difftrain.test/exit-code": "1", "difftrain.test/message": "Traceback"},
    )

    second = wait_until(lambda: cluster.job("demo-a2"), what="attempt 2's Job")
    env = {
        e["name"]: e.get("value")
        for e in second["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["PET_MASTER_ADDR"] == "demo-a2-0.demo"
    wait_until(
        lambda: cluster.job("demo-a1") is None and not cluster.pods(attempt=1),
        what="attempt 1's Job and pods are gone",
    )
    cluster.running_pods(2, attempt=2)
    status = cluster.wait_phase("Running")
    assert (status["attempt"], status["restarts"]) == (2, 1)
    assert cluster.printed()["RESTARTS"] == "1"
    warnings = [(e["reason"], e["message"]) for e in cluster.events() if e["type"] == "Warning"]
    assert warnings == [("Error", "restart 1 of 3 after Error: exit code 1: Traceback")]
    config = cluster.get("/api/v1/namespaces/{namespace}/configmaps", "demo-config")
    assert '"attempt": 2' in config["data"]["job.json"]


def profile(name: str, **spec) -> dict:
    return {
        "apiVersion": "difftrain.io/v1alpha1",
        "kind": "DiffusionTrainingProfile",
        "metadata": {"name": name},
        "spec": spec,
    }


def test_a_job_waits_for_its_profile_then_keeps_the_spec_it_took(cluster):
    name = f"{cluster.namespace}-platform"  # profiles are cluster-wide
    cluster.apply(demo(profile=name, resources={"requests": {"memory": "1Gi"}}))
    wait_until(lambda: cluster.status().get("reason") == "ProfileNotFound", what="ProfileNotFound")
    waiting = {c["type"]: c for c in cluster.status()["conditions"]}
    assert waiting["Created"]["status"] == "False"
    assert waiting["Reconciling"]["message"] == (
        f"DiffusionTrainingProfile {name} does not exist: create it, or fix spec.profile; "
        "the job starts once it is there"
    )
    assert cluster.events()[-1]["type"] == "Warning"
    assert cluster.job("demo-a1") is None
    said = _plugin(cluster, "status", "demo", "-n", cluster.namespace).stdout
    assert f"Profile:     {name} (not taken yet)" in said

    platform = profile(
        name,
        resources={"nodes": 2, "requests": {"cpu": "1", "memory": "2Gi"}},
        runPolicy={"maxRestarts": 1},
    )
    cluster.plane.kubectl("apply", "-f", "-", input=yaml.safe_dump(platform))
    try:
        pods = cluster.running_pods(2)
        container = pods[0]["spec"]["containers"][0]
        requests = container["resources"]["requests"]
        assert (requests["cpu"], requests["memory"]) == ("1", "1Gi")  # the job's memory wins
        kept = cluster.status()["profile"]
        assert (kept["name"], kept["generation"]) == (name, 1)
        assert kept["spec"]["runPolicy"] == {"maxRestarts": 1}
        said = _plugin(cluster, "status", "demo", "-n", cluster.namespace).stdout
        assert f"Profile:     {name} (generation 1)" in said

        # A later change to the profile changes neither this attempt nor the next one.
        platform["spec"]["resources"]["nodes"] = 3
        cluster.plane.kubectl("apply", "-f", "-", input=yaml.safe_dump(platform))
        cluster.annotate(cluster.index(pods, 0), {"difftrain.test/exit-code": "1"})
        cluster.running_pods(2, attempt=2)
        assert cluster.job("demo-a2")["spec"]["parallelism"] == 2
        assert cluster.status()["profile"]["generation"] == 1
    finally:
        cluster.plane.kubectl("delete", "dtp", name, "--wait=false")


def test_too_many_crashes_fail_the_job(cluster):
    cluster.apply(demo(runPolicy={"maxRestarts": 1}))
    for attempt in (1, 2):
        (pod,) = cluster.running_pods(1, attempt=attempt)
        cluster.annotate(pod, {"difftrain.test/exit-code": "1"})

    cluster.wait_phase("Failed")
    assert cluster.condition("Failed")["reason"] == "MaxRestartsExceeded"
    time.sleep(1.5)
    assert cluster.job("demo-a3") is None


def test_a_restarted_operator_creates_nothing_twice(cluster):
    cluster.apply(demo())
    wait_until(lambda: cluster.job("demo-a1"), what="the attempt's Job")
    cluster.operator.stop()
    cluster.operator.start()

    cluster.running_pods(1)
    cluster.wait_phase("Running")
    time.sleep(1.5)  # a resync

    created = [
        e
        for e in cluster.operator.requests()
        if (e.get("objectRef") or {}).get("namespace") == cluster.namespace
        and e["objectRef"].get("resource") == "jobs"
        and e.get("responseStatus", {}).get("code") == 201
    ]
    assert [e["objectRef"]["name"] for e in created] == ["demo-a1"]
    jobs = cluster.plane.api("GET", cluster.path(JOBS))["items"]
    assert [j["metadata"]["name"] for j in jobs] == ["demo-a1"]
    assert "difftrain_operator_reconcile_duration_seconds_count" in cluster.operator.metrics()


def test_a_disruption_replaces_the_pod_without_counting_a_failure(cluster):
    cluster.apply(demo())
    (pod,) = cluster.running_pods(1)

    cluster.annotate(pod, {"difftrain.test/disrupt": "true"})

    def replaced():
        pods = [p for p in cluster.pods(attempt=1) if p["status"].get("phase") == "Running"]
        return pods and pods[0]["metadata"]["uid"] != pod["metadata"]["uid"] and pods

    wait_until(replaced, what="the Job controller replaced the disrupted pod")
    status = cluster.wait_phase("Running")
    assert (status["attempt"], status.get("restarts", 0)) == (1, 0)
    assert cluster.job("demo-a2") is None
    assert not cluster.job("demo-a1")["status"].get("failed")


def test_a_gang_no_node_can_hold_is_unschedulable(cluster):
    cluster.apply(demo(resources={"gpusPerNode": 16}))

    condition = wait_until(lambda: cluster.condition("Unschedulable"), what="Unschedulable")

    assert "Insufficient nvidia.com/gpu" in condition["message"], condition
    assert cluster.status()["phase"] == "Pending"


def test_suspend_removes_the_pods_and_resume_brings_new_ones(cluster):
    cluster.apply(demo())
    (first,) = cluster.running_pods(1)

    cluster.patch_dtj({"runPolicy": {"suspend": True}})
    cluster.wait_phase("Suspended")
    wait_until(lambda: not cluster.pods(), what="the suspended job's pods are gone")
    assert cluster.job("demo-a1")["spec"]["suspend"] is True

    cluster.patch_dtj({"runPolicy": {"suspend": False}})
    (second,) = cluster.running_pods(1)
    cluster.wait_phase("Running")
    assert second["metadata"]["uid"] != first["metadata"]["uid"]
    assert cluster.status()["attempt"] == 1  # a suspension is not a restart


def test_a_finished_job_is_deleted_after_its_ttl_with_its_children(cluster):
    cluster.apply(demo(runPolicy={"ttlSecondsAfterFinished": 1}))
    (pod,) = cluster.running_pods(1)

    cluster.annotate(pod, {"difftrain.test/exit-code": "0"})

    wait_until(lambda: cluster.dtj() is None, 30, what="the TTL deleted the job")
    wait_until(
        lambda: (
            cluster.job("demo-a1") is None
            and cluster.get("/api/v1/namespaces/{namespace}/configmaps", "demo-config") is None
        ),
        what="the garbage collector deleted the children",
    )


def test_deleting_a_job_deletes_everything_it_owned(cluster):
    cluster.apply(demo(resources={"nodes": 2}))
    cluster.running_pods(2)

    cluster.plane.kubectl(
        "delete", "dtj", "demo", "-n", cluster.namespace, "--wait=true", "--timeout=30s"
    )

    def gone():
        return (
            cluster.job("demo-a1") is None
            and not cluster.pods()
            and cluster.get("/api/v1/namespaces/{namespace}/services", "demo") is None
            and cluster.get("/api/v1/namespaces/{namespace}/configmaps", "demo-config") is None
        )

    wait_until(gone, what="the Job, pods, Service and ConfigMap are gone")


MISSING_SECRET = {
    "dataset": {"uri": "s3://data/shapes", "resolution": 32},
    "storage": {
        "endpoint": "http://s3.example:9000",
        "secretRef": {"name": "difftrain-test-missing"},
    },
}


@pytest.mark.parametrize("policy", ["Running", "None"])
def test_a_missing_secret_is_reported_then_fails_the_job_and_frees_its_pods(cluster, policy):
    cluster.apply(demo(runPolicy={"cleanPodPolicy": policy}, **MISSING_SECRET))

    condition = wait_until(
        lambda: (
            cluster.status().get("phase") == "Pending"
            and cluster.condition("Created")
            and _waiting(cluster)
        ),
        what="the pod's waiting reason in the status",
    )
    assert condition["reason"] == "CreateContainerConfigError"
    assert condition["message"] == 'secret "difftrain-test-missing" not found'
    assert cluster.printed()["REASON"] == "CreateContainerConfigError"

    cluster.wait_phase("Failed", timeout=GRACE_SECONDS + 20)
    failed = cluster.condition("Failed")
    assert (failed["reason"], failed["message"]) == (
        "CreateContainerConfigError",
        f'secret "difftrain-test-missing" not found (for over {GRACE_SECONDS} s)',
    )
    warnings = [e["reason"] for e in cluster.events() if e["type"] == "Warning"]
    assert warnings == ["CreateContainerConfigError", "CreateContainerConfigError"]
    if policy == "Running":  # the Job stays, suspended: its pods go, it makes no more
        wait_until(lambda: not cluster.pods(), what="the failed job's pods are gone")
        assert cluster.job("demo-a1")["spec"]["suspend"] is True
    else:
        time.sleep(1.5)  # a resync or so
        assert len(cluster.pods()) == 1 and not cluster.job("demo-a1")["spec"]["suspend"]


def test_clean_pod_policy_all_removes_the_finished_pods_too(cluster):
    cluster.apply(demo(resources={"nodes": 2}, runPolicy={"cleanPodPolicy": "All"}))
    pods = cluster.running_pods(2)

    cluster.annotate(cluster.index(pods, 0), {"difftrain.test/exit-code": "3"})

    cluster.wait_phase("Failed")
    wait_until(
        lambda: cluster.job("demo-a1") is None and not cluster.pods(),
        what="the Job and all its pods are gone",
    )
    assert cluster.condition("Failed")["reason"] == "DatasetError"


def test_a_preemption_restarts_the_gang_without_using_up_max_restarts(cluster):
    """A node drain or a higher-priority job takes one pod (DisruptionTarget); its peer
    checkpoints on SIGTERM and exits 143. The job goes on, though no restarts are left."""
    cluster.apply(demo(resources={"nodes": 2}, runPolicy={"maxRestarts": 0}))
    pods = cluster.running_pods(2)
    evicted = cluster.index(pods, 0)

    cluster.annotate(evicted, {"difftrain.test/disrupt": "true"})
    wait_until(lambda: _disrupted(cluster, evicted), what="the pod has DisruptionTarget")
    cluster.annotate(cluster.index(pods, 1), {"difftrain.test/exit-code": "143"})

    wait_until(lambda: cluster.job("demo-a2"), what="attempt 2's Job")
    cluster.running_pods(2, attempt=2)
    status = cluster.wait_phase("Running")
    assert (status["attempt"], status["restarts"], status["preemptions"]) == (2, 0, 1)
    row = cluster.printed()
    assert (row["RESTARTS"], row["PREEMPTIONS"]) == ("0", "1")
    warnings = [(e["reason"], e["message"]) for e in cluster.events() if e["type"] == "Warning"]
    assert warnings == [
        (
            "Preempted",
            "restart after preemption 1 (not counted in maxRestarts): "
            f"pod {evicted['metadata']['name']} was disrupted (EvictionByEvictionAPI"
            ": Eviction API: evicting)",
        )
    ]
    labels = f'job="demo",namespace="{cluster.namespace}"'
    assert f"difftrain_operator_job_preemptions{{{labels}}} 1.0" in cluster.operator.metrics()


def _disrupted(cluster, pod: dict) -> bool:
    found = cluster.get("/api/v1/namespaces/{namespace}/pods", pod["metadata"]["name"])
    return any(
        c["type"] == "DisruptionTarget" and c["status"] == "True"
        for c in (found or {}).get("status", {}).get("conditions", [])
    )


def test_a_recreated_job_never_takes_over_its_predecessors_children(cluster):
    """Deleted with --cascade=orphan (or re-applied before the garbage collector is done),
    a finished job leaves its children; a new job of the same name deletes them, waits,
    and trains, rather than finding the old Job complete."""
    cluster.apply(demo())
    (old_pod,) = cluster.running_pods(1)
    cluster.annotate(old_pod, {"difftrain.test/exit-code": "0"})
    cluster.wait_phase("Succeeded")
    old = cluster.job("demo-a1")
    cluster.plane.kubectl(
        "delete",
        "dtj",
        "demo",
        "-n",
        cluster.namespace,
        "--cascade=orphan",
        "--wait=true",
        "--timeout=30s",
    )
    wait_until(
        lambda: not cluster.job("demo-a1")["metadata"].get("ownerReferences"),
        what="the old Job is orphaned",
    )

    created = cluster.apply(demo())

    new = wait_until(
        lambda: (
            (j := cluster.job("demo-a1")) and j["metadata"]["uid"] != old["metadata"]["uid"] and j
        ),
        what="a new attempt Job",
    )
    uid = created["metadata"]["uid"]
    config = cluster.get("/api/v1/namespaces/{namespace}/configmaps", "demo-config")
    service = cluster.get("/api/v1/namespaces/{namespace}/services", "demo")
    policy = cluster.get(NETWORK_POLICIES, "demo")
    for child in (new, config, service, policy):
        assert [r["uid"] for r in child["metadata"]["ownerReferences"]] == [uid]
    (pod,) = cluster.running_pods(1)
    assert pod["metadata"]["uid"] != old_pod["metadata"]["uid"]
    cluster.wait_phase("Running")
    reasons = [e["reason"] for e in cluster.events() if e["involvedObject"]["uid"] == uid]
    assert reasons[0] == "WaitingForPredecessor" and "Completed" not in reasons, reasons


def test_a_second_job_on_the_same_output_is_refused_naming_the_first(cluster):
    shared = "s3://outputs/shared-run"
    cluster.apply(job({"metadata": {"name": "first"}}, spec={"output": {"uri": shared}}))
    (pod,) = cluster.running_pods(1, "first")

    cluster.apply(job({"metadata": {"name": "second"}}, spec={"output": {"uri": shared + "/"}}))

    cluster.wait_phase("Failed", "second")
    failed = cluster.condition("Failed", "second")
    assert failed["reason"] == "OutputInUse"
    assert f"is in use by job {cluster.namespace}/first;" in failed["message"], failed
    assert cluster.printed("second")["REASON"] == "OutputInUse"
    assert cluster.job("second-a1") is None
    cluster.annotate(pod, {"difftrain.test/exit-code": "0"})
    cluster.wait_phase("Succeeded", "first")
    cluster.apply(job({"metadata": {"name": "third"}}, spec={"output": {"uri": shared}}))
    cluster.running_pods(1, "third")  # the output is free once the first job ended


def test_a_file_output_on_no_volume_is_refused_before_anything_is_created(cluster):
    cluster.apply(demo(output={"uri": "file:///data/out"}))

    cluster.wait_phase("Failed")
    failed = cluster.condition("Failed")
    assert failed["reason"] == "InvalidSpec"
    assert failed["message"].startswith(
        "spec.output.uri: file:///data/out is not on a volume the job mounts"
    ), failed
    assert cluster.job("demo-a1") is None
    assert cluster.get("/api/v1/namespaces/{namespace}/configmaps", "demo-config") is None


@pytest.mark.parametrize(
    ("cause", "said"),
    [
        ("missing-account", 'serviceaccount "robot" not found'),
        ("exhausted-quota", "exceeded quota: no-pods"),
    ],
)
def test_pods_the_api_server_refuses_are_reported_with_its_message(cluster, cause, said):
    if cause == "exhausted-quota":
        cluster.plane.apply(
            {
                "apiVersion": "v1",
                "kind": "ResourceQuota",
                "metadata": {"name": "no-pods", "namespace": cluster.namespace},
                "spec": {"hard": {"pods": "0"}},
            }
        )
        cluster.apply(demo())
    else:
        cluster.apply(demo(resources={"serviceAccountName": "robot"}))  # allowed, not created

    condition = wait_until(
        lambda: (c := _waiting(cluster)) and c["reason"] == "FailedCreate" and c,
        what="FailedCreate in the status",
    )

    assert said in condition["message"], condition
    assert cluster.status()["phase"] == "Pending"
    assert cluster.printed()["REASON"] == "FailedCreate"
    assert "FailedCreate" in [e["reason"] for e in cluster.events() if e["type"] == "Warning"]


def test_images_and_service_accounts_outside_the_policy_are_refused(cluster):
    """The module's operator allows registry.example/ml/* and the account robot."""
    cluster.apply(
        job(
            {"metadata": {"name": "allowed"}},
            spec={"resources": {"image": "registry.example/ml/trainer:2"}},
        )
    )
    cluster.apply(
        job({"metadata": {"name": "image"}}, spec={"resources": {"image": "evil.example/miner:1"}})
    )
    cluster.apply(
        job(
            {"metadata": {"name": "account"}},
            spec={"resources": {"serviceAccountName": "admin-robot"}},
        )
    )

    cluster.running_pods(1, "allowed")
    for name, field in (
        ("image", "spec.resources.image"),
        ("account", "spec.resources.serviceAccountName"),
    ):
        cluster.wait_phase("Failed", name)
        failed = cluster.condition("Failed", name)
        assert failed["reason"] == "NotAllowed" and failed["message"].startswith(field), failed
        assert cluster.job(f"{name}-a1") is None
    assert "(allowed: default, robot)" in cluster.condition("Failed", "account")["message"]


def test_blocking_owner_deletion_needs_the_finalizers_right(cluster):
    """The API server runs OwnerReferencesPermissionEnforcement: without update on
    diffusiontrainingjobs/finalizers, no child can be created; the job says so, and
    creates its children once the right is back."""
    path = f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{cluster.operator.cluster_role()}"
    role = cluster.plane.api("GET", path)
    kept = [r for r in role["rules"] if "diffusiontrainingjobs/finalizers" not in r["resources"]]
    assert len(kept) == len(role["rules"]) - 1
    cluster.plane.api("PUT", path, {**role, "rules": kept})
    try:
        cluster.apply(demo())
        created = wait_until(
            lambda: (c := _created(cluster)) and c["reason"] == "CreateRefused" and c,
            what="CreateRefused",
        )
        printed = cluster.printed()
    finally:
        cluster.plane.api("PUT", path, {**cluster.plane.api("GET", path), "rules": role["rules"]})

    assert created["message"].startswith("the API server refused ConfigMap demo-config: ")
    assert "cannot set blockOwnerDeletion" in created["message"], created
    assert printed["REASON"] == "CreateRefused"
    cluster.running_pods(1)
    cluster.wait_phase("Running")


def _created(cluster) -> dict:
    conditions = cluster.status().get("conditions", [])
    return next((c for c in conditions if c["type"] == "Created"), {})


def _waiting(cluster) -> dict:
    """The condition that says why the pods have not started."""
    for condition in cluster.status().get("conditions", []):
        if condition["type"] == "Running" and condition["reason"] not in ("", "PodsStarting"):
            return condition
    return {}


def _kueue_queue(cluster, gpus: int) -> None:
    """A LocalQueue "team" in the test's namespace, on a ClusterQueue with ``gpus`` GPUs."""
    quota = [
        {"name": "cpu", "nominalQuota": 1000},
        {"name": "memory", "nominalQuota": "10Ti"},
        {"name": "nvidia.com/gpu", "nominalQuota": gpus},
    ]
    cluster.plane.apply(
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "ResourceFlavor",
            "metadata": {"name": "gpu"},
        },
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "ClusterQueue",
            "metadata": {"name": f"{cluster.namespace}-queue"},
            "spec": {
                "namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": cluster.namespace}
                },
                "resourceGroups": [
                    {
                        "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                        "flavors": [{"name": "gpu", "resources": quota}],
                    }
                ],
            },
        },
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "LocalQueue",
            "metadata": {"name": "team", "namespace": cluster.namespace},
            "spec": {"clusterQueue": f"{cluster.namespace}-queue"},
        },
    )


def test_a_queue_kueue_cannot_serve_is_reported_until_it_can(cluster):
    """Queued with no Kueue installed, then for a LocalQueue that does not exist, then
    admitted once it does: each wait says why."""
    assert "kueue" not in cluster.plane.processes, "this test runs before Kueue starts"
    cluster.apply(demo(runPolicy={"queueName": "team"}))

    wait_until(lambda: cluster.status().get("reason") == "KueueNotFound", what="KueueNotFound")
    assert cluster.condition("Suspended")["message"] == (
        "queued for Kueue queue team, but Kueue is not installed (its API is not served): "
        "install Kueue, or remove spec.runPolicy.queueName"
    )
    assert cluster.printed()["REASON"] == "KueueNotFound"
    cluster.plane.start_kueue()
    wait_until(
        lambda: cluster.status().get("reason") == "LocalQueueNotFound", what="LocalQueueNotFound"
    )
    assert cluster.condition("Suspended")["message"] == (
        f"LocalQueue team does not exist in namespace {cluster.namespace}: create it, or fix "
        "spec.runPolicy.queueName"
    )
    _kueue_queue(cluster, gpus=2)
    cluster.running_pods(1)
    cluster.wait_phase("Running")
    warnings = [e["reason"] for e in cluster.events() if e["type"] == "Warning"]
    assert warnings == ["KueueNotFound", "LocalQueueNotFound"]


def test_kueue_admits_the_second_job_only_when_the_first_is_done(cluster):
    cluster.plane.start_kueue()
    _kueue_queue(cluster, gpus=2)
    queued = {"runPolicy": {"queueName": "team"}, "resources": {"nodes": 2}}
    cluster.apply(job({"metadata": {"name": "first"}}, spec=queued))
    cluster.running_pods(2, "first")
    cluster.apply(job({"metadata": {"name": "second"}}, spec=queued))

    waiting = wait_until(
        lambda: (
            (c := cluster.condition("Suspended", "second")) and "insufficient" in c["message"] and c
        ),
        what="second waits, with Kueue's reason",
    )
    assert waiting["reason"] == "WaitingForAdmission"
    assert waiting["message"].startswith("queued in Kueue queue team: couldn't assign flavors")
    time.sleep(1.5)
    assert cluster.job("second-a1")["spec"]["suspend"] is True and not cluster.pods("second")
    for pod in cluster.pods("first"):
        cluster.annotate(pod, {"difftrain.test/exit-code": "0"})

    cluster.wait_phase("Succeeded", "first")
    cluster.running_pods(2, "second")
    cluster.wait_phase("Running", "second")
    workloads = cluster.plane.api(
        "GET", f"/apis/kueue.x-k8s.io/v1beta2/namespaces/{cluster.namespace}/workloads"
    )["items"]
    admitted = [
        w
        for w in workloads
        if any(
            c["type"] == "Admitted" and c["status"] == "True"
            for c in w["status"].get("conditions", [])
        )
    ]
    assert len(admitted) == 2, dump([w["status"] for w in workloads])


def test_a_burst_of_jobs_all_get_their_children(cluster):
    names = [f"burst-{index}" for index in range(30)]

    text = yaml.safe_dump_all(
        [
            job({"metadata": {"name": n}}, spec={"output": {"uri": f"s3://outputs/{n}"}})
            for n in names
        ]
    )
    cluster.plane.kubectl("apply", "-n", cluster.namespace, "-f", "-", input=text)

    wait_until(
        lambda: all(cluster.job(f"{n}-a1") for n in names),
        60,
        every=1,
        what="every job has its Job",
    )
    wait_until(
        lambda: all(cluster.status(n).get("phase") in ("Pending", "Running") for n in names),
        60,
        every=1,
        what="every job has a status",
    )


def test_the_operator_streams_only_its_own_pods_and_jobs(cluster):
    """The API server filters the pods and Jobs the operator lists and watches: a cluster's
    other pods never reach it (Kopf's own label filters work on what it was sent)."""
    cluster.apply(demo())
    cluster.running_pods(1)

    reads = [
        e["requestURI"]
        for e in cluster.operator.requests()
        if e["verb"] in ("list", "watch")
        and (e.get("objectRef") or {}).get("resource") in ("pods", "jobs")
    ]

    def selector(uri: str) -> str:
        return urllib.parse.parse_qs(urllib.parse.urlsplit(uri).query).get("labelSelector", [""])[0]

    assert reads
    assert [uri for uri in reads if not selector(uri).startswith("difftrain.io/job-name")] == []


def test_the_operator_uses_exactly_the_rights_the_chart_grants(cluster):
    """Runs after the others: the audit log then holds the operator's whole range of work
    (the tour adds a finished, a crashed and a suspended job of its own)."""
    tour(cluster)

    requests = cluster.operator.requests()
    granted = cluster.operator.granted()

    assert refused(requests) == [], "requests the chart's RBAC refused"
    assert set(granted) == {""}, granted
    assert unused_rights(used_rights(requests), granted) == set(), "rights never used"
