"""A Kubernetes API for operator tests: kmock's emulator over HTTP on 127.0.0.1, taught
the server behaviour Kopf and the operator rely on.

kmock stores and serves objects, lists, watches and patches. This subclass adds: uid,
namespace, creationTimestamp, generation and a resourceVersion bumped on every write
(Kopf needs these to tell fresh events from stale ones), ``generateName``, 201 on create,
server-side apply creating missing objects, and 422 (not 500) for a failed JSON-patch
test. It does not garbage-collect by owner references or enforce field ownership: tests
assert what the operator requests, not what cluster controllers would do next.
"""

import datetime
import itertools
import uuid

import attrs
import jsonpatch
import yaml
from kmock import KubernetesEmulator, KubernetesError, ResourceInfo, action
from kmock._internal import parsing

VERBS = {"create", "delete", "get", "list", "patch", "update", "watch"}
RESOURCES = {  # path: (kind, subresources, namespaced)
    "difftrain.io/v1alpha1/diffusiontrainingjobs": ("DiffusionTrainingJob", {"status"}),
    "v1/configmaps": ("ConfigMap", set()),
    "v1/services": ("Service", set()),
    "v1/pods": ("Pod", {"status"}),
    "v1/events": ("Event", set()),
    "batch/v1/jobs": ("Job", {"status"}),
}
CLUSTER_RESOURCES = {"v1/namespaces": "Namespace"}  # Kopf looks for it at start-up


_parse_path = parsing.parse_path


def _parse_namespaces(path: str) -> parsing.ParsedPath:
    """kmock 0.8 reads ``/api/v1/namespaces[/NAME]`` as the start of a namespaced path and
    fails; it is the cluster-scoped Namespace resource (Kopf watches it when it serves
    chosen namespaces)."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
        name = parts[3] if len(parts) == 4 else None
        return parsing.ParsedPath("", "v1", "namespaces", None, name, None)
    return _parse_path(path)


parsing.parse_path = _parse_namespaces  # kmock looks it up at each request


@attrs.define(kw_only=True)
class ApiServer(KubernetesEmulator):
    _versions: itertools.count = attrs.field(factory=lambda: itertools.count(1), init=False)

    def __attrs_post_init__(self):
        super().__attrs_post_init__()
        for path, (kind, subresources) in RESOURCES.items():
            self.resources[path] = ResourceInfo(
                kind=kind,
                singular=kind.lower(),
                namespaced=True,
                verbs=VERBS,
                subresources=subresources,
            )
        for path, kind in CLUSTER_RESOURCES.items():
            self.resources[path] = ResourceInfo(
                kind=kind, singular=kind.lower(), namespaced=False, verbs=VERBS
            )

    def _version(self) -> str:
        return str(next(self._versions))

    async def _handle(self, request):
        if request.resource is None:
            return await super()._handle(request)
        data = request.data
        applying = request.headers.get("Content-Type", "").startswith("application/apply-patch")
        if applying and data is None and request.text:
            data = yaml.safe_load(request.text)
            object.__setattr__(request, "data", data)
        key = (request.resource, request.namespace, request.name)
        exists = key in self.objects and not self.objects[key].deleted
        if request.action == action.UPDATE and applying and not exists:
            data.setdefault("metadata", {}).setdefault("name", request.name)
            object.__setattr__(request, "action", action.CREATE)
            object.__setattr__(request, "name", None)
        if request.action == action.CREATE and isinstance(data, dict):
            self._stamp_new(data.setdefault("metadata", {}), request.namespace)
            response = await super()._handle(request)
            if response.status == 200:
                response.set_status(201)
            return response
        if request.action == action.UPDATE and exists:
            version = self._version()
            if isinstance(data, dict):
                metadata = data.get("metadata") or {}
                data["metadata"] = {**metadata, "resourceVersion": version}
                if request.subresource is None and "spec" in data:
                    old = self.objects[key].raw.get("metadata", {}).get("generation", 0)
                    data["metadata"]["generation"] = old + 1
            elif isinstance(data, list):
                data.append({"op": "add", "path": "/metadata/resourceVersion", "value": version})
        if request.action == action.DELETE and exists:
            metadata = self.objects[key].raw.get("metadata", {})
            if metadata.get("finalizers") and not metadata.get("deletionTimestamp"):
                self.objects[key]["metadata"] = {**metadata, "resourceVersion": self._version()}
        try:
            return await super()._handle(request)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as error:
            raise KubernetesError(status=422, reason="Invalid", message=str(error)) from None

    def _stamp_new(self, metadata: dict, namespace: str | None) -> None:
        if not metadata.get("name") and metadata.get("generateName"):
            metadata["name"] = metadata["generateName"] + uuid.uuid4().hex[:5]
        if namespace and not metadata.get("namespace"):
            metadata["namespace"] = namespace
        metadata.setdefault("uid", str(uuid.uuid4()))
        metadata.setdefault(
            "creationTimestamp",
            datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        metadata.setdefault("generation", 1)
        metadata["resourceVersion"] = self._version()
