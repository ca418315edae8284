"""Checks of a job that only a cluster makes: the operator runs them before it creates
anything, and a job that fails one fails with InvalidSpec (or NotAllowed, for the
platform's policy) and the field named.

Policy: whoever may create a DiffusionTrainingJob would otherwise run any image as any
ServiceAccount of the namespace. A job may name only the operator's trainer image or one
matching the chart's ``policy.allowedImages`` patterns, and only the namespace's
``default`` ServiceAccount or one in ``policy.allowedServiceAccounts``.

``difftrain run`` runs the same manifest on one machine, where a ``file://`` path is a
folder of that machine; in a pod it is a folder of the pod's own disk, gone with the pod,
unless it lies on a volume the job mounts (``spec.resources.volumes``).
"""

import fnmatch
import posixpath

from difftrain.api.job import DiffusionTrainingJob
from difftrain.operator.builders import Defaults

_HINT = (
    "use s3://, or mount a PersistentVolumeClaim (spec.resources.volumes) and use a path "
    "under its mountPath"
)


def _file_uris(value, path: str):
    """(field path, URI) of every file:// string in a dumped spec."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _file_uris(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _file_uris(item, f"{path}[{index}]")
    elif isinstance(value, str) and value.startswith("file://"):
        yield path, value


def problems(job: DiffusionTrainingJob) -> list[str]:
    """What keeps ``job`` from running in a cluster, each naming its field."""
    spec = job.spec
    volumes = spec.resources.volumes
    found = []
    dumped = spec.model_dump(by_alias=True, exclude_none=True)
    for field, uri in _file_uris(dumped, "spec"):
        path = uri.removeprefix("file://")
        if not path.startswith("/"):
            found.append(
                f"{field}: {uri} is a relative path, which a pod resolves on its own "
                f"disk and loses with it; {_HINT}"
            )
            continue
        path = posixpath.normpath(path)
        volume = next(
            (
                v
                for v in volumes
                if path == v.mount_path or path.startswith(v.mount_path.rstrip("/") + "/")
            ),
            None,
        )
        if volume is None:
            found.append(
                f"{field}: {uri} is not on a volume the job mounts, so a pod would "
                f"lose it with its own disk; {_HINT}"
            )
        elif volume.read_only and field == "spec.output.uri":
            found.append(
                f"{field}: {uri} is on volume {volume.name}, which is mounted "
                "read-only; set its readOnly to false, or write elsewhere"
            )
    return found


def policy_problems(job: DiffusionTrainingJob, defaults: Defaults) -> list[str]:
    """What the operator's policy does not allow ``job`` to ask for."""
    resources = job.spec.resources
    found = []
    image = resources.image
    if (
        image
        and image != defaults.image
        and not any(fnmatch.fnmatchcase(image, pattern) for pattern in defaults.allowed_images)
    ):
        allowed = ", ".join([defaults.image, *defaults.allowed_images])
        found.append(
            f"spec.resources.image: {image} is not allowed here (allowed: {allowed}); "
            "leave it out for the operator's trainer image, or ask the platform team "
            "to add a pattern to the chart's policy.allowedImages"
        )
    account = resources.service_account_name
    if account and account != "default" and account not in defaults.allowed_service_accounts:
        allowed = ", ".join(["default", *defaults.allowed_service_accounts])
        found.append(
            f"spec.resources.serviceAccountName: {account} is not allowed here "
            f"(allowed: {allowed}); ask the platform team to add it to the chart's "
            "policy.allowedServiceAccounts"
        )
    return found
