"""Everything a run sets up before its first step: the output held, the model and data
fetched, the processes started, the model loaded and the data indexed (:func:`prepare`).
What it makes, a :class:`Run`, is what every stage of the run shares."""

import collections
import datetime
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from difftrain.api.config import TrainerConfig
from difftrain.api.scratch import scratch_bytes
from difftrain.api.spec import DiffusionTrainingJobSpec
from difftrain.errors import InvalidSpec
from difftrain.storage import S3Settings, Store, open_store
from difftrain.trainer import data, evaluation, methods, models, ownership, records
from difftrain.trainer.evaluation import Inputs
from difftrain.trainer.scratch import Scratch
from difftrain.trainer.waiting import Waiting

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)


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
class Run:
    """What every stage of a run uses: processes, the method, model parts, data and the
    output."""

    config: TrainerConfig
    paths: Paths
    accelerator: "Accelerator"
    method: methods.Method
    components: models.Components
    batches: data.Batches
    dataset: data.TrainingSet
    output: Store
    facts: dict  # for the model card
    lease: ownership.Lease | None  # the main process's hold on the output
    disk: Scratch
    waiting: Waiting
    run_id: str | None = None  # the run this job writes, once a stage has chosen it
    evaluation: Inputs | None = None  # what spec.evaluation reads
    metrics_file: Path | None = None  # spec.output.metricsFile, on the main process
    held_out: list = field(default_factory=list)  # images for the held-out loss

    @property
    def spec(self):
        return self.config.spec

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


@dataclass
class Setup:
    """What a method needs to make extra examples (DreamBooth's class images)."""

    spec: DiffusionTrainingJobSpec
    storage: S3Settings
    accelerator: "Accelerator"
    components: models.Components
    output: Store
    paths: Paths
    facts: dict = field(default_factory=dict)


def gather_from_all(accelerator, value) -> list:
    """``value`` from every process, in rank order (a synchronisation point)."""
    if accelerator.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


def prepare(config: TrainerConfig, paths: Paths) -> Run:
    """Hold the output, fetch the model and data, start the process group, load the
    parts and the data."""
    spec = config.spec
    settings = S3Settings.from_spec(spec.storage)
    method = methods.for_spec(spec)
    output = open_store(spec.output.uri, settings)
    katib = None
    if os.environ.get("RANK", "0") == "0":
        output.check_writable()  # fail before hours of training, not at the first checkpoint
        katib = records.open_mirror(spec.output.metrics_file)
    leases: list[ownership.Lease] = []  # the main process's, once the data is usable
    try:
        run = _prepare(config, paths, settings, method, output, leases)
        run.metrics_file = katib
        return run
    except BaseException:
        for lease in leases:
            lease.release()
        raise


def _prepare(config, paths: Paths, settings, method, output: Store, leases: list) -> Run:
    spec = config.spec
    # Fetch before torch.distributed starts: downloads are per node (not per rank), and
    # libraries skip writing files on ranks other than 0 once it has.
    model_folder = models.fetch_model(
        spec.model, settings, paths.cache / "models", weights=method.needs_weights(spec)
    )
    data_folder = data.fetch_dataset(spec.dataset.uri, settings, paths.cache / "datasets")
    inputs = evaluation.fetch(spec, settings, paths.cache)
    accelerator = _accelerator(spec)
    components = method.components(model_folder, spec, spec.training.seed)
    check_model(spec, components)
    components.family.set_schedule(spec.training, components)
    examples, sizes, skipped = _usable_examples(accelerator, spec, data_folder, paths.cache)
    examples, sizes, held_out = evaluation.hold_out(spec, examples, sizes)
    if held_out:
        log.info("%d images held out of training for the validation loss", len(held_out))
    batches = _batches(spec, accelerator, training_sizes(spec.dataset, sizes))
    if accelerator.is_main_process:  # before anything is written to the output
        leases.append(ownership.take(output, ownership.Holder.of(config)))
    examples = method.examples(spec, examples)
    facts = {
        "architecture": components.architecture,
        "images": len(examples),
        "processes": accelerator.num_processes,
        "dataset_fingerprint": fingerprint(examples, data_folder),
        "skipped": skipped,
    }
    setup = Setup(spec, settings, accelerator, components, output, paths)
    examples, batches, extra = method.extra_examples(setup, examples, batches)
    facts.update(extra)
    templates, subject = method.captions(spec)
    transform = data.Transform(
        spec.dataset.center_crop,
        spec.dataset.random_flip,
        spec.dataset.caption_dropout,
        templates,
        subject,
    )
    return Run(
        config=config,
        paths=paths,
        accelerator=accelerator,
        method=method,
        components=components,
        batches=batches,
        dataset=data.TrainingSet(examples, transform, sizes),
        output=output,
        facts=facts,
        lease=leases[0] if leases else None,
        disk=Scratch(paths.base, scratch_bytes(spec)),
        waiting=Waiting(accelerator.num_processes),
        evaluation=inputs,
        held_out=held_out or (inputs.held_out if inputs else []),
    )


def _accelerator(spec):
    """Start the process group (torchrun's environment) and seed every library."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed

    on_cpu = spec.resources.gpus_per_node == 0 or not torch.cuda.is_available()
    # Without cpu=True, Accelerate ignores torchrun's WORLD_SIZE on CPUs and each
    # process would train alone.
    timeout = datetime.timedelta(seconds=spec.run_policy.collective_timeout_seconds)
    accelerator = Accelerator(
        mixed_precision=spec.training.mixed_precision,
        cpu=on_cpu,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)],
    )
    set_seed(spec.training.seed)
    return accelerator


def _batches(spec, accelerator, targets: tuple) -> data.Batches:
    counts = collections.Counter(targets).most_common()
    log.info("%d images at %s", len(targets), ", ".join(f"{w}x{h} ({n})" for (w, h), n in counts))
    batches = data.Batches(
        targets=targets,
        repeats=spec.dataset.repeats,
        batch_size=spec.training.batch_size,
        world_size=accelerator.num_processes,
        rank=accelerator.process_index,
        seed=spec.training.seed,
    )
    batches.check()
    return batches


def _usable_examples(accelerator, spec, folder: Path, cache: Path):
    """The dataset's readable examples and their sizes; each process checks a share,
    reusing what earlier starts on the node found (``cache``/scans/)."""
    examples = data.find_examples(folder)
    rank, world = accelerator.process_index, accelerator.num_processes
    scans = cache / "scans" / hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    mine = data.image_sizes(examples[rank::world], scans, f"rank{rank}")
    shares = gather_from_all(accelerator, mine)
    sizes = [shares[i % world][i // world] for i in range(len(examples))]
    usable = [(e, size) for e, size in zip(examples, sizes, strict=True) if size is not None]
    skipped = [e for e, size in zip(examples, sizes, strict=True) if size is None]
    data.check_usable([e for e, _ in usable], skipped, spec.dataset.max_skipped_fraction)
    return [e for e, _ in usable], [size for _, size in usable], len(skipped)


def check_model(spec, components) -> None:
    """Refuse what the loaded model's family cannot train: the method, a setting, or a
    training side."""
    family = components.family
    refusal = family.refused_methods.get(spec.method)
    if refusal:
        raise InvalidSpec(
            f"spec.method: {spec.method} does not train {family.name} models: {refusal}"
        )
    family.check(spec, components)
    check_sides(spec.dataset, components)
    if "singleFile" in (spec.output.formats or []):
        from difftrain.trainer import singlefile

        singlefile.check(family, components.denoiser)


def check_sides(dataset, components) -> None:
    """Refuse training sides the model cannot take: each must be a multiple of what its
    family's latents and patches divide by."""
    multiple = components.family.pixel_multiple(components)
    sides = [("resolution", dataset.resolution)]
    if dataset.bucketing.enabled:
        bucketing = dataset.bucketing
        sides += [
            ("bucketing.minResolution", bucketing.min_resolution),
            ("bucketing.maxResolution", bucketing.max_resolution),
            ("bucketing.step", bucketing.step),
        ]
    for name, side in sides:
        if side % multiple:
            low = side - side % multiple
            near = f"{low} or {low + multiple}" if low else str(multiple)
            raise InvalidSpec(
                f"spec.dataset.{name}: {side} is not a multiple of {multiple}, as this "
                f"{components.architecture} model's training sides must be; use {near}"
            )


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
