"""Method full: a new model from random weights, the VAE first (its own stage), then the
UNet and text encoders; the exported pipeline is complete and loads on its own."""

import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from difftrain.api.data import ModelSpec
from difftrain.errors import InvalidSpec
from difftrain.storage import S3Settings
from difftrain.trainer.models import fetch_model, new_components
from difftrain.trainer.presets import write_preset
from tests.builders import merge
from tests.trainer import runner

PROMPTS = ["a red circle on a white background", "a blue square on a black background"]


def _spec(shapes_folder, output, **extra):
    spec = {
        "method": "full",
        "full": {"autoencoder": {"steps": 4, "learningRate": 1e-3}},
        "dataset": {"uri": f"file://{shapes_folder}"},
        "output": {"uri": f"file://{output}", "dtype": "fp32"},
        "training": {"steps": 6, "batchSize": 4},
        "validation": {"prompts": PROMPTS, "everySteps": 4, "inferenceSteps": 2},
    }
    return merge(spec, extra)


def _tensors(folder):
    return load_file(next(folder.glob("*.safetensors")))


def test_full_trains_autoencoder_then_model_and_exports_a_pipeline(
    tmp_path, trainer_cache, shapes_folder
):
    output = tmp_path / "out"
    config = runner.write_config(tmp_path, _spec(shapes_folder, output))

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 0, log
    assert "autoencoder step 4/4" in log and "step 6/6" in log
    stage = json.loads((output / "autoencoder" / "model" / "difftrain.json").read_text())
    assert stage["steps"] == 4 and stage["scalingFactor"] > 0
    ae_steps = [json.loads(x)["step"] for x in (output / "autoencoder" / "metrics.jsonl").open()]
    assert ae_steps == [1, 2, 3, 4]
    assert (output / "autoencoder" / "loss.png").is_file() and (output / "loss.png").is_file()
    # Samples at step 4 and of the final model, each with their index of prompts.
    for step in (4, 6):
        folder = output / "samples" / f"step-{step:08d}"
        index = json.loads((folder / "prompts.json").read_text())
        assert [entry["prompt"] for entry in index] == PROMPTS
        assert all((folder / entry["file"]).is_file() for entry in index)
        assert (folder / "grid.png").is_file()

    from diffusers import StableDiffusionPipeline

    model = output / "model"
    pipeline = StableDiffusionPipeline.from_pretrained(model)
    assert pipeline.vae.config.scaling_factor == pytest.approx(stage["scalingFactor"])
    image = pipeline(
        PROMPTS[0], num_inference_steps=2, height=32, width=32, output_type="np"
    ).images[0]
    assert image.shape == (32, 32, 3)
    # Every component is new: none keeps the preset's (random) weights.
    preset = write_preset("tiny-sd", tmp_path / "preset")
    for part in ("unet", "vae", "text_encoder"):
        base, trained = _tensors(preset / part), _tensors(model / part)
        assert base.keys() == trained.keys()
        assert any(not torch.equal(base[k], trained[k]) for k in base), part
    card = (model / "README.md").read_text()
    assert "| Method | full |" in card
    assert "| Trained from scratch | UNet, text encoders, VAE |" in card


def test_a_restart_skips_the_finished_autoencoder_stage(tmp_path, trainer_cache, shapes_folder):
    output = tmp_path / "out"
    spec = _spec(shapes_folder, output, training={"steps": 12}, checkpoints={"everySteps": 3})
    config = runner.write_config(tmp_path, spec)
    process = runner.start(config, tmp_path, trainer_cache)
    seen = []
    for line in process.stdout:
        seen.append(line)
        if "step 4/12 " in line and "autoencoder" not in line:
            process.send_signal(signal.SIGTERM)
            break
    rest, _ = process.communicate(timeout=120)
    assert process.returncode == 143, "".join(seen) + rest

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 0, log
    assert "autoencoder step" not in log
    assert "resumed from checkpoint step" in log
    assert (output / "model" / "difftrain.json").is_file()


def test_reused_components_keep_the_base_weights(tmp_path, trainer_cache, shapes_folder):
    output = tmp_path / "out"
    spec = _spec(shapes_folder, output, full={"reuse": ["vae", "textEncoders"]})
    config = runner.write_config(tmp_path, spec)

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 0, log
    assert "autoencoder" not in log
    assert not (output / "autoencoder").exists()
    preset = write_preset("tiny-sd", tmp_path / "preset")
    for part, same in (("vae", True), ("text_encoder", True), ("unet", False)):
        base, trained = _tensors(preset / part), _tensors(output / "model" / part)
        assert all(torch.equal(base[k], trained[k]) for k in base) == same, part
    card = (output / "model" / "README.md").read_text()
    assert "| Trained from scratch | UNet; vae and textEncoders from the base |" in card


SMALL_UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [16, 32],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}


def test_inline_architecture_config(tmp_path, trainer_cache, shapes_folder):
    output = tmp_path / "out"
    model = {"base": "preset:tiny-sd", "architecture": "custom", "components": {"unet": SMALL_UNET}}
    spec = _spec(shapes_folder, output, model=model, full={"reuse": ["vae"]})
    config = runner.write_config(tmp_path, spec)

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 0, log
    written = json.loads((output / "model" / "unet" / "config.json").read_text())
    assert written["block_out_channels"] == [16, 32]
    assert written["layers_per_block"] == 1


def test_full_sdxl(tmp_path, trainer_cache, shapes_folder):
    output = tmp_path / "out"
    spec = _spec(shapes_folder, output, model={"base": "preset:tiny-sdxl"})
    config = runner.write_config(tmp_path, spec)

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 0, log
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(output / "model")
    assert pipeline.text_encoder_2 is not None
    assert (output / "samples" / "step-00000006" / "grid.png").is_file()


@pytest.mark.parametrize(
    ("components", "message"),
    [
        pytest.param(
            {"unet": {**SMALL_UNET, "cross_attention_dim": 48}},
            "spec.model.components: the UNet's cross_attention_dim (48) must equal the text "
            "encoders' hidden_size (32)",
            id="cross-attention-width",
        ),
        pytest.param(
            {"unet": {**SMALL_UNET, "in_channels": 8}},
            "spec.model.components: the UNet's in_channels (8) must equal the VAE's "
            "latent_channels (4)",
            id="latent-channels",
        ),
        pytest.param(
            {"unet": {**SMALL_UNET, "up_block_types": ["UpBlock2D"]}},
            "spec.model.components.unet: cannot build a UNet2DConditionModel from it: ",
            id="unbuildable-unet",
        ),
        pytest.param(
            {"text_encoder": {"vocab_size": 10, "hidden_size": 32}},
            "spec.model.components.text_encoder: vocab_size 10 is smaller than the tokenizer's",
            id="vocabulary",
        ),
    ],
)
def test_architecture_configs_that_cannot_work_are_refused(trainer_cache, components, message):
    folder = fetch_model(ModelSpec(base="preset:tiny-sd"), S3Settings(), trainer_cache / "models")
    model = ModelSpec(base="preset:tiny-sd", components=components)

    with pytest.raises(InvalidSpec) as error:
        new_components(folder, model, reuse=[], seed=0)

    assert str(error.value).startswith(message)


def test_a_bad_architecture_fails_the_job_before_training(tmp_path, trainer_cache, shapes_folder):
    output = tmp_path / "out"
    components = {"unet": {**SMALL_UNET, "in_channels": 8}}
    spec = _spec(shapes_folder, output, model={"base": "preset:tiny-sd", "components": components})
    config = runner.write_config(tmp_path, spec)

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 2, log
    reason = json.loads((tmp_path / "termination-log").read_text())
    assert reason["message"].startswith("spec.model.components: the UNet's in_channels"), reason
    assert "step 1/" not in log
    assert not (output / "checkpoints").exists()
