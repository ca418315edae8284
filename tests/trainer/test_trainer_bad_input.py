"""Bad input to the trainer: the contract's exit code, and a message naming what to fix,
in the log and in the termination log the operator reads."""

import http.server
import json
import shutil
import subprocess
import sys
import threading
import typing

import pytest

from difftrain.local import free_port
from difftrain.storage import S3Settings, open_store
from difftrain.trainer.presets import write_preset
from tests.trainer import runner


@pytest.fixture
def dataset(tmp_path, shapes_folder):
    """A writable copy of the small shapes dataset."""
    return shutil.copytree(shapes_folder, tmp_path / "data")


def _run(tmp_path, cache, spec, extra_env=None):
    spec = {"output": {"uri": f"file://{tmp_path}/out"}, **spec}
    config = runner.write_config(tmp_path, spec)
    code, log = runner.run(config, tmp_path, cache, extra_env)
    termination = tmp_path / "termination-log"
    reason = json.loads(termination.read_text()) if termination.exists() else None
    return code, log, reason


def test_a_few_corrupt_images_are_skipped_and_named(tmp_path, trainer_cache, dataset):
    (dataset / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (dataset / "captions" / "broken.txt").write_text("a broken file")

    code, log, reason = _run(tmp_path, trainer_cache, {"dataset": {"uri": f"file://{dataset}"}})

    assert (code, reason) == (0, None), log
    assert f"skipping unreadable image {dataset}/images/broken.png" in log


def test_too_many_corrupt_images_fail_with_dataset_error(tmp_path, trainer_cache, dataset):
    (dataset / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    spec = {"dataset": {"uri": f"file://{dataset}", "maxSkippedFraction": 0.0}}

    code, log, reason = _run(tmp_path, trainer_cache, spec)

    assert code == 3, log
    assert reason == {
        "reason": "DatasetError",
        "message": "1 of 33 images cannot be read, more than spec.dataset.maxSkippedFraction "
        "(0.0); e.g. broken.jpg",
    }
    assert not (tmp_path / "out").exists()


def test_missing_caption_is_a_warning(tmp_path, trainer_cache, dataset):
    (dataset / "captions" / "000003.txt").unlink()

    code, log, _ = _run(tmp_path, trainer_cache, {"dataset": {"uri": f"file://{dataset}"}})

    assert code == 0, log
    assert "no caption for images/000003.png (expected captions/000003.txt)" in log


def test_empty_dataset(tmp_path, trainer_cache):
    (tmp_path / "empty" / "images").mkdir(parents=True)

    code, log, reason = _run(
        tmp_path, trainer_cache, {"dataset": {"uri": f"file://{tmp_path}/empty"}}
    )

    assert code == 3, log
    assert reason["message"].startswith("the dataset has no images")


def test_dataset_smaller_than_a_batch(tmp_path, trainer_cache, dataset):
    spec = {"dataset": {"uri": f"file://{dataset}"}, "training": {"batchSize": 64}}

    code, log, reason = _run(tmp_path, trainer_cache, spec)

    assert code == 3, log
    assert "fewer than one batch for each of 1 processes" in reason["message"]


def test_wrong_credentials(tmp_path, trainer_cache, s3_env, bucket):
    secret = "wrong-secret-never-shown"
    spec = {
        "dataset": {"uri": f"s3://{bucket}/data"},
        "storage": {"endpoint": s3_env.endpoint},
    }
    env = {"AWS_ACCESS_KEY_ID": "AKIAWRONG", "AWS_SECRET_ACCESS_KEY": secret}

    code, log, reason = _run(tmp_path, trainer_cache, spec, env)

    assert code == 4, log
    assert reason["reason"] == "StorageAccessDenied"
    assert reason["message"].startswith(f"list s3://{bucket}/data/: access denied")
    assert secret not in log and "AKIAWRONG" not in log


def test_missing_bucket(tmp_path, trainer_cache, s3_env):
    spec = {
        "dataset": {"uri": "s3://no-such-bucket/data"},
        "storage": {"endpoint": s3_env.endpoint},
    }

    code, log, reason = _run(tmp_path, trainer_cache, spec)

    assert code == 4, log
    assert "bucket 'no-such-bucket' does not exist" in reason["message"]


@pytest.mark.parametrize(
    ("key", "code", "reason"),
    [
        pytest.param("data/images/../../../escaped.txt", 3, "DatasetError", id="dataset"),
        pytest.param("model/unet/../../../escaped.txt", 2, "InvalidSpec", id="model"),
    ],
)
def test_an_object_key_that_leaves_its_folder_is_refused(
    tmp_path, trainer_cache, s3_env, bucket, shapes_folder, key, code, reason
):
    settings = S3Settings(endpoint=s3_env.endpoint)
    open_store(f"s3://{bucket}/data", settings).upload_tree(shapes_folder, "")
    model = write_preset("tiny-sd", tmp_path / "tiny-sd")
    open_store(f"s3://{bucket}/model", settings).upload_tree(model, "")
    s3_env.client().put_object(Bucket=bucket, Key=key, Body=b"x")
    spec = {
        "model": {"base": f"s3://{bucket}/model"},
        "dataset": {"uri": f"s3://{bucket}/data"},
        "storage": {"endpoint": s3_env.endpoint},
    }

    exit_code, log, termination = _run(tmp_path, trainer_cache, spec)

    store, _, relative = key.partition("/")
    assert (exit_code, termination) == (
        code,
        {
            "reason": reason,
            "message": f"s3://{bucket}/{store}: the object {relative!r} would be written outside "
            "the folder it is copied into (its key has a '..' part); rename or delete it",
        },
    ), log
    assert not (trainer_cache / "escaped.txt").exists()  # where the key leads from the cache


def test_missing_base_model(tmp_path, trainer_cache, dataset):
    (tmp_path / "no-model").mkdir()
    spec = {
        "model": {"base": f"file://{tmp_path}/no-model"},
        "dataset": {"uri": f"file://{dataset}"},
    }

    code, log, reason = _run(tmp_path, trainer_cache, spec)

    assert code == 2, log
    assert reason == {
        "reason": "InvalidSpec",
        "message": f"spec.model.base: no diffusers model at file://{tmp_path}/no-model "
        "(model_index.json not found); point it at a folder written by "
        "DiffusionPipeline.save_pretrained",
    }


def test_hub_model_offline(tmp_path, trainer_cache, dataset):
    spec = {"model": {"base": "hf://org/model"}, "dataset": {"uri": f"file://{dataset}"}}

    code, log, reason = _run(tmp_path, trainer_cache, spec, {"HF_HUB_OFFLINE": "1"})

    assert code == 1, log
    assert reason["message"].startswith(
        "cannot download hf://org/model: the Hugging Face Hub is not reachable from here"
    )


class _Hub(http.server.BaseHTTPRequestHandler):
    """The Hub's answers, as the repository's name asks: org/status-429 answers 429."""

    tokens: typing.ClassVar[list] = []

    def do_GET(self):
        _Hub.tokens.append(self.headers.get("authorization"))
        code = int(self.path.split("status-")[1].split("/")[0]) if "status-" in self.path else 404
        body = b'{"error": "as asked"}'
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *_):
        pass


@pytest.fixture
def hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Hub.tokens = []
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=5)


def test_the_hubs_refusals_are_permanent_and_its_rate_limits_retryable(
    tmp_path, trainer_cache, dataset, hub
):
    token = "hf_never_in_the_log_0123456789"
    runs = []
    for status in (401, 404, 429, 503):
        folder = tmp_path / str(status)
        folder.mkdir()
        spec = {
            "model": {"base": f"hf://org/status-{status}"},
            "dataset": {"uri": f"file://{dataset}"},
            "output": {"uri": f"file://{folder}/out"},
        }
        env = {"HF_ENDPOINT": hub, "HF_TOKEN": token, "HF_HUB_DISABLE_TELEMETRY": "1"}
        runs.append((runner.write_config(folder, spec), folder, trainer_cache, env))

    results = runner.run_together(runs)

    said = [json.loads((folder / "termination-log").read_text()) for _, folder, _, _ in runs]
    assert [code for code, _ in results] == [2, 2, 1, 1], results
    assert [s["reason"] for s in said] == [
        "InvalidSpec",
        "InvalidSpec",
        "StorageUnavailable",
        "StorageUnavailable",
    ]
    assert said[0]["message"].startswith(
        "spec.model.base: hf://org/status-401 is not readable (401): the token in spec.storage"
    )
    assert "does not exist on the Hub" in said[1]["message"]
    assert said[2]["message"].startswith(
        "the Hugging Face Hub answered 429 for hf://org/status-429"
    )
    assert f"Bearer {token}" in _Hub.tokens  # the Secret's token reaches the Hub...
    assert not [log for _, log in results if token in log]  # ...and no log
    assert not [s for s in said if token in s["message"]]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        pytest.param(
            {
                "method": "finetune",
                "model": {"base": "preset:tiny-sd3"},
                "output": {"formats": ["singleFile"]},
            },
            "spec.output.formats: singleFile is written for SD 1.x/2.x and SDXL models (the "
            "layout ComfyUI and A1111 load); this is a sd3 model: use diffusers",
            id="single-file-sd3",
        ),
        pytest.param(
            {"lora": {"rank": 4}, "training": {"strategy": "fsdp"}},
            "spec.training.strategy: fsdp shards a denoiser that trains whole; use it with "
            "method finetune, or dreambooth with unet full and without trainTextEncoder",
            id="fsdp-lora",
        ),
        pytest.param(
            {
                "method": "dreambooth",
                "dreambooth": {
                    "instancePrompt": "a sks shape",
                    "unet": "full",
                    "trainTextEncoder": True,
                },
                "training": {"strategy": "fsdp"},
            },
            "spec.training.strategy: fsdp shards a denoiser that trains whole;",
            id="fsdp-text-encoders",
        ),
        pytest.param(
            {"method": "finetune", "training": {"strategy": "fsdp", "mixedPrecision": "fp16"}},
            "spec.training.mixedPrecision: fp16 needs a loss scaler, which sharded training "
            "does not keep in this trainer version; use bf16 (or no) with strategy fsdp",
            id="fsdp-fp16",
        ),
        pytest.param(
            {"lora": {"targetModules": ["no_such_layer"]}},
            "spec.lora.targetModules: ",
            id="lora-targets",
        ),
        pytest.param(
            {"training": {"flowMatching": {"shift": 1.0}}},
            "spec.training.flowMatching.shift: shifts the sigmas of flow-matching models (SD3, "
            "Flux); sd models learn by denoising over their DDPM schedule; remove it",
            id="flow-shift-unet",
        ),
    ],
)
def test_unsupported_settings_fail_before_training(tmp_path, trainer_cache, dataset, spec, message):
    spec = {"dataset": {"uri": f"file://{dataset}"}, **spec}

    code, log, reason = _run(tmp_path, trainer_cache, spec)

    assert code == 2, log
    assert reason["message"].startswith(message)
    assert "step 1/" not in log


def test_invalid_config_file(tmp_path, trainer_cache):
    config = tmp_path / "job.json"
    config.write_text(json.dumps({"name": "x", "spec": {"method": "lora"}}))

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 2, log
    reason = json.loads((tmp_path / "termination-log").read_text())
    assert reason["message"].startswith(f"{config}: spec.model: required field is missing")


def test_missing_config_variable(tmp_path, trainer_cache):
    code, log = runner.run(tmp_path / "job.json", tmp_path, trainer_cache, {"DIFFTRAIN_CONFIG": ""})

    assert code == 2
    assert "DIFFTRAIN_CONFIG is not set" in log


def test_pod_entry_point_keeps_the_trainers_exit_code(tmp_path, trainer_cache):
    """torchrun alone exits 1 for any failed worker; the pods' launcher passes 3 through."""
    (tmp_path / "empty").mkdir()
    config = runner.write_config(
        tmp_path,
        {
            "dataset": {"uri": f"file://{tmp_path}/empty"},
            "output": {"uri": f"file://{tmp_path}/out"},
        },
    )
    env = runner.trainer_env(
        config,
        tmp_path,
        trainer_cache,
        {
            "PET_NNODES": "1",
            "PET_NPROC_PER_NODE": "1",
            "PET_NODE_RANK": "0",
            "PET_MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_PORT": str(free_port()),
        },
    )

    result = subprocess.run(
        [sys.executable, "-m", "difftrain.launch"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 3, result.stdout + result.stderr
    reason = json.loads((tmp_path / "termination-log").read_text())
    assert reason["reason"] == "DatasetError"
