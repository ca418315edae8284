"""The training loop: set up, resume, train step by step, checkpoint, export.

It reads top to bottom: fetch and load everything the config names (:func:`prepare`),
build the trainer of each stage (the diffusion model; for method full, first the
autoencoder), and :func:`train` each: resume if a checkpoint exists, then loop over
optimiser steps (each of ``gradientAccumulationSteps`` micro-batches), sampling and
checkpointing every N steps and when asked to stop (SIGTERM). Finally export the model.
Only the main process writes shared outputs.
"""

import collections
import contextlib
import datetime
import hashlib
import itertools
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from difftrain.api.config import TrainerConfig
from difftrain.api.scratch import scratch_bytes
from difftrain.errors import DatasetError, Stopped
from difftrain.storage import S3Settings, Store, open_store
from difftrain.trainer import (
    autoencoder,
    checkpoint,
    data,
    dreambooth,
    export,
    identity,
    methods,
    models,
    optim,
    ownership,
    plots,
    sampling,
    textual_inversion,
)
from difftrain.trainer.cache import cached_folder
from difftrain.trainer.conditioning import encode_text, sdxl_time_ids, token_ids
from difftrain.trainer.loss import add_noise, diffusion_loss, min_snr_weights, sample_noise, target
from difftrain.trainer.scratch import Scratch
from difftrain.trainer.telemetry import Telemetry, memory_bytes, serves_metrics
from difftrain.trainer.waiting import Waiting

log = logging.getLogger(__name__)

# Threads making batches ahead of the training step (see data.prefetched).
DATA_WORKERS = min(4, os.cpu_count() or 1)


@dataclass
class Paths:
    """Node-local folders (emptyDirs in a pod): the cache, and this process's folder on
    the node's scratch disk (``base``, shared by the node's processes)."""

    cache: Path
    scratch: Path
    base: Path

    @classmethod
    def from_env(cls) -> "Paths":
        base = Path(os.environ.get("DIFFTRAIN_SCRATCH", "/tmp/difftrain"))
        cache = Path(os.environ.get("DIFFTRAIN_CACHE", base / "cache"))
        rank = os.environ.get("RANK", "0")
        return cls(cache=cache, scratch=base / f"scratch-rank{rank}", base=base)


@dataclass
class Shared:
    """What every stage of a run uses: processes, model parts, data and the output."""

    config: TrainerConfig
    paths: Paths
    accelerator: object
    components: object
    batches: data.Batches
    dataset: data.TrainingSet
    output: Store
    facts: dict  # for the model card
    lease: ownership.Lease | None  # the main process's hold on the output
    disk: Scratch
    waiting: Waiting
    run_id: str | None = None  # the run this job writes, once a stage has chosen it


@dataclass
class Trainer:
    """Everything the loop and checkpoints touch, for one stage of a run."""

    config: TrainerConfig
    accelerator: object
    components: object
    trainable: methods.Trainable  # the bare modules: checkpoints and export use these
    wrapped: dict  # the same modules as the accelerator prepared them (DDP): training uses these
    optimizer: torch.optim.Optimizer
    scheduler: object
    generator: torch.Generator
    batches: data.Batches
    dataset: data.TrainingSet
    total_steps: int
    output: Store  # the stage's root: OUTPUT, or OUTPUT/autoencoder
    paths: Paths
    scratch: Path  # the stage's local folder
    step: Callable  # one micro-batch: (trainer, batch, accumulation, sync) -> loss
    stage: str = "diffusion"
    ema: object | None = None  # diffusers EMAModel of the UNet, when spec.training.ema asks
    samples: bool = False  # whether validation samples are taken
    alphas: torch.Tensor | None = None  # the noise schedule's alphas_cumprod, on the device
    prior_weight: float | None = None  # DreamBooth prior preservation: the class term's weight
    losses: list = field(default_factory=list)
    disk: Scratch | None = None
    waiting: Waiting | None = None
    lease: ownership.Lease | None = None
    earlier_run: str | None = None  # the run an earlier stage wrote, which this one continues
    run: identity.Run | None = None  # the run this stage's checkpoints belong to
    ledger: checkpoint.Ledger | None = None  # this run's checkpoints (main process)


class StopFlag:
    """Set by SIGTERM or SIGINT; every stage checks it after each step."""

    requested = False


def fetch_dataset(uri: str, settings: S3Settings, cache: Path) -> Path:
    """A local folder holding the dataset at ``uri``."""
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    if uri == "builtin:shapes":
        from difftrain.shapes import write_dataset

        return cached_folder(cache, uri, write_dataset)
    store = open_store(uri, settings)
    return cached_folder(
        cache, uri, lambda folder: store.download_tree("", folder, unsafe_error=DatasetError)
    )


def gather_from_all(accelerator, value) -> list:
    """``value`` from every process, in rank order (a synchronisation point)."""
    if accelerator.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


def _usable_examples(accelerator, spec, folder: Path):
    """The dataset's readable examples and their sizes; each process checks a share."""
    examples = data.find_examples(folder)
    rank, world = accelerator.process_index, accelerator.num_processes
    shares = gather_from_all(accelerator, data.image_sizes(examples[rank::world]))
    sizes = [shares[i % world][i // world] for i in range(len(examples))]
    usable = [(e, size) for e, size in zip(examples, sizes, strict=True) if size is not None]
    skipped = [e for e, size in zip(examples, sizes, strict=True) if size is None]
    data.check_usable([e for e, _ in usable], skipped, spec.dataset.max_skipped_fraction)
    return [e for e, _ in usable], [size for _, size in usable], len(skipped)


def training_sizes(dataset, sizes: list[data.Size]) -> tuple[data.Size, ...]:
    """The (width, height) each image trains at: square, or its aspect-ratio bucket."""
    side = dataset.resolution
    if not dataset.bucketing.enabled:
        return tuple((side, side) for _ in sizes)
    bucketing = dataset.bucketing
    buckets = data.bucket_sizes(
        side, bucketing.min_resolution, bucketing.max_resolution, bucketing.step
    )
    return tuple(data.nearest_bucket(size, buckets) for size in sizes)


def fingerprint(examples: list[data.Example], folder: Path) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(str(example.image.relative_to(folder)).encode())
        digest.update(str(example.image.stat().st_size).encode())
        digest.update(example.caption.encode())
    return digest.hexdigest()


def prepare(config: TrainerConfig, paths: Paths) -> Shared:
    """Hold the output, fetch the model and data, start the process group, load the
    parts and the data."""
    spec = config.spec
    settings = S3Settings.from_spec(spec.storage)
    methods.check_supported(spec)
    output = open_store(spec.output.uri, settings)
    if os.environ.get("RANK", "0") == "0":
        output.check_writable()  # fail before hours of training, not at the first checkpoint
    leases: list[ownership.Lease] = []  # the main process's, once the data is usable
    try:
        return _prepare(config, paths, settings, output, leases)
    except BaseException:
        for lease in leases:
            lease.release()
        raise


def _prepare(config: TrainerConfig, paths: Paths, settings, output: Store, leases: list) -> Shared:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed

    spec = config.spec
    training = spec.training
    # Fetch before torch.distributed starts: downloads are per node (not per rank), and
    # libraries skip writing files on ranks other than 0 once it has.
    reuse = spec.full_settings.reuse
    model_folder = models.fetch_model(
        spec.model, settings, paths.cache / "models", weights=spec.method != "full" or bool(reuse)
    )
    data_folder = fetch_dataset(spec.dataset.uri, settings, paths.cache / "datasets")
    on_cpu = spec.resources.gpus_per_node == 0 or not torch.cuda.is_available()
    # Without cpu=True, Accelerate ignores torchrun's WORLD_SIZE on CPUs and each
    # process would train alone.
    timeout = datetime.timedelta(seconds=spec.run_policy.collective_timeout_seconds)
    accelerator = Accelerator(
        mixed_precision=training.mixed_precision,
        cpu=on_cpu,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)],
    )
    set_seed(training.seed)
    if spec.method == "full":
        components = models.new_components(model_folder, spec.model, reuse, training.seed)
    else:
        components = models.load_components(model_folder, spec.model)
    examples, sizes, skipped = _usable_examples(accelerator, spec, data_folder)
    targets = training_sizes(spec.dataset, sizes)
    counts = collections.Counter(targets).most_common()
    log.info("%d images at %s", len(examples), ", ".join(f"{w}x{h} ({n})" for (w, h), n in counts))
    batches = data.Batches(
        targets=targets,
        repeats=spec.dataset.repeats,
        batch_size=training.batch_size,
        world_size=accelerator.num_processes,
        rank=accelerator.process_index,
        seed=training.seed,
    )
    batches.check()
    lease = None
    if accelerator.is_main_process:  # before anything is written to the output
        lease = ownership.take(output, ownership.Holder.of(config))
        leases.append(lease)
    templates, subject = (), ""
    if spec.method == "textualInversion":
        concept = spec.textual_inversion
        templates = textual_inversion.TEMPLATES[concept.template]
        subject = textual_inversion.subject(concept)
    if spec.method == "dreambooth":
        examples = dreambooth.instance_examples(examples, spec.dreambooth.instance_prompt)
    facts = {
        "architecture": components.architecture,
        "images": len(examples),
        "processes": accelerator.num_processes,
        "dataset_fingerprint": fingerprint(examples, data_folder),
        "skipped": skipped,
    }
    if dreambooth.prior_weight(spec) is not None:
        classes = _class_examples(spec, accelerator, components, output, paths, settings)
        facts["class_images"] = len(classes)
        # Class batches in an order of their own; each takes its instance batch's size.
        unsized = ((0, 0),) * len(classes)
        prior = replace(batches, targets=unsized, repeats=1, seed=training.seed + 1)
        batches = dreambooth.WithPrior(batches, prior, offset=len(examples))
        batches.check()
        examples = examples + classes
    dataset = data.TrainingSet(
        examples,
        data.Transform(
            spec.dataset.center_crop,
            spec.dataset.random_flip,
            spec.dataset.caption_dropout,
            templates,
            subject,
        ),
    )
    disk = Scratch(paths.base, scratch_bytes(spec))
    waiting = Waiting(accelerator.num_processes)
    return Shared(
        config,
        paths,
        accelerator,
        components,
        batches,
        dataset,
        output,
        facts,
        lease,
        disk,
        waiting,
    )


def _class_examples(spec, accelerator, components, output, paths, storage) -> list:
    """DreamBooth's class images: from spec.dreambooth.classData, or made by the base model."""
    wanted = spec.dreambooth
    if wanted.class_data:
        folder = fetch_dataset(wanted.class_data, storage, paths.cache / "datasets")
        source = "spec.dreambooth.classData"
    else:
        folder = dreambooth.generate_class_images(
            accelerator, components, spec, output, paths.cache / "class-images"
        )
        source = f"{output.uri}/{dreambooth.FOLDER}"
    return dreambooth.class_examples(folder, wanted.class_prompt, wanted.num_class_images, source)


def stage_steps(shared: Shared, steps: int | None) -> int:
    """Optimiser steps of a stage: ``steps``, or the spec's epochs of the data."""
    training = shared.config.spec.training
    per_epoch = shared.batches.batches_per_epoch // training.gradient_accumulation_steps
    return steps or training.epochs * max(1, per_epoch)


def _generator(shared: Shared) -> torch.Generator:
    accelerator = shared.accelerator
    return torch.Generator(device=accelerator.device).manual_seed(
        shared.config.spec.training.seed * 7919 + accelerator.process_index
    )


def build_diffusion(shared: Shared) -> Trainer:
    """The trainer of the diffusion model: what the method trains, on frozen parts."""
    spec, accelerator, components = shared.config.spec, shared.accelerator, shared.components
    training = spec.training
    trainable = methods.prepare(components, spec)
    if training.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
    frozen_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        training.mixed_precision, torch.float32
    )
    components.vae.to(accelerator.device, dtype=frozen_dtype)
    if "unet" not in trainable.modules:  # textual inversion: a frozen UNet
        components.unet.to(accelerator.device, dtype=frozen_dtype)
    trained = [id(module) for module in trainable.modules.values()]
    for encoder in components.text_encoders:
        encoder.to(
            accelerator.device, dtype=torch.float32 if id(encoder) in trained else frozen_dtype
        )
    groups = [
        {
            "params": trainable.parameters(name),
            "lr": training.learning_rate
            if name == "unet"
            else (training.text_encoder_learning_rate or training.learning_rate),
        }
        for name in trainable.modules
    ]
    optimizer = optim.build_optimizer(training, groups)
    names = list(trainable.modules)
    *prepared, optimizer = accelerator.prepare(*trainable.modules.values(), optimizer)
    wrapped = dict(zip(names, prepared, strict=True))
    # Text encoders being trained must run through their wrappers to sync gradients.
    for index in range(len(components.text_encoders)):
        if models.encoder_name(index) in wrapped:
            components.text_encoders[index] = wrapped[models.encoder_name(index)]
    total = stage_steps(shared, training.steps)
    trainer = Trainer(
        config=shared.config,
        accelerator=accelerator,
        components=components,
        trainable=trainable,
        wrapped=wrapped,
        optimizer=optimizer,
        scheduler=optim.build_scheduler(optimizer, training, total),
        generator=_generator(shared),
        batches=shared.batches,
        dataset=shared.dataset,
        total_steps=total,
        output=shared.output,
        paths=shared.paths,
        scratch=shared.paths.scratch,
        step=train_step,
        **_shared_parts(shared),
        samples=bool(spec.validation.prompts),
        alphas=components.noise_scheduler.alphas_cumprod.to(accelerator.device),
        prior_weight=dreambooth.prior_weight(spec),
    )
    if training.ema.enabled:
        from diffusers.training_utils import EMAModel

        unet = trainable.modules["unet"]
        trainer.ema = EMAModel(
            unet.parameters(),
            decay=training.ema.decay,
            model_cls=type(unet),
            model_config=unet.config,
        )
        trainer.ema.to(accelerator.device)
    return trainer


def build_autoencoder(shared: Shared) -> Trainer:
    """The trainer of the autoencoder stage (method full without a reused VAE)."""
    spec, accelerator = shared.config.spec, shared.accelerator
    settings = spec.full_settings.autoencoder
    vae = shared.components.vae
    vae.requires_grad_(True)
    vae.to(accelerator.device, dtype=torch.float32)
    trainable = methods.Trainable({"vae": vae}, lora=False)
    optimizer = optim.build_optimizer(
        spec.training, [{"params": trainable.parameters("vae"), "lr": settings.learning_rate}]
    )
    objective, optimizer = accelerator.prepare(autoencoder.Objective(vae), optimizer)
    return Trainer(
        config=shared.config,
        accelerator=accelerator,
        components=shared.components,
        trainable=trainable,
        wrapped={"vae": objective},
        optimizer=optimizer,
        scheduler=optim.build_scheduler(optimizer, spec.training, settings.steps),
        generator=_generator(shared),
        batches=shared.batches,
        dataset=shared.dataset,
        total_steps=settings.steps,
        output=shared.output.child(autoencoder.FOLDER),
        paths=shared.paths,
        scratch=shared.paths.scratch / autoencoder.FOLDER,
        step=autoencoder_step,
        stage="autoencoder",
        **_shared_parts(shared),
    )


def _shared_parts(shared: Shared) -> dict:
    """The Trainer fields every stage takes from the run."""
    return {
        "disk": shared.disk,
        "waiting": shared.waiting,
        "lease": shared.lease,
        "earlier_run": shared.run_id,
    }


def _synchronising(trainer: Trainer, sync: bool) -> contextlib.ExitStack:
    """A context in which gradients are synchronised across processes only if ``sync``."""
    stack = contextlib.ExitStack()
    if not sync:
        for module in trainer.wrapped.values():
            stack.enter_context(trainer.accelerator.no_sync(module))
    return stack


def autoencoder_step(trainer: Trainer, batch: dict, accumulation: int, sync: bool) -> float:
    """One micro-batch of the autoencoder stage: reconstruct, loss, backward."""
    accelerator = trainer.accelerator
    weight = trainer.config.spec.full_settings.autoencoder.kl_weight
    with _synchronising(trainer, sync), accelerator.autocast():
        pixels = batch["pixels"].to(accelerator.device)
        reconstruction, kl = trainer.wrapped["vae"](pixels, trainer.generator)
        loss = autoencoder.loss(pixels, reconstruction, kl, weight)
        accelerator.backward(loss / accumulation)
    return loss.detach().item()


def train_step(trainer: Trainer, batch: dict, accumulation: int, sync: bool) -> float:
    """One micro-batch: forward, loss, backward (gradients synchronised when ``sync``)."""
    components, accelerator = trainer.components, trainer.accelerator
    spec = trainer.config.spec
    device = accelerator.device
    unet = trainer.wrapped.get("unet", components.unet)
    # Every copy to the device first: a copy from pageable memory waits for all the work
    # queued before it, so a copy in mid-step would stall the step there.
    pixels = batch["pixels"].to(device, dtype=components.vae.dtype)
    ids = [tokens.to(device) for tokens in token_ids(components, batch["captions"])]
    if components.architecture == "sdxl":
        time_ids = sdxl_time_ids(
            batch["original_sizes"], batch["crops_top_left"], batch["target_sizes"]
        ).to(device)
    alphas = trainer.alphas
    with _synchronising(trainer, sync), accelerator.autocast():
        with torch.no_grad():
            latents = components.vae.encode(pixels).latent_dist.sample(trainer.generator)
        latents = latents.float() * components.vae.config.scaling_factor
        noise = sample_noise(latents, trainer.generator, spec.training.noise_offset)
        timesteps = torch.randint(
            0,
            components.noise_scheduler.config.num_train_timesteps,
            (latents.shape[0],),
            generator=trainer.generator,
            device=device,
        )
        noisy = add_noise(latents, noise, timesteps, alphas)
        trains_text = "text_encoder" in trainer.wrapped
        with torch.enable_grad() if trains_text else torch.no_grad():
            conditioning = encode_text(components, ids)
        if components.architecture == "sdxl":
            conditioning["added_cond_kwargs"]["time_ids"] = time_ids
        prediction = unet(noisy, timesteps, **conditioning).sample
        expected = target(components.prediction_type, latents, noise, timesteps, alphas)
        weights = None
        if spec.training.snr_gamma:
            weights = min_snr_weights(
                timesteps, alphas, spec.training.snr_gamma, components.prediction_type
            )
        if trainer.prior_weight is None:
            loss = diffusion_loss(prediction, expected, weights)
        else:  # the second half of the batch is class images (dreambooth.WithPrior)
            halves = [
                t.chunk(2) if t is not None else (None, None)
                for t in (prediction, expected, weights)
            ]
            instance, prior = (diffusion_loss(*parts) for parts in zip(*halves, strict=True))
            loss = instance + trainer.prior_weight * prior
        accelerator.backward(loss / accumulation)
    return loss.detach().item()


def optimizer_step(trainer: Trainer) -> None:
    max_norm = trainer.config.spec.training.max_grad_norm
    if max_norm:
        parameters = [
            p for m in trainer.wrapped.values() for p in m.parameters() if p.requires_grad
        ]
        trainer.accelerator.clip_grad_norm_(parameters, max_norm)
    trainer.optimizer.step()
    trainer.trainable.after_step()
    trainer.scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    if trainer.ema is not None:
        trainer.ema.step(trainer.trainable.modules["unet"].parameters())


def _agree_to_stop(accelerator, stop: StopFlag, trainer: Trainer) -> tuple[bool, bool]:
    """Whether any process was asked to stop (all processes must checkpoint together),
    and whether the output was taken over by another job (all must stop writing)."""
    lost = trainer.lease is not None and trainer.lease.lost
    flags = torch.tensor([float(stop.requested), float(lost)], device=accelerator.device)
    halt, taken = accelerator.reduce(flags, reduction="sum").tolist()
    return halt > 0, taken > 0


class MetricsLog:
    """``metrics.jsonl``: one line per logged step, kept locally and uploaded whole."""

    def __init__(self, path: Path, store: Store, resume_step: int):
        self.path, self.store = path, store
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = []
        if resume_step and store.exists("metrics.jsonl"):
            lines = [
                line
                for line in store.read_bytes("metrics.jsonl").decode().splitlines()
                if line and json.loads(line)["step"] <= resume_step
            ]
        path.write_text("".join(line + "\n" for line in lines))

    def append(self, entry: dict) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")

    def upload(self) -> None:
        self.store.upload(self.path, "metrics.jsonl")


@dataclass
class Progress:
    """Where a stage's steps fall in the whole run, for the progress gauges: the
    autoencoder stage comes first, and the diffusion stage's steps follow it."""

    telemetry: Telemetry
    offset: int
    total: int

    def update(self, step: int, **values) -> None:
        self.telemetry.update(step=self.offset + step, total_steps=self.total, **values)

    def begin(self, stage: str) -> None:
        """A stage starts: checkpoint and sample steps count within it, as their folders
        are named (the autoencoder stage's under OUTPUT/autoencoder/)."""
        self.telemetry.update(autoencoder_stage=int(stage == "autoencoder"))
        self.telemetry.checkpoint_saved(0)

    def checkpoint_saved(self, step: int) -> None:
        self.telemetry.checkpoint_saved(step)

    def samples_generated(self, step: int, count: int) -> None:
        self.telemetry.samples_generated(step, count)


def run(config: TrainerConfig, paths: Paths | None = None) -> None:
    """Train the job described by ``config``; raises DifftrainError subclasses on failure."""
    paths = paths or Paths.from_env()
    start_time = datetime.datetime.now(datetime.UTC).isoformat()
    shared = prepare(config, paths)
    try:
        _run(shared, start_time)
    except BaseException as error:
        if shared.accelerator.num_processes > 1 and not isinstance(error, Stopped):
            shared.waiting.abandon(f"{type(error).__name__}: {error}"[:200])
        raise
    finally:
        if shared.lease is not None:
            shared.lease.release()


def _run(shared: Shared, start_time: str) -> None:
    config, paths = shared.config, shared.paths
    spec = config.spec
    accelerator = shared.accelerator
    main = accelerator.is_main_process
    stop = StopFlag()

    def request_stop(number, _):
        grace = os.environ.get("DIFFTRAIN_GRACE_SECONDS", "?")
        log.warning(
            "%s: finishing this step, then writing a checkpoint (%s s of grace)",
            signal.Signals(number).name,
            grace,
        )
        stop.requested = True

    # SIGINT too: torchrun's agent forwards a Ctrl-C it gets as SIGINT.
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, request_stop)
    telemetry = Telemetry(config.namespace, config.name, accelerator.process_index)
    if serves_metrics():
        telemetry.serve()
    telemetry.update(dataset_images_skipped=shared.facts["skipped"])
    first_stage = 0
    diffusion_steps = stage_steps(shared, spec.training.steps)
    if spec.method == "full" and "vae" not in spec.full_settings.reuse:
        first_stage = spec.full_settings.autoencoder.steps
        total = first_stage + diffusion_steps
        resumable = spec.checkpoints.resume == "auto"
        if not (resumable and autoencoder.is_done(shared.output, _spec_hash(shared))):
            trainer = build_autoencoder(shared)
            train(trainer, Progress(telemetry, 0, total), stop)
            shared.waiting.alone(
                main, "exporting the autoencoder", lambda: _export_autoencoder(trainer)
            )
            accelerator.free_memory()  # drop the stage's wrapped model and optimiser
            shared.run_id = trainer.run.id
            del trainer
        shared.components.vae = autoencoder.load(shared.output, paths.scratch)
    trainer = build_diffusion(shared)
    steps = train(trainer, Progress(telemetry, first_stage, first_stage + diffusion_steps), stop)

    def export_model():
        shared.facts.update(
            steps=steps,
            final_loss=trainer.losses[-1] if trainer.losses else None,
            start_time=start_time,
            end_time=datetime.datetime.now(datetime.UTC).isoformat(),
            image=os.environ.get("DIFFTRAIN_IMAGE"),
        )
        _export(trainer, shared.facts)

    shared.waiting.alone(main, "exporting the model", export_model)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def train(trainer: Trainer, progress: Progress, stop: StopFlag) -> int:
    """Run one stage to its last step from its latest checkpoint; the steps done.

    Raises :class:`Stopped` after checkpointing when ``stop`` was requested.
    """
    accelerator = trainer.accelerator
    spec = trainer.config.spec
    main = accelerator.is_main_process
    label = "" if trainer.stage == "diffusion" else f"{trainer.stage} "
    progress.begin(trainer.stage)
    position = resume(trainer)
    if position.step:
        log.info("%sresumed from checkpoint step %d", label, position.step)
        progress.checkpoint_saved(position.step)
    metrics = MetricsLog(trainer.scratch / "metrics.jsonl", trainer.output, position.step)
    accumulation = spec.training.gradient_accumulation_steps
    log_every = max(1, trainer.total_steps // 2000)
    last_saved = last_logged = last_sampled = position.step
    progress.update(position.step)
    micro, window_losses, tick = 0, [], time.perf_counter()
    # Seconds of the last checkpoint and samples, and of such pauses since the last record:
    # throughput counts training alone, and the time left adds the pauses still to come.
    pauses = {"save": 0.0, "sample": 0.0, "window": 0.0}

    def gather(value):
        return gather_from_all(accelerator, value)

    @contextlib.contextmanager
    def pause(kind: str):
        started = time.perf_counter()
        yield
        pauses[kind] = time.perf_counter() - started
        pauses["window"] += pauses[kind]

    def save():
        with pause("save"):
            checkpoint.save(trainer, position, gather)
            progress.checkpoint_saved(position.step)

            def record_and_prune():
                _upload_curve(trainer, metrics)
                trainer.ledger.prune(spec.checkpoints.keep_last)

            trainer.waiting.alone(main, "pruning checkpoints", record_and_prune)

    def take_samples():
        written = sampling.validate(trainer, position.step, lambda: stop.requested)
        log.info("samples written to %s", written)
        validation = spec.validation
        progress.samples_generated(
            position.step, len(validation.prompts) * validation.images_per_prompt
        )

    def sample():
        with pause("sample"):
            trainer.waiting.alone(main, "taking samples", take_samples)

    def time_left(per_step: float) -> float:
        """Seconds to the last step: the steps, and the checkpoints and samples between."""
        steps = progress.total - progress.offset - position.step
        left = per_step * steps + pauses["save"] * pauses_left(
            position.step, trainer.total_steps, spec.checkpoints.every_steps
        )
        if trainer.samples:
            every = spec.validation.every_steps
            left += pauses["sample"] * pauses_left(position.step, trainer.total_steps, every)
        return left

    def record():
        """Record the steps since the last record: gauges, and on the main process
        metrics.jsonl and the log line."""
        elapsed = time.perf_counter() - tick - pauses["window"]
        images = len(window_losses) * spec.training.batch_size * accelerator.num_processes
        entry = {
            "step": position.step,
            "epoch": position.epoch,
            "loss": sum(window_losses) / len(window_losses),
            "lr": trainer.scheduler.get_last_lr()[0],
            "imagesPerSecond": images / elapsed if elapsed else None,
        }
        entry["memoryBytes"], entry["peakMemoryBytes"] = memory_bytes()
        trainer.losses.append(entry["loss"])
        per_step = elapsed / (position.step - last_logged)
        progress.update(
            position.step,
            epoch=position.epoch,
            loss=entry["loss"],
            learning_rate=entry["lr"],
            images_per_second=entry["imagesPerSecond"],
            seconds_per_step=per_step,
            eta_seconds=time_left(per_step),
            device_memory_bytes=entry["memoryBytes"],
            device_memory_peak_bytes=entry["peakMemoryBytes"],
        )
        if main:  # every process keeps its node's gauges; one writes the run's record
            metrics.append(entry)
            log.info(
                "%sstep %d/%d loss %.4f",
                label,
                position.step,
                trainer.total_steps,
                entry["loss"],
            )

    for module in trainer.wrapped.values():
        module.train()
    while position.step < trainer.total_steps:
        keys = trainer.batches.epoch(position.epoch, position.batch)
        with contextlib.closing(data.prefetched(trainer.dataset, keys, DATA_WORKERS)) as batches:
            for batch in batches:
                micro += 1
                sync = micro == accumulation
                window_losses.append(trainer.step(trainer, batch, accumulation, sync))
                position.batch += 1
                if not sync:
                    continue
                optimizer_step(trainer)
                micro = 0
                position.step += 1
                if position.step % log_every == 0 or position.step == trainer.total_steps:
                    record()
                    window_losses, tick, pauses["window"] = [], time.perf_counter(), 0.0
                    last_logged = position.step
                if trainer.samples and position.step % spec.validation.every_steps == 0:
                    sample()
                    last_sampled = position.step
                halt, lost = _agree_to_stop(accelerator, stop, trainer)
                if lost:
                    raise ownership.OutputInUse(
                        f"{trainer.output.uri}: another job took over this output at step "
                        f"{position.step}; this job stops without writing more to it"
                    )
                if halt or position.step % spec.checkpoints.every_steps == 0:
                    save()
                    last_saved = position.step
                if halt:
                    raise Stopped(
                        f"stopped at step {position.step} on a signal; checkpoint written"
                    )
                if position.step >= trainer.total_steps:
                    break
            else:
                position.epoch += 1
                position.batch = 0
    if last_saved != position.step:
        save()  # a crash while exporting resumes here instead of training again
    if trainer.samples and last_sampled != position.step:
        sample()  # the final model's samples
    trainer.waiting.alone(main, "uploading the loss curve", lambda: _upload_curve(trainer, metrics))
    return position.step


def _spec_hash(shared: Shared) -> str:
    return identity.spec_hash(identity.training_spec(shared.config.spec))


def resume(trainer: Trainer) -> checkpoint.Position:
    """Choose the run this stage writes and restore its newest checkpoint, if any: under
    ``resume: auto`` the newest complete checkpoint, when it belongs to a run of this
    training spec (InvalidSpec otherwise); a new run from step 0 when there is none, or
    under ``resume: never``."""
    config, accelerator = trainer.config, trainer.accelerator
    current = identity.training_spec(config.spec)
    job = {"namespace": config.namespace, "name": config.name, "uid": config.uid}
    found = checkpoint.catalog(trainer.output)
    latest = checkpoint.newest(found) if config.spec.checkpoints.resume == "auto" else None
    if latest is not None:
        where = f"{trainer.output.uri}/{checkpoint.step_prefix(latest.step)}"
        identity.check_resumable(latest.record, current, where)
        run_id = latest.run
    else:  # one id for all processes: the main process's
        run_id = gather_from_all(accelerator, trainer.earlier_run or identity.new_run_id())[0]
    trainer.run = identity.Run(run_id, current, job)
    if accelerator.is_main_process:
        trainer.ledger = checkpoint.Ledger.of(trainer.output, run_id, found)
        if latest is None and any(f.run != run_id for f in found):
            log.warning(
                "%s holds checkpoints of earlier runs; they are left as they are, "
                "except any at a step this run saves too",
                trainer.output.uri,
            )
    if latest is None:
        return checkpoint.Position()
    return checkpoint.load(trainer, latest.step)


def pauses_left(step: int, last: int, every: int) -> int:
    """How many of the pauses taken every ``every`` steps, and once after ``last`` if it
    is not one of them, come after ``step``."""
    return last // every - step // every + (last % every != 0 and step < last)


def _upload_curve(trainer: Trainer, metrics: "MetricsLog") -> None:
    """Upload ``metrics.jsonl`` and its picture, ``loss.png``."""
    metrics.upload()
    title = f"{trainer.config.name}: {trainer.stage} loss"
    image = plots.write_loss_curve(metrics.path, trainer.scratch / "loss.png", title)
    trainer.output.upload(image, "loss.png")


def _export_autoencoder(trainer: Trainer) -> None:
    """Measure the latent scale on the first batches of the data, then save the VAE."""
    first = itertools.islice(trainer.batches.epoch(0, 0), autoencoder.SCALE_BATCHES)
    pixels = (data.collate([trainer.dataset[key] for key in keys])["pixels"] for keys in first)
    vae = trainer.trainable.modules["vae"]
    factor = autoencoder.scaling_factor(vae, pixels, trainer.generator)
    facts = {
        "stage": "autoencoder",
        "steps": trainer.total_steps,
        "finalLoss": trainer.losses[-1] if trainer.losses else None,
        "scalingFactor": factor,
        "specHash": trainer.run.spec_hash,
    }
    autoencoder.export(vae, factor, trainer.scratch / "model", trainer.output, facts)


def _export_bytes(trainer: Trainer, formats: list[str]) -> int:
    """About how large the exported files are: the trained weights alone, or for full
    weights every component, at the export dtype, once per pipeline format."""
    size = export.DTYPES[trainer.config.spec.output.dtype].itemsize
    if trainer.trainable.lora or trainer.config.spec.method == "textualInversion":
        modules = list(trainer.trainable.modules.values())
        count = sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)
        return count * size * len(formats)
    components = trainer.components
    modules = [components.unet, components.vae, *components.text_encoders]
    copies = 1 + ("singleFile" in formats)
    return sum(p.numel() for m in modules for p in m.parameters()) * size * copies


def _export(trainer: Trainer, facts: dict) -> None:
    config = trainer.config
    formats = export.formats_for(config)
    folder = trainer.paths.scratch / "model"
    with trainer.disk.writing(folder, "the exported model", _export_bytes(trainer, formats)):
        _write_model(trainer, folder, formats, facts)
    store = trainer.output.child("model")
    try:
        store.upload_tree(folder, "")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    # difftrain.json goes last: its presence says the model folder is complete.
    store.write_bytes("difftrain.json", export.record(config, facts).encode())
    log.info("model exported to %s", store.uri)


def _write_model(trainer: Trainer, folder: Path, formats: list[str], facts: dict) -> None:
    config = trainer.config
    folder.mkdir(parents=True, exist_ok=True)
    dtype = export.DTYPES[config.spec.output.dtype]
    trainable = trainer.trainable
    if trainable.lora:
        export.export_lora(trainer.components, trainable, formats, folder, config.name, dtype)
    elif config.spec.method == "textualInversion":
        textual_inversion.export(trainable, config.spec.textual_inversion, folder, dtype)
    else:
        unet = trainable.modules["unet"]
        if trainer.ema is not None:
            trainer.ema.copy_to(unet.parameters())  # export the average, as asked
        if config.spec.method == "full":
            export.save_pipeline(
                sampling.pipeline_for(trainer.components, trainable.modules), folder, dtype
            )
        else:
            export.export_pipeline(trainer.components, trainable.modules, folder, dtype)
    facts["formats"] = formats
    (folder / "README.md").write_text(export.model_card(config, facts))
