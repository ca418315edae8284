"""Presets, the offline tokenizer, and loading base models."""

import json

import pytest
import torch

from difftrain.api.data import ModelSpec
from difftrain.errors import InvalidSpec
from difftrain.trainer.models import load_components
from difftrain.trainer.presets import build_preset, write_preset
from difftrain.trainer.tokenizer import WORDS, build_tokenizer


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return write_preset("tiny-sd", tmp_path_factory.mktemp("model") / "tiny-sd")


def test_every_listed_word_is_one_token():
    tokenizer = build_tokenizer()

    lengths = {word: len(tokenizer(word).input_ids) - 2 for word in WORDS}

    assert set(lengths.values()) == {1}


def test_unknown_words_still_tokenize_by_bytes():
    tokenizer = build_tokenizer()

    tokens = tokenizer.convert_ids_to_tokens(tokenizer("zebra!").input_ids)

    assert tokens[0] == "<|startoftext|>" and tokens[-1] == "<|endoftext|>"
    assert "".join(tokens[1:-1]).replace("</w>", "") == "zebra!"


def test_presets_are_deterministic():
    first, second = build_preset("tiny-sd"), build_preset("tiny-sd")

    for (name, a), (_, b) in zip(
        first.unet.state_dict().items(), second.unet.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("preset", "architecture", "encoders"), [("tiny-sd", "sd", 1), ("tiny-sdxl", "sdxl", 2)]
)
def test_architecture_is_detected(tmp_path, preset, architecture, encoders):
    folder = write_preset(preset, tmp_path / preset)

    components = load_components(folder, ModelSpec(base=f"preset:{preset}"))

    assert components.architecture == architecture
    assert len(components.text_encoders) == len(components.tokenizers) == encoders
    assert components.prediction_type == "epsilon"


def test_prediction_type_override(sd_folder):
    spec = ModelSpec(base="preset:tiny-sd", prediction_type="v_prediction")

    assert load_components(sd_folder, spec).prediction_type == "v_prediction"


def test_architecture_mismatch_is_refused(sd_folder):
    with pytest.raises(
        InvalidSpec, match=r"spec\.model\.architecture is sdxl but .* is an sd model"
    ):
        load_components(sd_folder, ModelSpec(base="preset:tiny-sd", architecture="sdxl"))


def test_components_from_other_libraries_are_refused(tmp_path, sd_folder):
    import shutil

    folder = shutil.copytree(sd_folder, tmp_path / "custom")
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = ["my_package", "MyUNet"]
    (folder / "model_index.json").write_text(json.dumps(index))

    with pytest.raises(InvalidSpec, match="component unet comes from 'my_package'"):
        load_components(folder, ModelSpec(base="file:///custom"))


def test_a_model_of_another_family_is_refused_naming_what_it_is(tmp_path):
    folder = tmp_path / "pixart"
    (folder / "transformer").mkdir(parents=True)
    index = {
        "_class_name": "PixArtSigmaPipeline",
        "transformer": ["diffusers", "PixArtTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "transformer" / "config.json").write_text(json.dumps({"patch_size": 2}))

    with pytest.raises(InvalidSpec) as raised:
        load_components(folder, ModelSpec(base="s3://models/pixart"))

    assert str(raised.value) == (
        "spec.model.base: s3://models/pixart is a PixArtSigmaPipeline this trainer does not "
        "train; supported families: sdxl, flux, sd, sd3"
    )


def test_every_preset_the_api_accepts_belongs_to_a_family():
    from difftrain.api.uris import PRESETS
    from difftrain.trainer import families

    owned = {name: family.name for family in families.all_families() for name in family.presets}

    assert owned == {
        "tiny-sd": "sd",
        "tiny-sdxl": "sdxl",
        "tiny-sd3": "sd3",
        "tiny-flux": "flux",
    }
    assert set(PRESETS) == set(owned)
