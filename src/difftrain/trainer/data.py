"""Training data: find image/caption pairs, check the images, and serve sharded batches.

Two layouts are read: ``images/x.png`` with ``captions/x.txt``, or ``x.png`` with
``x.txt`` beside it. Unreadable images are skipped with a warning naming the file (and
counted); a missing caption is a warning and an empty caption, one that is not UTF-8 a
:class:`DatasetError`. Images train square, or with aspect-ratio bucketing at the bucket
nearest their shape. The order of samples is a pure function of (seed, epoch,
position), so a resumed run sees the same batches.
"""

import collections
import contextlib
import json
import logging
import math
import os
import random
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps

from difftrain.errors import DatasetError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
EXAMPLES_IN_ERRORS = 5
Size = tuple[int, int]  # (width, height) in pixels
Key = tuple[int, int, int, int]  # (example index, sample seed, width, height)


@dataclass(frozen=True)
class Example:
    """One training image and its caption."""

    image: Path
    caption: str


def find_examples(folder: Path) -> list[Example]:
    """The image/caption pairs under ``folder``, sorted by image path."""
    paired = (folder / "images").is_dir()
    image_root = folder / "images" if paired else folder
    examples = []
    for image in sorted(p for p in image_root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        relative = image.relative_to(image_root).with_suffix(".txt")
        caption_file = folder / "captions" / relative if paired else image.with_suffix(".txt")
        caption = read_caption(caption_file, folder)
        if caption is None:
            log.warning(
                "no caption for %s (expected %s); training it with an empty caption",
                image.relative_to(folder),
                caption_file.relative_to(folder),
            )
        examples.append(Example(image, caption or ""))
    return examples


def read_caption(path: Path, folder: Path) -> str | None:
    """The caption in the file ``path`` of the dataset ``folder``, or None if there is no
    such file. A leading byte order mark (which some Windows editors write) is dropped;
    other text than UTF-8 is a :class:`DatasetError`, not a guess at its encoding."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return raw.decode("utf-8").removeprefix("\ufeff").strip()
    except UnicodeDecodeError as error:
        raise DatasetError(
            f"caption file {path.relative_to(folder)} is not UTF-8: byte "
            f"0x{raw[error.start]:02x} at position {error.start} cannot be decoded; save it "
            "as UTF-8"
        ) from None


def load_rgb(path: Path) -> Image.Image:
    """Decode an image upright (EXIF orientation) in RGB; transparency becomes white."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        image.load()
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def image_sizes(
    examples: list[Example], scans: Path | None = None, name: str = "scan"
) -> list[tuple[int, int] | None]:
    """Each example's upright (width, height), or None (logged) if it cannot be decoded.

    With ``scans`` (a node-local folder), what earlier scans found is reused: each file's
    result is kept in ``scans/NAME.json`` under its path with its size and modification
    time, and a file is decoded again only when those changed; every ``*.json`` there is
    read (each process writes its own share under its own ``name``). An unreadable scan
    file is ignored and written anew."""

    def size(path: Path) -> tuple[int, int] | None:
        try:
            return load_rgb(path).size
        except Exception as error:  # PIL raises many types for broken files
            log.warning("skipping unreadable image %s: %s", path, error)
            return None

    def known(path: Path, found) -> None:
        if found is None:
            log.warning("skipping unreadable image %s (as when first scanned)", path)

    found = file_facts([e.image for e in examples], scans, name, size, known)
    return [None if value is None else tuple(value) for value in found]


def file_facts(paths: list[Path], records: Path | None, name: str, fact, known=None) -> list:
    """``fact(path)`` of each path, kept in ``records/NAME.json`` (when given) beside the
    file's size and modification time, and computed again only when those changed (or
    the file cannot be looked at); ``known(path, value)`` is told of each value reused."""
    earlier = _read_scans(records) if records is not None else {}
    values, seen = [], {}
    for path in paths:
        try:
            stat = path.stat()
            tag = f"{stat.st_size}-{stat.st_mtime_ns}"
        except OSError:  # a dangling link, a file gone since the listing
            tag = None  # never matches: looked at again next time
        entry = earlier.get(str(path))
        if tag is not None and entry is not None and entry[0] == tag:
            value = entry[1]
            if known is not None:
                known(path, value)
        else:
            value = fact(path)
        seen[str(path)] = [tag, value]
        values.append(value)
    if records is not None:
        _write_scan(records / f"{name}.json", seen)
    return values


def _read_scans(folder: Path) -> dict:
    known = {}
    for path in sorted(folder.glob("*.json")):
        try:
            entries = json.loads(path.read_text())
            known.update({k: v for k, v in entries.items() if isinstance(v, list) and len(v) == 2})
        except (OSError, ValueError, AttributeError):
            log.warning("ignoring the unreadable dataset scan %s; scanning anew", path)
    return known


def _write_scan(path: Path, entries: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of this process and thread's own: two jobs on a node may write it at once.
    temporary = path.with_name(f".tmp-{path.name}-{os.getpid()}-{threading.get_ident()}")
    temporary.write_text(json.dumps(entries))
    temporary.replace(path)  # readers see the old scan or the new one, whole


def check_usable(examples: list[Example], skipped: list[Example], max_fraction: float) -> None:
    """Fail with a :class:`DatasetError` when too few images are usable."""
    total = len(examples) + len(skipped)
    if total == 0:
        raise DatasetError(
            "the dataset has no images (looked for .jpg, .jpeg, .png and .webp files, in "
            "images/ or beside their .txt captions)"
        )
    names = ", ".join(e.image.name for e in skipped[:EXAMPLES_IN_ERRORS])
    if not examples:
        raise DatasetError(f"none of the dataset's {total} images can be read (e.g. {names})")
    if len(skipped) > max_fraction * total:
        raise DatasetError(
            f"{len(skipped)} of {total} images cannot be read, more than "
            f"spec.dataset.maxSkippedFraction ({max_fraction}); e.g. {names}"
        )


def bucket_sizes(resolution: int, smallest: int, largest: int, step: int) -> list[Size]:
    """Aspect-ratio buckets: (width, height) pairs in multiples of ``step``, each side in
    [smallest, largest], each about ``resolution``**2 pixels (never more)."""
    area = resolution * resolution
    sizes = set()
    for width in range(smallest, largest + 1, step):
        height = min(largest, area // width // step * step)
        if height >= smallest:
            sizes |= {(width, height), (height, width)}
    return sorted(sizes)


def nearest_bucket(size: Size, buckets: list[Size]) -> Size:
    """The bucket closest to ``size`` in aspect ratio (the larger one on a tie)."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def cover_crop(
    source: Size, target: Size, rng: random.Random | None
) -> tuple[tuple[float, float, float, float], tuple[int, int]]:
    """Where to crop an image of size ``source`` for ``target``: the image scaled to cover
    the target, cropped at its centre (``rng`` None) or at a random place. Returns the
    crop in source pixels, (left, top, right, bottom), and its (top, left) in the scaled
    image, as SDXL's crop conditioning counts it.

    Resizing just the crop bounds memory by the target size: scaling a 4 x 4000 image to
    cover 1024 x 1024 first would make 1024 x 1024000 pixels (3 GB) to keep 0.1% of them.
    """
    width, height = target
    scale = max(width / source[0], height / source[1])
    covered = (max(width, round(source[0] * scale)), max(height, round(source[1] * scale)))
    spare_x, spare_y = covered[0] - width, covered[1] - height
    if rng is None:
        left, top = spare_x // 2, spare_y // 2
    else:
        left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
    # Multiply before dividing: the box's far edges then never pass the image's.
    box = (
        left * source[0] / covered[0],
        top * source[1] / covered[1],
        (left + width) * source[0] / covered[0],
        (top + height) * source[1] / covered[1],
    )
    return box, (top, left)


def fixed_crop(source: Size, target: Size) -> bool:
    """Whether every crop of an image of size ``source`` for ``target`` is the same (the
    scaled image has nothing to spare), random or not."""
    width, height = target
    scale = max(width / source[0], height / source[1])
    return max(width, round(source[0] * scale)) == width and (
        max(height, round(source[1] * scale)) == height
    )


@dataclass(frozen=True)
class Plan:
    """How one sample is made of its image: the crop (in source pixels), the flip and
    the numbers SDXL's conditioning counts."""

    size: Size  # (width, height) trained at
    box: tuple[float, float, float, float]
    crop_top_left: tuple[int, int]
    flip: bool
    original: tuple[int, int]  # (height, width) of the upright image


@dataclass(frozen=True)
class Transform:
    """Scale an image to cover the target size, crop to it, maybe flip; maybe drop the caption."""

    center_crop: bool
    random_flip: bool
    caption_dropout: float
    # Textual Inversion: captions are these templates with ``subject`` filled in.
    templates: tuple[str, ...] = ()
    subject: str = ""

    def plan(self, source: Size, rng: random.Random, size: Size) -> tuple[Plan, str | None]:
        """The plan of a sample of an image of (upright) size ``source``, and its
        caption when the transform chooses it (a template, or the empty one); the random
        draws always come in the same order, whether the image is decoded or not."""
        box, crop_top_left = cover_crop(source, size, None if self.center_crop else rng)
        flip = bool(self.random_flip and rng.random() < 0.5)
        caption = rng.choice(self.templates).format(self.subject) if self.templates else None
        if self.caption_dropout and rng.random() < self.caption_dropout:
            caption = ""
        return Plan(size, box, crop_top_left, flip, (source[1], source[0])), caption

    def render(self, image: Image.Image | Path, plan: Plan) -> torch.Tensor:
        """The sample's pixels ``(3, H, W)`` in [-1, 1]."""
        if isinstance(image, Path):
            image = load_rgb(image)
        width, height = plan.size
        # Bicubic sampling reads the pixels around the box too, as when resizing it all.
        image = image.resize(plan.size, Image.Resampling.BICUBIC, box=plan.box)
        if plan.flip:
            image = ImageOps.mirror(image)
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        return pixels.view(height, width, 3).permute(2, 0, 1).float() / 127.5 - 1.0

    def __call__(self, example: Example, rng: random.Random, size: Size) -> dict:
        image = load_rgb(example.image)
        plan, caption = self.plan(image.size, rng, size)
        return sample(
            plan, example.caption if caption is None else caption, self.render(image, plan)
        )


def sample(plan: Plan, caption: str, pixels: torch.Tensor | None, **cached) -> dict:
    """One sample as the collate function takes it: pixels, or ``cached`` latent moments
    (``latents``) and text conditioning (``text``)."""
    return {
        "pixels": pixels,
        "caption": caption,
        "original_size": plan.original,
        "crop_top_left": plan.crop_top_left,
        "target_size": (plan.size[1], plan.size[0]),
        **cached,
    }


class TrainingSet(torch.utils.data.Dataset):
    """Examples served by ``(index, sample seed, width, height)`` keys from :class:`Batches`.

    With ``features`` (features.Features, set while a stage trains on the cache), a
    sample whose latents or text conditioning the cache holds is served from it, its
    image not decoded; ``sizes`` (the images' upright sizes, None where unknown) plan
    such a sample without opening its image."""

    def __init__(
        self, examples: list[Example], transform: Transform, sizes: list[Size | None] | None = None
    ):
        self.examples, self.transform = examples, transform
        self.sizes = list(sizes or []) + [None] * (len(examples) - len(sizes or []))
        self.features = None

    def __len__(self) -> int:
        return len(self.examples)

    def source_size(self, index: int) -> Size:
        """The upright size of example ``index``'s image (decoded once if not known)."""
        if self.sizes[index] is None:
            self.sizes[index] = load_rgb(self.examples[index].image).size
        return self.sizes[index]

    def __getitem__(self, key: Key) -> dict:
        index, seed, width, height = key
        example, features = self.examples[index], self.features
        if features is None:
            return self.transform(example, random.Random(seed), (width, height))
        plan, chosen = self.transform.plan(
            self.source_size(index), random.Random(seed), (width, height)
        )
        caption = example.caption if chosen is None else chosen
        latents = features.latents_of(index, plan)
        text = features.text_of(caption)
        pixels = None if latents is not None else self.transform.render(example.image, plan)
        return sample(plan, caption, pixels, latents=latents, text=text)


def collate(samples: list[dict]) -> dict:
    """A batch: the samples' pixels ``(B, 3, H, W)``, or where the cache served them,
    their latent moments (``latents``, with the rows they are, ``latent_rows``) beside
    the pixels of the others (``pixel_rows``); the cached text conditioning when the
    cache served every caption (``text``), else None."""
    decoded = [i for i, s in enumerate(samples) if s["pixels"] is not None]
    cached = [i for i, s in enumerate(samples) if s.get("latents") is not None]
    batch = {
        "pixels": torch.stack([samples[i]["pixels"] for i in decoded]) if decoded else None,
        "pixel_rows": decoded,
        "latents": _stacked([samples[i]["latents"] for i in cached]) if cached else None,
        "latent_rows": cached,
        "text": None,
        "captions": [s["caption"] for s in samples],
        "original_sizes": torch.tensor([s["original_size"] for s in samples]),
        "crops_top_left": torch.tensor([s["crop_top_left"] for s in samples]),
        "target_sizes": torch.tensor([s["target_size"] for s in samples]),
    }
    if all(s.get("text") is not None for s in samples):
        batch["text"] = _stacked([s["text"] for s in samples])
    return batch


def _stacked(fields: list[dict]) -> dict:
    return {name: torch.stack([f[name] for f in fields]) for name in fields[0]}


def prefetched(dataset: TrainingSet, batches: Iterable[list[Key]], workers: int) -> Iterator[dict]:
    """The collated batches of ``batches``, in order, each made ahead of its use by one
    of ``workers`` threads (image decoding and resizing release the GIL), so the device
    does not wait for the next batch. A sample depends on its key alone, so batches are
    the same as when made one at a time. Close the iterator to stop early."""

    def make(keys: list[Key]) -> dict:
        return collate([dataset[key] for key in keys])

    source = iter(batches)
    with ThreadPoolExecutor(workers, thread_name_prefix="difftrain-data") as pool:
        pending = collections.deque(pool.submit(make, keys) for keys in _take(source, workers))
        try:
            while pending:
                batch = pending.popleft().result()
                pending.extend(pool.submit(make, keys) for keys in _take(source, 1))
                yield batch
        finally:
            for future in pending:
                future.cancel()


def batches_from(dataset: TrainingSet, batches, position, workers: int) -> Iterator[dict]:
    """The collated batches from ``position`` (checkpoint.Position) on, epoch after
    epoch, made ahead by ``workers`` threads; ``position`` counts each batch as it is
    handed out."""
    while True:
        keys = batches.epoch(position.epoch, position.batch)
        with contextlib.closing(prefetched(dataset, keys, workers)) as made:
            for batch in made:
                position.batch += 1
                yield batch
        position.epoch += 1
        position.batch = 0


def _take(source: Iterator, count: int) -> list:
    return [item for _, item in zip(range(count), source, strict=False)]


@dataclass(frozen=True)
class Batches:
    """Which samples each process trains on, epoch by epoch.

    ``targets[i]`` is the (width, height) example ``i`` trains at: one size for all, or
    its aspect-ratio bucket. Every epoch is a seeded permutation of ``len(targets) *
    repeats`` positions, grouped by target size into batches (incomplete ones dropped),
    shuffled, and dealt to the processes in turn; every process gets the same number.
    """

    targets: tuple[Size, ...]
    repeats: int
    batch_size: int
    world_size: int
    rank: int
    seed: int

    @property
    def batches_per_epoch(self) -> int:
        counts = collections.Counter(self.targets)
        whole = sum(count * self.repeats // self.batch_size for count in counts.values())
        return whole // self.world_size

    def check(self) -> None:
        if self.batches_per_epoch == 0:
            raise DatasetError(
                f"the dataset has {len(self.targets)} usable images (x{self.repeats} repeats), "
                f"fewer than one batch for each of {self.world_size} processes "
                f"(spec.training.batchSize {self.batch_size}); add images, raise "
                "spec.dataset.repeats or lower the batch size"
            )

    def variants(self) -> set[tuple[int, Size]]:
        """Every (example index, size) a batch may hold."""
        return set(enumerate(self.targets))

    def epoch(self, epoch: int, start: int = 0) -> Iterator[list[Key]]:
        """Batches of keys from batch ``start`` of ``epoch``."""
        size = len(self.targets)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        by_target = collections.defaultdict(list)
        for position in torch.randperm(size * self.repeats, generator=generator).tolist():
            by_target[self.targets[position % size]].append(position)
        batches = [
            positions[i : i + self.batch_size]
            for _, positions in sorted(by_target.items())
            for i in range(0, len(positions) - self.batch_size + 1, self.batch_size)
        ]
        order = torch.randperm(len(batches), generator=generator).tolist()
        dealt = [batches[i] for i in order][self.rank :: self.world_size]
        for batch in dealt[start : self.batches_per_epoch]:
            yield [(p % size, hash((self.seed, epoch, p)), *self.targets[p % size]) for p in batch]


def fetch_dataset(uri: str, settings, cache: Path, unsafe_error=DatasetError) -> Path:
    """A local folder holding the dataset (or other folder of inputs) at ``uri``,
    fetched once per node into ``cache`` and again when any of its objects changes (the
    entry is keyed by their tags: ETags in S3); a key that would land outside the
    folder is refused with ``unsafe_error``."""
    from difftrain.storage import open_store
    from difftrain.trainer.cache import cached_folder

    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    if uri.startswith("builtin:"):
        from difftrain.shapes import BUILTIN, VERSION

        return cached_folder(cache, f"{uri}#{VERSION}", BUILTIN[uri.removeprefix("builtin:")])
    store = open_store(uri, settings)
    return cached_folder(
        cache,
        f"{uri}#{store.fingerprint()}",
        lambda folder: store.download_tree("", folder, unsafe_error=unsafe_error),
    )
