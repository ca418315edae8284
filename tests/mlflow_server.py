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


def _auth_config(folder: Path) -> Path:
    """The basic-auth app's settings: its users' database in ``folder``."""
    path = folder / "basic_auth.ini"
    path.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{folder}/basic_auth.db\n"
        "admin_username = admin\n"
        "admin_password = difftrain-tests-admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    return path


def start_mlflow_server(folder: Path, s3_server, bucket: str, *extra: str) -> MlflowServer:
    """The server, with ``extra`` arguments (``--app-name basic-auth`` asks for logins)."""
    port = free_port()
    env = {
        **os.environ,
        **s3_server.admin.env(),
        "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        # The basic-auth app's CSRF protection signs with it; a test server needs no secret.
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "difftrain-tests",
        # Its users' database, beside the tracking one (the default is the working folder).
        "MLFLOW_AUTH_CONFIG_PATH": str(_auth_config(folder)),
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
        *extra,
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
