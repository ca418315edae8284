"""A real MLflow tracking server for tests: its own process on 127.0.0.1, runs and the
registry in SQLite, artifacts on the local S3 server (served through the tracking server,
so clients need no S3 credentials of their own)."""

import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from difftrain.local import free_port

STARTUP_SECONDS = 120


@dataclass
class MlflowServer:
    uri: str
    process: subprocess.Popen

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_mlflow_server(folder: Path, s3_server, bucket: str) -> MlflowServer:
    port = free_port()
    env = {
        **os.environ,
        **s3_server.admin.env(),
        "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{folder}/mlflow.db",
        "--artifacts-destination",
        f"s3://{bucket}/mlflow",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = (folder / "mlflow-server.log").open("w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"mlflow server exited: {(folder / 'mlflow-server.log').read_text()[-2000:]}"
            )
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                if answer.status == 200:
                    return MlflowServer(uri, process)
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"mlflow server did not answer on {uri} in {STARTUP_SECONDS} s")
