"""``difftrain sample``: images from a trained model, the way its users will make them.

MODEL is one of
- a job's output (s3:// or file://), whose ``model/`` is found and read;
- an exported model folder (``model/`` itself, with its ``difftrain.json``);
- a diffusers pipeline folder (``model_index.json``), or a base model as the spec's
  ``model.base`` names one (``hf://``, ``preset:``, s3://, file://), with ``--lora`` and
  ``--embedding`` files applied to it.

A job whose model is an adapter (LoRA, Textual Inversion) gets its base from its record,
or from ``--base`` where the record keeps no location. Text-to-image by default;
``--image`` makes it image-to-image and ``--mask`` inpainting, with the pipeline class the
model's family has for the mode. What is wrong is said before any image is made: a mask
of another size, a LoRA whose layers this model lacks, an embedding of another width.
"""

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from difftrain import __version__, contract
from difftrain.errors import InvalidSpec
from difftrain.storage import FileStore, S3Settings, open_store

LORA_FILE = "pytorch_lora_weights.safetensors"
EMBEDDING_FILE = "learned_embeds.safetensors"
MODES = ("text-to-image", "image-to-image", "inpainting")
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass
class Adapter:
    """A LoRA (with its weight) or an embedding (with its token), as a local file."""

    path: Path
    source: str
    weight: float = 1.0
    token: str | None = None


@dataclass
class Model:
    """What to sample from: a local diffusers folder and the adapters over it."""

    folder: Path
    source: str
    loras: list[Adapter] = field(default_factory=list)
    embeddings: list[Adapter] = field(default_factory=list)
    record: dict | None = None

    @property
    def resolution(self) -> int | None:
        """The image side the job trained at, when the model came from a job."""
        return ((self.record or {}).get("spec", {}).get("dataset") or {}).get("resolution")

    def digest(self) -> str:
        """sha256 over the weight files of the pipeline and the adapters, in order."""
        total = hashlib.sha256()
        files = sorted(p for p in self.folder.rglob("*") if p.is_file() and p.suffix in _WEIGHTS)
        for path in [*files, *(a.path for a in self.loras + self.embeddings)]:
            with path.open("rb") as handle:
                total.update(hashlib.file_digest(handle, "sha256").digest())
        return total.hexdigest()


def parse_lora(text: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:WEIGHT`` (the weight a number after the last colon)."""
    where, colon, tail = text.rpartition(":")
    if colon and where and "/" not in tail:
        try:
            return where, float(tail)
        except ValueError:
            raise InvalidSpec(
                f"--lora {text}: the weight after ':' must be a number (FILE:0.8)"
            ) from None
    return text, 1.0


def parse_embedding(text: str) -> tuple[str, str | None]:
    """``FILE`` or ``FILE:TOKEN`` (the token the prompt uses for the embedding)."""
    where, colon, tail = text.rpartition(":")
    if colon and where and tail and "/" not in tail:
        return where, tail
    return text, None


def _open(uri: str, settings: S3Settings):
    """A store for ``uri``; a bare path is a local folder."""
    if uri.startswith(("s3://", "file://")):
        return open_store(uri.rstrip("/"), settings)
    return FileStore(Path(uri).expanduser().resolve())


def _local(store, key: str, target: Path, what: str) -> Path:
    """The file ``key`` of ``store`` on this machine (fetched when the store is S3)."""
    if not store.exists(key):
        raise InvalidSpec(f"{what}: {store.uri}/{key} does not exist")
    if isinstance(store, FileStore):
        return store._path(key)
    target.parent.mkdir(parents=True, exist_ok=True)
    store.download(key, target)
    return target


def fetch_file(uri: str, settings: S3Settings, work: Path, what: str) -> Path:
    """The file at ``uri`` (a path, file:// or s3://) on this machine."""
    folder, _, name = uri.rstrip("/").rpartition("/")
    if not name:
        raise InvalidSpec(f"{what}: {uri} names no file")
    store = _open(folder or ".", settings)
    digest = hashlib.sha256(uri.encode()).hexdigest()[:12]
    return _local(store, name, work / "files" / digest / name, what)


def _folder(store, work: Path, name: str) -> Path:
    """The whole of ``store`` as a local folder (itself when it is one)."""
    if isinstance(store, FileStore):
        return store.root
    target = work / name
    store.download_tree("", target, unsafe_error=InvalidSpec)
    return target


def _base(uri: str, settings: S3Settings, cache: Path, what: str) -> Path:
    from difftrain.api.data import ModelSpec
    from difftrain.trainer import models

    try:
        return models.fetch_model(ModelSpec(base=uri), settings, cache)
    except InvalidSpec as error:
        raise InvalidSpec(str(error).replace("spec.model.base", what)) from None


def locate(
    uri: str, settings: S3Settings, work: Path, cache: Path, base: str | None = None
) -> Model:
    """The model at ``uri`` (see the module's docstring), fetched into ``work``."""
    if uri.startswith(("hf://", "preset:")):
        return Model(folder=_base(uri, settings, cache, "MODEL"), source=uri)
    store = _open(uri, settings)
    if store.exists(f"{contract.MODEL}/difftrain.json"):
        store = store.child(contract.MODEL)
    if store.exists("model_index.json"):
        record = (
            json.loads(store.read_bytes("difftrain.json"))
            if store.exists("difftrain.json")
            else None
        )
        return Model(folder=_folder(store, work, "model"), source=uri, record=record)
    if not store.exists("difftrain.json"):
        raise InvalidSpec(
            f"MODEL: {uri} holds no model: neither a job's output (model/difftrain.json), "
            "nor an exported model (difftrain.json), nor a diffusers folder (model_index.json)"
        )
    record = json.loads(store.read_bytes("difftrain.json"))
    base_uri = base or (record.get("spec", {}).get("model") or {}).get("base", "")
    if not base_uri or _redacted(base_uri):
        raise InvalidSpec(
            f"MODEL: {uri} is an adapter on a base whose location its record does not keep "
            f"({base_uri or 'none'}); name the base with --base"
        )
    model = Model(folder=_base(base_uri, settings, cache, "--base"), source=uri, record=record)
    adapters = work / "adapters"
    if store.exists(LORA_FILE):
        model.loras.append(Adapter(_local(store, LORA_FILE, adapters / LORA_FILE, "MODEL"), uri))
    elif store.exists(EMBEDDING_FILE):
        settings_ti = record.get("spec", {}).get("textualInversion") or {}
        path = _local(store, EMBEDDING_FILE, adapters / EMBEDDING_FILE, "MODEL")
        model.embeddings.append(Adapter(path, uri, token=settings_ti.get("placeholderToken")))
    else:
        raise InvalidSpec(
            f"MODEL: {uri} holds neither a pipeline, nor {LORA_FILE}, nor {EMBEDDING_FILE}; "
            "LoKr and LoHa models load through peft (see their model card)"
        )
    return model


def _redacted(uri: str) -> bool:
    """Whether ``uri`` had its bucket or host taken out when the record was written."""
    from difftrain.trainer.export import REDACTED

    return REDACTED in uri


# Loading onto a pipeline.


def _family(pipeline) -> str:
    return type(pipeline).__name__


def _lora_layers(state: dict) -> int:
    """How many layers a LoRA file adapts (one down/A matrix each)."""
    return sum(1 for key in state if key.endswith((".lora_A.weight", ".lora_down.weight")))


def _adapted_layers(pipeline, name: str) -> int:
    import torch

    count = 0
    for module in pipeline.components.values():
        if isinstance(module, torch.nn.Module):
            for layer in module.modules():
                found = getattr(layer, "lora_A", None)
                if found is not None and name in found:
                    count += 1
    return count


def load_loras(pipeline, loras: list[Adapter]) -> None:
    """Load each LoRA with its weight; InvalidSpec naming the file when its layers are
    not this model's (another family, or another size of the same one)."""
    from safetensors.torch import load_file

    names = []
    for index, lora in enumerate(loras):
        name = f"lora{index}"
        wanted = _lora_layers(load_file(lora.path))
        try:
            pipeline.load_lora_weights(str(lora.path), adapter_name=name)
        except (ValueError, RuntimeError, KeyError) as error:
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            said = next((line for line in lines if "size mismatch" in line), lines[0])[:300]
            raise InvalidSpec(
                f"--lora {lora.source}: it does not fit this {_family(pipeline)} model "
                f"(trained for another family or size?): {said}"
            ) from None
        found = _adapted_layers(pipeline, name)
        if wanted and found < wanted:
            raise InvalidSpec(
                f"--lora {lora.source}: only {found} of its {wanted} layers are in this "
                f"{_family(pipeline)} model; it was trained for another model family"
            )
        names.append(name)
    if names:
        pipeline.set_adapters(names, [lora.weight for lora in loras])


def _encoders(pipeline) -> list[tuple[str, object, object]]:
    """(encoder name, text encoder, tokenizer) of the pipeline's CLIP encoders."""
    pairs = [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")]
    return [
        (encoder, getattr(pipeline, encoder), getattr(pipeline, tokenizer))
        for encoder, tokenizer in pairs
        if getattr(pipeline, encoder, None) is not None
    ]


# An SDXL embedding file's keys, by the encoder each belongs to.
_SDXL_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}


def load_embeddings(pipeline, embeddings: list[Adapter]) -> None:
    """Load each Textual Inversion file into the encoders it was made for; InvalidSpec
    naming the file when its vectors are not as wide as an encoder's token embeddings."""
    from safetensors.torch import load_file

    encoders = {name: (encoder, tokenizer) for name, encoder, tokenizer in _encoders(pipeline)}
    for embedding in embeddings:
        state = load_file(embedding.path)
        if set(state) & set(_SDXL_KEYS):
            parts = {
                _SDXL_KEYS[key]: vectors for key, vectors in state.items() if key in _SDXL_KEYS
            }
            token = embedding.token or f"<{embedding.path.stem}>"
        else:
            token, vectors = _single_vectors(state, embedding)
            parts = {"text_encoder": vectors}
        for name, vectors in parts.items():
            if name not in encoders:
                raise InvalidSpec(
                    f"--embedding {embedding.source}: it has vectors for {name}, which this "
                    f"{_family(pipeline)} model does not have"
                )
            encoder, tokenizer = encoders[name]
            width = encoder.get_input_embeddings().weight.shape[1]
            vectors = vectors.reshape(-1, vectors.shape[-1])
            if vectors.shape[-1] != width:
                raise InvalidSpec(
                    f"--embedding {embedding.source}: its vectors are {vectors.shape[-1]} wide, "
                    f"but {name} of this {_family(pipeline)} model embeds tokens in {width}; "
                    "it was trained for another model"
                )
            pipeline.load_textual_inversion(
                vectors, token=token, text_encoder=encoder, tokenizer=tokenizer
            )
        embedding.token = token


def _single_vectors(state: dict, embedding: Adapter):
    """(token, vectors) of a one-encoder file: {token: vectors} or A1111's emb_params."""
    if "emb_params" in state:
        return embedding.token or f"<{embedding.path.stem}>", state["emb_params"]
    if len(state) != 1:
        raise InvalidSpec(
            f"--embedding {embedding.source}: not a Textual Inversion file (expected one "
            f"vector entry, or clip_l/clip_g; found {', '.join(sorted(state)[:4])})"
        )
    ((key, vectors),) = state.items()
    return embedding.token or key, vectors


# Sampling.


@dataclass
class Request:
    """What to make."""

    prompt: str
    negative: str = ""
    steps: int = 25
    guidance: float = 7.5
    seed: int = 0
    count: int = 1
    size: int | None = None
    image: Path | None = None
    strength: float = 0.75
    mask: Path | None = None

    @property
    def mode(self) -> str:
        if self.mask is not None:
            return "inpainting"
        return "image-to-image" if self.image is not None else "text-to-image"


def check_request(request: Request):
    """The init image and mask, read and checked; (image, mask) or (None, None)."""
    from PIL import Image, UnidentifiedImageError

    if request.mask is not None and request.image is None:
        raise InvalidSpec("--mask: inpainting needs --image, the picture the mask applies to")
    for flag, value in (("--steps", request.steps), ("-n", request.count)):
        if value < 1:
            raise InvalidSpec(f"{flag}: must be at least 1, got {value}")
    if request.size is not None and (request.size < 8 or request.size % 8):
        raise InvalidSpec(f"--size: must be a multiple of 8, got {request.size}")
    if not 0 < request.strength <= 1:
        raise InvalidSpec(f"--strength: must be in (0, 1], got {request.strength}")
    opened = []
    for flag, path in (("--image", request.image), ("--mask", request.mask)):
        if path is None:
            opened.append(None)
            continue
        try:
            with Image.open(path) as image:
                opened.append(image.convert("RGB" if flag == "--image" else "L"))
        except FileNotFoundError:
            raise InvalidSpec(f"{flag}: {path} does not exist") from None
        except (UnidentifiedImageError, OSError) as error:
            raise InvalidSpec(f"{flag}: {path} is not an image PIL can read ({error})") from None
    image, mask = opened
    if mask is not None and mask.size != image.size:
        raise InvalidSpec(
            f"--mask: {request.mask} is {mask.size[0]}x{mask.size[1]} but --image "
            f"{request.image} is {image.size[0]}x{image.size[1]}; they must be the same size"
        )
    return image, mask


def load(model: Model):
    """The model as a diffusers pipeline (on the CPU), its adapters loaded."""
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(model.folder)
    load_loras(pipeline, model.loras)
    load_embeddings(pipeline, model.embeddings)
    return pipeline


def for_mode(pipeline, mode: str):
    """The family's pipeline for ``mode``, sharing ``pipeline``'s components."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    if mode == "text-to-image":
        return pipeline
    auto = AutoPipelineForImage2Image if mode == "image-to-image" else AutoPipelineForInpainting
    try:
        return auto.from_pipe(pipeline)
    except ValueError:
        flag = "--image" if mode == "image-to-image" else "--mask"
        raise InvalidSpec(
            f"{flag}: diffusers has no {mode} pipeline for a {_family(pipeline)} model; "
            "sample it text-to-image (without --image and --mask)"
        ) from None


def _options(pipeline) -> dict:
    """Arguments beside the prompt the pipeline needs: T5 prompts as long as the
    tokenizer reads (the tiny presets' tokenizers read fewer than the default 256/512)."""
    import inspect

    tokenizer = getattr(pipeline, "tokenizer_3", None) or (
        getattr(pipeline, "tokenizer_2", None) if hasattr(pipeline, "transformer") else None
    )
    accepted = inspect.signature(type(pipeline).__call__).parameters
    if tokenizer is None or "max_sequence_length" not in accepted:
        return {}
    return {"max_sequence_length": min(512, tokenizer.model_max_length)}


def run(model: Model, request: Request, out: Path, device: str | None = None) -> dict:
    """Make ``request.count`` images into ``out``: PNGs, ``samples.json`` and, for more
    than one image, ``grid.png``; returns what samples.json says."""
    import torch

    from difftrain.trainer import sampling

    image, mask = check_request(request)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipeline = for_mode(load(model), request.mode).to(device)
    size = request.size or model.resolution
    call = {
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance,
        **_options(pipeline),
    }
    if request.negative:
        call["negative_prompt"] = request.negative
    if image is None:
        if size:
            call.update(height=size, width=size)
    else:
        call.update(image=image, strength=request.strength)
        call.update(height=image.size[1], width=image.size[0])
        if mask is not None:
            call["mask_image"] = mask
    out.mkdir(parents=True, exist_ok=True)
    files, images = [], []
    started = time.monotonic()
    for index in range(request.count):
        seed = request.seed + index
        generator = torch.Generator(device).manual_seed(seed)
        with torch.no_grad():
            made = pipeline(request.prompt, generator=generator, **call).images[0]
        name = f"{index:03d}-seed{seed}.png"
        made.save(out / name)
        files.append({"file": name, "seed": seed})
        images.append(made)
    summary = {
        "model": model.source,
        "modelDigest": model.digest(),
        "pipeline": type(pipeline).__name__,
        "mode": request.mode,
        "prompt": request.prompt,
        "negativePrompt": request.negative,
        "steps": request.steps,
        "guidance": request.guidance,
        "seed": request.seed,
        "size": [images[0].width, images[0].height],
        "loras": [{"file": a.source, "weight": a.weight} for a in model.loras],
        "embeddings": [{"file": a.source, "token": a.token} for a in model.embeddings],
        "device": device,
        "seconds": round(time.monotonic() - started, 2),
        "difftrainVersion": __version__,
        "images": files,
    }
    if request.image is not None:
        summary.update(image=str(request.image), strength=request.strength)
    if request.mask is not None:
        summary["mask"] = str(request.mask)
    if len(images) > 1:
        sampling.grid(images).save(out / "grid.png")
        summary["grid"] = "grid.png"
    (out / "samples.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def cache_folder() -> Path:
    """Where fetched base models stay between runs."""
    root = os.environ.get("DIFFTRAIN_CACHE") or Path.home() / ".cache" / "difftrain"
    return Path(root) / "models"
