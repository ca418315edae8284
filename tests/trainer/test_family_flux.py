"""Flux: latents packed into tokens as FluxPipeline packs them, sigmas shifted by the
image's size as its scheduler shifts them, the guidance embedding given the job's value,
LoRA and fine-tuning that diffusers loads, and the settings the family refuses."""

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from difftrain.api.data import ModelSpec
from difftrain.api.training import TrainingSpec
from difftrain.trainer import families, loss
from difftrain.trainer.families import flux
from difftrain.trainer.models import load_components
from difftrain.trainer.presets import build_preset, write_preset
from tests.trainer import runner
from tests.trainer.families import from_scratch, job, refused, sample


def test_latents_are_packed_and_placed_as_flux_pipeline_does():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 6, 4)

    packed = flux.pack(latents)

    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 4))
    assert torch.equal(flux.unpack(packed, 6, 4), latents)
    # the pipeline's height and width are in pixels, here of a VAE that halves
    assert torch.equal(flux.unpack(packed, 6, 4), FluxPipeline._unpack_latents(packed, 12, 8, 2))
    expected = FluxPipeline._prepare_latent_image_ids(2, 3, 2, "cpu", torch.float32)
    assert torch.equal(flux.image_ids(3, 2, "cpu", torch.float32), expected)


def test_sigmas_are_shifted_by_the_image_size_as_the_scheduler_shifts_them():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler(**flux._SCHEDULER)
    shift = loss.Shift(base_length=256, max_length=4096, base_shift=0.5, max_shift=1.15)
    sigmas = torch.tensor([0.2, 0.5, 0.9])

    for length in (64, 256, 1024, 4096):
        mu = calculate_shift(length, 256, 4096, 0.5, 1.15)
        assert math.isclose(shift.mu(length), mu, rel_tol=1e-12)
        assert torch.allclose(loss.shift_sigmas(sigmas, mu), scheduler.time_shift(mu, 1.0, sigmas))
    # by hand: e^mu / (e^mu + 1/sigma - 1), larger images towards the noise
    assert torch.allclose(loss.shift_sigmas(torch.tensor([0.5]), math.log(3)), torch.tensor([0.75]))


def test_the_objective_shifts_by_the_token_count_of_the_batch():
    from types import SimpleNamespace

    table = torch.tensor([1.0, 0.75, 0.5, 0.25])
    settings = SimpleNamespace(
        timestep_density="uniform",
        logit_mean=0.0,
        logit_std=1.0,
        mode_scale=1.29,
        loss_weighting="none",
    )
    shift = loss.Shift(base_length=4, max_length=16, base_shift=0.0, max_shift=1.2)
    objective = loss.FlowMatching(table, table * 1000, settings, shift=shift, patch=2)
    latents = torch.zeros(3, 16, 8, 4)  # 4 x 2 tokens: mu = 0.1 * (8 - 4) = 0.4

    noised = objective(latents, torch.Generator().manual_seed(0))

    replay = torch.Generator().manual_seed(0)
    noise = torch.randn(latents.shape, generator=replay)
    sigma = loss.shift_sigmas(table[(torch.rand(3, generator=replay) * 4).long()], 0.4)
    assert torch.allclose(noised.timesteps, sigma * 1000)
    assert torch.allclose(noised.noisy, sigma[:, None, None, None] * noise)


def test_the_preset_is_a_flux_dev_pipeline_of_a_few_hundred_thousand_parameters(tmp_path):
    from diffusers import FluxPipeline

    pipeline = build_preset("tiny-flux")

    assert isinstance(pipeline, FluxPipeline)
    assert pipeline.transformer.config.guidance_embeds
    assert 100_000 < sum(p.numel() for p in pipeline.transformer.parameters()) < 1_000_000
    assert torch.equal(sample(pipeline), sample(build_preset("tiny-flux")))
    folder = write_preset("tiny-flux", tmp_path / "model")
    components = load_components(folder, ModelSpec(base=f"file://{folder}"))
    assert components.family is families.named("flux")
    assert [type(e).__name__ for e in components.text_encoders] == [
        "CLIPTextModel",
        "T5EncoderModel",
    ]


def test_guidance_is_the_jobs_value_or_one(tmp_path):
    folder = write_preset("tiny-flux", tmp_path / "model")
    components = load_components(folder, ModelSpec(base=f"file://{folder}"))
    family, batch = components.family, {"captions": ["a", "b"]}

    given = TrainingSpec(steps=1, flowMatching={"guidance": 3.5})
    unset = TrainingSpec(steps=1)

    assert torch.equal(
        family.conditioning(components, batch, given, "cpu")["guidance"], torch.tensor([3.5] * 2)
    )
    assert torch.equal(
        family.conditioning(components, batch, unset, "cpu")["guidance"], torch.tensor([1.0] * 2)
    )


def test_flux_lora_trains_and_loads_in_diffusers_with_the_trained_weights(
    tmp_path, trainer_cache, shapes_folder
):
    spec = job(
        tmp_path,
        shapes_folder,
        "tiny-flux",
        lora={"rank": 4, "trainTextEncoder": True},
        training={"steps": 4, "batchSize": 4, "learningRate": 1e-2},
        output={
            "uri": f"file://{tmp_path}/out",
            "dtype": "fp32",
            "formats": ["diffusers", "kohya"],
        },
        checkpoints={"everySteps": 4},
        validation={"prompts": ["a red circle"], "everySteps": 4, "inferenceSteps": 2},
    )
    spec["training"]["flowMatching"] = {"guidance": 3.5, "lossWeighting": "cosmap"}
    config = runner.write_config(tmp_path, spec)

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 0, log
    output = tmp_path / "out"
    assert (output / "samples" / "step-00000004" / "grid.png").is_file()
    kohya = load_file(output / "model" / "test-job.safetensors")
    assert "lora_unet_single_blocks_1_linear1.lora_down.weight" in kohya
    assert any(key.startswith("lora_te1_") for key in kohya)
    keys = load_file(output / "model" / "pytorch_lora_weights.safetensors")
    assert {key.split(".")[0] for key in keys} == {"transformer", "text_encoder"}
    adapted = {key.rsplit(".lora", 1)[0] for key in keys if key.startswith("transformer.")}
    assert any(".single_transformer_blocks." in name for name in adapted)
    assert any(name.endswith(".attn.add_q_proj") for name in adapted)  # the text stream
    pipeline = build_preset("tiny-flux")
    before = sample(pipeline)
    pipeline.load_lora_weights(output / "model")
    assert (sample(pipeline) - before).abs().max() > 1e-4
    trained = load_file(output / "checkpoints" / "step-00000004" / "trainable.safetensors")
    for part in ("transformer", "text_encoder"):
        loaded = {
            name.replace(".default_0", ".default"): value
            for name, value in getattr(pipeline, part).named_parameters()
            if ".lora_" in name
        }
        expected = {k.removeprefix(f"{part}."): v for k, v in trained.items() if k.startswith(part)}
        assert loaded.keys() == expected.keys(), part
        assert all(torch.equal(loaded[k], expected[k]) for k in loaded), part


def test_flux_finetune_exports_a_pipeline_that_loads(tmp_path, trainer_cache, shapes_folder):
    spec = job(tmp_path, shapes_folder, "tiny-flux", method="finetune")
    spec["dataset"]["bucketing"] = {
        "enabled": True,
        "minResolution": 16,
        "maxResolution": 48,
        "step": 8,
    }
    config = runner.write_config(tmp_path, spec)

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 0, log
    from diffusers import FluxPipeline

    trained = FluxPipeline.from_pretrained(tmp_path / "out" / "model")
    base = build_preset("tiny-flux")
    new, old = trained.transformer.state_dict(), base.transformer.state_dict()
    assert any(not torch.equal(new[k], old[k]) for k in old)
    assert sample(trained).shape == (1, 3, 32, 32)


# Bad input.


def test_a_guidance_value_for_a_model_without_guidance_embedding_is_refused(
    tmp_path, trainer_cache, shapes_folder
):
    spec = from_scratch(tmp_path, shapes_folder, "tiny-flux", guidance_embeds=False)  # schnell
    spec["training"]["flowMatching"] = {"guidance": 3.5}

    assert refused(tmp_path, trainer_cache, spec) == (
        "spec.training.flowMatching.guidance: this Flux model has no guidance embedding "
        "(guidance_embeds is false, as in Flux.1 schnell), so there is nothing to give the "
        "value to; remove it"
    )


def test_a_resolution_that_does_not_fit_the_packing_is_refused(tmp_path):
    from difftrain.api.data import DatasetSpec
    from difftrain.errors import InvalidSpec
    from difftrain.trainer.setup import check_sides

    folder = write_preset("tiny-flux", tmp_path / "base")
    components = load_components(folder, ModelSpec(base=f"file://{folder}"))
    check_sides(DatasetSpec(uri="builtin:shapes", resolution=40), components)  # 2 x 2: fine
    components.vae.register_to_config(block_out_channels=[32, 64, 64, 64])  # halves 3 times

    with pytest.raises(InvalidSpec) as error:
        check_sides(DatasetSpec(uri="builtin:shapes", resolution=40), components)

    assert str(error.value) == (
        "spec.dataset.resolution: 40 is not a multiple of 16, as this flux model's training "
        "sides must be; use 32 or 48"
    )


def test_a_flux_architecture_whose_parts_do_not_fit_is_refused(trainer_cache):
    from difftrain.errors import InvalidSpec
    from difftrain.storage import S3Settings
    from difftrain.trainer.models import fetch_model, new_components

    folder = fetch_model(ModelSpec(base="preset:tiny-flux"), S3Settings(), trainer_cache / "models")
    transformer = json.loads((folder / "transformer" / "config.json").read_text())
    transformer["axes_dims_rope"] = [4, 4, 4]
    model = ModelSpec(base="preset:tiny-flux", components={"transformer": transformer})

    with pytest.raises(InvalidSpec) as error:
        new_components(folder, model, reuse=[], seed=0)

    assert str(error.value) == (
        "spec.model.components.transformer: axes_dims_rope (summing to 12) must equal "
        "attention_head_dim (16)"
    )


# Flux.1's width: diffusers' reader of kohya's Flux layout knows only Flux.1's sizes.
FLUX1_WIDE = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 128,
    "num_attention_heads": 24,  # 3072 wide, as Flux.1
    "joint_attention_dim": 80,  # the tiny T5's
    "pooled_projection_dim": 32,  # the tiny CLIP's
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}


def _wide_pipeline():
    from diffusers import FluxTransformer2DModel

    pipeline = build_preset("tiny-flux")
    torch.manual_seed(0)
    pipeline.transformer = FluxTransformer2DModel(**FLUX1_WIDE)
    return pipeline


def _outputs(pipeline) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, 16, 64, generator=generator),
        "encoder_hidden_states": torch.randn(1, 4, 80, generator=generator),
        "pooled_projections": torch.randn(1, 32, generator=generator),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([1.0]),
        "txt_ids": torch.zeros(4, 3),
        "img_ids": torch.zeros(16, 3),
        "return_dict": False,
    }
    ids = pipeline.tokenizer(["a red circle"], return_tensors="pt").input_ids
    with torch.no_grad():
        return pipeline.transformer(**inputs)[0], pipeline.text_encoder(ids).pooler_output


def test_the_kohya_file_loads_through_diffusers_converter_as_the_trained_lora(tmp_path):
    from types import SimpleNamespace

    from difftrain.api.methods import LoraSpec
    from difftrain.trainer import adapters

    fresh = _wide_pipeline()  # built once: a third of a billion weights draw slowly
    trained = copy.deepcopy(fresh)
    components = SimpleNamespace(
        family=families.named("flux"),
        denoiser=trained.transformer,
        text_encoders=[trained.text_encoder, trained.text_encoder_2],
    )
    settings = SimpleNamespace(lora=LoraSpec(rank=4, alpha=8))
    trainable = adapters.add(components, settings, text_encoders=True)
    with torch.no_grad():  # as if trained: every up matrix away from zero
        for name, parameter in trained.transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
        for name, parameter in trained.text_encoder.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    adapters.export(
        components, trainable, ["diffusers", "kohya"], tmp_path, torch.float32, {"name": "job"}
    )
    expected = _outputs(trained)
    keys = load_file(tmp_path / "job.safetensors")
    assert keys["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (12, 3072)
    assert keys["lora_unet_double_blocks_0_img_attn_qkv.alpha"] == 24  # 3 parts of alpha 8
    assert keys["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * 3072 + 12288, 16)
    assert any(key.startswith("lora_te1_") for key in keys)

    base = _outputs(fresh)
    for file in ("job.safetensors", "pytorch_lora_weights.safetensors"):
        pipeline = copy.deepcopy(fresh)
        pipeline.load_lora_weights(tmp_path / file)
        for got, want, before in zip(_outputs(pipeline), expected, base, strict=True):
            assert torch.allclose(got, want, atol=1e-5), file
            assert not torch.allclose(got, before, atol=1e-4), file
