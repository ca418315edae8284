"""The generated CRD: up to date, accepted by Kubernetes' schema, structural, and faithful
to the models (same defaults, same accepted manifests)."""

from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from difftrain.api import DiffusionTrainingJob
from difftrain.api.crd import (
    CRD_PATH,
    PROFILE_CRD_PATH,
    crd_manifest,
    openapi_schema,
    profile_crd_manifest,
    profile_openapi_schema,
    render_crds,
)
from difftrain.api.profile import PROFILE_GROUPS
from difftrain.cli import main
from tests import examples
from tests.builders import job
from tests.kube_schema import apply_defaults

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = examples.JOBS
# Keywords a structural schema node may carry (apiextensions.k8s.io/v1 JSONSchemaProps,
# less those structural schemas forbid).
ALLOWED_KEYWORDS = {
    "type",
    "description",
    "default",
    "enum",
    "format",
    "pattern",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "maxProperties",
    "required",
    "properties",
    "items",
    "additionalProperties",
    "anyOf",
    "x-kubernetes-validations",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-int-or-string",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
}


@pytest.mark.parametrize("path", [CRD_PATH, PROFILE_CRD_PATH])
def test_committed_crds_are_current(path):
    assert (ROOT / path).read_text() == render_crds()[path], "run `make generate` and commit"
    assert (ROOT / "helm/difftrain" / path).read_text() == render_crds()[path]


def test_crd_command_writes_each_file_or_one_stream(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)

    assert main(["crd"]) == 0
    for path, text in render_crds().items():
        assert (tmp_path / path).read_text() == text
    capsys.readouterr()
    assert main(["crd", "--output", "-"]) == 0
    documents = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["spec"]["names"]["kind"] for d in documents] == [
        "DiffusionTrainingJob",
        "DiffusionTrainingProfile",
    ]


@pytest.mark.parametrize("path", [CRD_PATH, PROFILE_CRD_PATH])
def test_crds_pass_kubernetes_validate_strict(path):
    manifest = yaml.safe_load(render_crds()[path])

    kubernetes_validate.validate(manifest, "1.33.0", strict=True)


def _defaults(node):
    return [path for path, child in _nodes(node) if "default" in child]


def test_the_jobs_profile_groups_carry_no_defaults_in_the_crd():
    """The API server would fill them in, and the operator could no longer tell a field
    the job set (which wins over its profile) from one it left to the profile."""
    served = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec = served["properties"]["spec"]["properties"]

    for group in PROFILE_GROUPS:
        assert _defaults(spec[group]) == [], group
    assert _defaults(spec["training"]) != []  # the other groups keep theirs
    kept = served["properties"]["status"]["properties"]["profile"]["properties"]["spec"]
    assert _defaults(kept) == []
    assert _defaults(profile_openapi_schema()) == []


def test_profile_crd_is_cluster_scoped_without_status():
    spec = profile_crd_manifest()["spec"]

    assert spec["scope"] == "Cluster"
    assert spec["names"]["shortNames"] == ["dtp"]
    assert "subresources" not in spec["versions"][0]
    assert set(profile_openapi_schema()["properties"]["spec"]["properties"]) == set(PROFILE_GROUPS)


def _nodes(schema, path="openAPIV3Schema"):
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from _nodes(child, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from _nodes(schema[key], f"{path}[{key}]")


@pytest.mark.parametrize(
    ("path", "node"),
    list(_nodes(openapi_schema())) + list(_nodes(profile_openapi_schema(), "profile")),
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_every_schema_node_is_structural(path, node):
    assert set(node) <= ALLOWED_KEYWORDS, path
    if node.get("x-kubernetes-int-or-string"):
        assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}]
    else:
        assert "type" in node and "anyOf" not in node, path
    assert not ("properties" in node and "additionalProperties" in node), path
    if node.get("x-kubernetes-preserve-unknown-fields"):
        assert "properties" not in node, path
    if isinstance(node.get("exclusiveMinimum"), bool | None) is False:
        pytest.fail(f"{path}: exclusiveMinimum must be a boolean in OpenAPI v3.0")


@pytest.mark.parametrize(
    ("path", "node"),
    list(_nodes(openapi_schema()["properties"]["spec"], "spec")),
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_every_spec_field_is_described(path, node):
    for name, child in node.get("properties", {}).items():
        assert child.get("description"), f"{path}.{name} has no description"


@pytest.mark.parametrize(
    ("path", "node"),
    list(_nodes(openapi_schema()["properties"]["spec"], "spec")),
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_every_spec_value_is_bounded(path, node):
    """The API server estimates each CEL rule's worst-case cost from these bounds (the
    immutability rules compare whole groups) and refuses a CRD whose rules could cost too
    much; unbounded strings, lists or maps make that estimate huge."""
    kind = node.get("type")
    if kind == "string":
        assert "maxLength" in node or "enum" in node, path
    elif kind == "array":
        assert "maxItems" in node, path
    elif kind == "object" and "additionalProperties" in node:
        assert "maxProperties" in node, path


def test_crd_identity_and_columns():
    spec = crd_manifest()["spec"]
    version = spec["versions"][0]

    assert spec["names"]["shortNames"] == ["dtj"]
    assert spec["names"]["categories"] == ["difftrain"]
    assert spec["scope"] == "Namespaced"
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"] if "priority" not in c] == [
        "Phase",
        "Reason",
        "Progress",
        "Loss",
        "ETA",
        "Age",
    ]


@pytest.mark.parametrize(
    "column",
    crd_manifest()["spec"]["versions"][0]["additionalPrinterColumns"],
    ids=lambda c: c["name"],
)
def test_printer_columns_point_at_typed_fields(column):
    path = column["jsonPath"].lstrip(".").split(".")
    if path == ["metadata", "creationTimestamp"]:
        return
    node = openapi_schema()
    for part in path:
        node = node["properties"][part]
    kinds = {"number": {"number", "integer"}, "integer": {"integer"}, "string": {"string"}}
    assert node["type"] in kinds[column["type"]]


def test_free_form_only_for_inline_configs():
    free = [
        path
        for path, node in _nodes(openapi_schema())
        if node.get("x-kubernetes-preserve-unknown-fields")
    ]

    assert free == [
        f"openAPIV3Schema.spec.model.components.{name}"
        for name in (
            "unet",
            "transformer",
            "vae",
            "textEncoder",
            "textEncoder2",
            "textEncoder3",
            "scheduler",
        )
    ]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_validates_against_models_and_crd_schema(example, capsys):
    manifest = yaml.safe_load(example.read_text())

    assert main(["validate", str(example)]) == 0
    jsonschema.Draft4Validator(openapi_schema()).validate(manifest)


def test_example_set_covers_every_method():
    methods = {yaml.safe_load(p.read_text())["spec"]["method"] for p in EXAMPLES}
    names = {p.stem for p in EXAMPLES}

    assert methods == {"lora", "finetune", "dreambooth", "textualInversion", "full"}
    assert {"quickstart", "multinode", "kueue", "sdxl-lora", "from-scratch"} <= names


@pytest.mark.parametrize(
    "manifest",
    [
        pytest.param(job(), id="minimal"),
        pytest.param(
            job(spec={"method": "dreambooth", "dreambooth": {"instancePrompt": "a sks dog"}}),
            id="dreambooth",
        ),
        pytest.param(
            job(
                spec={
                    "method": "textualInversion",
                    "textualInversion": {"placeholderToken": "<t>", "initializerToken": "cat"},
                }
            ),
            id="ti",
        ),
        pytest.param(
            job(spec={"lora": {}, "evaluation": {"clipScore": {"modelUri": "s3://models/clip"}}}),
            id="nested-optional",
        ),
    ],
)
def test_crd_defaults_equal_model_defaults(manifest):
    """The API server (CRD defaults) and the trainer (pydantic) see the same spec."""
    schema = openapi_schema()
    model = DiffusionTrainingJob.model_validate(manifest)

    defaulted = apply_defaults(schema, manifest)

    assert defaulted["spec"] == model.spec.model_dump(by_alias=True, exclude_none=True)


@pytest.mark.parametrize(
    ("manifest", "field"),
    [
        pytest.param(job(spec={"resources": {"nodes": 0}}), "nodes", id="bound"),
        pytest.param(job(spec={"dataset": {"resolution": 500}}), "resolution", id="multiple"),
        pytest.param(job(spec={"training": {"learningRate": 0}}), "learningRate", id="exclusive"),
        pytest.param(job(spec={"dataset": {"uri": "gs://b/x"}}), "uri", id="scheme"),
        pytest.param(job(spec={"cache": {"uri": "hf://org/x"}}), "uri", id="cache-scheme"),
        pytest.param(job(spec={"cache": {"latents": "yes"}}), "latents", id="cache-type"),
        pytest.param(job(spec={"method": "sft"}), "method", id="enum"),
        pytest.param(job(spec={"training": {"steps": "10"}}), "steps", id="type"),
        pytest.param(job(spec={"resources": {"limits": {"cpu": "lots"}}}), "cpu", id="quantity"),
    ],
)
def test_crd_schema_rejects_what_the_models_reject(manifest, field):
    errors = list(jsonschema.Draft4Validator(openapi_schema()).iter_errors(manifest))

    assert [e.path[-1] for e in errors] == [field]
    with pytest.raises(ValueError):
        DiffusionTrainingJob.model_validate(manifest)
