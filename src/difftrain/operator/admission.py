"""Checks of a job that only a cluster makes: the operator runs them before it creates
anything, and a job that fails one fails with InvalidSpec and the field named.

``difftrain run`` runs the same manifest on one machine, where a ``file://`` path is a
folder of that machine; in a pod it is a folder of the pod's own disk, gone with the pod,
unless it lies on a volume the job mounts (``spec.resources.volumes``).
"""

import posixpath

from difftrain.api.job import DiffusionTrainingJob

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
            found.append(f"{field}: {uri} is a relative path, which a pod resolves on its own "
                         f"disk and loses with it; {_HINT}")  # fmt: skip
            continue
        path = posixpath.normpath(path)
        volume = next((v for v in volumes if path == v.mount_path
                       or path.startswith(v.mount_path.rstrip("/") + "/")), None)  # fmt: skip
        if volume is None:
            found.append(f"{field}: {uri} is not on a volume the job mounts, so a pod would "
                         f"lose it with its own disk; {_HINT}")  # fmt: skip
        elif volume.read_only and field == "spec.output.uri":
            found.append(f"{field}: {uri} is on volume {volume.name}, which is mounted "
                         "read-only; set its readOnly to false, or write elsewhere")  # fmt: skip
    return found
