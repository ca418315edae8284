"""Images from the model being trained: validation samples under ``samples/step-N/``.

Sampling builds an ordinary diffusers pipeline around the training components (the bare
modules, never their distributed wrappers), so what the samples show is what the
exported model will do. It draws from its own seeded generators inside a forked random
state: taking samples never changes the training run, and a resumed run stays identical.
"""

import contextlib
import json
import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from difftrain import contract
from difftrain.storage import Store

log = logging.getLogger(__name__)

# Images generated per pipeline call; bounds memory with many prompts.
CHUNK = 16


def pipeline_for(components, modules: dict | None = None):
    """The family's pipeline over ``components``, with ``modules`` (bare trained modules
    by component name) in place of the loaded ones, and the family's sampler."""
    modules = modules or {}
    family = components.family
    parts = {
        "vae": modules.get("vae", components.vae),
        family.denoiser: modules.get(family.denoiser, components.denoiser),
        "scheduler": family.sampler(components.noise_scheduler.config),
    }
    names = zip(family.encoder_names(), family.tokenizer_names(), strict=True)
    pairs = zip(components.text_encoders, components.tokenizers, strict=True)
    for (name, tokenizer_name), (encoder, tokenizer) in zip(names, pairs, strict=True):
        parts[name] = modules.get(name, encoder)
        parts[tokenizer_name] = tokenizer
    pipeline = family.pipeline(parts)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate(
    pipeline,
    prompts: list[str],
    *,
    size: int,
    seed: int,
    per_prompt: int = 1,
    steps: int = 25,
    guidance: float = 7.5,
    negative: str = "",
    stopping: Callable[[], bool] | None = None,
    options: dict | None = None,
) -> list[tuple[str, int, Image.Image]]:
    """``per_prompt`` images for each prompt, as (prompt, seed, image); image ``k`` always
    uses seed ``seed + k``, so runs and steps are comparable."""
    wanted = [(p, seed + k) for k, p in enumerate(p for p in prompts for _ in range(per_prompt))]
    return generate_each(
        pipeline,
        wanted,
        size=size,
        steps=steps,
        guidance=guidance,
        negative=negative,
        stopping=stopping,
        options=options,
    )


def generate_each(
    pipeline,
    wanted: list[tuple[str, int]],
    *,
    size: int,
    steps: int = 25,
    guidance: float = 7.5,
    negative: str = "",
    stopping: Callable[[], bool] | None = None,
    options: dict | None = None,
    made: Callable[[int], object] | None = None,
) -> list[tuple[str, int, Image.Image]]:
    """An image for each (prompt, seed) of ``wanted``, as (prompt, seed, image), made in
    chunks with generators of their own inside a forked random state; fewer if
    ``stopping()`` turns true between chunks (the job is being stopped). ``options``
    go to the pipeline call as they are (the family's ``sampling_options``); ``made``
    hears how many images each chunk made."""
    device = pipeline.device
    results = []
    modules = [m for m in pipeline.components.values() if hasattr(m, "training")]
    with outside_training(modules, device):
        for start in range(0, len(wanted), CHUNK):
            if stopping is not None and stopping():
                break
            chunk = wanted[start : start + CHUNK]
            with torch.no_grad():
                images = pipeline(
                    [p for p, _ in chunk],
                    negative_prompt=[negative] * len(chunk) if negative else None,
                    height=size,
                    width=size,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    generator=[torch.Generator(device).manual_seed(s) for _, s in chunk],
                    **(options or {}),
                ).images
            results += [(p, s, image) for (p, s), image in zip(chunk, images, strict=True)]
            if made is not None:
                made(len(chunk))
    return results


@contextlib.contextmanager
def outside_training(modules, device):
    """``modules`` in eval mode inside a forked random state, and as they were after:
    what runs inside (samples, evaluations) never changes the training run."""
    modes = {module: module.training for module in modules}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            for module in modes:
                module.eval()
            yield
        finally:
            for module, training in modes.items():
                module.train(training)


def grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """The images tiled in rows of ``columns`` (about square when not given)."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    sheet = Image.new("RGB", (columns * width, rows * height), (255, 255, 255))
    for index, image in enumerate(images):
        sheet.paste(image, ((index % columns) * width, (index // columns) * height))
    return sheet


def write_samples(
    results: list[tuple[str, int, Image.Image]], folder: Path, per_prompt: int
) -> None:
    """PNG per image, ``grid.png`` (a row per prompt when several images each) and
    ``prompts.json`` naming each file's prompt and seed."""
    folder.mkdir(parents=True, exist_ok=True)
    index = []
    for k, (prompt, seed, image) in enumerate(results):
        name = f"{k // per_prompt:03d}-{k % per_prompt:02d}.png"
        image.save(folder / name)
        index.append({"file": name, "prompt": prompt, "seed": seed})
    columns = per_prompt if per_prompt > 1 else None
    # Small models sample small images: enlarge the grid so that a person can see it.
    sheet = grid([image for _, _, image in results], columns)
    scale = max(1, 256 // results[0][2].size[0])
    sheet = sheet.resize((sheet.width * scale, sheet.height * scale), Image.Resampling.NEAREST)
    sheet.save(folder / "grid.png")
    (folder / "prompts.json").write_text(json.dumps(index, indent=2) + "\n")


sample_prefix = contract.samples_prefix


@contextlib.contextmanager
def _averaged(trainer):
    """The denoiser holds its EMA weights inside this context when the job keeps an EMA
    (the weights the export will have), and its training weights again after it."""
    if trainer.ema is None:
        yield
        return
    # A sharded model's averages are shards: its parameters must be too, not what an
    # earlier forward pass left gathered.
    trainer.after_sampling()
    parameters = trainer.denoiser_parameters()
    trainer.ema.store(parameters)
    trainer.ema.copy_to(parameters)
    try:
        yield
    finally:
        trainer.ema.restore(parameters)


def validate(
    trainer, step: int, stopping: Callable[[], bool] | None = None, write: bool = True
) -> str | None:
    """Generate the spec's validation samples at ``step`` and upload them; their URI.

    When ``stopping()`` turns true (SIGTERM), the images not yet made are left out: the
    grace period is for the checkpoint. None when none were made. A sharded model's
    processes all generate (each forward pass gathers the shards), and only the one told
    to ``write`` writes."""
    spec = trainer.config.spec
    validation = spec.validation
    pipeline = pipeline_for(trainer.components, trainer.trainable.modules)
    with trainer.accelerator.autocast(), _averaged(trainer):
        results = generate(
            pipeline,
            validation.prompts,
            size=spec.dataset.resolution,
            seed=validation.seed,
            per_prompt=validation.images_per_prompt,
            steps=validation.inference_steps,
            guidance=validation.guidance_scale,
            negative=validation.negative_prompt,
            stopping=stopping,
            options=trainer.components.family.sampling_options(trainer.components),
        )
    wanted = len(validation.prompts) * validation.images_per_prompt
    if len(results) < wanted:
        log.warning(
            "samples of step %d cut short at %d of %d images: the job is stopping",
            step,
            len(results),
            wanted,
        )
    if not results or not write:
        return None
    folder = trainer.scratch / sample_prefix(step)
    write_samples(results, folder, validation.images_per_prompt)
    store: Store = trainer.output.child(sample_prefix(step))
    try:
        store.upload_tree(folder, "")
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # scratch keeps no uploaded copy
    return store.uri
