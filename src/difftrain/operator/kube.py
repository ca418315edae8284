"""All of the operator's Kubernetes API I/O, in one place.

Writes are server-side applies with the field manager ``difftrain`` (idempotent: applying
the same object twice changes nothing, so a restarted operator creates no duplicates).
The blocking ``kubernetes`` client runs in worker threads.
"""

import asyncio
import json
import os
import urllib.request
from dataclasses import dataclass

from difftrain.api.crd import PLURAL
from difftrain.api.job import API_VERSION, KIND
from difftrain.api.profile import PROFILE_PLURAL

FIELD_MANAGER = "difftrain"
NETWORKING = "networking.k8s.io/v1"
KUEUE_API = "kueue.x-k8s.io/v1beta1"  # served by every Kueue release since 0.5

_PATHS = {
    ("v1", "ConfigMap"): "/api/v1/namespaces/{namespace}/configmaps",
    ("v1", "Service"): "/api/v1/namespaces/{namespace}/services",
    ("v1", "Pod"): "/api/v1/namespaces/{namespace}/pods",
    ("batch/v1", "Job"): "/apis/batch/v1/namespaces/{namespace}/jobs",
    (NETWORKING, "NetworkPolicy"): f"/apis/{NETWORKING}/namespaces/{{namespace}}/networkpolicies",
    (API_VERSION, KIND): f"/apis/{API_VERSION}/namespaces/{{namespace}}/{PLURAL}",
}


class ApiError(Exception):
    """The API server answered with an error status; ``reason`` and ``detail`` are its
    Status object's (e.g. Forbidden, and why)."""

    def __init__(self, status: int, message: str, reason: str = "", detail: str = ""):
        super().__init__(message)
        self.status, self.reason, self.detail = status, reason, detail or message


def api_client(host: str | None = None):
    """A ``kubernetes`` ApiClient: for ``host`` if given, else in-cluster or kubeconfig."""
    from kubernetes import client, config

    if host:
        return client.ApiClient(client.Configuration(host=host))
    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as error:
            where = os.environ.get("KUBECONFIG") or "~/.kube/config"
            raise NoCredentials(
                "no Kubernetes credentials: not in a pod with a service account "
                "(KUBERNETES_SERVICE_HOST is not set), and the kubeconfig "
                f"{where} cannot be used ({str(error).splitlines()[0]}); set KUBECONFIG "
                "to a kubeconfig file, or run the operator in the cluster"
            ) from None
    return client.ApiClient()


class NoCredentials(Exception):
    """Neither the in-cluster service account nor a kubeconfig is there to use."""


@dataclass
class Kube:
    """The API calls the operator makes; each is one HTTP request."""

    client: object  # kubernetes.client.ApiClient

    async def _call(self, method: str, path: str, *, body=None, query=(), content_type=None):
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        return await asyncio.to_thread(self._request, method, path, body, list(query), headers)

    def _request(self, method: str, path: str, body, query: list, headers: dict):
        client = self.client
        # Bodies stay dicts: the client writes them as JSON, which is also valid YAML (apply).
        method, url, headers, body, _ = client.param_serialize(
            method,
            path,
            query_params=query,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = client.call_api(method, url, header_params=headers, body=body)
        response.read()
        if not 200 <= response.status < 300:
            try:
                found = json.loads(response.data)
                reason, detail = found.get("reason", ""), found.get("message", "")
            except (ValueError, AttributeError):
                reason, detail = "", ""
            message = f"{method} {path}: {response.status} {response.data!r}"
            raise ApiError(response.status, message, reason, detail)
        return json.loads(response.data) if response.data else None

    async def _get(self, path: str):
        try:
            return await self._call("GET", path)
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    @staticmethod
    def _collection(api_version: str, kind: str, namespace: str) -> str:
        return _PATHS[api_version, kind].format(namespace=namespace)

    async def apply(self, manifest: dict) -> dict:
        """Create or update ``manifest`` by server-side apply."""
        metadata = manifest["metadata"]
        path = self._collection(manifest["apiVersion"], manifest["kind"], metadata["namespace"])
        return await self._call(
            "PATCH",
            f"{path}/{metadata['name']}",
            body=manifest,
            query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
            content_type="application/apply-patch+yaml",
        )

    async def create(self, manifest: dict) -> bool:
        """Create ``manifest``; False when an object of its name exists already."""
        metadata = manifest["metadata"]
        path = self._collection(manifest["apiVersion"], manifest["kind"], metadata["namespace"])
        try:
            await self._call(
                "POST",
                path,
                body=manifest,
                query=[("fieldManager", FIELD_MANAGER)],
                content_type="application/json",
            )
        except ApiError as error:
            if error.status == 409 and error.reason == "AlreadyExists":
                return False
            raise
        return True

    async def get_job(self, namespace: str, name: str) -> dict | None:
        return await self._get(f"{self._collection('batch/v1', 'Job', namespace)}/{name}")

    async def set_job_suspended(self, namespace: str, name: str, suspended: bool) -> None:
        await self._call(
            "PATCH",
            f"{self._collection('batch/v1', 'Job', namespace)}/{name}",
            body={"spec": {"suspend": suspended}},
            content_type="application/merge-patch+json",
        )

    async def delete_job(self, namespace: str, name: str, uid: str | None = None) -> None:
        """Delete an attempt's Job and, in the background, its pods; with ``uid``, only
        that object (not one re-created under the same name meanwhile)."""
        await self.delete("batch/v1", "Job", namespace, name, uid)

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict | None:
        return await self._get(f"{self._collection(api_version, kind, namespace)}/{name}")

    async def delete(
        self, api_version: str, kind: str, namespace: str, name: str, uid: str | None = None
    ) -> None:
        """Delete an object (its dependents in the background); gone already is fine, and
        with ``uid`` so is a different object of that name (409)."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        path = f"{self._collection(api_version, kind, namespace)}/{name}"
        try:
            await self._call("DELETE", path, body=body, content_type="application/json")
        except ApiError as error:
            if error.status not in (404, 409):
                raise

    async def list_pods(self, namespace: str, labels: dict[str, str]) -> list[dict]:
        selector = ",".join(f"{key}={value}" for key, value in labels.items())
        found = await self._call(
            "GET", self._collection("v1", "Pod", namespace), query=[("labelSelector", selector)]
        )
        pods = found.get("items", []) if found else []
        # Filter here too: the selector is an optimisation, the labels are the truth.
        return [
            pod
            for pod in pods
            if all(pod.get("metadata", {}).get("labels", {}).get(k) == v for k, v in labels.items())
        ]

    async def failed_create(self, namespace: str, uid: str) -> str | None:
        """The message of the newest FailedCreate Event of the Job ``uid`` (the Job
        controller's word for pods the API server refused), or None."""
        found = await self._call(
            "GET",
            f"/api/v1/namespaces/{namespace}/events",
            query=[("fieldSelector", f"involvedObject.uid={uid},reason=FailedCreate")],
        )
        items = (found or {}).get("items", [])
        if not items:
            return None

        def when(event: dict) -> str:
            return event.get("lastTimestamp") or event.get("eventTime") or ""

        return max(items, key=when).get("message") or None

    async def kueue_wait(self, namespace: str, queue: str, job_uid: str) -> tuple[str, str]:
        """What Kueue says of a queued Job: ("KueueNotFound", ""), ("LocalQueueNotFound",
        ""), or ("", the message of its Workload's False QuotaReserved or Admitted
        condition, "" if it has none or no Workload yet)."""
        base = f"/apis/{KUEUE_API}/namespaces/{namespace}"
        try:
            found = await self._call(
                "GET",
                f"{base}/workloads",
                query=[("labelSelector", f"kueue.x-k8s.io/job-uid={job_uid}")],
            )
        except ApiError as error:
            if error.status == 404:  # the resource is not served: no Kueue
                return "KueueNotFound", ""
            raise
        if await self._get(f"{base}/localqueues/{queue}") is None:
            return "LocalQueueNotFound", ""
        for workload in (found or {}).get("items", []):
            for condition in workload.get("status", {}).get("conditions", []) or []:
                if (
                    condition.get("type") in ("QuotaReserved", "Admitted")
                    and condition.get("status") == "False"
                ):
                    return "", condition.get("message", "")
        return "", ""

    async def get_training_job(self, namespace: str, name: str) -> dict | None:
        return await self._get(f"{self._collection(API_VERSION, KIND, namespace)}/{name}")

    async def get_profile(self, name: str) -> dict | None:
        """The cluster-scoped DiffusionTrainingProfile ``name``, or None."""
        return await self._get(f"/apis/{API_VERSION}/{PROFILE_PLURAL}/{name}")

    async def list_training_jobs(self, namespace: str | None = None) -> list[dict]:
        """The DiffusionTrainingJobs of ``namespace``, or of all namespaces."""
        path = (
            self._collection(API_VERSION, KIND, namespace)
            if namespace
            else f"/apis/{API_VERSION}/{PLURAL}"
        )
        found = await self._call("GET", path)
        return found.get("items", []) if found else []

    async def patch_status(self, namespace: str, name: str, status: dict) -> None:
        path = self._collection(API_VERSION, KIND, namespace)
        await self._call(
            "PATCH",
            f"{path}/{name}/status",
            body={"status": status},
            content_type="application/merge-patch+json",
        )

    async def post_event(self, job: dict, kind: str, reason: str, message: str, now: str) -> None:
        """A core/v1 Event about ``job`` (kubectl describe shows it)."""
        metadata = job["metadata"]
        await self._call(
            "POST",
            f"/api/v1/namespaces/{metadata['namespace']}/events",
            body={
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {
                    "generateName": f"{metadata['name']}.",
                    "namespace": metadata["namespace"],
                },
                "involvedObject": {
                    "apiVersion": API_VERSION,
                    "kind": KIND,
                    "name": metadata["name"],
                    "namespace": metadata["namespace"],
                    "uid": metadata.get("uid"),
                },
                "type": kind,
                "reason": reason,
                "message": message[:1024],
                "firstTimestamp": now,
                "lastTimestamp": now,
                "count": 1,
                "source": {"component": "difftrain-operator"},
                "reportingComponent": "difftrain-operator",
            },
        )

    async def scrape(self, url: str, timeout: float) -> str | None:
        """The text at a trainer's metrics ``url``, or None when it cannot be read."""

        def fetch() -> str | None:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    return response.read().decode()
            except (OSError, ValueError):
                return None

        return await asyncio.to_thread(fetch)

    async def delete_training_job(self, namespace: str, name: str) -> None:
        path = self._collection(API_VERSION, KIND, namespace)
        await self._call("DELETE", f"{path}/{name}", query=[("propagationPolicy", "Background")])
