"""Finding, decoding and serving training images."""

import random

import pytest
import torch
from PIL import Image

from difftrain.errors import DatasetError
from difftrain.trainer import data


def _image(path, size=(40, 20), colour=(200, 10, 10), mode="RGB", **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, **save)
    return path


def test_images_and_captions_folders(tmp_path):
    _image(tmp_path / "images" / "b.png")
    _image(tmp_path / "images" / "sub" / "a.jpg")
    (tmp_path / "captions" / "sub").mkdir(parents=True)
    (tmp_path / "captions" / "b.txt").write_text("  a bee \n")
    (tmp_path / "captions" / "sub" / "a.txt").write_text("an ant")

    assert data.find_examples(tmp_path) == [
        data.Example(tmp_path / "images" / "b.png", "a bee"),
        data.Example(tmp_path / "images" / "sub" / "a.jpg", "an ant"),
    ]


def test_sidecar_captions_and_every_format(tmp_path):
    for name, fmt in (("a.JPG", "JPEG"), ("b.jpeg", "JPEG"), ("c.png", "PNG"), ("d.webp", "WEBP")):
        _image(tmp_path / name, format=fmt)
        (tmp_path / name).with_suffix(".txt").write_text(name)
    (tmp_path / "notes.md").write_text("not an image")

    examples = data.find_examples(tmp_path)

    assert [(e.image.name, e.caption) for e in examples] == [
        ("a.JPG", "a.JPG"), ("b.jpeg", "b.jpeg"), ("c.png", "c.png"), ("d.webp", "d.webp")
    ]  # fmt: skip


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    image.save(tmp_path / "rotated.jpg", exif=exif)

    assert data.load_rgb(tmp_path / "rotated.jpg").size == (20, 40)


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [
        ("RGBA", (255, 0, 0, 0), (255, 255, 255)),  # fully transparent: white
        ("RGBA", (255, 0, 0, 255), (255, 0, 0)),
        ("L", 128, (128, 128, 128)),
        ("LA", (0, 0), (255, 255, 255)),
    ],
)
def test_any_mode_becomes_rgb(tmp_path, mode, colour, expected):
    path = _image(tmp_path / "x.png", mode=mode, colour=colour)

    image = data.load_rgb(path)

    assert (image.mode, image.getpixel((0, 0))) == ("RGB", expected)


def test_unreadable_images_are_listed(tmp_path):
    good = _image(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    truncated = tmp_path / "cut.jpg"
    _image(truncated, size=(256, 256), format="JPEG")
    truncated.write_bytes(truncated.read_bytes()[:300])
    examples = [data.Example(p, "") for p in (good, tmp_path / "bad.png", truncated)]

    assert data.unreadable(examples) == [1, 2]


@pytest.mark.parametrize(
    ("usable", "skipped", "fraction", "message"),
    [
        (0, 0, 0.1, "the dataset has no images"),
        (0, 2, 0.1, "none of the dataset's 2 images can be read (e.g. s0.png, s1.png)"),
        (8, 2, 0.1, "2 of 10 images cannot be read, more than spec.dataset.maxSkippedFraction"),
    ],
)
def test_too_few_usable_images_is_a_dataset_error(usable, skipped, fraction, message):
    def examples(n, prefix):
        return [data.Example(data.Path(f"/d/{prefix}{i}.png"), "") for i in range(n)]

    with pytest.raises(DatasetError) as raised:
        data.check_usable(examples(usable, "u"), examples(skipped, "s"), fraction)

    assert str(raised.value).startswith(message)
    assert raised.value.exit_code == 3


def test_within_the_skip_budget_is_fine():
    examples = [data.Example(data.Path(f"/d/{i}.png"), "") for i in range(10)]

    data.check_usable(examples[:9], examples[9:], 0.1)


def test_transform_resizes_crops_and_scales(tmp_path):
    path = _image(tmp_path / "wide.png", size=(64, 32), colour=(255, 0, 0))
    example = data.Example(path, "red")
    transform = data.Transform(16, center_crop=True, random_flip=False, caption_dropout=0.0)

    sample = transform(example, random.Random(0))

    assert sample["pixels"].shape == (3, 16, 16)
    assert torch.allclose(sample["pixels"][:, 5, 5], torch.tensor([1.0, -1.0, -1.0]))
    assert sample["original_size"] == (32, 64)
    assert sample["crop_top_left"] == (0, 8)  # the centre of a 32x16 resize
    assert sample["caption"] == "red"


def test_random_crop_flip_and_dropout_follow_the_seed(tmp_path):
    image = Image.new("RGB", (48, 32))
    image.paste((255, 255, 255), (0, 0, 24, 32))  # left half white
    image.save(tmp_path / "half.png")
    example = data.Example(tmp_path / "half.png", "half")
    transform = data.Transform(16, center_crop=False, random_flip=True, caption_dropout=0.5)

    samples = [transform(example, random.Random(seed)) for seed in range(40)]

    again = transform(example, random.Random(7))
    assert torch.equal(again["pixels"], samples[7]["pixels"])
    assert {s["caption"] for s in samples} == {"", "half"}
    assert len({s["crop_top_left"] for s in samples}) > 1
    flipped = [s["pixels"][0, 8, 0] < s["pixels"][0, 8, -1] for s in samples]
    assert any(flipped) and not all(flipped)


def test_shards_are_disjoint_and_epochs_differ():
    def shard(rank, epoch):
        batches = data.ShardedBatches(10, repeats=2, batch_size=3, world_size=2, rank=rank, seed=1)
        return [key for batch in batches.epoch(epoch) for key in batch]

    first, second = shard(0, 0), shard(1, 0)

    assert len(first) == len(second) == 9  # 20 positions / 2 ranks = 10, 3 whole batches
    assert {index for index, _ in first + second} <= set(range(10))
    assert not {seed for _, seed in first} & {seed for _, seed in second}
    assert shard(0, 0) == first and shard(0, 1) != first


def test_resuming_mid_epoch_continues_the_same_order():
    batches = data.ShardedBatches(20, repeats=1, batch_size=2, world_size=1, rank=0, seed=3)

    whole = list(batches.epoch(4))

    assert list(batches.epoch(4, start=3)) == whole[3:]


def test_dataset_smaller_than_a_batch_per_process():
    batches = data.ShardedBatches(5, repeats=1, batch_size=2, world_size=4, rank=0, seed=0)

    with pytest.raises(DatasetError, match="fewer than one batch for each of 4 processes"):
        batches.check()
