"""DreamBooth: teach the model one subject from a few images, keeping its class prior.

Every instance image (the dataset) is captioned with ``spec.dreambooth.instancePrompt``.
With a ``classPrompt``, prior preservation is on: each batch of instance images is
followed by as many class images, captioned with the class prompt and trained at the
instance batch's size, and the loss adds their term times ``priorLossWeight`` so that
the model keeps what the class looks like.

Class images come from ``classData``, or are generated with the base model before
training: image ``i`` from seed ``classSeed + i``, the missing indices shared out across
all processes, each uploaded to ``OUTPUT/class-images/`` as soon as it is made. A
restart or rerun finds them there and makes only the missing ones;
``class-images/difftrain.json``, written last, records the settings they were made with
(other settings make them anew).
"""

import io
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from difftrain import bars
from difftrain.errors import DatasetError
from difftrain.storage import Store
from difftrain.trainer import adapters, data, export, loss, sampling
from difftrain.trainer.cache import cached_folder
from difftrain.trainer.methods import Method, register, whole_denoiser, whole_text_encoders
from difftrain.trainer.trainable import Trainable

log = logging.getLogger(__name__)

FOLDER = "class-images"
RECORD = "difftrain.json"


def prior_weight(spec) -> float | None:
    """The class term's weight when the job preserves a prior, else None."""
    settings = spec.dreambooth
    if settings.class_prompt is None:
        return None
    return settings.prior_loss_weight


def image_name(index: int) -> str:
    return f"{index:05d}.png"


def instance_examples(examples: list[data.Example], prompt: str) -> list[data.Example]:
    """The instance images, each captioned with the instance prompt."""
    return [data.Example(example.image, prompt) for example in examples]


def wanted_record(spec) -> dict:
    """The settings generated class images depend on."""
    settings = spec.dreambooth
    return {
        "model": spec.model.base,
        "classPrompt": settings.class_prompt,
        "count": settings.num_class_images,
        "inferenceSteps": settings.class_inference_steps,
        "seed": settings.class_seed,
        "resolution": spec.dataset.resolution,
        "guidanceScale": spec.validation.guidance_scale,
        "negativePrompt": spec.validation.negative_prompt,
    }


def _record(store: Store) -> dict | None:
    if not store.exists(RECORD):
        return None
    try:
        return json.loads(store.read_bytes(RECORD))
    except ValueError:
        return None


def generate_class_images(accelerator, components, spec, output: Store, cache: Path) -> Path:
    """Make the class images not yet under ``OUTPUT/class-images/`` (every process makes
    its share), then fetch them all to a node-local folder; that folder."""
    store = output.child(FOLDER)
    wanted = wanted_record(spec)
    count = wanted["count"]
    found = _record(store)
    present = set(store.keys())
    accelerator.wait_for_everyone()  # every process has seen the same images before any is made
    if found is not None and found != wanted:
        log.warning(
            "class images under %s were made with other settings; making them again", store.uri
        )
        if accelerator.is_main_process:
            store.delete([RECORD])
        present = set()
    missing = [i for i in range(count) if image_name(i) not in present]
    if missing or found is None:
        mine = missing[accelerator.process_index :: accelerator.num_processes]
        log.info(
            "class images: %d of %d to make, %d by each of %d processes",
            len(missing),
            count,
            len(mine),
            accelerator.num_processes,
        )
        if mine:
            _make(accelerator, components, spec, store, mine)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            store.write_bytes(RECORD, (json.dumps(wanted, indent=2) + "\n").encode())
        accelerator.wait_for_everyone()
    else:
        log.info("class images: reusing the %d under %s", count, store.uri)
    key = f"{store.uri}\n{json.dumps(wanted, sort_keys=True)}"
    select = {image_name(i) for i in range(count)}

    def fill(folder: Path) -> None:
        store.download_tree("", folder, select.__contains__, unsafe_error=DatasetError)

    return cached_folder(cache, key, fill)


def _make(accelerator, components, spec, store: Store, indices: list[int]) -> None:
    """Generate class images ``indices`` with the base model and upload each."""
    import torch

    settings, validation = spec.dreambooth, spec.validation
    for part in (components.denoiser, components.vae, *components.text_encoders):
        part.to(accelerator.device)
    pipeline = sampling.pipeline_for(components)
    wanted = [(settings.class_prompt, settings.class_seed + i) for i in indices]
    shown = bars.bar(len(wanted), "class images", "image")
    with accelerator.autocast(), shown:
        for start in range(0, len(wanted), sampling.CHUNK):  # upload each chunk as it is made
            made = sampling.generate_each(
                pipeline,
                wanted[start : start + sampling.CHUNK],
                size=spec.dataset.resolution,
                steps=settings.class_inference_steps,
                guidance=validation.guidance_scale,
                negative=validation.negative_prompt,
                options=components.family.sampling_options(components),
            )
            for _, seed, image in made:
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                store.write_bytes(image_name(seed - settings.class_seed), buffer.getvalue())
                shown.update()
    del pipeline
    if accelerator.device.type == "cuda":
        torch.cuda.empty_cache()


def class_examples(folder: Path, prompt: str, count: int, source: str) -> list[data.Example]:
    """Up to ``count`` readable images of ``folder``, each captioned with ``prompt``;
    ``source`` names where they came from in errors."""
    images = [example.image for example in data.find_examples(folder)][:count]
    sizes = data.image_sizes([data.Example(image, "") for image in images])
    usable = [image for image, size in zip(images, sizes, strict=True) if size is not None]
    if not usable:
        raise DatasetError(f"{source}: no readable class images; add images or remove it")
    if len(usable) < count:
        log.warning(
            "%s: %d class images, fewer than spec.dreambooth.numClassImages %d",
            source,
            len(usable),
            count,
        )
    return [data.Example(image, prompt) for image in usable]


@dataclass(frozen=True)
class WithPrior:
    """Batches of instance keys, each followed by as many class-image keys.

    Batch ``b`` of instance epoch ``e`` is the ``n``-th of the run (``n = e * per_epoch +
    b``) and takes the ``n``-th class batch in the class images' own epochs, so the
    pairing is a function of the position alone and a resumed run sees the same pairs.
    Class images train at the size of the instance batch they join.
    """

    instance: data.Batches
    prior: data.Batches
    offset: int  # the index of the first class image in the TrainingSet

    @property
    def batches_per_epoch(self) -> int:
        return self.instance.batches_per_epoch

    def check(self) -> None:
        self.instance.check()
        if self.prior.batches_per_epoch == 0:
            raise DatasetError(
                f"{len(self.prior.targets)} class images are fewer than one batch for each "
                f"of {self.prior.world_size} processes (spec.training.batchSize "
                f"{self.prior.batch_size}); raise spec.dreambooth.numClassImages"
            )

    def variants(self) -> set[tuple[int, data.Size]]:
        sizes = set(self.instance.targets)  # class images train at their instance batch's
        classes = range(self.offset, self.offset + len(self.prior.targets))
        return self.instance.variants() | {(i, size) for i in classes for size in sizes}

    def epoch(self, epoch: int, start: int = 0):
        per_epoch = self.instance.batches_per_epoch
        per_prior = self.prior.batches_per_epoch
        for number, keys in enumerate(self.instance.epoch(epoch, start), start):
            prior_epoch, prior_batch = divmod(epoch * per_epoch + number, per_prior)
            prior = next(self.prior.epoch(prior_epoch, prior_batch))
            width, height = keys[0][2:]
            yield keys + [(index + self.offset, seed, width, height) for index, seed, _, _ in prior]


class DreamBooth(Method):
    name = "dreambooth"

    def can_shard(self, spec) -> bool:
        settings = spec.dreambooth
        return settings.unet == "full" and not settings.train_text_encoder

    def examples(self, spec, examples):
        return instance_examples(examples, spec.dreambooth.instance_prompt)

    def extra_examples(self, setup, examples, batches):
        """With prior preservation, the class images after the instance images, and
        batches that follow each instance batch with as many class images."""
        spec = setup.spec
        if prior_weight(spec) is None:
            return examples, batches, {}
        classes = _class_examples(setup)
        # Class batches in an order of their own; each takes its instance batch's size.
        unsized = ((0, 0),) * len(classes)
        prior = replace(batches, targets=unsized, repeats=1, seed=spec.training.seed + 1)
        paired = WithPrior(batches, prior, offset=len(examples))
        paired.check()
        return examples + classes, paired, {"class_images": len(classes)}

    def prepare(self, components, spec):
        """LoRA adapters (spec.lora) or the whole denoiser; the text encoders too when asked."""
        settings = spec.dreambooth
        if settings.unet == "lora":
            return adapters.add(components, spec, settings.train_text_encoder)
        modules = whole_denoiser(components)
        if settings.train_text_encoder:
            whole_text_encoders(components, modules)
        return Trainable(modules)

    def loss(self, spec, prediction, target, weights):
        weight = prior_weight(spec)
        if weight is None:
            return loss.diffusion_loss(prediction, target, weights)
        # The second half of the batch is class images (WithPrior).
        halves = [
            t.chunk(2) if t is not None else (None, None) for t in (prediction, target, weights)
        ]
        instance, prior = (loss.diffusion_loss(*parts) for parts in zip(*halves, strict=True))
        return instance + weight * prior

    def export(self, stage, folder, formats, dtype):
        if stage.trainable.lora:
            naming = export.naming(stage)
            adapters.export(stage.components, stage.trainable, formats, folder, dtype, naming)
        else:
            super().export(stage, folder, formats, dtype)

    def export_bytes(self, stage, formats, itemsize):
        if stage.trainable.lora:
            return adapters.export_bytes(stage, formats, itemsize)
        return super().export_bytes(stage, formats, itemsize)

    def card(self, spec, facts, family):
        settings = spec.dreambooth
        trained = "LoRA" if settings.unet == "lora" else f"whole {family.denoiser_title}"
        if settings.train_text_encoder:
            trained += " and text encoders"
        prior = "off"
        if settings.class_prompt:
            prior = (
                f"{facts['class_images']} class images of {settings.class_prompt}, "
                f"weight {settings.prior_loss_weight}"
            )
        rows = [
            ("Instance prompt", settings.instance_prompt),
            ("Prior preservation", prior),
            ("Trained", trained),
        ]
        if settings.unet == "lora":
            return [*rows, adapters.card_row(spec)], adapters.usage(spec, family)
        return rows, 'DiffusionPipeline.from_pretrained("model/")'


def _class_examples(setup) -> list[data.Example]:
    """The class images: from spec.dreambooth.classData, or made by the base model."""
    wanted = setup.spec.dreambooth
    if wanted.class_data:
        folder = data.fetch_dataset(
            wanted.class_data, setup.storage, setup.paths.cache / "datasets"
        )
        source = "spec.dreambooth.classData"
    else:
        folder = generate_class_images(
            setup.accelerator,
            setup.components,
            setup.spec,
            setup.output,
            setup.paths.cache / "class-images",
        )
        source = f"{setup.output.uri}/{FOLDER}"
    return class_examples(folder, wanted.class_prompt, wanted.num_class_images, source)


register(DreamBooth())
