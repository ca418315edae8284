"""Base models: fetch a diffusers folder (S3, local, Hugging Face Hub or a preset) and load
its components for training.

The folder is fetched once per node into the local cache. Components are loaded by the
classes named in ``model_index.json``, only from diffusers and transformers (no remote
code). SD 1.x/2.x and SDXL are told apart by the pipeline class or, for custom
pipelines, by whether the UNet takes SDXL's extra size/crop conditioning.
"""

import importlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difftrain.api.data import ModelSpec
from difftrain.errors import InvalidSpec, StorageUnavailable
from difftrain.storage import S3Settings, open_store
from difftrain.trainer.cache import cached_folder
from difftrain.trainer.presets import write_preset

log = logging.getLogger(__name__)

_LIBRARIES = ("diffusers", "transformers")


def fetch_model(model: ModelSpec, settings: S3Settings, cache: Path) -> Path:
    """A local diffusers folder holding ``model.base``."""
    uri = model.base
    if uri.startswith("preset:"):
        name = uri.removeprefix("preset:")
        return cached_folder(cache, uri, lambda folder: write_preset(name, folder))
    if uri.startswith("file://"):
        folder = Path(uri.removeprefix("file://"))
    elif uri.startswith("s3://"):
        store = open_store(uri, settings)
        if not store.exists("model_index.json"):
            raise _not_a_model(uri)
        folder = cached_folder(cache, uri, lambda target: store.download_tree("", target))
    else:
        folder = _from_hub(uri.removeprefix("hf://"), model.revision, cache)
    if not (folder / "model_index.json").is_file():
        raise _not_a_model(uri)
    return folder


def _not_a_model(uri: str) -> InvalidSpec:
    return InvalidSpec(
        f"spec.model.base: no diffusers model at {uri} (model_index.json not found); point "
        "it at a folder written by DiffusionPipeline.save_pretrained"
    )


def _from_hub(repo: str, revision: str | None, cache: Path) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache / "hub"))
    except LocalEntryNotFoundError:
        raise StorageUnavailable(
            f"cannot download hf://{repo}: the Hugging Face Hub is not reachable from here "
            "(offline, or HF_HUB_OFFLINE is set) and the model is not cached; copy the model "
            "to s3:// or file:// and set spec.model.base to it"
        ) from None
    except HfHubHTTPError as error:
        raise InvalidSpec(f"spec.model.base: cannot fetch hf://{repo}: {error}") from None


@dataclass
class Components:
    """A base model's parts, ready to train. SDXL has two text encoders and tokenizers."""

    folder: Path
    architecture: str  # "sd" or "sdxl"
    prediction_type: str  # "epsilon" or "v_prediction"
    unet: Any
    vae: Any
    noise_scheduler: Any
    text_encoders: list = field(default_factory=list)
    tokenizers: list = field(default_factory=list)


def read_index(folder: Path) -> dict:
    return json.loads((folder / "model_index.json").read_text())


def detect_architecture(index: dict, unet_config: dict) -> str:
    """``sdxl`` or ``sd``, from the pipeline class or the UNet's conditioning."""
    name = index.get("_class_name", "")
    if "XL" in name or unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd"


def _load_part(folder: Path, index: dict, name: str, variant: str | None):
    library, class_name = index[name]
    if library not in _LIBRARIES:
        raise InvalidSpec(
            f"spec.model.base: component {name} comes from {library!r}; only {_LIBRARIES} "
            "components can be loaded"
        )
    cls = getattr(importlib.import_module(library), class_name)
    options = {"variant": variant} if variant and library == "diffusers" else {}
    if name.startswith("tokenizer"):
        return cls.from_pretrained(folder / name)
    return cls.from_pretrained(folder / name, **options)


def load_components(folder: Path, model: ModelSpec) -> Components:
    """Load the parts of the model in ``folder`` as ``model`` (the spec) describes."""
    index = read_index(folder)
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    architecture = detect_architecture(index, unet_config)
    if model.architecture in ("sd", "sdxl") and model.architecture != architecture:
        raise InvalidSpec(
            f"spec.model.architecture is {model.architecture} but {model.base} is an "
            f"{architecture} model; set architecture to auto or {architecture}"
        )
    scheduler = _load_part(folder, index, "scheduler", None)
    prediction_type = (
        scheduler.config.prediction_type
        if model.prediction_type == "auto"
        else model.prediction_type
    )
    names = ["text_encoder", "text_encoder_2"] if architecture == "sdxl" else ["text_encoder"]
    return Components(
        folder=folder,
        architecture=architecture,
        prediction_type=prediction_type,
        unet=_load_part(folder, index, "unet", model.variant),
        vae=_load_part(folder, index, "vae", model.variant),
        noise_scheduler=scheduler,
        text_encoders=[_load_part(folder, index, n, model.variant) for n in names],
        tokenizers=[
            _load_part(folder, index, n.replace("text_encoder", "tokenizer"), None) for n in names
        ],
    )
