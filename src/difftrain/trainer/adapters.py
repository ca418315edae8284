"""LoRA adapters (peft) on the denoiser and the text encoders, and their export in
diffusers' and kohya's layouts; used by every method that trains adapters."""

import shutil

import torch
from safetensors.torch import save_file

from difftrain.api.methods import LoraSpec
from difftrain.errors import InvalidSpec
from difftrain.trainer.families import kohya_encoder_prefix
from difftrain.trainer.trainable import Trainable


def settings_of(spec) -> LoraSpec:
    return spec.lora or LoraSpec()


def _config(settings: LoraSpec, targets: list[str]):
    """peft's config for the adapters spec.lora asks for, on the layers ``targets``."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    alpha = settings.alpha or settings.rank
    if settings.type == "lora":
        return LoraConfig(
            r=settings.rank,
            lora_alpha=alpha,
            lora_dropout=settings.dropout,
            init_lora_weights="gaussian",
            use_dora=settings.dora,
            target_modules=targets,
        )
    kind = {"lokr": LoKrConfig, "loha": LoHaConfig}[settings.type]
    # Both start as no change (one factor at zero), as LoRA's B does.
    return kind(
        r=settings.rank,
        alpha=alpha,
        rank_dropout=settings.dropout,
        init_weights=True,
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


def peft_config(module):
    """The config of ``module``'s adapter (peft names the one adapter "default")."""
    return module.peft_config["default"]


def is_lora(trainable: Trainable) -> bool:
    """Whether the adapters are LoRA (DoRA included), which diffusers' LoRA files hold."""
    return all(peft_config(m).peft_type == "LORA" for m in trainable.modules.values())


def export(components, trainable: Trainable, formats: list[str], folder, dtype, naming: dict):
    """The adapters' weights. LoRA and DoRA: diffusers' ``pytorch_lora_weights.safetensors``
    and/or a kohya file (LoRA only). LoKr and LoHa: peft's folders (:func:`export_peft`)
    and/or one file in LyCORIS's layout (:func:`lycoris_state`)."""
    from peft.utils import get_peft_model_state_dict

    cast = {
        part: {k: v.detach().to("cpu", dtype) for k, v in get_peft_model_state_dict(m).items()}
        for part, m in trainable.modules.items()
    }
    family, name = components.family, naming["name"]
    if not is_lora(trainable):  # LoKr, LoHa
        if "diffusers" in formats:
            export_peft(trainable, cast, folder)
        if "kohya" in formats:
            lycoris = lycoris_state(cast, trainable, family, dtype)
            save_file(lycoris, folder / f"{name}.safetensors")
        return
    # The adapter config carries lora_alpha; without it loaders assume alpha = rank.
    metadata = {
        f"{part}_lora_adapter_metadata": peft_config(module).to_dict()
        for part, module in trainable.modules.items()
    }
    if "diffusers" in formats:
        family.save_lora(folder, cast, metadata)
    if "kohya" in formats:
        kohya = family.kohya_state(cast, trainable, dtype)
        save_file({k: v.contiguous() for k, v in kohya.items()}, folder / f"{name}.safetensors")
    if "merged" in formats and "diffusers" in formats:
        export_merged(components, folder, folder / MERGED, formats, dtype, naming)
    elif "merged" in formats:  # the diffusers file only for as long as merging takes
        lora = folder / ".lora"
        family.save_lora(lora, cast, metadata)
        try:
            export_merged(components, lora, folder / MERGED, formats, dtype, naming)
        finally:
            shutil.rmtree(lora, ignore_errors=True)


def export_bytes(stage, formats: list[str], itemsize: int) -> int:
    """About how large the adapter files are, and the merged model's when asked for."""
    from difftrain.trainer.methods import whole_model_bytes

    size = stage.trainable.trained_count() * itemsize * len(formats)
    if "merged" in formats:
        size += whole_model_bytes(stage.components, formats, itemsize)
    return size


# Where the merged export goes, under model/.
MERGED = "merged"


def export_merged(components, lora, folder, formats: list[str], dtype, naming: dict) -> None:
    """The base model with the LoRA file in ``lora`` fused into its weights, as a diffusers
    folder at ``folder`` (and ``<name>.safetensors`` in it with singleFile; ``naming`` as
    export.naming gives it). Made the way users load base + LoRA, so the merged model
    draws what they would."""
    from diffusers import DiffusionPipeline

    from difftrain.trainer import export

    pipeline = DiffusionPipeline.from_pretrained(components.folder)
    pipeline.load_lora_weights(lora)
    pipeline.fuse_lora()
    pipeline.unload_lora_weights()
    whole = ["diffusers"] + (["singleFile"] if "singleFile" in formats else [])
    export.save_pipeline(pipeline, components.family, folder, whole, dtype, **naming)


def kohya_state(states: dict, trainable: Trainable, family, dtype) -> dict:
    """LoRA in kohya's keys (``lora_unet_...``, ``lora_te1_...``), as diffusers names
    them for the UNet families and for text encoders, with each layer's real alpha."""
    from diffusers.utils import convert_state_dict_to_kohya

    prefixed = {
        f"{part}.{key}": value for part, state in states.items() for key, value in state.items()
    }
    kohya = convert_state_dict_to_kohya(prefixed)
    # diffusers writes alpha = rank here; kohya loaders scale by alpha / rank, so the
    # real lora_alpha must be stored or the LoRA applies at the wrong strength.
    for key in kohya:
        if key.endswith(".alpha"):
            part = family.kohya_component(key.split("_", 2)[1])
            alpha = peft_config(trainable.modules[part]).lora_alpha
            kohya[key] = torch.tensor(float(alpha), dtype=dtype)
    return kohya


def lycoris_state(states: dict, trainable: Trainable, family, dtype) -> dict:
    """LoKr and LoHa in LyCORIS's layout, the one ComfyUI, A1111/Forge and kohya's
    sd-scripts read: ``<prefix>_<module path, dots as underscores>.<factor>`` and an
    ``.alpha`` per layer. The prefix is the family's for the denoiser (``lora_unet`` over
    the UNet's diffusers names, ``lycoris`` over a transformer's) and ``lora_te1``,
    ``lora_te2`` for the text encoders. peft and LyCORIS name the factors alike
    (``lokr_w1``, ``lokr_w2_a``, ``hada_w1_a``, ...) and hold them in the same shapes."""
    lycoris = {}
    for part, state in states.items():
        config = peft_config(trainable.modules[part])
        prefix = family.lycoris_prefix if part == family.denoiser else kohya_encoder_prefix(part)
        layers: dict[str, dict] = {}
        for key, value in state.items():
            layer, factor = key.rsplit(".", 1)
            layers.setdefault(layer, {})[factor] = value
        for layer, factors in layers.items():
            name = f"{prefix}_{layer.replace('.', '_')}"
            # Readers scale by alpha / rank only where a factor is split in two (rank
            # known); a LoKr of two whole factors they apply as it is, so peft's scale is
            # folded into its first factor.
            whole = not any(factor.endswith(("_a", "_b")) for factor in factors)
            for factor, value in factors.items():
                if whole and factor == "lokr_w1":
                    value = value * (config.alpha / config.r)
                lycoris[f"{name}.{factor}"] = value.contiguous()
            lycoris[f"{name}.alpha"] = torch.tensor(float(config.alpha), dtype=dtype)
    return lycoris


PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def export_peft(trainable: Trainable, states: dict, folder) -> None:
    """LoKr and LoHa, which diffusers' LoRA files cannot hold, in peft's own layout: a
    folder per component (``unet/``, ``text_encoder/``, ...) with the adapter's config
    and its weights, keyed as peft names them."""
    for part, module in trainable.modules.items():
        target = folder / part
        target.mkdir(parents=True, exist_ok=True)
        peft_config(module).save_pretrained(target)
        save_file({k: v.contiguous() for k, v in states[part].items()}, target / PEFT_WEIGHTS)


def load_peft(module, folder) -> None:
    """Put the adapter exported by :func:`export_peft` in ``folder`` on ``module``: what
    the model card tells users to do, and what the tests do."""
    from peft import PeftConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    inject_adapter_in_model(PeftConfig.from_pretrained(folder), module)
    set_peft_model_state_dict(module, load_file(folder / PEFT_WEIGHTS))


NAMES = {"lora": "LoRA", "lokr": "LoKr", "loha": "LoHa"}


def card_row(spec) -> tuple[str, str]:
    """The model card's row about the adapters."""
    lora = settings_of(spec)
    kind = "DoRA" if lora.dora else NAMES[lora.type]
    return (f"{kind} rank / alpha", f"{lora.rank} / {lora.alpha or lora.rank:g}")


def usage(spec, family) -> str:
    """How a user loads the adapters (for the model card)."""
    if settings_of(spec).type == "lora":
        return 'pipe.load_lora_weights("model/")'
    return (
        "ComfyUI, A1111/Forge: the LyCORIS `.safetensors` file in model/ (output format "
        "kohya); diffusers with "
        f'peft: `inject_adapter_in_model(PeftConfig.from_pretrained("model/{family.denoiser}"), '
        f"pipe.{family.denoiser})`, then `set_peft_model_state_dict(pipe.{family.denoiser}, "
        f'load_file("model/{family.denoiser}/{PEFT_WEIGHTS}"))` (and likewise for each text '
        "encoder folder)"
    )
