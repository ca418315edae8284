"""Run the built images (tests/images/build.py) with Debian's podman, as their pods run.

The containers share this machine's network (``--network host``: the test control plane
and S3 server listen on 127.0.0.1), run as user 1000 on a read-only root filesystem, and
get only the mounts a test gives them. podman uses runc (crun refuses this machine's
hybrid cgroups) and lower rlimits than its defaults (the machine lets no one raise them).
"""

import subprocess
from pathlib import Path

from tests.images.build import STORE

BASE = ("podman", *STORE, "--runtime", "runc")
LIMITS = ("--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096")


def run_command(
    image: str,
    *args: str,
    name: str,
    env: dict[str, str] | None = None,
    mounts: list[str] | None = None,
    entrypoint: list[str] | None = None,
) -> list[str]:
    """``podman run`` of ``image`` as a pod runs it; ``mounts`` are ``-v`` specs."""
    command = [*BASE, "run", "--rm", "--name", name, "--network", "host", *LIMITS]
    command += ["--user", "1000:1000", "--read-only", "--read-only-tmpfs=false"]
    for key, value in (env or {}).items():
        command += ["--env", f"{key}={value}"]
    for mount in mounts or []:
        command += ["--volume", mount]
    if entrypoint is not None:
        command += ["--entrypoint", entrypoint[0]]
        args = (*entrypoint[1:], *args)
    return [*command, image, *args]


def empty_dir(folder: Path, path: str) -> str:
    """A mount of an emptyDir at ``path``: a new folder anyone may write, as the kubelet
    makes one (podman's tmpfs would take the mode of the image's folder it covers)."""
    folder.mkdir(parents=True)
    folder.chmod(0o777)
    return f"{folder}:{path}"


def remove(name: str) -> None:
    """Stop and remove the container ``name`` if it is there."""
    subprocess.run([*BASE, "rm", "--force", "--time", "10", name], capture_output=True)
