"""The trainer image (``make images``) run as its pod runs it: the rendered pod's command,
environment (resolved as ``difftrain run`` resolves it: node rank 0, the rendezvous on
this machine, Secret keys from the test) and user 1000, on a read-only root filesystem
with only the pod's volumes writable (its emptyDirs as folders of this machine, the
ConfigMap mounted read-only). A tiny LoRA job on the local S3 server trains, checkpoints
and exports; a write anywhere else would fail it."""

import shutil
import subprocess

import pytest

from difftrain.api.validation import load_job
from difftrain.local import free_port
from difftrain.operator.builders import COMPLETION_INDEX, Defaults, children
from difftrain.storage import S3Settings, open_store
from tests.builders import job
from tests.images import build, podman

IMAGE = build.IMAGES["trainer"]


def _environment(container: dict, secrets: dict[str, str], port: int) -> dict[str, str]:
    """The pod's environment, for node 0 of a one-node gang on this machine."""
    env = {}
    for entry in container["env"]:
        source = entry.get("valueFrom", {})
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        elif source.get("fieldRef", {}).get("fieldPath") == COMPLETION_INDEX:
            env[entry["name"]] = "0"
        elif "secretKeyRef" in source:
            env[entry["name"]] = secrets[source["secretKeyRef"]["key"]]
        else:
            raise AssertionError(f"cannot resolve {entry['name']}: {source}")
    env.update(PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=str(free_port()))
    env["DIFFTRAIN_METRICS_PORT"] = str(port)
    return env


def test_the_trainer_image_trains_a_lora_as_its_pod_runs_it(
    tmp_path, s3_env, bucket, shapes_folder
):
    s3_server = s3_env  # the credentials in this process's environment, for the set-up
    if shutil.which("podman") is None or not build.exists(IMAGE):
        pytest.fail(f"no {IMAGE}: run `make images`")
    settings = S3Settings(endpoint=s3_server.endpoint, path_style=True)
    open_store(f"s3://{bucket}/data", settings).upload_tree(shapes_folder, "")
    manifest = job(
        {"metadata": {"name": "imaged"}},
        spec={
            "dataset": {"uri": f"s3://{bucket}/data", "resolution": 32},
            "output": {"uri": f"s3://{bucket}/out"},
            "training": {"steps": 4, "batchSize": 2},
            "checkpoints": {"everySteps": 2},
            "storage": {
                "endpoint": s3_server.endpoint,
                "pathStyle": True,
                "secretRef": {"name": "s3-credentials"},
            },
            "resources": {"gpusPerNode": 0},
        },
    )
    config_map, _, batch = children(load_job(manifest), 1, Defaults(image=IMAGE))
    pod = batch["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == IMAGE
    assert pod["securityContext"]["runAsUser"] == 1000
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = []
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            folder = tmp_path / mount["name"]
            folder.mkdir()
            for key, text in config_map["data"].items():
                (folder / key).write_text(text)
            mounts.append(f"{folder}:{mount['mountPath']}:ro")
        else:
            assert "emptyDir" in volume, volume
            mounts.append(podman.empty_dir(tmp_path / mount["name"], mount["mountPath"]))
    termination = tmp_path / "termination-log"
    termination.touch(mode=0o666)
    mounts.append(f"{termination}:/dev/termination-log")
    keys = s3_server.admin
    secrets = {
        "AWS_ACCESS_KEY_ID": keys.access_key_id,
        "AWS_SECRET_ACCESS_KEY": keys.secret_access_key,
    }
    name = f"difftrain-trainer-{bucket}"
    command = podman.run_command(
        IMAGE,
        name=name,
        env=_environment(container, secrets, free_port()),
        mounts=mounts,
        entrypoint=container["command"],
    )

    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    finally:
        podman.remove(name)

    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-20000:]
    output = open_store(f"s3://{bucket}/out", settings)
    keys_written = output.keys()
    assert "checkpoints/step-00000002/COMPLETE" in keys_written, keys_written
    assert "checkpoints/step-00000004/COMPLETE" in keys_written
    assert any(key.startswith("model/") and key.endswith(".safetensors") for key in keys_written)
    assert termination.read_text() == ""  # no failure to report (a success without a registry)
    assert "Read-only file system" not in log  # nothing tried to write outside the volumes
