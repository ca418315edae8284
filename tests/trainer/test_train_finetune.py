"""Full UNet fine-tuning: the model learns, and the exported pipeline reloads and runs."""

import json

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from difftrain.api.data import ModelSpec
from difftrain.trainer import loss
from difftrain.trainer.conditioning import token_ids
from difftrain.trainer.data import Transform, find_examples
from difftrain.trainer.models import load_components
from difftrain.trainer.presets import write_preset
from difftrain.trainer.sampling import generate, pipeline_for
from tests.trainer import runner


def evaluation_loss(components, examples, seed: int = 0) -> float:
    """Loss on a fixed batch: fixed images, noise and timesteps."""
    transform = Transform(center_crop=True, random_flip=False, caption_dropout=0.0)
    samples = [transform(example, None, (32, 32)) for example in examples]
    pixels = torch.stack([s["pixels"] for s in samples])
    generator = torch.Generator().manual_seed(seed)
    schedule = components.noise_scheduler
    with torch.no_grad():
        latents = components.vae.encode(pixels).latent_dist.mean
        latents = latents * components.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.linspace(50, 950, len(examples)).long()
        noisy = loss.add_noise(latents, noise, timesteps, schedule.alphas_cumprod)
        ids = token_ids(components, [s["caption"] for s in samples])
        conditioning = components.family.encode_text(components, ids)
        prediction = components.denoiser(noisy, timesteps, **conditioning).sample
    return loss.diffusion_loss(prediction, noise).item()


def test_finetune_lowers_loss_and_exports_a_pipeline(tmp_path, trainer_cache, shapes_folder):
    config = runner.write_config(
        tmp_path,
        {
            "method": "finetune",
            "dataset": {"uri": f"file://{shapes_folder}", "centerCrop": True},
            "output": {"uri": f"file://{tmp_path}/out", "dtype": "fp32"},
            "training": {"steps": 40, "batchSize": 8, "learningRate": 5e-4},
        },
    )

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 0, log
    examples = find_examples(shapes_folder)[:16]
    base = load_components(
        write_preset("tiny-sd", tmp_path / "base"), ModelSpec(base="preset:tiny-sd")
    )
    trained = load_components(tmp_path / "out" / "model", ModelSpec(base="file:///model"))
    before, after = evaluation_loss(base, examples), evaluation_loss(trained, examples)
    assert after < 0.7 * before, (before, after)

    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tmp_path / "out" / "model")
    image = pipeline(
        "a blue square on a black background",
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
    ).images[0]
    assert image.shape == (32, 32, 3)
    assert (tmp_path / "out" / "model" / "README.md").exists()


def test_ema_weights_are_checkpointed_and_exported(tmp_path, trainer_cache, shapes_folder):
    output = tmp_path / "out"
    config = runner.write_config(
        tmp_path,
        {
            "method": "finetune",
            "dataset": {"uri": f"file://{shapes_folder}"},
            "output": {"uri": f"file://{output}", "dtype": "fp32"},
            # A high learning rate: the averaged weights lag visibly behind the raw ones.
            "training": {"steps": 4, "learningRate": 1e-2, "ema": {"enabled": True, "decay": 0.9}},
            "checkpoints": {"everySteps": 2},
            "validation": {"prompts": ["a red circle"], "everySteps": 4, "inferenceSteps": 2},
        },
    )

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 0, log
    # Samples show the averaged weights, those of the export.
    model = load_components(output / "model", ModelSpec(base="file://model"))
    sample = np.asarray(Image.open(output / "samples" / "step-00000004" / "000-00.png"), int)

    def drawn():
        [(_, _, image)] = generate(pipeline_for(model), ["a red circle"], size=32, seed=0, steps=2)
        return np.abs(np.asarray(image, dtype=int) - sample).max()

    averaged = drawn()
    raw = load_file(output / "checkpoints" / "step-00000004" / "trainable.safetensors")
    model.denoiser.load_state_dict({k.removeprefix("unet."): v for k, v in raw.items()})
    assert averaged <= 2 < 4 < drawn()  # the sample is the averaged model's, not the raw one's
    last = output / "checkpoints" / "step-00000004"
    raw = load_file(last / "trainable.safetensors")
    shadow = torch.load(last / "ema.pt", weights_only=False)["shadow_params"]
    from diffusers import UNet2DConditionModel

    exported = UNet2DConditionModel.from_pretrained(output / "model" / "unet")
    names = [name for name, _ in exported.named_parameters()]
    for name, param, average in zip(names, exported.parameters(), shadow, strict=True):
        assert torch.equal(param, average), name
    assert any(not torch.equal(raw[f"unet.{n}"], a) for n, a in zip(names, shadow, strict=True))

    # Training longer resumes from the last checkpoint, EMA included.
    settings = json.loads(config.read_text())
    settings["spec"]["training"]["steps"] = 6
    config.write_text(json.dumps(settings))
    code, log = runner.run(config, tmp_path, trainer_cache)
    assert code == 0, log
    assert "resumed from checkpoint step 4" in log
    resumed = torch.load(output / "checkpoints" / "step-00000006" / "ema.pt", weights_only=False)
    assert resumed["optimization_step"] == 6
