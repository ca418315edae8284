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
        mean, std = family.latent_moments(components, pixels)
        latents = family.scale_latents(
            components, mean + std * torch.randn(mean.shape, generator=generator)
        )
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


def test_a_shift_the_job_sets_is_trained_sampled_and_exported(
    tmp_path, trainer_cache, shapes_folder
):
    """SD3's 3.0 is for 1024 px; a job on smaller images sets its own."""
    spec = job(tmp_path, shapes_folder, "tiny-sd3", method="finetune")
    spec["training"] = {"steps": 2, "flowMatching": {"shift": 1.5}}
    spec["validation"] = {"prompts": ["a red circle"], "everySteps": 2, "inferenceSteps": 2}
    config = runner.write_config(tmp_path, spec)

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 0, log
    assert "the sigma schedule shifted by 1.5 (spec.training.flowMatching.shift)" in log
    model = tmp_path / "out" / "model"
    scheduler = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["shift"] == 1.5 and not scheduler["use_dynamic_shifting"]
    assert "| Sigma shift (sample with the same) | 1.5 |" in (model / "README.md").read_text()
    assert (tmp_path / "out" / "samples" / "step-00000002" / "grid.png").is_file()


def test_the_shift_replaces_the_schedulers_own_for_training():
    """As diffusers' scheduler shifts (by hand: s * sigma / (1 + (s - 1) * sigma)), and in
    place of Flux's shift by the image's size."""
    from types import SimpleNamespace

    from difftrain.api.training import TrainingSpec

    training = TrainingSpec.model_validate({"steps": 1, "flowMatching": {"shift": 2.0}})
    for name in ("sd3", "flux"):
        components = SimpleNamespace(noise_scheduler=build_preset(f"tiny-{name}").scheduler)
        family = families.named(name)

        family.set_schedule(training, components)

        scheduler = components.noise_scheduler
        assert scheduler.config.shift == 2.0 and not scheduler.config.use_dynamic_shifting
        plain = torch.linspace(1.0, 1 / 1000, 1000)
        assert torch.allclose(scheduler.sigmas, 2 * plain / (1 + plain), atol=1e-6)


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


# Stability's MMDiT checkpoints name SD3's layers as kohya's SD3 layout does; diffusers
# has no reader of kohya's SD3 LoRA, but it reads those checkpoints. The test writes the
# base transformer in their layout, adds the kohya file's LoRA to it as a kohya loader
# does (W + alpha / rank * up @ down), and reads it back with diffusers' converter.
STREAMS = {  # the MMDiT's names of a block's layers, and diffusers', by stream
    "x_block": {
        "attn.proj": "attn.to_out.0",
        "attn.ln_q": "attn.norm_q",
        "attn.ln_k": "attn.norm_k",
        "attn2.proj": "attn2.to_out.0",
        "attn2.ln_q": "attn2.norm_q",
        "attn2.ln_k": "attn2.norm_k",
        "mlp.fc1": "ff.net.0.proj",
        "mlp.fc2": "ff.net.2",
        "adaLN_modulation.1": "norm1.linear",
    },
    "context_block": {
        "attn.proj": "attn.to_add_out",
        "attn.ln_q": "attn.norm_added_q",
        "attn.ln_k": "attn.norm_added_k",
        "mlp.fc1": "ff_context.net.0.proj",
        "mlp.fc2": "ff_context.net.2",
        "adaLN_modulation.1": "norm1_context.linear",
    },
}
QKV = {
    "x_block.attn": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "x_block.attn2": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "context_block.attn": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
OUTER = {
    "pos_embed": "pos_embed.pos_embed",
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "context_embedder": "context_embedder",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}


def _swap(tensor):
    first, second = tensor.chunk(2)
    return torch.cat([second, first])


def _mmdit_checkpoint(transformer) -> dict:
    """The transformer's weights as Stability's SD3 checkpoints hold them."""
    state = transformer.state_dict()
    out = {"pos_embed": state["pos_embed.pos_embed"]}
    for theirs, ours in OUTER.items():
        for kind in ("weight", "bias"):
            if f"{ours}.{kind}" in state:
                out[f"{theirs}.{kind}"] = state[f"{ours}.{kind}"]
    for name in ("final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"):
        out[name] = _swap(out[name])  # (shift, scale) there, (scale, shift) here
    last = len(transformer.transformer_blocks) - 1
    for i in range(last + 1):
        block = f"transformer_blocks.{i}"
        for stream, layers in STREAMS.items():
            for theirs, ours in layers.items():
                for kind in ("weight", "bias"):
                    if f"{block}.{ours}.{kind}" in state:
                        value = state[f"{block}.{ours}.{kind}"]
                        if i == last and theirs == "adaLN_modulation.1" and stream != "x_block":
                            value = _swap(value)
                        out[f"joint_blocks.{i}.{stream}.{theirs}.{kind}"] = value
        for theirs, parts in QKV.items():
            for kind in ("weight", "bias"):
                if f"{block}.{parts[0]}.{kind}" in state:
                    fused = torch.cat([state[f"{block}.{part}.{kind}"] for part in parts])
                    out[f"joint_blocks.{i}.{theirs}.qkv.{kind}"] = fused
    return out


def _from_mmdit(checkpoint: dict, config):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    transformer = SD3Transformer2DModel.from_config(config)
    state = convert_sd3_transformer_checkpoint_to_diffusers(dict(checkpoint))
    transformer.load_state_dict(state, strict=True)
    return transformer


def _transformer_output(transformer) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, 16, 8, 8, generator=generator),
        "encoder_hidden_states": torch.randn(1, 6, 80, generator=generator),
        "pooled_projections": torch.randn(1, 64, generator=generator),
        "timestep": torch.tensor([500.0]),
        "return_dict": False,
    }
    with torch.no_grad():
        return transformer(**inputs)[0]


def _pooled(pipeline) -> list[torch.Tensor]:
    ids = pipeline.tokenizer(["a red circle"], return_tensors="pt").input_ids
    with torch.no_grad():
        return [pipeline.text_encoder(ids)[0], pipeline.text_encoder_2(ids)[0]]


def test_the_kohya_file_holds_the_trained_lora_in_stabilitys_layer_names(tmp_path):
    from types import SimpleNamespace

    from diffusers import StableDiffusionXLPipeline

    from difftrain.api.methods import LoraSpec
    from difftrain.trainer import adapters

    trained = build_preset("tiny-sd3")
    components = SimpleNamespace(
        family=families.named("sd3"),
        denoiser=trained.transformer,
        text_encoders=[trained.text_encoder, trained.text_encoder_2, trained.text_encoder_3],
    )
    every = sorted(families.flow.kohya_targets(families.sd3.KOHYA_LAYERS))  # MLPs, norms too
    settings = SimpleNamespace(lora=LoraSpec(rank=4, alpha=8, targetModules=every))
    trainable = adapters.add(components, settings, text_encoders=True)
    with torch.no_grad():  # as if trained: every up matrix away from zero
        for part in (trained.transformer, trained.text_encoder, trained.text_encoder_2):
            for name, parameter in part.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.05)
    adapters.export(
        components, trainable, ["diffusers", "kohya"], tmp_path, torch.float32, {"name": "job"}
    )
    expected, expected_pooled = _transformer_output(trained.transformer), _pooled(trained)
    kohya = load_file(tmp_path / "job.safetensors")
    assert kohya["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"].shape == (12, 64)
    assert kohya["lora_unet_joint_blocks_0_x_block_attn_qkv.alpha"] == 24  # 3 parts of alpha 8
    assert "lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_up.weight" in kohya  # SD3.5's
    assert "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1.alpha" in kohya

    base = build_preset("tiny-sd3")
    checkpoint = _mmdit_checkpoint(base.transformer)
    read_back = _from_mmdit(checkpoint, base.transformer.config).state_dict()
    assert all(torch.equal(read_back[k], v) for k, v in base.transformer.state_dict().items())
    layers = {key.replace(".", "_").removesuffix("_weight"): key for key in checkpoint}
    applied = set()
    for key, down in kohya.items():
        if key.startswith("lora_unet_") and key.endswith(".lora_down.weight"):
            module = key.removesuffix(".lora_down.weight")
            up, alpha = kohya[f"{module}.lora_up.weight"], kohya[f"{module}.alpha"]
            weight = layers[module.removeprefix("lora_unet_")]
            checkpoint[weight] = checkpoint[weight] + alpha / down.shape[0] * up @ down
            applied.add(module)
    # Every linear layer of both blocks: the first's 7 of the image stream (SD3.5's second
    # attention among them) and 5 of the text stream's; the last's 5 and 2 (its text
    # stream ends after its attention's input).
    assert len(applied) == 7 + 5 + 5 + 2
    got = _transformer_output(_from_mmdit(checkpoint, base.transformer.config))
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, _transformer_output(base.transformer), atol=1e-4)

    # The CLIP encoders' part, lora_te1_ and lora_te2_ as SDXL's, through diffusers'
    # kohya reader.
    encoders = {k: v for k, v in kohya.items() if k.startswith("lora_te")}
    assert {key.split("_")[1] for key in encoders} == {"te1", "te2"}
    state, alphas = StableDiffusionXLPipeline.lora_state_dict(encoders)
    pipeline = build_preset("tiny-sd3")
    for part in ("text_encoder", "text_encoder_2"):
        StableDiffusionXLPipeline.load_lora_into_text_encoder(
            state, alphas, text_encoder=getattr(pipeline, part), prefix=part
        )
    for got, want, before in zip(_pooled(pipeline), expected_pooled, _pooled(base), strict=True):
        assert torch.allclose(got, want, atol=1e-5)
        assert not torch.allclose(got, before, atol=1e-4)
