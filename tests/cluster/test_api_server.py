"""The CRD on a real API server: it installs as a platform team installs it, every example
applies, each bad manifest is refused there naming its field, and the spec's immutable
parts stay so. Everything goes through the real kubectl."""

import json
import re
import time

import pytest
import yaml

from tests import examples
from tests.api.test_validate_cli import BAD_MANIFESTS
from tests.builders import job, merge
from tests.cluster.control_plane import CRDS

EXAMPLES = examples.JOBS  # the Katib Experiment: tests/cluster/test_katib.py


def _eventually(check, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not (found := check()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


def test_the_crd_installs_server_side_and_explains_itself(control_plane):
    crd = json.loads(
        control_plane.kubectl(
            "get", "crd", "diffusiontrainingjobs.difftrain.io", "-o", "json"
        ).stdout
    )
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions["Established"] == "True" and conditions["NamesAccepted"] == "True"

    # Applying again changes nothing (GitOps re-applies it on every sync).
    again = control_plane.kubectl("apply", "--server-side", "-f", str(CRDS))
    assert "serverside-applied" in again.stdout

    # The API server publishes a new CRD's OpenAPI schema a moment after it is Established.
    explained = _eventually(
        lambda: (
            control_plane.kubectl(
                "explain", "diffusiontrainingjob.spec.training", check=False
            ).stdout
        )
    )
    assert "steps" in explained and "batchSize" in explained and "learningRate" in explained


@pytest.mark.parametrize("example", EXAMPLES, ids=[path.stem for path in EXAMPLES])
def test_every_example_applies_on_the_api_server(control_plane, example):
    for document in yaml.safe_load_all(example.read_text()):
        if document and document.get("metadata", {}).get("namespace"):
            control_plane.kubectl(
                "create", "namespace", document["metadata"]["namespace"], check=False
            )

    result = control_plane.kubectl("apply", "--dry-run=server", "-f", str(example), check=False)

    assert result.returncode == 0, result.stderr


# Refused by kubectl before the API server sees them: no such resource, or no object.
REFUSED_BY_KUBECTL = {
    "other-kind": 'no matches for kind "Deployment" in version "difftrain.io/v1alpha1"',
    "other-api-version": 'no matches for kind "DiffusionTrainingJob" in version "difftrain.io/v1"',
    "scalar-document": "invalid object to validate",
}


def _server_problems(stderr: str) -> list[tuple[str, str]]:
    """(field, what the API server says of it) for each problem in kubectl's report."""
    if "strict decoding error: " in stderr:  # unknown fields
        return [
            (field, "unknown field") for field in re.findall(r'unknown field "([^"]+)"', stderr)
        ]
    _, _, listed = stderr.partition(" is invalid: ")
    lines = [line.removeprefix("* ") for line in listed.strip().splitlines() if line.strip()]
    return [
        tuple(line.split(": ", 1))
        for line in lines
        if not line.startswith("<nil>: Invalid value: null")
    ]


@pytest.mark.parametrize(
    ("name", "manifest", "expected"), [pytest.param(*case, id=case[0]) for case in BAD_MANIFESTS]
)
def test_the_api_server_refuses_each_bad_manifest_as_difftrain_validate_does(
    control_plane, namespace, name, manifest, expected
):
    field, _, problem = expected.partition(": ")

    result = control_plane.kubectl(
        "apply",
        "--dry-run=server",
        "-n",
        namespace,
        "-f",
        "-",
        input=yaml.safe_dump(manifest),
        check=False,
    )

    assert result.returncode != 0, f"the API server took it: {result.stdout}"
    if name in REFUSED_BY_KUBECTL:
        assert REFUSED_BY_KUBECTL[name] in result.stderr, result.stderr
        return
    problems = _server_problems(result.stderr)
    assert problems, result.stderr
    named, said = problems[0]
    said = said.removeprefix("Invalid value: ")
    if named == "<nil>":  # a rule on the root, which cannot name a field in metadata
        named = field if said.startswith(field) else said
    # The same field is named first...
    assert named == field, result.stderr
    # ...and where a CEL rule of the CRD refused it, with the words validate uses (validate
    # may add what CEL cannot know: the value, the fix). Schema checks say it their way.
    if said != problems[0][1] and " in body " not in said and not said.startswith('"'):
        core = said.removeprefix(field).removeprefix(":").strip()
        assert problem.startswith(core), (said, problem)


def _apply(control_plane, namespace, manifest, check=True):
    return control_plane.kubectl(
        "apply",
        "--server-side",
        "-n",
        namespace,
        "-f",
        "-",
        input=yaml.safe_dump(manifest),
        check=check,
    )


def _generation(control_plane, namespace, name) -> int:
    found = control_plane.kubectl("get", "dtj", name, "-n", namespace, "-o", "json").stdout
    return json.loads(found)["metadata"]["generation"]


def test_reapplying_the_same_manifest_changes_nothing(control_plane, namespace):
    manifest = job({"metadata": {"name": "same"}})
    _apply(control_plane, namespace, manifest)
    first = _generation(control_plane, namespace, "same")

    again = _apply(control_plane, namespace, manifest)

    assert _generation(control_plane, namespace, "same") == first
    assert "serverside-applied" in again.stdout


CHANGES = [
    ("training", {"training": {"learningRate": 0.5}}, "spec.training"),
    ("dataset", {"dataset": {"uri": "s3://other/data"}}, "spec.dataset"),
    ("model-component", {"model": {"components": {"unet": {"sample_size": 16}}}}, "spec.model"),
]


@pytest.mark.parametrize(("change", "field"), [pytest.param(c, f, id=i) for i, c, f in CHANGES])
def test_the_api_server_refuses_a_change_to_what_training_depends_on(
    control_plane, namespace, change, field
):
    base = job(
        {"metadata": {"name": "fixed"}},
        spec={"method": "full", "model": {"components": {"unet": {"sample_size": 8}}}},
    )
    _apply(control_plane, namespace, base)

    result = _apply(control_plane, namespace, merge(base, {"spec": change}), check=False)

    assert result.returncode != 0, f"the API server took it: {result.stdout}"
    assert "immutable" in result.stderr and field in result.stderr, result.stderr


def test_suspending_and_resuming_is_allowed(control_plane, namespace):
    base = job({"metadata": {"name": "pausable"}})
    _apply(control_plane, namespace, base)
    first = _generation(control_plane, namespace, "pausable")

    base["spec"].setdefault("runPolicy", {})["suspend"] = True
    _apply(control_plane, namespace, base)
    base["spec"]["runPolicy"]["suspend"] = False
    _apply(control_plane, namespace, base)

    assert _generation(control_plane, namespace, "pausable") == first + 2


def test_kubectl_get_wide_shows_the_newest_evaluation(control_plane, namespace):
    _apply(control_plane, namespace, job({"metadata": {"name": "scored"}}))
    status = {
        "status": {
            "phase": "Running",
            "evaluation": {
                "step": 600,
                "fid": 41.25,
                "clipScore": 27.5,
                "validationLoss": 0.125,
                "time": "2026-11-26T12:00:00Z",
            },
        }
    }
    control_plane.kubectl(
        "patch",
        "dtj",
        "scored",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )

    table = control_plane.kubectl("get", "dtj", "scored", "-n", namespace, "-o", "wide").stdout

    header, row = table.splitlines()
    assert header.split()[-2:] == ["FID", "CLIP"]
    assert row.split()[-2:] == ["41.25", "27.5"]
    narrow = control_plane.kubectl("get", "dtj", "scored", "-n", namespace).stdout
    assert "FID" not in narrow


def test_the_profile_groups_of_a_job_are_stored_as_written(control_plane, namespace):
    """No defaults there: the operator must tell what a job set (which wins over its
    profile) from what it left out."""
    _apply(control_plane, namespace, job({"metadata": {"name": "short"}}, spec={"profile": "p"}))

    found = control_plane.kubectl("get", "dtj", "short", "-n", namespace, "-o", "json").stdout
    spec = json.loads(found)["spec"]

    assert not {"resources", "storage", "cache", "runPolicy"} & set(spec)
    assert spec["checkpoints"]["everySteps"] == 500  # the other groups take their defaults


def _profile(name: str, spec: dict) -> dict:
    return {
        "apiVersion": "difftrain.io/v1alpha1",
        "kind": "DiffusionTrainingProfile",
        "metadata": {"name": name},
        "spec": spec,
    }


def test_profiles_apply_change_and_list_cluster_wide(control_plane, namespace):
    name = f"{namespace}-a100"
    spec = {
        "resources": {"image": "registry.example/ml/difftrain:1", "nodes": 2, "gpusPerNode": 8},
        "runPolicy": {"queueName": "training"},
    }
    control_plane.kubectl("apply", "-f", "-", input=yaml.safe_dump(_profile(name, spec)))
    try:
        spec["runPolicy"]["queueName"] = "other"  # a profile may change; jobs keep theirs
        control_plane.kubectl("apply", "-f", "-", input=yaml.safe_dump(_profile(name, spec)))

        found = json.loads(control_plane.kubectl("get", "dtp", name, "-o", "json").stdout)
        listed = control_plane.kubectl("get", "dtp", name).stdout.split()
    finally:
        control_plane.kubectl("delete", "dtp", name)

    assert found["metadata"]["generation"] == 2
    assert found["spec"] == spec  # nothing defaulted
    header, row = listed[:6], listed[6:10]
    assert header == ["NAME", "IMAGE", "NODES", "GPUS", "QUEUE", "AGE"]
    assert row == [name, "registry.example/ml/difftrain:1", "2", "8"]


@pytest.mark.parametrize(
    ("spec", "said"),
    [
        pytest.param(
            {"runPolicy": {"suspend": True}},
            "spec.runPolicy.suspend is each job's own switch",
            id="suspend",
        ),
        pytest.param({"training": {"steps": 1}}, 'unknown field "spec.training"', id="group"),
        pytest.param({"resources": {"nodes": 0}}, "spec.resources.nodes", id="bound"),
    ],
)
def test_the_api_server_refuses_a_bad_profile(control_plane, spec, said):
    result = control_plane.kubectl(
        "apply", "-f", "-", input=yaml.safe_dump(_profile("bad", spec)), check=False
    )

    assert result.returncode != 0
    assert said in result.stderr, result.stderr
