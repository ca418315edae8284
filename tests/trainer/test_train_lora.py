"""LoRA training end to end: model and data from S3, outputs to S3, and artifacts that
load where users load them."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from difftrain.errors import InvalidSpec
from difftrain.shapes import render
from difftrain.storage import S3Settings, open_store
from difftrain.trainer.presets import build_preset, write_preset
from tests.trainer import runner


@pytest.fixture
def s3_job(tmp_path, s3_env, bucket, shapes_folder):
    """A LoRA job reading its dataset from S3 and writing its outputs there."""
    settings = S3Settings(endpoint=s3_env.endpoint, path_style=True)
    open_store(f"s3://{bucket}/data/shapes", settings).upload_tree(shapes_folder, "")
    model = write_preset("tiny-sd", tmp_path / "tiny-sd")
    open_store(f"s3://{bucket}/models/tiny-sd", settings).upload_tree(model, "")
    spec = {
        "model": {"base": f"s3://{bucket}/models/tiny-sd"},
        "dataset": {"uri": f"s3://{bucket}/data/shapes"},
        "output": {"uri": f"s3://{bucket}/runs/lora"},
        "storage": {
            "endpoint": s3_env.endpoint,
            "pathStyle": True,
            "secretRef": {"name": "team-s3-keys"},
        },
        "resources": {"serviceAccountName": "team-robot"},
        "lora": {"rank": 4},
        "checkpoints": {"everySteps": 4},
    }
    return runner.write_config(tmp_path, spec, name="lora-s3"), open_store(
        f"s3://{bucket}/runs/lora", settings
    )


def test_lora_from_s3_exports_loadable_weights(tmp_path, trainer_cache, s3_job, s3_env, bucket):
    config, output = s3_job

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 0, log
    # What a shared model must not tell: where the team's storage is (endpoint, bucket),
    # its Secret, its ServiceAccount. Checkpoints stay in the cluster; the rest is scanned.
    private = [s3_env.endpoint.split("://")[1], bucket, "team-s3-keys", "team-robot"]
    stored = output.keys()
    exported = [k for k in stored if not k.startswith("checkpoints/")]
    found = {
        (k, word) for k in exported for word in private if word.encode() in output.read_bytes(k)
    }
    assert found == set()
    # The credentials (from the environment, as secretKeyRef puts them) are nowhere else:
    # not in the config, the log, or any object the run wrote.
    keys, written = s3_env.admin, output.keys()
    for secret in (keys.secret_access_key, keys.access_key_id):
        assert secret not in config.read_text() and secret not in log
        assert not [k for k in written if secret.encode() in output.read_bytes(k)]
    assert output.keys() == [
        "checkpoints/step-00000004/COMPLETE",
        "checkpoints/step-00000004/optimizer.pt",
        "checkpoints/step-00000004/position.json",
        "checkpoints/step-00000004/rng-0.pt",
        "checkpoints/step-00000004/run.json",
        "checkpoints/step-00000004/scheduler.pt",
        "checkpoints/step-00000004/trainable.safetensors",
        "checkpoints/step-00000006/COMPLETE",
        "checkpoints/step-00000006/optimizer.pt",
        "checkpoints/step-00000006/position.json",
        "checkpoints/step-00000006/rng-0.pt",
        "checkpoints/step-00000006/run.json",
        "checkpoints/step-00000006/scheduler.pt",
        "checkpoints/step-00000006/trainable.safetensors",
        "loss.png",
        "metrics.jsonl",
        "model/README.md",
        "model/difftrain.json",
        "model/lora-s3.safetensors",
        "model/pytorch_lora_weights.safetensors",
    ]
    model = tmp_path / "model"
    output.download_tree("model", model, unsafe_error=InvalidSpec)
    record = json.loads((model / "difftrain.json").read_text())
    assert (record["steps"], record["images"], record["name"]) == (6, 32, "lora-s3")
    assert record["spec"]["model"]["base"] == "s3://redacted/models/tiny-sd"
    assert "storage" not in record["spec"]
    losses = [json.loads(line) for line in output.read_bytes("metrics.jsonl").splitlines()]
    assert [entry["step"] for entry in losses] == [1, 2, 3, 4, 5, 6]
    # On a CPU: the process's resident memory, at least what the loaded model takes.
    assert all(0 < e["memoryBytes"] <= e["peakMemoryBytes"] for e in losses)
    assert losses[-1]["peakMemoryBytes"] > 100 * 2**20
    card = (model / "README.md").read_text()
    assert "| Method | lora |" in card and "| LoRA rank / alpha | 4 / 4 |" in card

    pipeline = build_preset("tiny-sd")
    before = _sample(pipeline)
    pipeline.load_lora_weights(model)
    after = _sample(pipeline)
    assert (after - before).abs().max() > 1e-3


def _sample(pipeline) -> torch.Tensor:
    images = pipeline(
        "a red circle on a white background",
        num_inference_steps=3,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    return images


def test_kohya_file_has_one_triple_per_adapted_layer(tmp_path, trainer_cache, shapes_folder):
    config = runner.write_config(
        tmp_path,
        {
            "dataset": {"uri": f"file://{shapes_folder}"},
            "output": {"uri": f"file://{tmp_path}/out"},
            "lora": {"rank": 4, "alpha": 8},
            "training": {"steps": 2, "mixedPrecision": "bf16"},
        },
        name="kohya",
    )

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 0, log
    assert "the frozen base under the adapters: " in log and "in torch.bfloat16" in log
    kohya = load_file(tmp_path / "out" / "model" / "kohya.safetensors")
    unet = build_preset("tiny-sd").unet
    adapted = [
        name
        for name, _ in unet.named_modules()
        if name.split(".")[-1] in ("to_q", "to_k", "to_v") or name.endswith("to_out.0")
    ]
    expected = {
        f"lora_unet_{name.replace('.', '_')}.{part}"
        for name in adapted
        for part in ("lora_down.weight", "lora_up.weight", "alpha")
    }
    assert set(kohya) == expected
    alphas = {float(v) for k, v in kohya.items() if k.endswith(".alpha")}
    assert alphas == {8.0}
    assert kohya[next(k for k in kohya if k.endswith("lora_down.weight"))].shape[0] == 4
    pipeline = build_preset("tiny-sd")
    pipeline.load_lora_weights(tmp_path / "out" / "model")
    loaded = next(iter(pipeline.unet.peft_config.values()))
    assert (loaded.r, loaded.lora_alpha) == (4, 8)


def test_tiny_sdxl_lora_with_buckets_runs_end_to_end(tmp_path, trainer_cache, shapes_folder):
    mixed = shutil.copytree(shapes_folder, tmp_path / "mixed")
    for index, size in enumerate([(48, 24)] * 8 + [(24, 48)] * 8):
        image, caption = render(index, 48)
        image.resize(size).save(mixed / "images" / f"wide{index}.png")
        (mixed / "captions" / f"wide{index}.txt").write_text(caption)
    config = runner.write_config(
        tmp_path,
        {
            "model": {"base": "preset:tiny-sdxl"},
            "dataset": {
                "uri": f"file://{mixed}",
                "bucketing": {"enabled": True, "minResolution": 16, "maxResolution": 64, "step": 8},
            },
            "output": {"uri": f"file://{tmp_path}/out"},
            "lora": {"rank": 4, "trainTextEncoder": True},
            "training": {"steps": 4, "gradientCheckpointing": True},
        },
    )

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 0, log
    assert "48 images at 32x32 (32), 40x24 (8), 24x40 (8)" in log
    model = tmp_path / "out" / "model"
    pipeline = build_preset("tiny-sdxl")
    before = _sample(pipeline)
    pipeline.load_lora_weights(model)
    assert (_sample(pipeline) - before).abs().max() > 1e-4
    keys = load_file(model / "test-job.safetensors")
    assert {k.split("_", 2)[1] for k in keys} == {"unet", "te1", "te2"}


def test_gradient_accumulation_counts_optimizer_steps(tmp_path, trainer_cache, shapes_folder):
    config = runner.write_config(
        tmp_path,
        {
            "dataset": {"uri": f"file://{shapes_folder}"},
            "output": {"uri": f"file://{tmp_path}/out"},
            "training": {"steps": 3, "batchSize": 2, "gradientAccumulationSteps": 3},
        },
    )

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 0, log
    position = tmp_path / "out" / "checkpoints" / "step-00000003" / "position.json"
    assert json.loads(position.read_text()) == {"step": 3, "epoch": 0, "batch": 9}
    steps = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in steps] == [1, 2, 3]


@pytest.mark.parametrize("dora", [False, True])
def test_the_frozen_base_is_held_in_the_training_precision_under_fp32_adapters(dora):
    from peft import LoraConfig

    from difftrain.trainer.stages import hold_frozen

    unet = build_preset("tiny-sd").unet
    unet.requires_grad_(False)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    unet.add_adapter(
        LoraConfig(r=4, init_lora_weights="gaussian", use_dora=dora, target_modules=targets)
    )
    full = sum(p.numel() * 4 for p in unet.parameters() if not p.requires_grad)

    held = hold_frozen(unet, torch.bfloat16)

    assert held == full // 2
    trained = {p.dtype for p in unet.parameters() if p.requires_grad}
    frozen = {p.dtype for p in unet.parameters() if not p.requires_grad}
    assert (trained, frozen) == ({torch.float32}, {torch.bfloat16})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 77, 32))
    out.sample.float().square().mean().backward()
    grads = [p.grad for p in unet.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert hold_frozen(unet, torch.float32) == 0  # fp32 training keeps the base as it is
