"""Adapters besides LoRA (DoRA, LoKr, LoHa) through peft: they train on every family, and
what is exported loads into a fresh pipeline with exactly the trained weights; LoKr and
LoHa files in LyCORIS's layout load through LyCORIS's own readers and draw the same."""

import json

import pytest
import torch
from safetensors.torch import load_file

from difftrain.trainer import adapters, families
from difftrain.trainer.presets import build_preset
from tests.trainer import runner
from tests.trainer.families import job, refused, sample

CASES = [
    pytest.param("tiny-sd", {"type": "lokr"}, "LoKrConfig", id="sd-lokr"),
    pytest.param("tiny-sd", {"type": "loha"}, "LoHaConfig", id="sd-loha"),
    pytest.param("tiny-sd", {"dora": True}, "LoraConfig", id="sd-dora"),
    pytest.param("tiny-sdxl", {"type": "loha"}, "LoHaConfig", id="sdxl-loha"),
    pytest.param("tiny-sd3", {"type": "lokr"}, "LoKrConfig", id="sd3-lokr"),
    pytest.param("tiny-sd3", {"dora": True}, "LoraConfig", id="sd3-dora"),
    pytest.param("tiny-flux", {"type": "loha"}, "LoHaConfig", id="flux-loha"),
]


def _adapter_weights(module) -> dict[str, torch.Tensor]:
    """The adapter tensors of ``module`` by parameter name, whatever the adapter's name."""
    return {
        name.replace(".default_0", ".default"): value.detach()
        for name, value in module.named_parameters()
        if any(f".{kind}" in name for kind in ("lora_", "lokr_", "hada_"))
    }


def _with_lycoris(pipeline, file, denoiser: str, encoders: list[str]) -> int:
    """Put the LyCORIS file's adapters on ``pipeline`` with the lycoris package's reader
    (which builds each layer's LoKr or LoHa from the file's tensors alone) and return how
    many layers it adapted. The reader names a module ``<prefix>_<path>``: a transformer's
    keys are ``lycoris_<path>`` (its own prefix); kohya's ``lora_unet_<path>`` and
    ``lora_te1_<path>`` are the paths of a module holding ``unet`` and ``te1`` under the
    prefix ``lora``."""
    from lycoris import create_lycoris_from_weights
    from lycoris.wrapper import LycorisNetwork

    roots = [("lora", torch.nn.Module())]
    for part in encoders:
        roots[0][1].add_module(
            families.kohya_encoder_prefix(part).removeprefix("lora_"), getattr(pipeline, part)
        )
    if denoiser == "transformer":
        roots.append(("lycoris", pipeline.transformer))
    else:
        roots[0][1].add_module("unet", pipeline.unet)
    adapted, own = 0, LycorisNetwork.LORA_PREFIX
    for prefix, root in roots:
        LycorisNetwork.LORA_PREFIX = prefix
        try:
            network, _ = create_lycoris_from_weights(1.0, str(file), root)
        finally:
            LycorisNetwork.LORA_PREFIX = own
        network.apply_to()
        adapted += len(network.loras)
    return adapted


@pytest.mark.parametrize(("preset", "lora", "config_class"), CASES)
def test_adapters_train_and_load_with_the_trained_weights(
    tmp_path, trainer_cache, shapes_folder, preset, lora, config_class
):
    output = tmp_path / "out"
    flow = preset in ("tiny-sd3", "tiny-flux")
    lycoris = config_class != "LoraConfig"
    # kohya's layout (LyCORIS's for LoKr and LoHa) is written by default for the UNet
    # families, when asked for the transformer ones
    formats = {"formats": ["diffusers", "kohya"]} if flow and lycoris else {}
    spec = {
        "model": {"base": f"preset:{preset}"},
        "dataset": {"uri": f"file://{shapes_folder}"},
        "output": {"uri": f"file://{output}", "dtype": "fp32", **formats},
        # DoRA on text encoders is refused (their magnitudes would not load in diffusers)
        "lora": {"rank": 4, "alpha": 8, "trainTextEncoder": "dora" not in lora, **lora},
        "training": {"steps": 4, "learningRate": 1e-2},
        "checkpoints": {"everySteps": 4},
    }
    config = runner.write_config(tmp_path, spec)

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 0, log
    model = output / "model"
    pipeline = build_preset(preset)
    before = sample(pipeline)
    denoiser = "transformer" if hasattr(pipeline, "transformer") else "unet"
    encoders = {"tiny-sd": ["text_encoder"], "tiny-flux": ["text_encoder"]}.get(
        preset, ["text_encoder", "text_encoder_2"]
    )
    if "dora" in lora:
        encoders = []
    if config_class == "LoraConfig":
        assert not (model / "test-job.safetensors").exists()  # no kohya layout for DoRA
        pipeline.load_lora_weights(model)
    else:
        assert sorted(p.name for p in model.iterdir()) == sorted(
            ["README.md", "difftrain.json", "test-job.safetensors", denoiser, *encoders]
        )
        for part in (denoiser, *encoders):
            adapters.load_peft(getattr(pipeline, part), model / part)
    loaded = next(iter(getattr(pipeline, denoiser).peft_config.values()))
    assert type(loaded).__name__ == config_class
    assert getattr(loaded, "use_dora", False) == lora.get("dora", False)
    trained_image = sample(pipeline)
    assert (trained_image - before).abs().max() > 1e-4
    trained = load_file(output / "checkpoints" / "step-00000004" / "trainable.safetensors")
    for part in (denoiser, *encoders):
        got = _adapter_weights(getattr(pipeline, part))
        expected = {
            key.removeprefix(f"{part}."): value
            for key, value in trained.items()
            if key.startswith(f"{part}.")
        }
        assert got.keys() == expected.keys(), part
        different = [k for k in got if not torch.equal(got[k], expected[k])]
        assert not different, (part, different[:3])
    if lycoris:
        file = model / "test-job.safetensors"
        keys = load_file(file).keys()
        owners = {"lycoris" if flow else "lora_unet", *map(families.kohya_encoder_prefix, encoders)}
        assert {owner for owner in owners for key in keys if key.startswith(f"{owner}_")} == owners
        assert all(any(key.startswith(f"{owner}_") for owner in owners) for key in keys)
        other = build_preset(preset)
        layers = sum(key.endswith(".alpha") for key in keys)
        assert _with_lycoris(other, file, denoiser, encoders) == layers
        drawn = sample(other)
        assert (drawn - trained_image).abs().max() < 1e-5
        assert (drawn - before).abs().max() > 1e-4
    card = (model / "README.md").read_text()
    kind = {"lokr": "LoKr", "loha": "LoHa"}.get(lora.get("type"), "DoRA")
    assert f"| {kind} rank / alpha | 4 / 8 |" in card
    record = json.loads((model / "difftrain.json").read_text())
    assert record["spec"]["lora"]["type"] == lora.get("type", "lora")


@pytest.mark.parametrize(("preset", "title"), [("tiny-sd3", "SD3"), ("tiny-flux", "Flux")])
def test_kohya_for_layers_its_layout_does_not_name_is_refused(
    tmp_path, trainer_cache, shapes_folder, preset, title
):
    spec = job(
        tmp_path,
        shapes_folder,
        preset,
        lora={"rank": 4, "targetModules": ["to_q", "proj_out"]},
        output={"uri": f"file://{tmp_path}/out", "formats": ["kohya"]},
    )

    assert refused(tmp_path, trainer_cache, spec).startswith(
        f"spec.lora.targetModules: the kohya layout has no name for proj_out in {title}; "
        "target only "
    )
