"""`difftrain operator` as users run it: a process with a kubeconfig, metrics and a
liveness endpoint."""

import asyncio
import subprocess
import sys
import urllib.request

import pytest
import yaml

from difftrain.local import free_port
from tests.operator.conftest import eventually
from tests.operator.test_operator import DTJ, _get, create

pytestmark = pytest.mark.asyncio


def _fetch(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.read().decode()
    except OSError:
        return None


async def test_operator_command_reconciles_and_serves_metrics(k8s, tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": str(k8s.url).rstrip("/")}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        "users": [{"name": "test", "user": {"token": "test-token"}}],
    }))  # fmt: skip
    metrics, health = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "difftrain.cli", "operator", "--resync-seconds", "1",
         "--metrics-port", str(metrics), "--health-port", str(health)],
        env={"KUBECONFIG": str(kubeconfig), "PATH": "/usr/bin:/bin",
             "DIFFTRAIN_TRAINER_IMAGE": "registry.example/trainer:7"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        await eventually(lambda: _fetch(f"http://127.0.0.1:{health}/healthz"), 30)
        await create(k8s)

        trainer = await eventually(lambda: _get(k8s, "batch/v1/jobs", "demo-a1"), 30)
        await eventually(lambda: (_get(k8s, DTJ, "demo") or {}).get("status"), 10)
        text = await eventually(
            lambda: (t := _fetch(f"http://127.0.0.1:{metrics}/metrics"))
            and 'difftrain_operator_jobs{namespace="ml",phase="Pending"} 1.0' in t and t, 10,
        )  # fmt: skip
    finally:
        process.terminate()
        output, _ = await asyncio.to_thread(process.communicate, timeout=30)

    image = trainer["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "registry.example/trainer:7", output
    assert "difftrain_operator_reconcile_duration_seconds_count" in text
    assert "difftrain_operator_restarts_total 0.0" in text
