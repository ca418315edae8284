"""Training data: find image/caption pairs, check the images, and serve sharded batches.

Two layouts are read: ``images/x.png`` with ``captions/x.txt``, or ``x.png`` with
``x.txt`` beside it. Unreadable images are skipped with a warning naming the file (and
counted); a missing caption is a warning and an empty caption. The order of samples is a
pure function of (seed, epoch, position), so a resumed run sees the same batches.
"""

import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps

from difftrain.errors import DatasetError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
EXAMPLES_IN_ERRORS = 5


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
        try:
            caption = caption_file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            log.warning(
                "no caption for %s (expected %s); training it with an empty caption",
                image.relative_to(folder),
                caption_file.relative_to(folder),
            )
            caption = ""
        examples.append(Example(image, caption))
    return examples


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


def unreadable(examples: list[Example]) -> list[int]:
    """Indices of the examples whose image cannot be decoded, each logged."""
    bad = []
    for index, example in enumerate(examples):
        try:
            load_rgb(example.image)
        except Exception as error:  # PIL raises many types for broken files
            log.warning("skipping unreadable image %s: %s", example.image, error)
            bad.append(index)
    return bad


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


@dataclass(frozen=True)
class Transform:
    """Resize the short side to ``resolution``, crop a square, maybe flip."""

    resolution: int
    center_crop: bool
    random_flip: bool
    caption_dropout: float

    def __call__(self, example: Example, rng: random.Random) -> dict:
        image = load_rgb(example.image)
        original = (image.height, image.width)
        scale = self.resolution / min(image.size)
        size = (
            max(self.resolution, round(image.width * scale)),
            max(self.resolution, round(image.height * scale)),
        )
        image = image.resize(size, Image.Resampling.BICUBIC)
        spare_x, spare_y = size[0] - self.resolution, size[1] - self.resolution
        if self.center_crop:
            left, top = spare_x // 2, spare_y // 2
        else:
            left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        if self.random_flip and rng.random() < 0.5:
            image = ImageOps.mirror(image)
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        pixels = pixels.view(self.resolution, self.resolution, 3).permute(2, 0, 1)
        dropped = self.caption_dropout and rng.random() < self.caption_dropout
        return {
            "pixels": pixels.float() / 127.5 - 1.0,
            "caption": "" if dropped else example.caption,
            "original_size": original,
            "crop_top_left": (top, left),
        }


class TrainingSet(torch.utils.data.Dataset):
    """Examples served by ``(index, sample_seed)`` keys from :class:`ShardedBatches`."""

    def __init__(self, examples: list[Example], transform: Transform):
        self.examples, self.transform = examples, transform

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        return self.transform(self.examples[index], random.Random(seed))


def collate(samples: list[dict]) -> dict:
    return {
        "pixels": torch.stack([s["pixels"] for s in samples]),
        "captions": [s["caption"] for s in samples],
        "original_sizes": torch.tensor([s["original_size"] for s in samples]),
        "crops_top_left": torch.tensor([s["crop_top_left"] for s in samples]),
    }


@dataclass(frozen=True)
class ShardedBatches:
    """Which samples each process trains on, epoch by epoch.

    Every epoch is a seeded permutation of ``size * repeats`` positions; process ``rank``
    takes every ``world_size``-th one and groups them into batches (an incomplete last
    batch is dropped so that every process takes the same number of steps).
    """

    size: int
    repeats: int
    batch_size: int
    world_size: int
    rank: int
    seed: int

    @property
    def batches_per_epoch(self) -> int:
        return (self.size * self.repeats // self.world_size) // self.batch_size

    def check(self) -> None:
        if self.batches_per_epoch == 0:
            raise DatasetError(
                f"the dataset has {self.size} usable images (x{self.repeats} repeats), fewer "
                f"than one batch for each of {self.world_size} processes "
                f"(spec.training.batchSize {self.batch_size}); add images, raise "
                "spec.dataset.repeats or lower the batch size"
            )

    def epoch(self, epoch: int, start: int = 0) -> Iterator[list[tuple[int, int]]]:
        """Batches of ``(example index, sample seed)`` from batch ``start`` of ``epoch``."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.size * self.repeats, generator=generator)
        mine = order[self.rank :: self.world_size].tolist()
        for batch in range(start, self.batches_per_epoch):
            positions = mine[batch * self.batch_size : (batch + 1) * self.batch_size]
            yield [(p % self.size, hash((self.seed, epoch, p))) for p in positions]


def epochs_for(steps: int, batches_per_epoch: int, accumulation: int) -> int:
    """How many epochs ``steps`` optimiser steps span."""
    return math.ceil(steps * accumulation / batches_per_epoch)
