"""A finished model as a version in MLflow's model registry (``spec.output.registry``).

After the model is in the job's output, the main process logs one MLflow run: the spec
as parameters (as ``difftrain.json`` keeps it: no storage, no Secrets, no hosts), the loss
curve and the evaluation scores as metrics, and the model card, the latest samples and the
exported files as artifacts. It then registers the run's ``model`` folder as a new version
of ``modelName``, tagged with the job's name, uid and spec hash, and writes
``model/registry.json`` beside the model.

A retried attempt finds the version its job registered before (by the uid and spec hash
tags) instead of adding another. A server that cannot be reached, or that fails, raises
:class:`RegistryUnavailable` (retryable) after the model is safe in the output; one that
refuses the credentials raises InvalidSpec naming the Secret.
"""

import json
import logging
import os
import tempfile
import time
from pathlib import Path

from difftrain import contract
from difftrain.errors import InvalidSpec, RegistryUnavailable

log = logging.getLogger(__name__)

RECORD = "registry.json"
# MLflow's limits: values of a parameter, and entries of one log_batch request.
_PARAM_LENGTH = 6000
_BATCH_PARAMS, _BATCH_METRICS = 100, 1000
_REFUSED = (401, 403)


def flatten(value, prefix: str = "") -> dict[str, str]:
    """A nested spec as {dotted.path: text}; lists as JSON."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    text = json.dumps(value) if isinstance(value, list) else str(value)
    return {prefix.rstrip("."): text[:_PARAM_LENGTH]}


def curve(lines: list[str]) -> list[tuple[str, float, int]]:
    """(metric, value, step) from metrics.jsonl: the logged training values and each
    evaluation's scores (``eval_fid``, ``eval_clip_score``, ``validation_loss``)."""
    points = []
    for line in lines:
        if not line.strip():
            continue
        entry = json.loads(line)
        step = int(entry.get("step", 0))
        scores = entry.get("evaluation")
        if scores is None:
            values = {k: v for k, v in entry.items() if k != "step"}
        else:
            gauges = contract.SCORE_GAUGES
            values = {gauges[k]: v for k, v in scores.items() if k in gauges}
        for key, value in values.items():
            if isinstance(value, int | float) and value == value:  # numbers, not NaN
                points.append((key, float(value), step))
    return points


def _error(settings, error: Exception) -> Exception:
    """The job's error for a failed request to the tracking server."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    said = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
    code = getattr(error, "error_code", "")
    if status in _REFUSED or code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
        secret = settings.secret_ref or "none set"
        return InvalidSpec(
            f"spec.output.registry.mlflow: {settings.tracking_uri} refused the credentials "
            f"(Secret {secret}, keys {', '.join(contract.MLFLOW_CREDENTIALS)}): {said}"
        )
    return RegistryUnavailable(
        f"spec.output.registry.mlflow: cannot register the model at {settings.tracking_uri} "
        f"({said}); the model is saved in the output, and a retry registers it"
    )


class Publisher:
    """One job's run and model version on the tracking server of ``settings``."""

    def __init__(self, settings, config, spec_hash: str):
        from mlflow import MlflowClient

        self.settings, self.config, self.spec_hash = settings, config, spec_hash
        # Fail within minutes, not the client's default hour of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        uri = settings.tracking_uri
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def tags(self) -> dict[str, str]:
        config = self.config
        return {
            "difftrain.job": config.name,
            "difftrain.namespace": config.namespace or "",
            "difftrain.uid": config.uid or "",
            "difftrain.specHash": self.spec_hash,
        }

    def existing(self):
        """The version this job registered in an earlier attempt, if any."""
        name = self.settings.model_name
        uid, digest = self.config.uid or "", self.spec_hash
        query = f"name='{name}' and tags.`difftrain.specHash`='{digest}'"
        for version in self.client.search_model_versions(query):
            if version.tags.get("difftrain.uid", "") == uid and uid:
                return version
        return None

    def log_run(self, params: dict, points: list, artifacts: dict[str, Path]) -> str:
        """A finished run with ``params``, metric ``points`` and ``artifacts`` (folders or
        files by artifact path); its id."""
        from mlflow.entities import Metric, Param, RunTag

        client, settings = self.client, self.settings
        found = client.get_experiment_by_name(settings.experiment)
        experiment = found.experiment_id if found else client.create_experiment(settings.experiment)
        run = client.create_run(experiment, run_name=self.config.name)
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        tags = [RunTag(k, v) for k, v in self.tags().items()]
        pairs = [Param(k, v) for k, v in params.items()]
        for start in range(0, max(len(pairs), 1), _BATCH_PARAMS):
            batch = pairs[start : start + _BATCH_PARAMS]
            client.log_batch(run_id, params=batch, tags=tags if start == 0 else [])
        metrics = [Metric(key, value, now, step) for key, value, step in points]
        for start in range(0, len(metrics), _BATCH_METRICS):
            client.log_batch(run_id, metrics=metrics[start : start + _BATCH_METRICS])
        for where, path in artifacts.items():
            if path.is_dir():
                client.log_artifacts(run_id, str(path), where or None)
            else:
                client.log_artifact(run_id, str(path), where or None)
        client.set_terminated(run_id)
        return run_id

    def register(self, run_id: str):
        """A new version of the model: the run's ``model`` folder."""
        from mlflow.exceptions import MlflowException

        client, name = self.client, self.settings.model_name
        try:
            client.create_registered_model(name)
        except MlflowException as error:
            if getattr(error, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{client.get_run(run_id).info.artifact_uri}/{contract.MODEL}"
        return client.create_model_version(name, source, run_id=run_id, tags=self.tags())


def publish(stage, folder: Path, spec: dict, spec_hash: str) -> dict:
    """Log the job's run and register its model (the exported files in ``folder``);
    writes and returns ``model/registry.json``'s content."""
    settings = stage.config.spec.output.registry.mlflow
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise InvalidSpec(
            "spec.output.registry.mlflow: this trainer image has no MLflow client; install "
            "difftrain with its trainer extra (it brings mlflow-skinny)"
        ) from None
    try:
        publisher = Publisher(settings, stage.config, spec_hash)
        version = publisher.existing()
        if version is None:
            with tempfile.TemporaryDirectory(prefix="difftrain-registry-") as work:
                artifacts = _artifacts(stage, folder, Path(work))
                points = curve(_metrics_lines(stage))
                run_id = publisher.log_run(flatten(spec), points, artifacts)
            version = publisher.register(run_id)
    except (InvalidSpec, RegistryUnavailable):
        raise
    except Exception as error:  # the client's own errors, and the connection's
        raise _error(settings, error) from None
    record = {
        "mlflow": {
            "trackingUri": settings.tracking_uri,
            "modelName": settings.model_name,
            "version": str(version.version),
            "runId": version.run_id,
        }
    }
    stage.output.child(contract.MODEL).write_bytes(RECORD, json.dumps(record, indent=2).encode())
    log.info("registered %s version %s", settings.model_name, version.version)
    return record


def _metrics_lines(stage) -> list[str]:
    local = stage.scratch / contract.METRICS_FILE
    if local.is_file():
        return local.read_text().splitlines()
    if stage.output.exists(contract.METRICS_FILE):
        return stage.output.read_bytes(contract.METRICS_FILE).decode().splitlines()
    return []


def _artifacts(stage, folder: Path, work: Path) -> dict[str, Path]:
    """What the run keeps: the exported files (the model card among them), and the
    latest validation samples."""
    artifacts = {contract.MODEL: folder}
    keys = stage.output.keys(contract.SAMPLES)
    steps = contract.sample_steps(keys)
    if steps:
        latest = contract.samples_prefix(steps[-1]) + "/"
        target = work / contract.SAMPLES
        for key in keys:
            if key.startswith(latest) and "/" not in key.removeprefix(latest):
                stage.output.download(key, target / key.removeprefix(latest))
        artifacts[contract.SAMPLES] = target
    return artifacts
