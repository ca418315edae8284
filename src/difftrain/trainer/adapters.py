"""LoRA adapters (peft) on the denoiser and the text encoders, and their export in
diffusers' and kohya's layouts; used by every method that trains adapters."""

import torch
from safetensors.torch import save_file

from difftrain.api.methods import LoraSpec
from difftrain.errors import InvalidSpec
from difftrain.trainer.trainable import Trainable


def settings_of(spec) -> LoraSpec:
    return spec.lora or LoraSpec()


def _config(settings: LoraSpec, targets: list[str]):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha or settings.rank,
        lora_dropout=settings.dropout,
        init_lora_weights="gaussian",
        target_modules=targets,
    )


def add(components, spec, text_encoders: bool) -> Trainable:
    """LoRA adapters on the denoiser (settings from spec.lora), and on the text encoders
    when ``text_encoders``; the frozen base stays as it is."""
    family, settings = components.family, settings_of(spec)
    components.denoiser.requires_grad_(False)
    targets = family.lora_targets(settings.target_modules)
    try:
        components.denoiser.add_adapter(_config(settings, targets))
    except ValueError as error:  # peft: no module matched
        raise InvalidSpec(f"spec.lora.targetModules: {error}") from None
    modules = {family.denoiser: components.denoiser}
    if text_encoders:
        trained = family.trained_encoders()
        for name, encoder in zip(family.encoder_names(), components.text_encoders, strict=True):
            if name in trained:
                encoder.add_adapter(_config(settings, family.text_encoder_lora_targets()))
                modules[name] = encoder
    return Trainable(modules, lora=True)


def export(components, trainable: Trainable, formats: list[str], folder, name: str, dtype):
    """LoRA weights: diffusers' ``pytorch_lora_weights.safetensors`` and/or a kohya file."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    cast = {
        part: {k: v.detach().to("cpu", dtype) for k, v in get_peft_model_state_dict(m).items()}
        for part, m in trainable.modules.items()
    }
    family = components.family
    if "diffusers" in formats:
        # The adapter config carries lora_alpha; without it loaders assume alpha = rank.
        metadata = {
            f"{part}_lora_adapter_metadata": module.peft_config["default"].to_dict()
            for part, module in trainable.modules.items()
        }
        family.save_lora(folder, cast, metadata)
    if "kohya" in formats:
        prefixed = {
            f"{part}.{key}": value for part, state in cast.items() for key, value in state.items()
        }
        kohya = convert_state_dict_to_kohya(prefixed)
        # diffusers writes alpha = rank here; kohya loaders scale by alpha / rank, so the
        # real lora_alpha must be stored or the LoRA applies at the wrong strength.
        for key in kohya:
            if key.endswith(".alpha"):
                part = family.kohya_component(key.split("_", 2)[1])
                alpha = trainable.modules[part].peft_config["default"].lora_alpha
                kohya[key] = torch.tensor(float(alpha), dtype=dtype)
        save_file({k: v.contiguous() for k, v in kohya.items()}, folder / f"{name}.safetensors")


def card_row(spec) -> tuple[str, str]:
    """The model card's row about the adapters."""
    lora = spec.lora
    rank = lora.rank if lora else 16
    return ("LoRA rank / alpha", f"{rank} / {(lora.alpha if lora else None) or rank}")


USAGE = 'pipe.load_lora_weights("model/")'
