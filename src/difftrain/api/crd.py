"""Render the CustomResourceDefinition from the API models.

Pydantic writes JSON Schema (draft 2020-12, with ``$ref``s and ``anyOf`` for optional
fields); the API server wants a *structural* OpenAPI v3 schema: every node typed and
inlined, ``nullable``/``exclusiveMinimum`` in their OpenAPI 3.0 forms, and no keywords it
rejects. :func:`structural` does that translation; nothing else edits the schema.
"""

import copy
from typing import Any

from difftrain.api.job import (
    API_VERSION,
    GROUP,
    KIND,
    ROOT_RULES,
    VERSION,
    DiffusionTrainingJob,
)
from difftrain.api.profile import (
    PROFILE_GROUPS,
    PROFILE_KIND,
    PROFILE_PLURAL,
    DiffusionTrainingProfile,
    DiffusionTrainingProfileSpec,
)
from difftrain.api.spec import DiffusionTrainingJobSpec
from difftrain.api.status import DiffusionTrainingJobStatus
from difftrain.yamltext import dump

PLURAL = "diffusiontrainingjobs"
CRD_PATH = f"crds/{GROUP}_{PLURAL}.yaml"
PROFILE_CRD_PATH = f"crds/{GROUP}_{PROFILE_PLURAL}.yaml"

# JSON Schema keywords that carry no meaning for the API server, or that it refuses.
_DROPPED = {"title", "propertyNames", "$defs"}

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Reason", "type": "string", "jsonPath": ".status.reason"},
    {
        "name": "Progress",
        "type": "number",
        "jsonPath": ".status.progress.percent",
        "description": "Percent of training steps done.",
    },
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
    {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Method", "type": "string", "jsonPath": ".spec.method", "priority": 1},
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step", "priority": 1},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts", "priority": 1},
    {
        "name": "Preemptions",
        "type": "integer",
        "jsonPath": ".status.preemptions",
        "priority": 1,
    },
    {
        "name": "FID",
        "type": "number",
        "jsonPath": ".status.evaluation.fid",
        "description": "FID of the newest evaluation (lower is better).",
        "priority": 1,
    },
    {
        "name": "CLIP",
        "type": "number",
        "jsonPath": ".status.evaluation.clipScore",
        "description": "CLIP score of the newest evaluation (higher is better).",
        "priority": 1,
    },
]


def structural(node: Any, defs: dict[str, Any]) -> Any:
    """Translate one pydantic JSON Schema node (and its children) into structural OpenAPI."""
    if isinstance(node, list):
        return [structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        branches = [b for b in node.pop("anyOf") if b != {"type": "null"}]
        if len(branches) != 1:
            raise ValueError(f"cannot express a union of {branches} in a structural schema")
        node = {**branches[0], **node}
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        # The field's own keywords (description, default) win over the referenced model's.
        node = {**copy.deepcopy(target), **node}
    if node.get("default", 0) is None:
        del node["default"]  # optional fields are simply left out, never null
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound in ("Minimum", "Maximum"):
        exclusive = node.get(f"exclusive{bound}")
        if exclusive is not None and not isinstance(exclusive, bool):
            node[bound.lower()] = exclusive
            node[f"exclusive{bound}"] = True
    if node.get("additionalProperties") is False:
        del node["additionalProperties"]  # unknown fields are pruned by the API server
    if node.get("type") == "object" and node.get("additionalProperties") is True:
        del node["additionalProperties"]
        node["x-kubernetes-preserve-unknown-fields"] = True
    out = {}
    for key, value in node.items():
        if key in _DROPPED:
            continue
        if key == "properties":
            out[key] = {name: structural(child, defs) for name, child in value.items()}
        elif key in ("items", "additionalProperties", "anyOf"):
            out[key] = structural(value, defs)
        else:
            out[key] = value
    return out


def model_schema(model) -> dict[str, Any]:
    """The structural schema of one pydantic model, by alias."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    return structural(schema, schema.get("$defs", {}))


def without_defaults(node: Any, transitions: bool = True) -> Any:
    """``node`` with no ``default`` anywhere in it (and, unless ``transitions``, with no
    rule that compares to ``oldSelf``)."""
    if isinstance(node, list):
        return [without_defaults(item, transitions) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "default":
            continue
        if key == "x-kubernetes-validations" and not transitions:
            value = [rule for rule in value if "oldSelf" not in rule["rule"]]
            if not value:
                continue
        out[key] = without_defaults(value, transitions)
    return out


def openapi_schema(profile_defaults: bool = True) -> dict[str, Any]:
    """The whole object's openAPIV3Schema. Without ``profile_defaults`` (the CRD), the
    groups a profile may set carry no defaults, so that the operator sees which fields the
    job itself set: the API server would otherwise fill them in before the merge."""
    spec = model_schema(DiffusionTrainingJobSpec)
    status = model_schema(DiffusionTrainingJobStatus)
    if not profile_defaults:
        for group in PROFILE_GROUPS:
            spec["properties"][group] = without_defaults(spec["properties"][group])
        kept = status["properties"]["profile"]["properties"]
        kept["spec"] = without_defaults(kept["spec"], transitions=False)
    return {
        "type": "object",
        "description": DiffusionTrainingJob.__doc__,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "difftrain.io/v1alpha1"},
            "kind": {"type": "string", "description": "DiffusionTrainingJob"},
            "metadata": {"type": "object"},
            "spec": spec,
            # A new job reads as not yet observed (observedGeneration 0, below any
            # generation) until the operator writes its status: kstatus (Flux, kubectl)
            # would take a job without a status for one that is done.
            "status": {**status, "default": {}},
        },
        "x-kubernetes-validations": ROOT_RULES,
    }


PROFILE_PRINTER_COLUMNS = [
    {"name": "Image", "type": "string", "jsonPath": ".spec.resources.image"},
    {"name": "Nodes", "type": "integer", "jsonPath": ".spec.resources.nodes"},
    {"name": "GPUs", "type": "integer", "jsonPath": ".spec.resources.gpusPerNode"},
    {"name": "Queue", "type": "string", "jsonPath": ".spec.runPolicy.queueName"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def profile_openapi_schema() -> dict[str, Any]:
    """The DiffusionTrainingProfile's openAPIV3Schema: the job's groups without defaults
    (what a profile leaves out stays out of the merge) and without the job's immutability
    rules (a profile may change; jobs that took it keep the spec they took)."""
    return {
        "type": "object",
        "description": DiffusionTrainingProfile.__doc__,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": API_VERSION},
            "kind": {"type": "string", "description": PROFILE_KIND},
            "metadata": {"type": "object"},
            "spec": without_defaults(model_schema(DiffusionTrainingProfileSpec), transitions=False),
        },
    }


def _crd(plural: str, kind: str, scope: str, short: str, version: dict) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "labels": {
                "app.kubernetes.io/name": "difftrain",
                "app.kubernetes.io/part-of": "difftrain",
            },
        },
        "spec": {
            "group": GROUP,
            "scope": scope,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": ["difftrain"],
            },
            "versions": [{"name": VERSION, "served": True, "storage": True, **version}],
        },
    }


def crd_manifest() -> dict[str, Any]:
    """The DiffusionTrainingJob CustomResourceDefinition."""
    return _crd(
        PLURAL,
        KIND,
        "Namespaced",
        "dtj",
        {
            "subresources": {"status": {}},
            "additionalPrinterColumns": PRINTER_COLUMNS,
            "schema": {"openAPIV3Schema": openapi_schema(profile_defaults=False)},
        },
    )


def profile_crd_manifest() -> dict[str, Any]:
    """The DiffusionTrainingProfile CustomResourceDefinition (cluster-scoped)."""
    return _crd(
        PROFILE_PLURAL,
        PROFILE_KIND,
        "Cluster",
        "dtp",
        {
            "additionalPrinterColumns": PROFILE_PRINTER_COLUMNS,
            "schema": {"openAPIV3Schema": profile_openapi_schema()},
        },
    )


def _generated(manifest: dict[str, Any]) -> str:
    kind = manifest["spec"]["names"]["kind"]
    header = (
        "# Generated by `difftrain crd` from difftrain.api. Do not edit by hand.\n"
        f"# {API_VERSION} {kind}\n"
    )
    return header + dump(manifest)


def render_crd() -> str:
    """The DiffusionTrainingJob CRD as the YAML file committed under crds/."""
    return _generated(crd_manifest())


def render_profile_crd() -> str:
    """The DiffusionTrainingProfile CRD as the YAML file committed under crds/."""
    return _generated(profile_crd_manifest())


def render_crds() -> dict[str, str]:
    """Every CRD, by the path of its file under crds/."""
    return {CRD_PATH: render_crd(), PROFILE_CRD_PATH: render_profile_crd()}
