"""spec.output.registry: a finished job logs its run to a real MLflow tracking server
(artifacts on the local S3 server) and registers a model version; a retried attempt does
not register twice; a server that is down fails the job retryably with the model saved."""

import json

import pytest

from difftrain.local import free_port
from difftrain.trainer import modelregistry
from tests.mlflow_server import start_mlflow_server
from tests.trainer import runner

MODEL_NAME = "shapes-lora"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, s3_server):
    bucket = s3_server.create_bucket("mlflow-artifacts")
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow"), s3_server, bucket)
    yield server
    server.stop()


def _spec(tmp_path, shapes_folder, tracking_uri: str) -> dict:
    return {
        "dataset": {"uri": f"file://{shapes_folder}"},
        "lora": {"rank": 4},
        "output": {
            "uri": f"file://{tmp_path}/out",
            "registry": {"mlflow": {"trackingUri": tracking_uri, "modelName": MODEL_NAME}},
        },
        "training": {"steps": 2},
        "validation": {"prompts": ["a red circle"], "everySteps": 2, "inferenceSteps": 2},
    }


def _reason(tmp_path) -> dict:
    return json.loads((tmp_path / "termination-log").read_text())


def test_a_finished_job_registers_one_version_with_its_run(
    tmp_path, trainer_cache, shapes_folder, mlflow_server
):
    from mlflow import MlflowClient

    spec = _spec(tmp_path, shapes_folder, mlflow_server.uri)
    config = runner.write_config(tmp_path, spec, name="registered", uid="uid-1")

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 0, log
    said = _reason(tmp_path)
    assert said["reason"] == "Succeeded" and said["outputs"] == {"registryVersion": "1"}
    record = json.loads((tmp_path / "out" / "model" / "registry.json").read_text())
    assert record["mlflow"]["version"] == "1"
    client = MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)
    version = client.get_model_version(MODEL_NAME, "1")
    assert version.tags["difftrain.job"] == "registered"
    assert version.tags["difftrain.uid"] == "uid-1"
    assert len(version.tags["difftrain.specHash"]) == 64
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["method"] == "lora"
    assert run.data.params["lora.rank"] == "4"
    assert "storage" not in {key.split(".")[0] for key in run.data.params}
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    model = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/pytorch_lora_weights.safetensors", "model/README.md"} <= model
    assert "model/difftrain.json" in model
    samples = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert "samples/grid.png" in samples
    # A retried attempt of the same job (same uid and spec) finds its version.
    code, log = runner.run(config, tmp_path, trainer_cache)
    assert code == 0, log
    assert _reason(tmp_path)["outputs"] == {"registryVersion": "1"}
    assert len(client.search_model_versions(f"name='{MODEL_NAME}'")) == 1


def test_a_registry_that_is_down_fails_retryably_and_keeps_the_model(
    tmp_path, trainer_cache, shapes_folder
):
    down = f"http://127.0.0.1:{free_port()}"
    config = runner.write_config(tmp_path, _spec(tmp_path, shapes_folder, down), uid="uid-2")

    code, log = runner.run(
        config, tmp_path, trainer_cache, {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    )

    assert code == 1, log
    said = _reason(tmp_path)
    assert said["reason"] == "RegistryUnavailable"
    assert said["message"].startswith(
        f"spec.output.registry.mlflow: cannot register the model at {down} ("
    )
    assert said["message"].endswith("the model is saved in the output, and a retry registers it")
    model = tmp_path / "out" / "model"
    assert (model / "difftrain.json").is_file()
    assert (model / "pytorch_lora_weights.safetensors").is_file()


def test_a_registry_that_refuses_the_credentials_names_the_secret(
    tmp_path, tmp_path_factory, trainer_cache, shapes_folder, s3_server
):
    """A server that asks for logins (MLflow's basic-auth app) and a job that has none."""
    bucket = s3_server.create_bucket("mlflow-locked")
    folder = tmp_path_factory.mktemp("mlflow-locked")
    server = start_mlflow_server(folder, s3_server, bucket, "--app-name", "basic-auth")
    try:
        spec = _spec(tmp_path, shapes_folder, server.uri)
        config = runner.write_config(tmp_path, spec, uid="uid-3")
        code, log = runner.run(config, tmp_path, trainer_cache)
    finally:
        server.stop()

    assert code == 2, log
    said = _reason(tmp_path)
    assert said["reason"] == "InvalidSpec"
    assert said["message"].startswith(
        f"spec.output.registry.mlflow: {server.uri} refused the credentials (Secret none "
        "set, keys MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD)"
    )
    assert (tmp_path / "out" / "model" / "difftrain.json").is_file()  # the model is kept


def test_metrics_and_scores_become_mlflow_points():
    lines = [
        json.dumps({"step": 1, "loss": 0.5, "lr": 1e-4}),
        json.dumps({"step": 2, "evaluation": {"step": 2, "fid": 12.5, "clipScore": None}}),
        json.dumps({"step": 3, "loss": float("nan")}),
    ]

    assert modelregistry.curve(lines) == [
        ("loss", 0.5, 1),
        ("lr", 1e-4, 1),
        ("eval_fid", 12.5, 2),
    ]
    assert modelregistry.flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {
        "a.b": "1",
        "a.c": "[1, 2]",
        "d": "x",
    }
