"""Evaluation of the model being trained (``spec.evaluation``): FID against reference
images, CLIP score of generated images against their prompts, and the loss on images
held out of training.

Everything an evaluation reads is fetched once per node before training starts, like
the base model (:func:`fetch`): the Inception weights file, the CLIP model folder, the
reference images, the prompts, the held-out images; nothing is downloaded from the
internet, and a missing or unreadable input fails the job at set-up, naming its field.

The metrics are torchmetrics' own (``FrechetInceptionDistance`` over torch-fidelity's
InceptionV3, ``CLIPScore``), fed by every process with its share of the images; their
``compute`` gathers the shares. The generated images are the same for every evaluation
of a run and across runs with the same settings: image ``k`` is prompt ``k`` (the
prompts in turn) at seed ``evaluation.seed + k``. The held-out loss noises each image
at ``validationLoss.timesteps`` fixed points of the schedule with noise of its own seed,
so its numbers compare across steps and runs (see docs/evaluate.md).
"""

import datetime
import hashlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from difftrain import bars
from difftrain.errors import DatasetError, InvalidSpec
from difftrain.storage import open_store
from difftrain.trainer import data, sampling
from difftrain.trainer.cache import cached_folder
from difftrain.trainer.conditioning import token_ids

log = logging.getLogger(__name__)

# model/evaluation.json: the last evaluation's scores, its settings and every earlier one.
RESULT_FILE = "evaluation.json"
# Images per metric update and per held-out batch: bounds memory.
CHUNK = 32
# Seeds of the held-out noise: image i at timestep j uses NOISE_SEED + i * 1000 + j.
NOISE_SEED = 20_240_607


@dataclass
class Inputs:
    """What the evaluations read, fetched onto the node before training."""

    prompts: list[str] = field(default_factory=list)  # empty: the dataset's captions
    inception: Path | None = None
    clip: Path | None = None
    reference: list[Path] = field(default_factory=list)
    held_out: list[data.Example] = field(default_factory=list)  # from validationLoss.uri


def fetch(spec, settings, cache: Path) -> Inputs | None:
    """Fetch what ``spec.evaluation`` reads into the node's ``cache``; None without
    evaluation. Raises InvalidSpec naming the field of an input that is not there."""
    evaluation = spec.evaluation
    if evaluation is None:
        return None
    inputs = Inputs(prompts=list(evaluation.prompts))
    if evaluation.prompts_uri:
        path = fetch_file(evaluation.prompts_uri, settings, cache / "evaluation", "promptsUri")
        lines = path.read_text(errors="replace").splitlines()
        inputs.prompts = [line.strip() for line in lines if line.strip()]
        if not inputs.prompts:
            raise InvalidSpec(
                f"spec.evaluation.promptsUri: {evaluation.prompts_uri} holds no prompts; "
                "write one prompt per line"
            )
    fid = evaluation.fid
    if fid is not None:
        inputs.inception = fetch_file(fid.weights_uri, settings, cache / "evaluation", "fid")
        folder = data.fetch_dataset(fid.reference_uri, settings, cache / "datasets")
        inputs.reference = sorted(
            p for p in folder.rglob("*") if p.suffix.lower() in data.IMAGE_SUFFIXES
        )
        if len(inputs.reference) < 2:
            raise InvalidSpec(
                f"spec.evaluation.fid.referenceUri: FID needs at least 2 reference images; "
                f"{fid.reference_uri} holds {len(inputs.reference)}"
            )
    if evaluation.clip_score is not None:
        uri = evaluation.clip_score.model_uri
        inputs.clip = data.fetch_dataset(uri, settings, cache / "evaluation", InvalidSpec)
        if not (inputs.clip / "config.json").is_file():
            raise InvalidSpec(
                f"spec.evaluation.clipScore.modelUri: no CLIP model at {uri} (config.json "
                "not found); point it at a folder written by CLIPModel.save_pretrained and "
                "CLIPProcessor.save_pretrained"
            )
    loss = evaluation.validation_loss
    if loss is not None and loss.uri:
        folder = data.fetch_dataset(loss.uri, settings, cache / "datasets")
        inputs.held_out = data.find_examples(folder)
        if not inputs.held_out:
            raise InvalidSpec(
                f"spec.evaluation.validationLoss.uri: no images in {loss.uri} (looked for "
                f"{', '.join(sorted(data.IMAGE_SUFFIXES))})"
            )
    return inputs


def fetch_file(uri: str, settings, cache: Path, what: str) -> Path:
    """A local copy of the file at ``uri`` (file:// as it is; s3:// once per node and
    again when its object changes)."""
    if uri.startswith("file://"):
        path = Path(uri.removeprefix("file://"))
        if not path.is_file():
            raise InvalidSpec(f"spec.evaluation.{_field(uri, what)}: no file at {uri}")
        return path
    parent, _, name = uri.rstrip("/").rpartition("/")
    store = open_store(parent, settings)
    if not store.exists(name):
        raise InvalidSpec(f"spec.evaluation.{_field(uri, what)}: no object at {uri}")
    version = store.fingerprint(name, lambda key: key == name)
    folder = cached_folder(cache, f"{uri}#{version}", lambda f: store.download(name, f / name))
    return folder / name


def _field(uri: str, what: str) -> str:
    return {"fid": "fid.weightsUri", "promptsUri": "promptsUri"}.get(what, what)


def hold_out(spec, examples: list, sizes: list) -> tuple[list, list, list]:
    """(training examples, their sizes, held-out examples): with
    ``validationLoss.fraction``, that share of the dataset (at least one image) leaves
    training, chosen by a hash of each image's name, so the same images are held out
    whatever the order or machine."""
    evaluation = spec.evaluation
    loss = evaluation.validation_loss if evaluation else None
    if loss is None or loss.fraction is None:
        return examples, sizes, []
    count = max(1, round(loss.fraction * len(examples)))
    if count >= len(examples):
        raise DatasetError(
            f"spec.evaluation.validationLoss.fraction: holding out {count} of "
            f"{len(examples)} images leaves none to train on; add images or lower the fraction"
        )

    def rank(index: int) -> str:
        return hashlib.sha256(examples[index].image.name.encode()).hexdigest()

    chosen = set(sorted(range(len(examples)), key=rank)[:count])
    kept = [i for i in range(len(examples)) if i not in chosen]
    held = [examples[i] for i in sorted(chosen)]
    return [examples[i] for i in kept], [sizes[i] for i in kept], held


def wanted_images(evaluation, prompts: list[str]) -> list[tuple[str, int]]:
    """The (prompt, seed) of every image an evaluation generates, in order."""
    return [(prompts[k % len(prompts)], evaluation.seed + k) for k in range(evaluation.num_images)]


def share(items: list, rank: int, world: int, even: bool) -> tuple[list, int]:
    """This process's share of ``items`` (every ``world``-th from ``rank``) and how many
    of it count; with ``even``, padded to the same length on every process (a sharded
    model's processes must all make the same forward passes)."""
    mine = items[rank::world]
    count = len(mine)
    if even and items:
        mine = mine + [items[0]] * (math.ceil(len(items) / world) - count)
    return mine, count


def as_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as uint8 ``(3, H, W)``, as the metrics take it."""
    rgb = image.convert("RGB")
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return pixels.view(rgb.height, rgb.width, 3).permute(2, 0, 1)


def reference_image(path: Path, side: int) -> torch.Tensor:
    """A reference image scaled to cover ``side`` x ``side`` and centre-cropped: the size
    the model generates."""
    image = data.load_rgb(path)
    box, _ = data.cover_crop(image.size, (side, side), None)
    return as_tensor(image.resize((side, side), Image.Resampling.BICUBIC, box=box))


class _Projected(torch.nn.Module):
    """A CLIPModel whose feature methods return the projected embeddings as tensors
    (transformers 5 returns them inside an output object; torchmetrics expects tensors)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, pixel_values):
        return _embedding(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids, attention_mask=None):
        output = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return _embedding(output)


def _embedding(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def fid_metric(weights: Path, features: int, device):
    """torchmetrics' FID over torch-fidelity's InceptionV3 with the weights file at
    ``weights`` (never downloaded), comparing layer ``features``; the reference
    images' features stay across resets."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(
        feature=features, reset_real_features=False, feature_extractor_weights_path=str(weights)
    ).to(device)


def clip_metric(folder: Path, device):
    """torchmetrics' CLIP score over the CLIP model saved in ``folder``."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    model = _Projected(CLIPModel.from_pretrained(folder).eval())
    processor = CLIPProcessor.from_pretrained(folder)
    return CLIPScore(model_name_or_path=lambda: (model, processor)).to(device)


def add_images(metric, images: list[torch.Tensor], real: bool) -> None:
    """Feed uint8 ``(3, H, W)`` images of one size to a FID metric, a chunk at a time."""
    for start in range(0, len(images), CHUNK):
        chunk = torch.stack(images[start : start + CHUNK]).to(metric.device)
        metric.update(chunk, real=real)


def add_captioned(metric, images: list[tuple[str, torch.Tensor]]) -> None:
    """Feed (prompt, uint8 image) pairs to a CLIP score metric, a chunk at a time."""
    for start in range(0, len(images), CHUNK):
        chunk = images[start : start + CHUNK]
        pixels = torch.stack([image for _, image in chunk]).to(metric.device)
        metric.update(pixels, [prompt for prompt, _ in chunk])


class Evaluator:
    """The metrics of one stage's evaluations, built on its device; the reference
    images' features are computed once, at the first evaluation."""

    def __init__(self, stage, inputs: Inputs):
        self.stage, self.inputs = stage, inputs
        self.spec = stage.config.spec.evaluation
        self.prompts = inputs.prompts or self._captions()
        device = stage.accelerator.device
        self.fid = self.clip = None
        self.reference_done = False
        if self.spec.fid is not None:
            self.fid = fid_metric(inputs.inception, self.spec.fid.features, device)
        if self.spec.clip_score is not None:
            self.clip = clip_metric(inputs.clip, device)

    def _captions(self) -> list[str]:
        """The dataset's captions, for evaluations without prompts of their own."""
        captions = [e.caption for e in self.stage.dataset.examples if e.caption]
        if not captions and self.spec.clip_score is not None:
            raise InvalidSpec(
                "spec.evaluation.prompts: the CLIP score needs prompts, and the dataset has "
                "no captions to use instead; set evaluation.prompts or promptsUri"
            )
        return captions or [""]

    def evaluate(self, step: int, stopping=None) -> dict | None:
        """Every process's share of one evaluation; the scores (the same on every
        process), or None when a process was stopped in the middle (nothing recorded).
        The modules are in eval mode and the random state is forked: an evaluation
        never changes the training run."""
        stage = self.stage
        with sampling.outside_training(stage.trainable.modules.values(), stage.accelerator.device):
            return self._evaluate(step, stopping)

    def _evaluate(self, step: int, stopping) -> dict | None:
        stage = self.stage
        started = time.perf_counter()
        scores: dict = {"step": step}
        if self.spec.generates:
            images = self._generate(stopping)
            if self._any(images is None):
                log.warning("evaluation of step %d left out: the job is stopping", step)
                return None
            if self.fid is not None:
                scores["fid"] = self._fid(images)
            if self.clip is not None:
                scores["clipScore"] = self._clip_score(images)
        if self.spec.validation_loss is not None:
            scores["validationLoss"] = self._held_out_loss()
        scores["seconds"] = round(time.perf_counter() - started, 3)
        scores["time"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        stage.after_sampling()
        return scores

    def _any(self, flag: bool) -> bool:
        accelerator = self.stage.accelerator
        if accelerator.num_processes == 1:
            return flag
        total = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum")
        return total.item() > 0

    def _generate(self, stopping) -> list[tuple[str, torch.Tensor]] | None:
        """This process's share of the evaluation's images, as (prompt, uint8 image)."""
        stage, evaluation = self.stage, self.spec
        accelerator = stage.accelerator
        wanted = wanted_images(evaluation, self.prompts)
        mine, count = share(
            wanted, accelerator.process_index, accelerator.num_processes, stage.sharded
        )
        pipeline = sampling.pipeline_for(stage.components, stage.trainable.modules)
        shown = bars.bar(len(mine), "evaluation images", "image")
        with accelerator.autocast(), sampling._averaged(stage), shown:
            results = sampling.generate_each(
                pipeline,
                mine,
                size=stage.config.spec.dataset.resolution,
                steps=evaluation.inference_steps,
                guidance=evaluation.guidance_scale,
                stopping=None if stage.sharded else stopping,
                options=stage.components.family.sampling_options(stage.components),
                made=shown.update,
            )
        if len(results) < len(mine):
            return None
        log.info("evaluation: %d of its %d images made by this process", count, len(wanted))
        return [(prompt, as_tensor(image)) for prompt, _, image in results[:count]]

    def _fid(self, images: list) -> float:
        fid = self.fid
        if not self.reference_done:
            accelerator = self.stage.accelerator
            mine, _ = share(
                self.inputs.reference, accelerator.process_index, accelerator.num_processes, False
            )
            side = self.stage.config.spec.dataset.resolution
            add_images(fid, [reference_image(path, side) for path in mine], real=True)
            self.reference_done = True
        fid.reset()  # the generated images' features; the reference's stay
        add_images(fid, [image for _, image in images], real=False)
        return float(fid.compute())

    def _clip_score(self, images: list) -> float:
        self.clip.reset()
        add_captioned(self.clip, images)
        return float(self.clip.compute())

    def _held_out_loss(self) -> float:
        """The mean loss over this run's held-out images, each noised at the fixed
        timesteps with its own noise, summed over the processes' shares."""
        stage = self.stage
        accelerator = stage.accelerator
        settings = self.spec.validation_loss
        held = (stage.run.held_out or [])[: settings.max_images]
        indexed = list(enumerate(held))
        mine, count = share(
            indexed, accelerator.process_index, accelerator.num_processes, stage.sharded
        )
        total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
        with torch.no_grad(), accelerator.autocast(), sampling._averaged(stage):
            for start in range(0, len(mine), CHUNK):
                chunk = mine[start : start + CHUNK]
                losses = self._losses(chunk)
                counted = max(0, min(len(chunk), count - start))
                total[0] += losses[:counted].sum().double()
                total[1] += counted * settings.timesteps
        if accelerator.num_processes > 1:
            total = accelerator.reduce(total, reduction="sum")
        return float(total[0] / total[1]) if total[1] else math.nan

    def _losses(self, chunk: list[tuple[int, data.Example]]) -> torch.Tensor:
        """Per-image loss sums over the fixed timesteps, shape ``(len(chunk),)``."""
        stage = self.stage
        components, accelerator = stage.components, stage.accelerator
        family, device = components.family, accelerator.device
        side = stage.config.spec.dataset.resolution
        templates, subject = stage.run.method.captions(stage.config.spec)
        transform = data.Transform(True, False, 0.0, templates, subject)
        samples = [transform(e, random.Random(i), (side, side)) for i, e in chunk]
        batch = data.collate(samples)
        pixels = batch["pixels"].to(device, dtype=components.vae.dtype)
        mean, _ = family.latent_moments(components, pixels)
        latents = family.scale_latents(components, mean)
        bare = _bare_encoders(stage)
        ids = [t.to(device) for t in token_ids(bare, batch["captions"])]
        text = family.encode_text(bare, ids)
        extra = family.conditioning(bare, batch, stage.config.spec.training, device)
        denoiser = stage.trainable.modules.get(family.denoiser, components.denoiser)
        steps = self.spec.validation_loss.timesteps
        sums = torch.zeros(len(chunk), dtype=torch.float64, device=device)
        for j in range(steps):
            noise = torch.stack(
                [
                    torch.randn(
                        latents.shape[1:],
                        generator=torch.Generator().manual_seed(NOISE_SEED + i * 1000 + j),
                    )
                    for i, _ in chunk
                ]
            ).to(device, latents.dtype)
            u = torch.full((len(chunk),), (j + 0.5) / steps)
            noised = stage.objective.fixed(latents, noise, u)
            prediction = family.predict(denoiser, noised.noisy, noised.timesteps, text, extra)
            error = (prediction.float() - noised.target.float()) ** 2
            sums += error.mean(dim=tuple(range(1, error.dim()))).double()
        return sums.cpu()


def _bare_encoders(stage):
    """The run's components with the bare text encoders (not their distributed wrappers,
    whose forward passes would synchronise with the other processes)."""
    import dataclasses

    components = stage.components
    names = components.family.encoder_names()
    bare = [
        stage.trainable.modules.get(name, encoder)
        for name, encoder in zip(names, components.text_encoders, strict=True)
    ]
    return dataclasses.replace(components, text_encoders=bare)


def schedule(stage, evaluates: bool):
    """When a stage evaluates: every ``evaluation.everySteps`` and at its last step, if
    the job evaluates and ``evaluates`` (the diffusion stage does)."""
    from difftrain.trainer.policies import Every

    evaluates = evaluates and stage.run.evaluation is not None
    every = stage.config.spec.evaluation.every_steps if evaluates else None
    total = stage.total_steps
    return Every(every or total, total, at_last=True, enabled=evaluates)


SCORE_NAMES = ("fid", "clipScore", "validationLoss")


def steps(stage) -> set[int]:
    """The steps the stage has evaluated at."""
    return {scores["step"] for scores in stage.evaluations}


def summary(scores: dict) -> str:
    """The log line of an evaluation."""
    said = ", ".join(f"{key} {scores[key]:.4f}" for key in SCORE_NAMES if key in scores)
    return f"evaluation at step {scores['step']}: {said} ({scores['seconds']:.1f} s)"


def card_rows(history: list[dict]) -> list[tuple[str, str]]:
    """The model card's rows for the last evaluation."""
    if not history:
        return []
    last = history[-1]
    rows = []
    for key, label in (
        ("fid", "FID"),
        ("clipScore", "CLIP score"),
        ("validationLoss", "Validation loss"),
    ):
        if last.get(key) is not None:
            rows.append((f"{label} (step {last['step']})", f"{last[key]:.4f}"))
    return rows


def result(spec, history: list[dict]) -> dict:
    """model/evaluation.json: the last scores, the settings they were made with, and
    every evaluation of the run."""
    evaluation = spec.evaluation
    settings = evaluation.model_dump(by_alias=True, exclude_none=True, mode="json")
    last = history[-1] if history else {}
    return {**last, "settings": settings, "history": history}
