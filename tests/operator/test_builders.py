"""The operator's desired children: golden files, Kubernetes schema, and the contract."""

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from difftrain.api.validation import load_job
from difftrain.cli import main
from difftrain.operator.builders import Defaults, children, owned, shared_memory
from difftrain.operator.main import defaults_from_env
from difftrain.yamltext import dump_all
from tests.builders import job, merge

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
IDENTITY = {"metadata": {"namespace": "ml", "uid": "6f1c2d3e-0000-4000-8000-000000000001"}}


def _example(name: str, patch: dict | None = None) -> dict:
    return merge(yaml.safe_load((EXAMPLES / name).read_text()), merge(IDENTITY, patch or {}))


CASES = {
    "cpu-one-node": job(IDENTITY, spec={"resources": {"gpusPerNode": 0}}),
    "two-nodes-eight-gpus": _example("multinode.yaml"),
    "kueue": _example("kueue.yaml"),
    "suspended": job(IDENTITY, spec={"runPolicy": {"suspend": True}}),
    "volumes": job(
        IDENTITY,
        spec={
            "model": {"base": "file:///models/sd15"},
            "output": {"uri": "file:///mnt/runs/demo"},
            "resources": {
                "volumes": [
                    {
                        "name": "models",
                        "claimName": "team-models",
                        "mountPath": "/models",
                        "readOnly": True,
                    },
                    {"name": "runs", "claimName": "team-runs", "mountPath": "/mnt/runs"},
                ]
            },
        },
    ),
    "secrets-and-endpoint": _example(
        "sd15-lora-s3.yaml",
        {
            "spec": {
                "storage": {"secretRef": {"sessionTokenKey": "AWS_SESSION_TOKEN"}},
                "runPolicy": {"activeDeadlineSeconds": 86400},
            }
        },
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_children_match_golden_files(case, golden):
    rendered = dump_all(children(load_job(CASES[case]), attempt=2, defaults=Defaults()))

    golden(f"builders/{case}.yaml", rendered)


WITH_POLICY = Defaults(network_policy=True, metrics_namespaces=("ops", "monitoring"))


@pytest.mark.parametrize("defaults", [Defaults(), WITH_POLICY], ids=["plain", "network-policy"])
@pytest.mark.parametrize("case", CASES)
def test_children_pass_kubernetes_schema_strictly(case, defaults):
    for manifest in children(load_job(CASES[case]), attempt=1, defaults=defaults):
        kubernetes_validate.validate(manifest, "1.33.0", strict=True)


def _selects(selector: dict, labels: dict) -> bool:
    """Whether a matchLabels-only LabelSelector selects an object with ``labels``."""
    assert set(selector) == {"matchLabels"}, selector
    return all(labels.get(key) == value for key, value in selector["matchLabels"].items())


def test_the_network_policy_lets_in_only_the_jobs_pods_and_the_metrics_scrapers():
    mine = children(load_job(job(IDENTITY, spec={"resources": {"nodes": 2}})), 1, WITH_POLICY)
    other = children(load_job(job({"metadata": {"name": "other", "uid": "u-2"}})), 1, WITH_POLICY)
    policy = next(m for m in mine if m["kind"] == "NetworkPolicy")
    labels = mine[-1]["spec"]["template"]["metadata"]["labels"]
    theirs = other[-1]["spec"]["template"]["metadata"]["labels"]

    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    assert _selects(spec["podSelector"], labels) and not _selects(spec["podSelector"], theirs)
    peers, scrapers = spec["ingress"]
    (peer,) = peers["from"]
    assert "ports" not in peers  # the collectives use ports of their own
    assert _selects(peer["podSelector"], labels) and not _selects(peer["podSelector"], theirs)
    assert [s["namespaceSelector"]["matchLabels"] for s in scrapers["from"]] == [
        {"kubernetes.io/metadata.name": "ops"},
        {"kubernetes.io/metadata.name": "monitoring"},
    ]
    assert scrapers["ports"] == [{"protocol": "TCP", "port": 9400}]
    assert [m["kind"] for m in children(load_job(job(IDENTITY)), 1, Defaults())] == [
        "ConfigMap",
        "Service",
        "Job",
    ]  # off unless the operator is told (the chart turns it on)


def _trainer_job(manifest: dict, attempt: int = 1) -> dict:
    return children(load_job(manifest), attempt, Defaults())[-1]


def _env(job_manifest: dict) -> dict:
    container = job_manifest["spec"]["template"]["spec"]["containers"][0]
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}


def test_torchrun_contract():
    trainer = _trainer_job(CASES["two-nodes-eight-gpus"], attempt=3)
    env = _env(trainer)
    pod = trainer["spec"]["template"]["spec"]

    assert trainer["metadata"]["name"] == "sdxl-finetune-16gpu-a3"
    assert (trainer["spec"]["completions"], trainer["spec"]["parallelism"]) == (2, 2)
    assert trainer["spec"]["completionMode"] == "Indexed"
    assert pod["containers"][0]["command"] == ["python", "-m", "difftrain.launch"]
    assert {k: env[k] for k in env if k.startswith("PET_")} == {
        "PET_NNODES": "2",
        "PET_NPROC_PER_NODE": "8",
        "PET_NODE_RANK": {
            "fieldRef": {
                "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
            }
        },
        "PET_MASTER_ADDR": "sdxl-finetune-16gpu-a3-0.sdxl-finetune-16gpu",
        "PET_MASTER_PORT": "29500",
    }
    assert pod["subdomain"] == "sdxl-finetune-16gpu"
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8


def test_permanent_exit_codes_fail_fast_and_disruptions_are_ignored():
    rules = _trainer_job(job(IDENTITY))["spec"]["podFailurePolicy"]["rules"]

    assert rules == [
        {
            "action": "FailJob",
            "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2, 3, 4]},
        },
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]


def test_credentials_only_by_reference():
    manifests = children(load_job(CASES["secrets-and-endpoint"]), 1, Defaults())
    env = _env(manifests[2])

    assert env["AWS_SECRET_ACCESS_KEY"] == {
        "secretKeyRef": {
            "name": "s3-credentials",
            "key": "AWS_SECRET_ACCESS_KEY",
            "optional": False,
        }
    }
    assert env["AWS_ENDPOINT_URL"] == "http://minio.storage.svc:9000"
    assert "secretKeyRef" not in manifests[0]["data"]["job.json"]


def test_a_hugging_face_token_comes_from_its_secret():
    spec = {
        "model": {"base": "hf://org/gated"},
        "storage": {"huggingFaceTokenSecretRef": {"name": "hub"}},
    }
    env = _env(children(load_job(job(IDENTITY, spec=spec)), 1, Defaults())[-1])

    assert env["HF_TOKEN"] == {
        "secretKeyRef": {"name": "hub", "key": "HF_TOKEN", "optional": False}
    }


def test_registry_credentials_come_from_their_secret_each_key_optional():
    registry = {"mlflow": {"trackingUri": "https://mlflow.example.com", "modelName": "m"}}
    spec = {"output": {"uri": "s3://bucket/o", "registry": registry}}
    plain = _env(children(load_job(job(IDENTITY, spec=spec)), 1, Defaults())[-1])
    registry["mlflow"]["secretRef"] = "mlflow-login"
    env = _env(children(load_job(job(IDENTITY, spec=spec)), 1, Defaults())[-1])

    assert not {"MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME"} & plain.keys()
    for variable in (
        "MLFLOW_TRACKING_TOKEN",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
    ):
        assert env[variable] == {
            "secretKeyRef": {"name": "mlflow-login", "key": variable, "optional": True}
        }


def test_prompts_never_reach_a_shell():
    hostile = "$(touch /tmp/pwned); `id` && echo"
    manifest = job(IDENTITY, spec={"validation": {"prompts": [hostile]}})

    trainer = _trainer_job(manifest)
    config = children(load_job(manifest), 1, Defaults())[0]

    assert hostile not in yaml.safe_dump(trainer)
    assert hostile in config["data"]["job.json"]


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        ({}, "8Gi"),
        ({"limits": {"memory": "64Gi"}}, "32Gi"),
        ({"limits": {"memory": "3G"}}, "1430Mi"),
        ({"sharedMemory": "2Gi"}, "2Gi"),
    ],
)
def test_shared_memory_size(resources, expected):
    assert shared_memory(load_job(job(spec={"resources": resources}))) == expected


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param({}, "2Gi", id="lora-on-a-preset"),
        pytest.param(
            {"method": "finetune", "model": {"base": "s3://bucket/sd15", "architecture": "sd"}},
            "13Gi",
            id="finetune-sd",
        ),
        pytest.param(
            {"method": "finetune", "model": {"base": "s3://bucket/m"}},
            "36Gi",
            id="finetune-auto-taken-as-sdxl",
        ),
        pytest.param(
            {
                "method": "finetune",
                "model": {"base": "s3://bucket/m"},
                "training": {"ema": {"enabled": True}},
                "output": {"uri": "s3://bucket/o", "formats": ["diffusers", "singleFile"]},
            },
            "48Gi",
            id="finetune-sdxl-ema-two-formats",
        ),
        pytest.param({"resources": {"scratchSize": "100Gi"}}, "100Gi", id="given"),
    ],
)
def test_scratch_disk_size(spec, expected):
    pod = _trainer_job(job(spec=spec))["spec"]["template"]["spec"]

    assert {"name": "scratch", "emptyDir": {"sizeLimit": expected}} in pod["volumes"]


def test_grace_period_reaches_the_pod_and_the_launcher():
    pod = _trainer_job(job(spec={"runPolicy": {"terminationGracePeriodSeconds": 900}}))["spec"][
        "template"
    ]["spec"]

    assert pod["terminationGracePeriodSeconds"] == 900
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["DIFFTRAIN_GRACE_SECONDS"] == "900"


def test_operator_defaults_fill_in_what_the_spec_leaves_out():
    defaults = Defaults(
        image="registry/trainer:1",
        image_pull_policy="Always",
        requests={"cpu": "4", "memory": "32Gi"},
        limits={"memory": "64Gi"},
        node_selector={"pool": "gpu", "zone": "a"},
    )
    manifest = job(spec={"resources": {"requests": {"cpu": "8"}, "nodeSelector": {"zone": "b"}}})

    pod = children(load_job(manifest), 1, defaults)[2]["spec"]["template"]["spec"]

    container = pod["containers"][0]
    assert (container["image"], container["imagePullPolicy"]) == ("registry/trainer:1", "Always")
    assert container["resources"] == {
        "requests": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": 1},  # the spec's cpu
        "limits": {"memory": "64Gi", "nvidia.com/gpu": 1},
    }
    assert pod["nodeSelector"] == {"pool": "gpu", "zone": "b"}
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["sizeLimit"] == "32Gi"  # half the default memory limit


def test_operator_defaults_come_from_its_environment():
    environ = {
        "DIFFTRAIN_TRAINER_IMAGE": "registry/trainer:2",
        "DIFFTRAIN_TRAINER_LIMITS": '{"memory": "64Gi"}',
        "DIFFTRAIN_TRAINER_NODE_SELECTOR": "",  # empty: not set
        "DIFFTRAIN_TRAINER_CACHE_URI": "s3://team/cache",
    }

    defaults = defaults_from_env(environ)
    policy = defaults_from_env(
        {"DIFFTRAIN_NETWORK_POLICY": "true", "DIFFTRAIN_METRICS_NAMESPACES": "ops, monitoring"}
    )

    assert defaults == Defaults(
        image="registry/trainer:2", limits={"memory": "64Gi"}, cache_uri="s3://team/cache"
    )
    assert policy == Defaults(network_policy=True, metrics_namespaces=("ops", "monitoring"))


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("DIFFTRAIN_TRAINER_LIMITS", "{memory: 64Gi}", "DIFFTRAIN_TRAINER_LIMITS: not JSON"),
        (
            "DIFFTRAIN_TRAINER_LIMITS",
            '{"memory": 64}',
            "DIFFTRAIN_TRAINER_LIMITS: must be a JSON object of strings",
        ),
        (
            "DIFFTRAIN_TRAINER_LIMITS",
            '["64Gi"]',
            "DIFFTRAIN_TRAINER_LIMITS: must be a JSON object of strings",
        ),
        (
            "DIFFTRAIN_NETWORK_POLICY",
            "yes",
            "DIFFTRAIN_NETWORK_POLICY: must be true or false, got 'yes'",
        ),
        (
            "DIFFTRAIN_TRAINER_CACHE_URI",
            "gs://team/cache",
            "DIFFTRAIN_TRAINER_CACHE_URI: scheme 'gs' is not supported here; use one of "
            "s3://, file://",
        ),
    ],
)
def test_a_malformed_default_stops_the_operator_naming_its_variable(
    monkeypatch, capsys, variable, value, message
):
    monkeypatch.setenv(variable, value)

    assert main(["operator"]) == 2
    assert message in capsys.readouterr().err


def test_the_operators_cache_uri_reaches_jobs_that_name_none():
    defaults = Defaults(cache_uri="s3://team/cache")
    own = {"cache": {"uri": "s3://mine/cache"}}

    plain = _env(children(load_job(job(IDENTITY)), 1, defaults)[-1])
    naming = _env(children(load_job(job(IDENTITY, spec=own)), 1, defaults)[-1])
    unset = _env(children(load_job(job(IDENTITY)), 1, Defaults())[-1])

    assert plain["DIFFTRAIN_SHARED_CACHE_URI"] == "s3://team/cache"
    assert "DIFFTRAIN_SHARED_CACHE_URI" not in naming  # the trainer reads spec.cache.uri
    assert "DIFFTRAIN_SHARED_CACHE_URI" not in unset  # each node's own disk


def test_first_attempt_of_a_queued_job_waits_for_kueue():
    trainer = _trainer_job(CASES["kueue"])

    assert trainer["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-gpus"
    assert trainer["spec"]["suspend"] is True


def test_the_applied_children_are_owned_by_the_job_and_the_built_ones_not():
    dtj = load_job(CASES["cpu-one-node"])
    built = children(dtj, 1, Defaults(network_policy=True))

    applied = [owned(manifest, dtj) for manifest in built]

    assert all("ownerReferences" not in m["metadata"] for m in built)
    for manifest in applied:
        (reference,) = manifest["metadata"]["ownerReferences"]
        assert reference == {
            "apiVersion": "difftrain.io/v1alpha1",
            "kind": "DiffusionTrainingJob",
            "name": "demo",
            "uid": IDENTITY["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
    assert [m["metadata"]["labels"] for m in applied] == [m["metadata"]["labels"] for m in built]


def test_dry_run_leaves_out_owner_references(capsys):
    assert main(["render", str(EXAMPLES / "quickstart.yaml"), "--attempt", "2"]) == 0

    documents = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in documents] == ["ConfigMap", "Service", "Job"]
    assert documents[2]["metadata"]["name"] == "quickstart-a2"
    assert all("ownerReferences" not in d["metadata"] for d in documents)


def test_render_refuses_an_invalid_manifest(write_manifest, capsys):
    path = write_manifest(job(spec={"resources": {"nodes": 0}}))

    assert main(["render", str(path)]) == 2
    assert capsys.readouterr().err.endswith("spec.resources.nodes: must be >= 1 (got 0)\n")


def test_volumes_are_claims_mounted_where_the_spec_says():
    trainer = _trainer_job(CASES["volumes"])
    pod = trainer["spec"]["template"]["spec"]
    (container,) = pod["containers"]

    claims = {
        v["name"]: v["persistentVolumeClaim"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    mounts = {
        m["name"]: (m["mountPath"], m["readOnly"])
        for m in container["volumeMounts"]
        if m["name"].startswith("claim-")
    }
    assert claims == {
        "claim-models": {"claimName": "team-models", "readOnly": True},
        "claim-runs": {"claimName": "team-runs", "readOnly": False},
    }
    assert mounts == {"claim-models": ("/models", True), "claim-runs": ("/mnt/runs", False)}
