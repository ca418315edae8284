"""The single-file and merged exports: loaded back by diffusers' own loaders, they draw what
the diffusers folder (or base + LoRA) draws."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open

from difftrain.trainer import families, singlefile
from difftrain.trainer.presets import build_preset, tokenizer, write_preset
from tests.trainer import runner

# What each part of an original Stable Diffusion checkpoint is keyed under.
SD1_PREFIXES = {"model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."}
# Names every SD checkpoint has, whatever its size (the ones loaders look for).
SD_NAMES = [
    "model.diffusion_model.input_blocks.0.0.weight",
    "model.diffusion_model.time_embed.0.weight",
    "model.diffusion_model.middle_block.1.proj_in.weight",
    "model.diffusion_model.out.2.weight",
    "first_stage_model.encoder.mid.attn_1.q.weight",
    "first_stage_model.decoder.up.0.block.0.norm1.weight",
    "first_stage_model.post_quant_conv.weight",
]


def _image(pipeline, seed: int = 0) -> np.ndarray:
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(
        "a red circle",
        height=32,
        width=32,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images[0]


def _keys(path) -> dict:
    with safe_open(path, "pt") as file:
        return {key: file.get_slice(key).get_dtype() for key in file.keys()}  # noqa: SIM118


def _prefixes(keys) -> set[str]:
    known = [
        "model.diffusion_model.",
        "first_stage_model.",
        "cond_stage_model.transformer.",
        "cond_stage_model.model.",
        "conditioner.embedders.0.transformer.",
        "conditioner.embedders.1.model.",
    ]
    return {next(p for p in known if key.startswith(p)) for key in keys}


def _same_weights(one, other) -> None:
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(one, name, None) is None:
            continue
        mine, theirs = getattr(one, name).state_dict(), getattr(other, name).state_dict()
        assert mine.keys() == theirs.keys(), name
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), name


def test_a_finetune_exports_one_file_that_from_single_file_loads_as_the_folder(
    tmp_path, trainer_cache, shapes_folder
):
    config = runner.write_config(
        tmp_path,
        {
            "method": "finetune",
            "dataset": {"uri": f"file://{shapes_folder}"},
            "output": {"uri": f"file://{tmp_path}/out", "formats": ["diffusers", "singleFile"]},
            "training": {"steps": 2},
        },
        name="shapes-ft",
    )

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 0, log
    model = tmp_path / "out" / "model"
    file = model / "shapes-ft.safetensors"
    keys = _keys(file)
    assert set(keys.values()) == {"F16"}  # the output dtype (fp16 by default)
    assert _prefixes(keys) == SD1_PREFIXES
    assert set(SD_NAMES) <= keys.keys()
    folder = StableDiffusionPipeline.from_pretrained(model, dtype=torch.float32)
    counted = sum(len(getattr(folder, n).state_dict()) for n in ("unet", "vae", "text_encoder"))
    assert len(keys) == counted  # every weight, once (position_ids are not weights)
    single = StableDiffusionPipeline.from_single_file(
        file, config=str(model), local_files_only=True, dtype=torch.float32
    )
    _same_weights(folder, single)
    assert np.array_equal(_image(folder), _image(single))
    card = (model / "README.md").read_text()
    assert "`shapes-ft.safetensors` holds the whole model" in card


def _wide_sdxl():
    """The tiny SDXL preset with a second text encoder wider than the first, as SDXL's
    (768 and 1280): the single-file loader tells the two apart by their widths."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    pipeline = build_preset("tiny-sdxl")
    torch.manual_seed(1)
    config = families.named("sdxl").preset_parts("tiny-sdxl")["unet"].config
    wide = {**pipeline.text_encoder.config.to_dict(), "hidden_size": 48, "projection_dim": 40}
    encoder = CLIPTextModelWithProjection(type(pipeline.text_encoder_2.config)(**wide))
    unet = UNet2DConditionModel.from_config(
        {**config, "cross_attention_dim": 32 + 48, "projection_class_embeddings_input_dim": 88}
    )
    return StableDiffusionXLPipeline(
        vae=pipeline.vae,
        text_encoder=pipeline.text_encoder,
        text_encoder_2=encoder,
        tokenizer=tokenizer(),
        tokenizer_2=tokenizer(),
        unet=unet,
        scheduler=pipeline.scheduler,
    )


def test_sdxl_single_files_hold_both_encoders_in_their_original_layouts(tmp_path):
    pipeline = _wide_sdxl()
    pipeline.save_pretrained(tmp_path / "folder")
    file = tmp_path / "sdxl.safetensors"

    singlefile.save(pipeline, families.named("sdxl"), file, torch.float32)

    keys = _keys(file)
    assert _prefixes(keys) == {
        "model.diffusion_model.",
        "first_stage_model.",
        "conditioner.embedders.0.transformer.",
        "conditioner.embedders.1.model.",
    }
    assert "model.diffusion_model.label_emb.0.0.weight" in keys  # the size conditioning
    assert "conditioner.embedders.1.model.text_projection" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    single = StableDiffusionXLPipeline.from_single_file(
        file, config=str(tmp_path / "folder"), local_files_only=True
    )
    _same_weights(pipeline, single)
    assert np.array_equal(_image(pipeline), _image(single))


def test_an_sd2_text_encoder_is_written_in_openclips_layout(tmp_path):
    """SD 2.x's encoder came from OpenCLIP (gelu); its checkpoints keep OpenCLIP's keys."""
    from transformers import CLIPTextModel

    pipeline = build_preset("tiny-sd")
    config = {**pipeline.text_encoder.config.to_dict(), "hidden_act": "gelu"}
    pipeline.text_encoder = CLIPTextModel(type(pipeline.text_encoder.config)(**config))
    pipeline.register_modules(text_encoder=pipeline.text_encoder)
    pipeline.save_pretrained(tmp_path / "folder")
    file = tmp_path / "sd2.safetensors"

    singlefile.save(pipeline, families.named("sd"), file, torch.float32)

    keys = _keys(file)
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in keys
    assert "cond_stage_model.model.positional_embedding" in keys
    single = StableDiffusionPipeline.from_single_file(
        file, config=str(tmp_path / "folder"), local_files_only=True
    )
    _same_weights(pipeline, single)


def test_a_unet_without_one_layers_per_block_is_refused(tmp_path):
    from diffusers import UNet2DConditionModel

    from difftrain.errors import InvalidSpec

    unet = UNet2DConditionModel.from_config(
        {**build_preset("tiny-sd").unet.config, "layers_per_block": [1, 2]}
    )
    with pytest.raises(InvalidSpec, match="singleFile needs one layers_per_block"):
        singlefile.check(families.named("sd"), unet)


def test_a_merged_lora_draws_what_base_and_lora_draw(tmp_path, trainer_cache, shapes_folder):
    config = runner.write_config(
        tmp_path,
        {
            "dataset": {"uri": f"file://{shapes_folder}"},
            "lora": {"rank": 4, "alpha": 8},
            "output": {
                "uri": f"file://{tmp_path}/out",
                "dtype": "fp32",
                "formats": ["kohya", "merged", "singleFile"],
            },
            "training": {"steps": 3, "learningRate": 1e-2},
        },
        name="merged-lora",
    )

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 0, log
    model = tmp_path / "out" / "model"
    base = StableDiffusionPipeline.from_pretrained(write_preset("tiny-sd", tmp_path / "base"))
    plain = _image(base)
    base.load_lora_weights(model / "merged-lora.safetensors")  # the kohya file
    with_lora = _image(base)
    merged = StableDiffusionPipeline.from_pretrained(model / "merged")
    assert not np.allclose(plain, with_lora, atol=1e-3)  # the LoRA changes the image...
    assert np.allclose(_image(merged), with_lora, atol=2e-3)  # ...and merged draws the same
    single = StableDiffusionPipeline.from_single_file(
        model / "merged" / "merged-lora.safetensors",
        config=str(model / "merged"),
        local_files_only=True,
    )
    _same_weights(merged, single)
    assert sorted(p.name for p in model.iterdir()) == [
        "README.md",
        "difftrain.json",
        "merged",
        "merged-lora.safetensors",
    ]  # the diffusers LoRA file merging needed is gone
    assert "`merged/` is the base model with the LoRA fused in" in (model / "README.md").read_text()


def test_an_int8_export_loads_quantized_and_draws_near_the_full_precision_model(
    tmp_path, trainer_cache, shapes_folder
):
    from diffusers import DiffusionPipeline
    from torchao.quantization import Int8Tensor

    config = runner.write_config(
        tmp_path,
        {
            "method": "finetune",
            "dataset": {"uri": f"file://{shapes_folder}"},
            "output": {"uri": f"file://{tmp_path}/out", "dtype": "int8"},
            "training": {"steps": 1, "learningRate": 1e-9},  # the base, all but unchanged
        },
    )

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 0, log
    model = tmp_path / "out" / "model"
    quantized = DiffusionPipeline.from_pretrained(model, dtype=torch.bfloat16)
    linear = quantized.unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q
    assert isinstance(linear.weight, Int8Tensor)
    assert quantized.vae.dtype == torch.bfloat16
    base = DiffusionPipeline.from_pretrained(
        write_preset("tiny-sd", tmp_path / "base"), dtype=torch.bfloat16
    )
    difference = np.abs(_image(quantized) - _image(base))
    assert difference.mean() < 0.02, difference.mean()
