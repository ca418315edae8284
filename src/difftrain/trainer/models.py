"""Base models: fetch a diffusers folder (S3, local, Hugging Face Hub or a preset) and load
its components for training.

The folder is fetched once per node into the local cache. Components are loaded by the
classes named in ``model_index.json``, only from diffusers and transformers (no remote
code). The model's family (families/) is told by ``model_index.json`` and the
component configs.
"""

import importlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difftrain.api.data import ModelSpec
from difftrain.errors import InvalidSpec, StorageUnavailable
from difftrain.storage import S3Settings, open_store
from difftrain.trainer import families
from difftrain.trainer.cache import cached_folder
from difftrain.trainer.families import Family
from difftrain.trainer.presets import write_preset

log = logging.getLogger(__name__)

_LIBRARIES = ("diffusers", "transformers")


# Weight files: what a from-scratch job that reuses nothing need not download.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx", ".h5")


def fetch_model(model: ModelSpec, settings: S3Settings, cache: Path, weights: bool = True) -> Path:
    """A local diffusers folder holding ``model.base``; without ``weights``, only its
    configs and tokenizers (enough to build a new model of the same architecture)."""
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

        select = None if weights else _not_weights

        def fill(target: Path) -> None:
            store.download_tree("", target, select, unsafe_error=InvalidSpec)

        # Keyed by the objects' tags (ETags): a model written anew is fetched anew.
        version = store.fingerprint("", select) + ("" if weights else "#configs")
        folder = cached_folder(cache, f"{uri}#{version}", fill)
    else:
        folder = _from_hub(uri.removeprefix("hf://"), model.revision, cache, weights)
    if not (folder / "model_index.json").is_file():
        raise _not_a_model(uri)
    return folder


def _not_weights(key: str) -> bool:
    return not key.endswith(_WEIGHT_SUFFIXES)


def _not_a_model(uri: str) -> InvalidSpec:
    return InvalidSpec(
        f"spec.model.base: no diffusers model at {uri} (model_index.json not found); point "
        "it at a folder written by DiffusionPipeline.save_pretrained"
    )


def _from_hub(repo: str, revision: str | None, cache: Path, weights: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = None if weights else ["*.json", "*.txt", "*.model"]
    try:
        return Path(
            snapshot_download(
                repo, revision=revision, cache_dir=cache / "hub", allow_patterns=patterns
            )
        )
    except LocalEntryNotFoundError as error:
        # The Hub's own answer, when it gave one (the library reports a refused request
        # as "not in the local cache" with the HTTP error as its cause).
        if isinstance(error.__cause__, HfHubHTTPError):
            raise hub_error(repo, error.__cause__) from None
        raise StorageUnavailable(
            f"cannot download hf://{repo}: the Hugging Face Hub is not reachable from here "
            "(offline, or HF_HUB_OFFLINE is set) and the model is not cached; copy the model "
            "to s3:// or file:// and set spec.model.base to it"
        ) from None
    except HfHubHTTPError as error:
        raise hub_error(repo, error) from None


# Answers of the Hub that a later try may not get (rate limits, its own trouble).
RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


def hub_error(repo: str, error) -> Exception:
    """The job's error for a failed Hub request: retryable (StorageUnavailable) for a rate
    limit or a server error, InvalidSpec naming the fix for the rest."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    said = str(error).splitlines()[0] if str(error) else type(error).__name__
    if status in RETRYABLE_STATUS:
        return StorageUnavailable(
            f"the Hugging Face Hub answered {status} for hf://{repo}; the job will retry ({said})"
        )
    if status == 404:
        return InvalidSpec(
            f"spec.model.base: hf://{repo} does not exist on the Hub, or is "
            "private and the token cannot see it; check the name (and "
            "spec.model.revision)"
        )
    if status in (401, 403):
        token = "HF_TOKEN" in os.environ
        fix = (
            "the token in spec.storage.huggingFaceTokenSecretRef may not read it: accept "
            "the model's terms on the Hub with that account, or use a token that can"
            if token
            else "a gated or private model needs a token: set "
            "spec.storage.huggingFaceTokenSecretRef to a Secret holding one"
        )
        return InvalidSpec(f"spec.model.base: hf://{repo} is not readable ({status}): {fix}")
    return InvalidSpec(f"spec.model.base: cannot fetch hf://{repo}: {said}")


@dataclass
class Components:
    """A base model's parts, ready to train, and the family that knows how to train them."""

    folder: Path
    family: Family
    prediction_type: str  # "epsilon" or "v_prediction"; "flow" for flow-matching families
    denoiser: Any  # the family's denoiser (its component ``family.denoiser``)
    vae: Any
    noise_scheduler: Any
    text_encoders: list = field(default_factory=list)
    tokenizers: list = field(default_factory=list)

    @property
    def architecture(self) -> str:
        return self.family.name


def read_index(folder: Path) -> dict:
    return json.loads((folder / "model_index.json").read_text())


def component_configs(folder: Path, index: dict, override: dict | None = None) -> dict:
    """The config of every component of the model in ``folder`` that has one, by name;
    ``override`` (inline configs) replaces the folder's."""
    configs = {}
    for name in index:
        path = folder / name / "config.json"
        if not name.startswith("_") and path.is_file():
            configs[name] = json.loads(path.read_text())
    configs.update({name: dict(config) for name, config in (override or {}).items()})
    return configs


def _family(model: ModelSpec, index: dict, configs: dict, what: str) -> Family:
    """The model's family, checked against spec.model.architecture."""
    family = families.detect(index, configs, model.base)
    wanted = model.architecture
    if wanted not in ("auto", "custom") and wanted != family.name:
        raise InvalidSpec(
            f"spec.model.architecture is {wanted} but {what} an {family.name} model; set "
            f"architecture to auto or {family.name}"
        )
    return family


def _component_class(index: dict, name: str) -> tuple[str, type]:
    """The library and class ``model_index.json`` names for component ``name``."""
    library, class_name = index[name]
    if library not in _LIBRARIES:
        raise InvalidSpec(
            f"spec.model.base: component {name} comes from {library!r}; only {_LIBRARIES} "
            "components can be loaded"
        )
    return library, getattr(importlib.import_module(library), class_name)


def _load_part(folder: Path, index: dict, name: str, variant: str | None):
    library, cls = _component_class(index, name)
    options = {"variant": variant} if variant and library == "diffusers" else {}
    if name.startswith("tokenizer"):
        return cls.from_pretrained(folder / name)
    return cls.from_pretrained(folder / name, **options)


def check_complete(model: ModelSpec, index: dict, family: Family) -> None:
    """Refuse a model folder without a component its family needs (a pipeline saved
    without its T5 encoder, say)."""
    missing = [n for n in family.component_names() if not (index.get(n) or [None])[0]]
    if missing:
        raise InvalidSpec(
            f"spec.model.base: {model.base} has no {', '.join(missing)} component; "
            f"{family.name} models are trained with all of "
            f"{', '.join(family.component_names())}"
        )


def load_components(folder: Path, model: ModelSpec) -> Components:
    """Load the parts of the model in ``folder`` as ``model`` (the spec) describes."""
    index = read_index(folder)
    family = _family(model, index, component_configs(folder, index), f"{model.base} is")
    check_complete(model, index, family)
    scheduler = _load_part(folder, index, "scheduler", None)
    names = family.encoder_names()
    return Components(
        folder=folder,
        family=family,
        prediction_type=_prediction_type(model, family, scheduler),
        denoiser=_load_part(folder, index, family.denoiser, model.variant),
        vae=_load_part(folder, index, "vae", model.variant),
        noise_scheduler=scheduler,
        text_encoders=[_load_part(folder, index, n, model.variant) for n in names],
        tokenizers=[_load_part(folder, index, n, None) for n in family.tokenizer_names()],
    )


def _prediction_type(model: ModelSpec, family: Family, scheduler) -> str:
    if model.prediction_type == "auto":
        return family.prediction_type(scheduler)
    return model.prediction_type


def _build(index: dict, name: str, config: dict, field: str):
    """Component ``name`` with random weights, from ``config``."""
    library, cls = _component_class(index, name)
    try:
        if library == "diffusers":
            return cls.from_config(config)
        return cls(cls.config_class.from_dict(config))
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        raise InvalidSpec(f"{field}: cannot build a {cls.__name__} from it: {error}") from None


def new_components(folder: Path, model: ModelSpec, reuse: list[str], seed: int) -> Components:
    """Components for training from scratch: the architecture of the base in ``folder``
    (or the spec's inline configs) with random weights, except the parts in ``reuse``
    (``vae``, ``textEncoders``), which keep the base's trained weights."""
    import torch

    index = read_index(folder)
    inline = model.components.model_dump(exclude_none=True) if model.components else {}
    configs = component_configs(folder, index, inline)
    family = _family(model, index, configs, "the configs describe")
    check_complete(model, index, family)
    if "scheduler" in inline:
        scheduler = _component_class(index, "scheduler")[1].from_config(inline["scheduler"])
    else:
        scheduler = _load_part(folder, index, "scheduler", None)
    names = family.encoder_names()
    tokenizers = [_load_part(folder, index, n, None) for n in family.tokenizer_names()]

    def part(name: str, reused: bool):
        if reused:
            return _load_part(folder, index, name, model.variant)
        return _build(index, name, configs[name], f"spec.model.components.{name}")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # every process builds the same initial weights
        denoiser = part(family.denoiser, False)
        vae = part("vae", "vae" in reuse)
        encoders = [part(name, "textEncoders" in reuse) for name in names]
    components = Components(
        folder=folder,
        family=family,
        prediction_type=_prediction_type(model, family, scheduler),
        denoiser=denoiser,
        vae=vae,
        noise_scheduler=scheduler,
        text_encoders=encoders,
        tokenizers=tokenizers,
    )
    check_fit(components)
    return components


def check_fit(components: Components) -> None:
    """Refuse component configs that cannot work together, naming the fields to fix."""
    components.family.check_fit(components)
    for name, encoder, tokenizer in zip(
        components.family.encoder_names(),
        components.text_encoders,
        components.tokenizers,
        strict=True,
    ):
        if encoder.config.vocab_size < len(tokenizer):
            raise InvalidSpec(
                f"spec.model.components.{name}: vocab_size {encoder.config.vocab_size} is "
                f"smaller than the tokenizer's {len(tokenizer)} tokens"
            )
