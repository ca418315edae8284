"""The Helm chart, rendered by a real helm binary (installed into the venv by `make`):
lint, strict Kubernetes schemas, a golden default render, its values schema, and its
agreement with the CRD, the operator's command line and its environment. Its monitoring
objects are checked against the Prometheus Operator's schemas (an npm package that
`make test` installs) and against the pods and Service they select."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from difftrain.api.crd import profile_openapi_schema
from difftrain.api.validation import load_job, validate_profile
from difftrain.cli import build_parser
from difftrain.dashboard import DASHBOARD_PATH, dashboard
from difftrain.dashboard import render as render_dashboard
from difftrain.operator.builders import Defaults, children
from difftrain.operator.main import defaults_from_env
from tests.builders import job
from tests.operator.test_pod_security import violations

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "difftrain"
KUBERNETES = "1.33.0"

# Every value changed from its default, and the watch limited to two namespaces.
CUSTOM = {
    "operator": {
        "image": {
            "repository": "registry.example/difftrain-operator",
            "tag": "1.2.3",
            "pullPolicy": "Always",
        },
        "resyncSeconds": 60,
        "failureGraceSeconds": 600,
        "metricsPort": 9090,
        "healthPort": 9091,
        "nodeSelector": {"pool": "system"},
        "tolerations": [{"key": "system", "operator": "Exists", "effect": "NoSchedule"}],
        "podAnnotations": {"example.com/team": "ml-platform"},
        "podLabels": {"team": "ml"},
        "priorityClassName": "system-cluster-critical",
    },
    "watchNamespaces": ["team-a", "team-b"],
    "trainer": {
        "image": {
            "repository": "registry.example/difftrain-trainer",
            "tag": "1.2.3-cu128",
            "pullPolicy": "Always",
        },
        "resources": {"requests": {"cpu": 8, "memory": "64Gi"}, "limits": {"memory": "96Gi"}},
        "nodeSelector": {"node.kubernetes.io/instance-type": "p5.48xlarge"},
    },
    "networkPolicy": {"enabled": True, "monitoringNamespace": "observability"},
    "imagePullSecrets": [{"name": "registry"}],
    "serviceAccount": {"create": False, "name": "difftrain-operator"},
    "metrics": {"service": {"enabled": False}},
}

# Every monitoring object on, with extra labels.
MONITORING = {
    "monitoring": {
        "labels": {"release": "kube-prometheus-stack"},
        "podMonitor": {"enabled": True, "interval": "15s"},
        "serviceMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "dashboard": {
            "enabled": True,
            "namespace": "grafana",
            "annotations": {"grafana_folder": "Training"},
        },
    }
}
PROMETHEUS_OPERATOR = "monitoring.coreos.com/v1"


def helm() -> str:
    found = shutil.which("helm") or str(Path(sys.executable).parent / "helm")
    assert Path(found).exists(), "no helm binary: `make test` installs one into the venv"
    return found


def render(tmp_path: Path, values: dict | None = None) -> list[dict]:
    command = [helm(), "template", "ops", str(CHART), "--namespace", "difftrain-system"]
    if values is not None:
        (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
        command += ["--values", str(tmp_path / "values.yaml")]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def _refused(tmp_path: Path, values: dict) -> str:
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    done = subprocess.run(
        [helm(), "template", "ops", str(CHART), "--values", str(tmp_path / "values.yaml")],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    return done.stderr


def _of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def test_helm_lint_is_clean():
    done = subprocess.run([helm(), "lint", "--strict", str(CHART)], capture_output=True, text=True)

    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("values", [None, CUSTOM], ids=["default", "custom"])
def test_every_rendered_object_passes_the_kubernetes_schema_strictly(tmp_path, values):
    objects = render(tmp_path, values)

    assert {o["kind"] for o in objects} >= {"Deployment"}
    for manifest in objects:
        kubernetes_validate.validate(manifest, KUBERNETES, strict=True)


def test_default_render_matches_its_golden_file(tmp_path, golden):
    done = subprocess.run(
        [helm(), "template", "ops", str(CHART), "--namespace", "difftrain-system"],
        capture_output=True,
        text=True,
        check=True,
    )

    golden("chart/default.yaml", done.stdout)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"operatr": {}}, "additional properties 'operatr' not allowed"),
        ({"operator": {"resyncSeconds": "fast"}}, "resyncSeconds"),
        ({"trainer": {"image": {"pullPolicy": "Sometimes"}}}, "pullPolicy"),
        ({"watchNamespaces": ["Team_A"]}, "watchNamespaces"),
        ({"monitoring": {"podMonitor": {"interval": "often"}}}, "interval"),
        (
            {"monitoring": {"prometheusRule": {"checkpointStale": {"afterSeconds": 0}}}},
            "afterSeconds",
        ),
        ({"profiles": {"GPU_pool": {}}}, "GPU_pool"),
        ({"profiles": {"a100": {"training": {}}}}, "additional properties 'training' not allowed"),
        (
            {
                "monitoring": {"serviceMonitor": {"enabled": True}},
                "metrics": {"service": {"enabled": False}},
            },
            "monitoring.serviceMonitor.enabled needs metrics.service.enabled",
        ),
    ],
)
def test_values_schema_refuses_unknown_keys_and_wrong_types(tmp_path, values, message):
    assert message in _refused(tmp_path, values)


def test_the_charts_crds_are_the_generated_ones():
    generated = sorted((ROOT / "crds").glob("*.yaml"))

    assert [p.name for p in generated] == sorted(p.name for p in (CHART / "crds").glob("*"))
    for path in generated:
        assert (CHART / "crds" / path.name).read_text() == path.read_text()


PROFILES = {
    "profiles": {
        "a100": {
            "resources": {
                "image": "registry.example/ml/difftrain:1.0",
                "nodes": 2,
                "gpusPerNode": 8,
                "nodeSelector": {"pool": "a100"},
                "tolerations": [{"key": "gpu", "operator": "Exists"}],
            },
            "storage": {"endpoint": "https://minio.example", "secretRef": {"name": "s3"}},
            "runPolicy": {"queueName": "training"},
        },
        "cpu.small": {"resources": {"gpusPerNode": 0}},
    }
}


def test_profiles_from_values_are_valid_profiles(tmp_path):
    objects = _of_kind(render(tmp_path, PROFILES), "DiffusionTrainingProfile")
    schema = profile_openapi_schema()

    assert [o["metadata"]["name"] for o in objects] == ["a100", "cpu.small"]
    for manifest in objects:
        jsonschema.Draft4Validator(schema).validate(manifest)
        found, problems = validate_profile(manifest)
        assert problems == []
        assert manifest["spec"] == PROFILES["profiles"][found.metadata.name]
    assert _of_kind(render(tmp_path), "DiffusionTrainingProfile") == []


def test_cluster_wide_by_default_namespaced_when_asked(tmp_path):
    default, custom = render(tmp_path), render(tmp_path, CUSTOM)

    assert [o["kind"] for o in default if "Role" in o["kind"]] == [
        "ClusterRole",
        "ClusterRoleBinding",
    ]
    # Namespaced: only the rights to watch Namespace objects and CRDs, and to read the
    # (cluster-scoped) profiles, are cluster-wide.
    profiles = {
        "apiGroups": ["difftrain.io"],
        "resources": ["diffusiontrainingprofiles"],
        "verbs": ["get"],
    }
    crds = {
        "apiGroups": ["apiextensions.k8s.io"],
        "resources": ["customresourcedefinitions"],
        "verbs": ["list", "watch"],
    }
    (cluster_role,) = _of_kind(custom, "ClusterRole")
    namespaces = {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]}
    assert cluster_role["rules"] == [namespaces, profiles, crds]
    roles = _of_kind(custom, "Role")
    assert [r["metadata"]["namespace"] for r in roles] == ["team-a", "team-b"]
    assert [*roles[0]["rules"], profiles, crds] == _of_kind(default, "ClusterRole")[0]["rules"]
    bindings = _of_kind(custom, "RoleBinding")
    assert {s["name"] for b in bindings for s in b["subjects"]} == {"difftrain-operator"}
    assert not _of_kind(custom, "ServiceAccount") and not _of_kind(custom, "Service")


@pytest.mark.parametrize("values", [None, CUSTOM], ids=["default", "custom"])
def test_the_operator_pod_is_restricted_and_runs_one_at_a_time(tmp_path, values):
    (deployment,) = _of_kind(render(tmp_path, values), "Deployment")
    template = deployment["spec"]["template"]

    assert violations(template["spec"], template["metadata"].get("annotations")) == []
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    probes = template["spec"]["containers"][0]
    assert probes["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert probes["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_the_operator_accepts_what_the_chart_gives_it(tmp_path):
    (deployment,) = _of_kind(render(tmp_path, CUSTOM), "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    environ = {item["name"]: item["value"] for item in container["env"]}

    args = build_parser().parse_args(["operator", *container["args"]])
    defaults = defaults_from_env(environ)

    assert (args.namespace, args.resync_seconds) == (["team-a", "team-b"], 60.0)
    assert (args.metrics_port, args.health_port) == (9090, 9091)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 9090, "health": 9091}
    assert container["image"] == "registry.example/difftrain-operator:1.2.3"
    assert defaults == Defaults(
        image="registry.example/difftrain-trainer:1.2.3-cu128",
        image_pull_policy="Always",
        requests={"cpu": "8", "memory": "64Gi"},  # numbers in values become quantities
        limits={"memory": "96Gi"},
        node_selector={"node.kubernetes.io/instance-type": "p5.48xlarge"},
        network_policy=True,
        metrics_namespaces=("difftrain-system", "observability"),
    )
    assert json.loads(environ["DIFFTRAIN_TRAINER_REQUESTS"]) == {"cpu": "8", "memory": "64Gi"}
    assert args.failure_grace_seconds == 600


def test_without_network_policies_the_operator_neither_makes_nor_may_make_them(tmp_path):
    objects = render(tmp_path, {"networkPolicy": {"enabled": False}})
    (deployment,) = _of_kind(objects, "Deployment")
    environ = {
        e["name"]: e["value"]
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    (role,) = _of_kind(objects, "ClusterRole")

    assert defaults_from_env(environ).network_policy is False
    assert [r for r in role["rules"] if "networkpolicies" in r["resources"]] == []


def test_default_images_follow_the_charts_app_version(tmp_path):
    (deployment,) = _of_kind(render(tmp_path), "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]

    assert container["image"] == f"difftrain-operator:{version}"
    assert {"name": "DIFFTRAIN_TRAINER_IMAGE", "value": f"difftrain-trainer:{version}"} in (
        container["env"]
    )


def _schema_errors(objects: list[dict]) -> list[str | None]:
    """Each object's errors under the Prometheus Operator's schemas (None when valid)."""
    modules = Path(sys.executable).parents[1] / "node_modules"
    assert (modules / ".installed").exists(), "no schemas: `make test` installs them"
    done = subprocess.run(
        ["node", str(ROOT / "tests" / "monitoring_schemas.mjs"), str(modules)],
        input=json.dumps(objects),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_monitoring_is_off_by_default(tmp_path):
    kinds = {o["kind"] for o in render(tmp_path)}

    assert not kinds & {"PodMonitor", "ServiceMonitor", "PrometheusRule", "ConfigMap"}


def test_monitoring_objects_pass_their_schemas(tmp_path):
    objects = render(tmp_path, MONITORING)
    monitoring = [o for o in objects if o["apiVersion"] == PROMETHEUS_OPERATOR]
    broken = json.loads(json.dumps(_of_kind(monitoring, "PodMonitor")[0]))
    broken["spec"]["podMetricsEndpoints"][0]["port"] = 9400  # a port *name* is a string

    assert sorted(o["kind"] for o in monitoring) == [
        "PodMonitor",
        "PrometheusRule",
        "ServiceMonitor",
    ]
    assert _schema_errors([*monitoring, broken]) == [
        None,
        None,
        None,
        ("data/spec/podMetricsEndpoints/0/port must be string"),
    ]
    for manifest in objects:
        if manifest not in monitoring:
            kubernetes_validate.validate(manifest, KUBERNETES, strict=True)
    for manifest in [*monitoring, *_of_kind(objects, "ConfigMap")]:
        assert manifest["metadata"]["labels"]["release"] == "kube-prometheus-stack"


@pytest.mark.parametrize("watch", [[], ["team-a", "team-b"]], ids=["everywhere", "namespaces"])
def test_the_monitors_find_the_trainer_pods_and_the_operator(tmp_path, watch):
    objects = render(tmp_path, {**MONITORING, "watchNamespaces": watch})
    (pod_monitor,) = _of_kind(objects, "PodMonitor")
    (service_monitor,) = _of_kind(objects, "ServiceMonitor")
    (service,) = _of_kind(objects, "Service")
    trainer = children(load_job(job()), 1, Defaults())[2]["spec"]["template"]
    trainer_ports = {p["name"] for c in trainer["spec"]["containers"] for p in c["ports"]}

    selector = pod_monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= trainer["metadata"]["labels"].items()
    (endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["interval"], endpoint["honorLabels"]) == (
        "metrics",
        "15s",
        True,
    )
    assert endpoint["port"] in trainer_ports
    expected = {"matchNames": watch} if watch else {"any": True}
    assert pod_monitor["spec"]["namespaceSelector"] == expected

    selector = service_monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    (endpoint,) = service_monitor["spec"]["endpoints"]
    assert endpoint["honorLabels"] is True
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert service_monitor["spec"]["namespaceSelector"] == {"matchNames": ["difftrain-system"]}


def test_the_dashboard_configmap_carries_the_generated_dashboard(tmp_path):
    (configmap,) = _of_kind(render(tmp_path, MONITORING), "ConfigMap")

    assert configmap["metadata"]["namespace"] == "grafana"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "Training"}
    assert json.loads(configmap["data"]["difftrain.json"]) == dashboard()
    assert (ROOT / DASHBOARD_PATH).read_text() == render_dashboard(), "run `make generate`"
