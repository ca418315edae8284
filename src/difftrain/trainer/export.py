"""The final artifacts under ``OUTPUT/model/``: weights in the requested formats, a model
card, and ``difftrain.json`` (the reproducibility record)."""

import hashlib
import importlib
import json
import logging
import shutil
from pathlib import Path

import torch

from difftrain import __version__, contract
from difftrain.api.config import TrainerConfig
from difftrain.trainer import evaluation

log = logging.getLogger(__name__)

DTYPES = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    # int8: the denoiser's linear layers as int8 weights (torchao, weight-only, a scale
    # per output channel; see quantize_saved), all else, adapter files included, in bf16.
    "int8": torch.bfloat16,
}


def formats_for(config: TrainerConfig, family) -> list[str]:
    """The export formats: the spec's, or the family's standard set for the method."""
    spec = config.spec
    if spec.output.formats:
        return spec.output.formats
    formats = family.export_formats(spec.trains_lora)
    if spec.lora is not None and not spec.lora.kohya_layout:  # LoKr, LoHa, DoRA
        formats = [name for name in formats if name != "kohya"]
    return formats


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
    spec["output"].get("registry", {}).get("mlflow", {}).pop("secretRef", None)
    return _redact(spec)


def spec_hash(config: TrainerConfig) -> str:
    text = config.spec.model_dump_json(by_alias=True, exclude_none=True)
    return hashlib.sha256(text.encode()).hexdigest()


def export_pipeline(stage, modules: dict, folder: Path, formats: list[str], dtype) -> None:
    """The base model with the trained ``modules`` (bare modules by component name: unet,
    text_encoder, ...) in place, in the whole-model ``formats``."""
    from diffusers import DiffusionPipeline

    # The training scheduler, with the schedule the job set (spec.training.flowMatching).
    scheduler = stage.components.noise_scheduler
    pipeline = DiffusionPipeline.from_pretrained(
        stage.components.folder, **{"scheduler": scheduler, **modules}
    )
    save_pipeline(pipeline, stage.components.family, folder, formats, dtype, **naming(stage))


def naming(stage) -> dict:
    """save_pipeline's arguments from the job: the single file's name, and int8."""
    output = stage.config.spec.output
    return {"name": stage.config.name, "int8": output.dtype == "int8"}


def save_pipeline(
    pipeline, family, folder: Path, formats: list[str], dtype, name: str, int8: bool = False
) -> None:
    """``pipeline`` in ``dtype`` as a diffusers folder (format diffusers), its denoiser's
    weights in int8 with ``int8``, and as ``<name>.safetensors`` in the original Stable
    Diffusion layout (singleFile)."""
    from difftrain.trainer import singlefile

    pipeline.to(dtype=dtype)
    if "diffusers" in formats:
        pipeline.save_pretrained(folder, safe_serialization=True)
        if int8:
            quantize_saved(folder, family.denoiser)
    if "singleFile" in formats:
        singlefile.save(pipeline, family, folder / f"{name}.safetensors", dtype)


def quantize_saved(folder: Path, denoiser: str) -> None:
    """Rewrite the saved ``denoiser`` of the pipeline at ``folder`` with int8 weights
    (torchao's weight-only int8), its config saying so: ``from_pretrained`` loads it
    quantized wherever torchao is installed."""
    from diffusers import DiffusionPipeline, TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    index = DiffusionPipeline.load_config(folder)
    library, class_name = index[denoiser]
    model_class = getattr(importlib.import_module(library), class_name)
    quantized = model_class.from_pretrained(
        folder,
        subfolder=denoiser,
        quantization_config=TorchAoConfig(Int8WeightOnlyConfig()),
        dtype=torch.bfloat16,
    )
    shutil.rmtree(folder / denoiser)
    quantized.save_pretrained(folder / denoiser, safe_serialization=True)


def model_card(config: TrainerConfig, facts: dict, method, family) -> str:
    """README.md for the model folder; ``method`` adds its rows and says how to load it."""
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
        *(
            [("Sigma shift (sample with the same)", training.flow_matching.shift)]
            if training.flow_matching.shift is not None
            else []
        ),
        ("Final loss", f"{facts['final_loss']:.4f}" if facts["final_loss"] is not None else "-"),
        ("Exported as", ", ".join(facts["formats"])),
        *evaluation.card_rows(facts.get("evaluations") or []),
    ]
    own, usage = method.card(spec, facts, family)
    rows[2:2] = own
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    return (
        f"# {config.name}\n\n"
        f"Trained with difftrain {__version__} from `{redact_uri(spec.model.base)}`.\n\n"
        f"| | |\n| --- | --- |\n{table}\n\n"
        f"Load it with diffusers: `{usage}`.\n\n"
        f"{_other_files(config.name, facts['formats'])}"
        f"Reproducibility record: `difftrain.json` (spec hash {spec_hash(config)[:12]}).\n"
    )


def _other_files(name: str, formats: list[str]) -> str:
    """The model card's lines on the single-file and merged exports."""
    lines = []
    if "merged" in formats:
        lines.append(
            "`merged/` is the base model with the LoRA fused in, a whole pipeline: "
            '`DiffusionPipeline.from_pretrained("model/merged/")`.'
        )
    if "singleFile" in formats:
        where = f"merged/{name}.safetensors" if "merged" in formats else f"{name}.safetensors"
        lines.append(
            f"`{where}` holds the whole model in the original Stable Diffusion layout: put "
            "it in ComfyUI's `models/checkpoints/` or A1111's `models/Stable-diffusion/`, or "
            f'load it with `StableDiffusionPipeline.from_single_file("model/{where}")` '
            "(StableDiffusionXLPipeline for SDXL)."
        )
    return "".join(line + "\n\n" for line in lines)


def export_model(stage, facts: dict) -> None:
    """Write the trained model to ``OUTPUT/model/``: the method's files, the model card,
    and ``difftrain.json`` last (its presence says the folder is complete)."""
    config, method = stage.config, stage.run.method
    formats = formats_for(config, stage.components.family)
    dtype = DTYPES[config.spec.output.dtype]
    folder = stage.paths.scratch / contract.MODEL
    size = method.export_bytes(stage, formats, dtype.itemsize)
    with stage.disk.writing(folder, "the exported model", size):
        folder.mkdir(parents=True, exist_ok=True)
        method.export(stage, folder, formats, dtype)
        facts["formats"] = formats
        card = model_card(config, facts, method, stage.components.family)
        (folder / "README.md").write_text(card)
        if config.spec.evaluation is not None:
            scores = evaluation.result(config.spec, facts.get("evaluations") or [])
            text = json.dumps(_redact(scores), indent=2) + "\n"
            (folder / evaluation.RESULT_FILE).write_text(text)
    store = stage.output.child(contract.MODEL)
    try:
        store.upload_tree(folder, "")
        text = record(config, facts)
        store.write_bytes("difftrain.json", text.encode())
        log.info("model exported to %s", store.uri)
        if config.spec.output.registry is not None:  # the model is safe in the output first
            from difftrain.trainer import modelregistry

            (folder / "difftrain.json").write_text(text)
            shared = shareable_spec(config)
            facts["registry"] = modelregistry.publish(stage, folder, shared, spec_hash(config))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


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
