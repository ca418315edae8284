"""`difftrain run`: the job's pods as local processes, launched as the operator would."""

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import yaml

from difftrain import contract, local
from difftrain.api.validation import load_job
from difftrain.local import (
    combined_exit_code,
    free_port,
    node_environment,
    progress_line,
    threads_per_process,
)
from difftrain.operator.builders import Defaults, children
from tests.builders import job, merge
from tests.trainer.runner import FAST_SPEC


def _manifest(tmp_path, spec: dict) -> dict:
    return job({"metadata": {"name": "local"}}, spec=merge(FAST_SPEC, spec))


def _difftrain_run(tmp_path, manifest, *args, env=None, popen=False):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest))
    command = [
        sys.executable,
        "-m",
        "difftrain.cli",
        "run",
        str(path),
        "--workdir",
        str(tmp_path / "work"),
        *args,
    ]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if popen:
        return subprocess.Popen(
            command, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    return subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=300)


def test_two_local_nodes_train_together(tmp_path, shapes_folder):
    output = tmp_path / "out"
    manifest = _manifest(
        tmp_path,
        {
            "dataset": {"uri": f"file://{shapes_folder}"},
            "output": {"uri": f"file://{output}"},
            "training": {"steps": 3},
            "checkpoints": {"everySteps": 3},
        },
    )

    port = free_port()

    # As on a terminal: node 0 draws its progress bars (difftrain.bars), node 1 none.
    result = _difftrain_run(
        tmp_path,
        manifest,
        "--nodes",
        "2",
        "--metrics-port",
        str(port),
        env={"DIFFTRAIN_PROGRESS": "1"},
    )

    assert result.returncode == 0, result.stdout + result.stderr
    urls = [line for line in result.stdout.splitlines() if " metrics: http" in line]
    assert urls[0] == f"node 0 metrics: http://127.0.0.1:{port}/metrics"
    assert urls[1].startswith("node 1 metrics: http://127.0.0.1:") and len(urls) == 2
    checkpoint = output / "checkpoints" / "step-00000003"
    assert {"rng-0.pt", "rng-1.pt", "COMPLETE"} <= {p.name for p in checkpoint.iterdir()}
    assert (output / "model" / "difftrain.json").exists()
    assert "[node 0] " in result.stdout and "[node 1] " in result.stdout
    assert result.stdout.count("model exported") == 1
    bars = [line for line in result.stdout.splitlines() if "caching latents: " in line]
    assert bars and all(line.startswith("[node 0] ") for line in bars)
    assert "100%" in bars[-1]


def test_a_nodes_bar_redraws_stay_redraws(tmp_path):
    """Lines ended by a carriage return (a bar's redraws) are relayed as they are, each
    with the node's prefix, so the terminal redraws one line."""
    script = "import sys; sys.stdout.write('a\\rb\\rc\\nd\\n')"
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    relayed = io.StringIO()

    with contextlib.redirect_stdout(relayed):
        local._stream(process, "[node 0] ")

    assert process.wait() == 0
    assert relayed.getvalue() == "[node 0] a\r[node 0] b\r[node 0] c\n[node 0] d\n"


def test_trainer_failure_is_reported_with_its_exit_code(tmp_path):
    (tmp_path / "empty").mkdir()
    manifest = _manifest(
        tmp_path,
        {
            "dataset": {"uri": f"file://{tmp_path}/empty"},
            "output": {"uri": f"file://{tmp_path}/out"},
        },
    )

    result = _difftrain_run(tmp_path, manifest)

    assert result.returncode == 3, result.stdout + result.stderr
    assert "DatasetError: the dataset has no images" in result.stderr


def test_missing_secret_variable_is_named_before_anything_starts(tmp_path, monkeypatch):
    manifest = _manifest(tmp_path, {"storage": {"secretRef": {"name": "s3-creds"}}})
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    container = children(load_job(manifest), 1, Defaults())[2]["spec"]["template"]["spec"][
        "containers"
    ][0]

    with pytest.raises(Exception) as raised:
        node_environment(container, 0, {"scratch": tmp_path}, 1234)

    assert str(raised.value) == (
        "AWS_ACCESS_KEY_ID is not set: in a cluster it comes from key AWS_ACCESS_KEY_ID of "
        "Secret s3-creds (spec.storage.secretRef); export AWS_ACCESS_KEY_ID to run here"
    )


def test_pod_environment_is_mapped_to_this_machine(tmp_path):
    container = children(load_job(_manifest(tmp_path, {})), 1, Defaults())[2]["spec"]["template"][
        "spec"
    ]["containers"][0]
    folders = {"config": tmp_path / "config", "scratch": tmp_path / "n3", "cache": tmp_path / "c"}

    env = node_environment(container, 3, folders, 4321)

    assert env["PET_NODE_RANK"] == "3"
    assert (env["PET_MASTER_ADDR"], env["PET_MASTER_PORT"]) == ("127.0.0.1", "4321")
    assert env["DIFFTRAIN_CONFIG"] == f"{tmp_path}/config/job.json"
    assert env["HOME"] == f"{tmp_path}/n3/home"
    assert env["DIFFTRAIN_CACHE"] == f"{tmp_path}/c"


def test_local_nodes_share_the_cpus(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    job = load_job(_manifest(tmp_path, {"resources": {"nodes": 2, "gpusPerNode": 0}}))
    container = children(job, 1, Defaults())[2]["spec"]["template"]["spec"]["containers"][0]
    folders = {"scratch": tmp_path}

    assert threads_per_process(job) == 4
    assert node_environment(container, 0, folders, 1, threads=4)["OMP_NUM_THREADS"] == "4"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's choice wins
    assert node_environment(container, 0, folders, 1, threads=4)["OMP_NUM_THREADS"] == "1"


@pytest.mark.parametrize(
    ("codes", "expected"), [([0, 0], 0), ([1, 3], 3), ([143, 0], 143), ([0, 4], 4)]
)
def test_one_exit_code_for_all_nodes(codes, expected):
    assert combined_exit_code(codes) == expected


def test_progress_line_from_the_trainers_metrics():
    text = (
        '# TYPE difftrain_step gauge\ndifftrain_step{job="a",namespace="n"} 12.0\n'
        'difftrain_total_steps{job="a",namespace="n"} 40.0\n'
        'difftrain_loss{job="a",namespace="n"} 0.123456\n'
        'difftrain_images_per_second{job="a",namespace="n"} 25.06\n'
        'difftrain_eta_seconds{job="a",namespace="n"} 72.4\n'
    )

    line = progress_line(contract.read_metrics(text))

    assert line == "progress: step 12/40 (30%), loss 0.1235, 25.1 images/s, ETA 1m12s"
    assert progress_line({}) is None


@pytest.mark.parametrize(
    ("spec", "code", "message"),
    [
        pytest.param(
            {"output": {"uri": "file://{tmp}/blocker/out"}},
            4,
            "StorageAccessDenied: cannot write file://{tmp}/blocker/out: "
            "{tmp}/blocker is not a writable folder",
            id="unwritable-output",
        ),
        pytest.param(
            {
                "dataset": {"uri": "s3://bucket-x/data"},
                "storage": {"endpoint": "http://127.0.0.1:9"},
            },
            1,
            "StorageUnavailable: list s3://bucket-x/data/: cannot reach "
            "http://127.0.0.1:9; check spec.storage.endpoint",
            id="unreachable-s3",
        ),
    ],
)
def test_storage_problems_fail_before_training(tmp_path, spec, code, message):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    spec = json.loads(json.dumps(spec).replace("{tmp}", str(tmp_path)))
    spec.setdefault("output", {"uri": f"file://{tmp_path}/out"})

    result = _difftrain_run(
        tmp_path,
        _manifest(tmp_path, spec),
        env={"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b", "AWS_MAX_ATTEMPTS": "2"},
    )

    assert result.returncode == code, result.stdout + result.stderr
    assert message.replace("{tmp}", str(tmp_path)) in result.stderr
    assert "step 1/" not in result.stdout
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_python_m_difftrain_is_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "difftrain", "--version"], capture_output=True, text=True
    )

    assert result.returncode == 0 and result.stdout.startswith("difftrain ")


def test_the_operator_without_credentials_says_what_is_missing(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_SERVICE")}
    env["KUBECONFIG"] = str(tmp_path / "missing-kubeconfig")
    result = subprocess.run(
        [sys.executable, "-m", "difftrain", "operator"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"difftrain operator: no Kubernetes credentials: not in a pod with a service account "
        f"(KUBERNETES_SERVICE_HOST is not set), and the kubeconfig {tmp_path}/missing-kubeconfig "
        "cannot be used (Invalid kube-config file. No configuration found.); set KUBECONFIG "
        "to a kubeconfig file, or run the operator in the cluster"
    ]
