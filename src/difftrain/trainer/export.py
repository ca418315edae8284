"""The final artifacts under ``OUTPUT/model/``: weights in the requested formats, a model
card, and ``difftrain.json`` (the reproducibility record)."""

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from difftrain import __version__
from difftrain.api.config import TrainerConfig

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def formats_for(config: TrainerConfig) -> list[str]:
    """The export formats: the spec's, or the method's standard set."""
    spec = config.spec
    return spec.output.formats or (["diffusers", "kohya"] if spec.trains_lora else ["diffusers"])


# Written in place of what must not leave the cluster with a shared model.
REDACTED = "redacted"
_HOSTED = ("s3://", "http://", "https://")


def redact_uri(value: str) -> str:
    """``value`` with the host of an s3:// or http(s):// URI replaced (bucket names and
    endpoints say where a team keeps its data); other strings as they are. hf:// ids
    stay: they name public or gated models on the Hub, as a model card should."""
    for scheme in _HOSTED:
        if value.startswith(scheme):
            _, _, path = value[len(scheme) :].partition("/")
            return f"{scheme}{REDACTED}/{path}" if path else f"{scheme}{REDACTED}"
    return value


def redact_image(image: str | None) -> str | None:
    """An image reference without its registry host (``registry.internal:5000/...``)."""
    if not image:
        return image
    first, slash, rest = image.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return f"{REDACTED}/{rest}"
    return image


def _redact(value):
    if isinstance(value, dict):
        return {key: _redact(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_redact(item) for item in value]
    return redact_uri(value) if isinstance(value, str) else value


def shareable_spec(config: TrainerConfig) -> dict:
    """The spec as exported records carry it: no ``storage`` (endpoint, Secret name), no
    ServiceAccount, and no URI hosts (see :func:`redact_uri`)."""
    spec = config.spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    spec.pop("storage", None)
    spec.get("resources", {}).pop("serviceAccountName", None)
    return _redact(spec)


def spec_hash(config: TrainerConfig) -> str:
    text = config.spec.model_dump_json(by_alias=True, exclude_none=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _peft_state(module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(module)


def export_lora(components, trainable, formats: list[str], folder: Path, name: str, dtype):
    """LoRA weights: diffusers' ``pytorch_lora_weights.safetensors`` and/or a kohya file."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya

    peft = {part: _peft_state(module) for part, module in trainable.modules.items()}
    cast = {
        part: {k: v.detach().to("cpu", dtype) for k, v in state.items()}
        for part, state in peft.items()
    }
    if "diffusers" in formats:
        layers = {
            f"{part}_lora_layers": convert_state_dict_to_diffusers(state)
            for part, state in cast.items()
        }
        # The adapter config carries lora_alpha; without it loaders assume alpha = rank.
        metadata = {
            f"{part}_lora_adapter_metadata": module.peft_config["default"].to_dict()
            for part, module in trainable.modules.items()
        }
        pipeline = (
            StableDiffusionXLPipeline
            if components.architecture == "sdxl"
            else StableDiffusionPipeline
        )
        pipeline.save_lora_weights(folder, safe_serialization=True, **layers, **metadata)
    if "kohya" in formats:
        prefixed = {
            f"{part}.{key}": value for part, state in cast.items() for key, value in state.items()
        }
        kohya = convert_state_dict_to_kohya(prefixed)
        # diffusers writes alpha = rank here; kohya loaders scale by alpha / rank, so the
        # real lora_alpha must be stored or the LoRA applies at the wrong strength.
        for key in kohya:
            if key.endswith(".alpha"):
                part = _KOHYA_PARTS[key.split("_", 2)[1]]
                alpha = trainable.modules[part].peft_config["default"].lora_alpha
                kohya[key] = torch.tensor(float(alpha), dtype=dtype)
        save_file({k: v.contiguous() for k, v in kohya.items()}, folder / f"{name}.safetensors")


_KOHYA_PARTS = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}


def export_pipeline(components, modules: dict, folder: Path, dtype) -> None:
    """A complete diffusers pipeline folder: the base model with the trained ``modules``
    (bare modules by component name: unet, text_encoder, ...) in place, in ``dtype``."""
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(components.folder, **modules)
    save_pipeline(pipeline, folder, dtype)


def save_pipeline(pipeline, folder: Path, dtype) -> None:
    """Save ``pipeline`` as a diffusers folder in ``dtype``."""
    pipeline.to(dtype=dtype)
    pipeline.save_pretrained(folder, safe_serialization=True)


def model_card(config: TrainerConfig, facts: dict) -> str:
    """README.md for the model folder."""
    spec = config.spec
    training = spec.training
    rows = [
        ("Base model", redact_uri(spec.model.base)),
        ("Method", spec.method),
        ("Architecture", facts["architecture"]),
        ("Training images", facts["images"]),
        ("Resolution", spec.dataset.resolution),
        ("Steps", facts["steps"]),
        (
            "Batch size (per device x devices x accumulation)",
            f"{training.batch_size} x {facts['processes']} x "
            f"{training.gradient_accumulation_steps}",
        ),
        ("Learning rate", f"{training.learning_rate} ({training.scheduler.type})"),
        ("Optimizer", training.optimizer.type),
        ("Mixed precision", training.mixed_precision),
        ("Final loss", f"{facts['final_loss']:.4f}" if facts["final_loss"] is not None else "-"),
        ("Exported as", ", ".join(facts["formats"])),
    ]
    if spec.trains_lora:
        lora = spec.lora
        rank = lora.rank if lora else 16
        rows.insert(2, ("LoRA rank / alpha", f"{rank} / {(lora.alpha if lora else None) or rank}"))
    if spec.method == "full":
        reused = spec.full_settings.reuse
        rows.insert(2, ("Trained from scratch", _from_scratch(reused)))
        if "vae" not in reused:
            rows.insert(3, ("Autoencoder stage steps", spec.full_settings.autoencoder.steps))
    if spec.method == "dreambooth":
        rows[2:2] = _dreambooth_rows(spec.dreambooth, facts)
    usage = 'DiffusionPipeline.from_pretrained("model/")'
    if spec.trains_lora:
        usage = 'pipe.load_lora_weights("model/")'
    elif spec.method == "textualInversion":
        settings = spec.textual_inversion
        rows.insert(
            2, ("Placeholder / vectors", f"{settings.placeholder_token} / {settings.vectors}")
        )
        usage = 'pipe.load_textual_inversion("model/learned_embeds.safetensors")'
        if facts["architecture"] == "sdxl":
            usage = (
                'pipe.load_textual_inversion(embeds["clip_l"], token=TOKEN, ...)` for the first '
                'text encoder and `embeds["clip_g"]` with `text_encoder_2`/`tokenizer_2'
            )
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    return (
        f"# {config.name}\n\n"
        f"Trained with difftrain {__version__} from `{redact_uri(spec.model.base)}`.\n\n"
        f"| | |\n| --- | --- |\n{table}\n\n"
        f"Load it with diffusers: `{usage}`.\n\n"
        f"Reproducibility record: `difftrain.json` (spec hash {spec_hash(config)[:12]}).\n"
    )


def _dreambooth_rows(settings, facts: dict) -> list[tuple[str, str]]:
    trained = "LoRA" if settings.unet == "lora" else "whole UNet"
    if settings.train_text_encoder:
        trained += " and text encoders"
    prior = "off"
    if settings.class_prompt:
        prior = (
            f"{facts['class_images']} class images of {settings.class_prompt}, "
            f"weight {settings.prior_loss_weight}"
        )
    return [
        ("Instance prompt", settings.instance_prompt),
        ("Prior preservation", prior),
        ("Trained", trained),
    ]


def _from_scratch(reused: list[str]) -> str:
    parts = ["UNet"] + [
        name
        for key, name in (("textEncoders", "text encoders"), ("vae", "VAE"))
        if key not in reused
    ]
    kept = f"; {' and '.join(reused)} from the base" if reused else ""
    return ", ".join(parts) + kept


def record(config: TrainerConfig, facts: dict) -> str:
    """difftrain.json: what produced this model."""
    return json.dumps(
        {
            "name": config.name,
            "namespace": config.namespace,
            "uid": config.uid,
            "difftrainVersion": __version__,
            "specHash": spec_hash(config),
            "datasetFingerprint": facts["dataset_fingerprint"],
            "images": facts["images"],
            "steps": facts["steps"],
            "finalLoss": facts["final_loss"],
            "startTime": facts["start_time"],
            "endTime": facts["end_time"],
            "image": redact_image(facts.get("image")),
            # What made the model, less what says where the team keeps things.
            "spec": shareable_spec(config),
        },
        indent=2,
    )
