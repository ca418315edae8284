"""SD3: the tiny preset, flow-matching training with LoRA, fine-tuning and DreamBooth,
samples from SD3's own pipeline, exports that diffusers loads, and the settings the
family refuses."""

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file

from difftrain.api.data import ModelSpec
from difftrain.errors import InvalidSpec
from difftrain.storage import S3Settings
from difftrain.trainer import families, loss
from difftrain.trainer.conditioning import token_ids
from difftrain.trainer.data import Transform, find_examples
from difftrain.trainer.models import fetch_model, load_components, new_components
from difftrain.trainer.presets import build_preset, write_preset
from difftrain.trainer.tokenizer import build_t5_tokenizer
from tests.trainer import runner
from tests.trainer.families import from_scratch, job, refused, sample


def test_the_tiny_preset_is_an_sd3_pipeline_of_a_few_hundred_thousand_parameters():
    from diffusers import StableDiffusion3Pipeline

    pipeline = build_preset("tiny-sd3")

    assert isinstance(pipeline, StableDiffusion3Pipeline)
    sizes = {
        name: sum(p.numel() for p in part.parameters())
        for name, part in pipeline.components.items()
        if isinstance(part, torch.nn.Module)
    }
    assert 100_000 < sizes["transformer"] < 1_000_000, sizes
    assert sum(sizes.values()) < 2_000_000, sizes
    assert pipeline.vae.config.latent_channels == pipeline.transformer.config.in_channels == 16
    image = sample(pipeline)
    assert image.shape == (1, 3, 32, 32)
    assert torch.equal(image, sample(build_preset("tiny-sd3")))  # same seed, same weights


def test_the_t5_tokenizer_reads_any_caption_and_ends_it():
    tokenizer = build_t5_tokenizer()

    ids = tokenizer("a red circle, 3 blue squares!").input_ids

    assert ids[-1] == tokenizer.eos_token_id == 1
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a red circle, 3 blue squares!"
    assert tokenizer.pad_token_id == 0


def test_an_sd3_folder_is_detected_as_the_sd3_family(tmp_path):
    folder = write_preset("tiny-sd3", tmp_path / "model")

    components = load_components(folder, ModelSpec(base=f"file://{folder}"))

    assert components.family is families.named("sd3")
    assert [type(e).__name__ for e in components.text_encoders] == [
        "CLIPTextModelWithProjection",
        "CLIPTextModelWithProjection",
        "T5EncoderModel",
    ]


def test_sd3_lora_trains_both_streams_and_the_clip_encoders_and_loads_in_diffusers(
    tmp_path, trainer_cache, shapes_folder
):
    spec = job(
        tmp_path,
        shapes_folder,
        "tiny-sd3",
        lora={"rank": 4, "trainTextEncoder": True},
        validation={"prompts": ["a red circle"], "everySteps": 4, "inferenceSteps": 2},
    )
    config = runner.write_config(tmp_path, spec)

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 0, log
    model = tmp_path / "out" / "model"
    assert sorted(p.name for p in model.iterdir()) == [
        "README.md",
        "difftrain.json",
        "pytorch_lora_weights.safetensors",
    ]
    keys = load_file(model / "pytorch_lora_weights.safetensors")
    assert {key.split(".")[0] for key in keys} == {"transformer", "text_encoder", "text_encoder_2"}
    adapted = {key.rsplit(".lora", 1)[0] for key in keys if key.startswith("transformer.")}
    assert {name.rsplit(".", 1)[-1] for name in adapted} >= {"to_q", "add_q_proj", "0"}
    assert any(".attn2.to_q" in name for name in adapted)  # SD3.5's second image attention
    assert (tmp_path / "out" / "samples" / "step-00000004" / "grid.png").is_file()
    pipeline = build_preset("tiny-sd3")
    before = sample(pipeline)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft warns of adapters the file lacks
        pipeline.load_lora_weights(model)
    assert (sample(pipeline) - before).abs().max() > 1e-4
    loaded = next(iter(pipeline.transformer.peft_config.values()))
    assert loaded.r == 4
    wrapped = {
        name for name, module in pipeline.transformer.named_modules() if hasattr(module, "lora_A")
    }
    assert {f"transformer.{name}" for name in wrapped} == adapted  # all of the file, applied
    assert "Architecture | sd3" in (model / "README.md").read_text()


def flow_loss(components, examples) -> float:
    """The flow-matching loss on a fixed batch: fixed images, noise and sigmas."""
    transform = Transform(center_crop=True, random_flip=False, caption_dropout=0.0)
    samples = [transform(example, None, (32, 32)) for example in examples]
    pixels = torch.stack([s["pixels"] for s in samples])
    generator = torch.Generator().manual_seed(0)
    family = components.family
    with torch.no_grad():
        latents = family.latents(components, pixels, generator)
        noise = torch.randn(latents.shape, generator=generator)
        sigmas = torch.linspace(0.1, 0.9, len(examples))
        noisy = loss.flow_noisy(latents, noise, sigmas)
        ids = token_ids(components, [s["caption"] for s in samples])
        text = family.encode_text(components, ids)
        prediction = family.predict(components.denoiser, noisy, sigmas * 1000, text, {})
    return loss.diffusion_loss(prediction, loss.flow_target(latents, noise)).item()


def test_sd3_finetune_lowers_the_flow_loss_and_exports_a_pipeline(
    tmp_path, trainer_cache, shapes_folder
):
    spec = job(
        tmp_path,
        shapes_folder,
        "tiny-sd3",
        method="finetune",
        training={"steps": 40, "batchSize": 8, "learningRate": 2e-3},
    )
    spec["dataset"]["centerCrop"] = True
    config = runner.write_config(tmp_path, spec)

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 0, log
    examples = find_examples(shapes_folder)[:16]
    base = load_components(
        write_preset("tiny-sd3", tmp_path / "base"), ModelSpec(base="preset:tiny-sd3")
    )
    trained = load_components(tmp_path / "out" / "model", ModelSpec(base="file:///model"))
    before, after = flow_loss(base, examples), flow_loss(trained, examples)
    # The tiny model first learns the velocity's scale per timestep (about a tenth of the
    # loss of its random start; the rest takes hundreds of steps).
    assert after < 0.95 * before, (before, after)
    from diffusers import StableDiffusion3Pipeline

    pipeline = StableDiffusion3Pipeline.from_pretrained(tmp_path / "out" / "model")
    assert sample(pipeline).shape == (1, 3, 32, 32)


def test_sd3_dreambooth_makes_class_images_with_the_sd3_pipeline(
    tmp_path, trainer_cache, shapes_folder
):
    spec = job(
        tmp_path,
        shapes_folder,
        "tiny-sd3",
        method="dreambooth",
        dreambooth={
            "instancePrompt": "a photo of sks shape",
            "classPrompt": "a photo of a shape",
            "numClassImages": 4,
            "classInferenceSteps": 2,
        },
        lora={"rank": 4},
    )
    config = runner.write_config(tmp_path, spec)

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 0, log
    made = list((tmp_path / "out" / "class-images").glob("*.png"))
    assert len(made) == 4
    assert (tmp_path / "out" / "model" / "pytorch_lora_weights.safetensors").is_file()


def test_sd3_from_scratch_builds_the_transformer_from_inline_configs(
    tmp_path, trainer_cache, shapes_folder
):
    spec = from_scratch(tmp_path, shapes_folder, "tiny-sd3", num_layers=1, dual_attention_layers=[])
    config = runner.write_config(tmp_path, spec)

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 0, log
    written = json.loads((tmp_path / "out" / "model" / "transformer" / "config.json").read_text())
    assert written["num_layers"] == 1
    card = (tmp_path / "out" / "model" / "README.md").read_text()
    assert "Trained from scratch | transformer" in card


# Bad input.


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        pytest.param(
            {
                "method": "textualInversion",
                "textualInversion": {"placeholderToken": "<sks>", "initializerToken": "circle"},
            },
            "spec.method: textualInversion does not train sd3 models: its T5 encoder reads "
            "every prompt",
            id="textual-inversion",
        ),
        pytest.param(
            {"training": {"steps": 2, "snrGamma": 5.0}},
            "spec.training.snrGamma: applies to noise-prediction models; sd3 models learn by "
            "flow matching",
            id="snr-gamma",
        ),
        pytest.param(
            {"lora": {"rank": 4}, "output": {"formats": ["diffusers", "kohya"]}},
            "spec.output.formats: the kohya layout is not written for sd3 LoRA",
            id="kohya",
        ),
        pytest.param(
            {"model": {"base": "preset:tiny-sd3", "predictionType": "epsilon"}},
            "spec.model.predictionType: sd3 models predict the flow's velocity",
            id="prediction-type",
        ),
    ],
)
def test_settings_sd3_cannot_train_with_are_refused(
    tmp_path, trainer_cache, shapes_folder, extra, message
):
    spec = job(tmp_path, shapes_folder, "tiny-sd3")
    for key, value in extra.items():
        spec[key] = {**spec.get(key, {}), **value} if key != "method" else value
    spec["output"]["uri"] = f"file://{tmp_path}/out"

    assert refused(tmp_path, trainer_cache, spec).startswith(message)


def test_a_resolution_that_does_not_fit_the_patches_is_refused(
    tmp_path, trainer_cache, shapes_folder
):
    # Patches of 8 latents over a VAE that halves: sides must be multiples of 16.
    spec = from_scratch(tmp_path, shapes_folder, "tiny-sd3", patch_size=8)
    spec["dataset"]["resolution"] = 40

    assert refused(tmp_path, trainer_cache, spec) == (
        "spec.dataset.resolution: 40 is not a multiple of 16, as this sd3 model's training "
        "sides must be; use 32 or 48"
    )


def test_a_bucket_step_that_does_not_fit_the_patches_is_refused(tmp_path):
    from difftrain.api.data import DatasetSpec
    from difftrain.trainer.setup import check_sides

    folder = write_preset("tiny-sd3", tmp_path / "base")
    components = load_components(folder, ModelSpec(base=f"file://{folder}"))
    dataset = DatasetSpec(
        uri="builtin:shapes",
        resolution=32,
        bucketing={"enabled": True, "minResolution": 16, "maxResolution": 64, "step": 8},
    )
    check_sides(dataset, components)  # multiples of 4 for the tiny preset's patches

    components.denoiser.register_to_config(patch_size=8)  # now multiples of 16
    with pytest.raises(InvalidSpec) as error:
        check_sides(dataset, components)

    assert str(error.value) == (
        "spec.dataset.bucketing.step: 8 is not a multiple of 16, as this sd3 model's training "
        "sides must be; use 16"
    )


def test_an_sd3_folder_without_its_t5_encoder_is_refused_naming_it(
    tmp_path, trainer_cache, shapes_folder
):
    folder = write_preset("tiny-sd3", tmp_path / "base")
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder_3"] = [None, None]
    index["tokenizer_3"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(folder / "text_encoder_3")
    spec = job(tmp_path, shapes_folder, "tiny-sd3", model={"base": f"file://{folder}"})

    assert refused(tmp_path, trainer_cache, spec).startswith(
        f"spec.model.base: file://{folder} has no text_encoder_3, tokenizer_3 component; "
        "sd3 models are trained with all of transformer, vae, scheduler, text_encoder, "
        "text_encoder_2, text_encoder_3, tokenizer, tokenizer_2, tokenizer_3"
    )


@pytest.mark.parametrize(
    ("changed", "message"),
    [
        pytest.param(
            {"joint_attention_dim": 96},
            "spec.model.components.transformer: joint_attention_dim (96) must equal the T5 "
            "encoder's d_model (80)",
            id="t5-width",
        ),
        pytest.param(
            {"pooled_projection_dim": 32},
            "spec.model.components.transformer: pooled_projection_dim (32) must equal the "
            "CLIP encoders' projection_dim together (64)",
            id="pooled-width",
        ),
    ],
)
def test_sd3_architectures_that_cannot_work_are_refused(trainer_cache, changed, message):
    folder = fetch_model(ModelSpec(base="preset:tiny-sd3"), S3Settings(), trainer_cache / "models")
    transformer = json.loads((folder / "transformer" / "config.json").read_text())
    model = ModelSpec(
        base="preset:tiny-sd3", components={"transformer": {**transformer, **changed}}
    )

    with pytest.raises(InvalidSpec) as error:
        new_components(folder, model, reuse=[], seed=0)

    assert str(error.value) == message
