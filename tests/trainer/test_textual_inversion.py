"""Textual Inversion: only the new token's rows learn, the export loads with diffusers'
load_textual_inversion, and bad tokens fail before training."""

import json

import pytest
import torch
from safetensors.torch import load_file

from difftrain.api.data import ModelSpec
from difftrain.api.methods import TextualInversionSpec
from difftrain.trainer.methods import textual_inversion
from difftrain.trainer.models import load_components
from difftrain.trainer.presets import write_preset
from tests.trainer import runner

TI = {"placeholderToken": "<shape>", "initializerToken": "circle", "vectors": 2}


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return write_preset("tiny-sd", tmp_path_factory.mktemp("tiny-sd"))


def test_only_the_new_rows_change_and_they_start_from_the_initializer(tiny_sd):
    components = load_components(tiny_sd, ModelSpec(base="preset:tiny-sd"))
    tokenizer, encoder = components.tokenizers[0], components.text_encoders[0]
    before = encoder.get_input_embeddings().weight.detach().clone()
    settings = TextualInversionSpec.model_validate(TI)

    trainable = textual_inversion.prepare(components, settings)

    rows = tokenizer.convert_tokens_to_ids(["<shape>", "<shape>_1"])
    weights = encoder.get_input_embeddings().weight
    circle = tokenizer.convert_tokens_to_ids("circle</w>")
    assert trainable.rows == rows and weights.shape[0] == before.shape[0] + 2
    assert torch.equal(weights[rows[0]], before[circle])
    trained = [n for n, p in encoder.named_parameters() if p.requires_grad]
    assert len(trained) == 1 and trained[0].endswith("token_embedding.weight")
    # Steps of AdamW with weight decay: without the restore, every row would shrink.
    optimizer = torch.optim.AdamW(trainable.parameters("text_encoder"), lr=1e-2)
    ids = tokenizer(["a photo of a <shape> <shape>_1 on white"], return_tensors="pt").input_ids
    for _ in range(3):
        encoder(ids)[0].square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        trainable.after_step()
    assert rows == [len(before), len(before) + 1]  # the new rows come after the vocabulary
    assert torch.equal(weights.detach()[: len(before)], before)  # bit-identical
    assert not torch.equal(weights[rows[0]], before[circle])
    assert set(trainable.state_dict()) == {"text_encoder.token_embedding.rows"}
    assert trainable.state_dict()["text_encoder.token_embedding.rows"].shape == (2, 32)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        pytest.param(
            {**TI, "placeholderToken": "circle"},
            "spec.textualInversion.placeholderToken: 'circle' is already in the tokenizer's "
            "vocabulary",
            id="token-in-vocabulary",
        ),
        pytest.param(
            {**TI, "initializerToken": "xyzzy"},
            "spec.textualInversion.initializerToken: 'xyzzy' is 5 tokens (x y z z y</w>), not one",
            id="initializer-several-tokens",
        ),
    ],
)
def test_bad_tokens_fail_before_training(tmp_path, trainer_cache, shapes_folder, settings, message):
    spec = {
        "method": "textualInversion",
        "textualInversion": settings,
        "dataset": {"uri": f"file://{shapes_folder}"},
        "output": {"uri": f"file://{tmp_path}/out"},
    }
    config = runner.write_config(tmp_path, spec)

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 2, log
    reason = json.loads((tmp_path / "termination-log").read_text())
    assert reason["message"].startswith(message), reason
    assert "step 1/" not in log


def _train(tmp_path, trainer_cache, shapes_folder, base: str):
    spec = {
        "method": "textualInversion",
        "model": {"base": base},
        "textualInversion": TI,
        "dataset": {"uri": f"file://{shapes_folder}"},
        "output": {"uri": f"file://{tmp_path}/out", "dtype": "fp32"},
        "training": {"steps": 6, "learningRate": 5e-2},
        "checkpoints": {"everySteps": 3},
        "validation": {"prompts": ["a photo of a <shape>"], "everySteps": 6, "inferenceSteps": 2},
    }
    config = runner.write_config(tmp_path, spec)
    code, log = runner.run(config, tmp_path, trainer_cache)
    assert code == 0, log
    return tmp_path / "out"


def _image(pipeline, prompt: str):
    generator = torch.Generator().manual_seed(0)
    return pipeline(
        prompt, num_inference_steps=3, height=32, width=32, generator=generator, output_type="np"
    ).images[0]


def test_learned_embedding_loads_into_a_fresh_pipeline(
    tmp_path, trainer_cache, shapes_folder, tiny_sd
):
    output = _train(tmp_path, trainer_cache, shapes_folder, "preset:tiny-sd")

    learned = load_file(output / "model" / "learned_embeds.safetensors")
    assert set(learned) == {"<shape>"} and learned["<shape>"].shape == (2, 32)
    checkpoint = load_file(output / "checkpoints" / "step-00000006" / "trainable.safetensors")
    assert torch.equal(checkpoint["text_encoder.token_embedding.rows"], learned["<shape>"])
    index = json.loads((output / "samples" / "step-00000006" / "prompts.json").read_text())
    assert index[0]["prompt"] == "a photo of a <shape>"
    assert "load_textual_inversion" in (output / "model" / "README.md").read_text()

    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.load_textual_inversion(output / "model" / "learned_embeds.safetensors")
    # The learned vectors, not the initializer's, condition the image.
    assert pipeline.tokenizer.convert_tokens_to_ids("<shape>_1") == len(pipeline.tokenizer) - 1
    assert not (_image(pipeline, "a <shape>") == _image(pipeline, "a circle circle")).all()


def test_sdxl_exports_both_text_encoders(tmp_path, trainer_cache, shapes_folder):
    output = _train(tmp_path, trainer_cache, shapes_folder, "preset:tiny-sdxl")

    learned = load_file(output / "model" / "learned_embeds.safetensors")
    assert set(learned) == {"clip_l", "clip_g"}
    assert learned["clip_l"].shape == (2, 32) and learned["clip_g"].shape == (2, 32)

    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(
        write_preset("tiny-sdxl", tmp_path / "base")
    )
    pipeline.set_progress_bar_config(disable=True)
    pipeline.load_textual_inversion(
        learned["clip_l"],
        token="<shape>",
        text_encoder=pipeline.text_encoder,
        tokenizer=pipeline.tokenizer,
    )
    pipeline.load_textual_inversion(
        learned["clip_g"],
        token="<shape>",
        text_encoder=pipeline.text_encoder_2,
        tokenizer=pipeline.tokenizer_2,
    )
    assert _image(pipeline, "a <shape>").shape == (32, 32, 3)
