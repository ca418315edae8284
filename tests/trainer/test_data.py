"""Finding, decoding and serving training images."""

import random
import struct
import subprocess
import sys
import zlib

import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

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
        ("a.JPG", "a.JPG"),
        ("b.jpeg", "b.jpeg"),
        ("c.png", "c.png"),
        ("d.webp", "d.webp"),
    ]


@pytest.mark.parametrize(
    ("content", "caption"),
    [
        pytest.param(b"a bee", "a bee", id="utf-8"),
        pytest.param("\ufeffa bee\n".encode(), "a bee", id="utf-8-with-bom"),
        pytest.param(
            "\ufeff  une abeille dorée ".encode(), "une abeille dorée", id="bom-and-spaces"
        ),
    ],
)
def test_utf8_captions_are_read_with_or_without_a_bom(tmp_path, content, caption):
    _image(tmp_path / "images" / "b.png")
    (tmp_path / "captions").mkdir()
    (tmp_path / "captions" / "b.txt").write_bytes(content)

    assert data.find_examples(tmp_path) == [data.Example(tmp_path / "images" / "b.png", caption)]


@pytest.mark.parametrize(
    ("caption_file", "content", "message"),
    [
        pytest.param(
            "captions/sub/b.txt",
            "a café".encode("latin-1"),
            "caption file captions/sub/b.txt is not UTF-8: byte 0xe9 at position 5 cannot be "
            "decoded; save it as UTF-8",
            id="latin-1",
        ),
        pytest.param(
            "captions/sub/b.txt",
            "\u201cquoted\u201d".encode("cp1252"),
            "caption file captions/sub/b.txt is not UTF-8: byte 0x93 at position 0 cannot be "
            "decoded; save it as UTF-8",
            id="windows-1252",
        ),
        pytest.param(
            "sub/b.txt",
            "a bee".encode("utf-16"),
            "caption file sub/b.txt is not UTF-8: byte 0xff at position 0 cannot be decoded; "
            "save it as UTF-8",
            id="utf-16-beside-the-image",
        ),
    ],
)
def test_a_caption_that_is_not_utf8_is_a_dataset_error(tmp_path, caption_file, content, message):
    image = "images/sub/b.png" if caption_file.startswith("captions/") else "sub/b.png"
    _image(tmp_path / image)
    (tmp_path / caption_file).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / caption_file).write_bytes(content)

    with pytest.raises(DatasetError) as raised:
        data.find_examples(tmp_path)

    assert (str(raised.value), raised.value.exit_code) == (message, 3)


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


def test_sizes_are_upright_and_unreadable_images_have_none(tmp_path):
    good = _image(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    truncated = tmp_path / "cut.jpg"
    _image(truncated, size=(256, 256), format="JPEG")
    truncated.write_bytes(truncated.read_bytes()[:300])
    examples = [data.Example(p, "") for p in (good, tmp_path / "bad.png", truncated)]

    assert data.image_sizes(examples) == [(40, 20), None, None]


def _png_header(path, width, height):
    """A small PNG file that declares ``width`` x ``height`` pixels (its data is cut short)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    pixels = chunk(b"IDAT", zlib.compress(bytes(1 + 3 * width)))  # one row
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + pixels + chunk(b"IEND", b""))
    return path


def test_an_image_too_large_to_decode_is_skipped_and_named(tmp_path, caplog):
    huge = _png_header(tmp_path / "huge.png", 30000, 30000)

    assert data.image_sizes([data.Example(huge, "")]) == [None]
    assert f"skipping unreadable image {huge}: Image size (900000000 pixels) exceeds limit" in (
        caplog.text
    )


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
    transform = data.Transform(center_crop=True, random_flip=False, caption_dropout=0.0)

    sample = transform(example, random.Random(0), (16, 16))

    assert sample["pixels"].shape == (3, 16, 16)
    assert torch.allclose(sample["pixels"][:, 5, 5], torch.tensor([1.0, -1.0, -1.0]))
    assert sample["original_size"] == (32, 64)
    assert sample["crop_top_left"] == (0, 8)  # the centre of a 32x16 resize
    assert sample["caption"] == "red"
    assert sample["target_size"] == (16, 16)


def test_transform_fills_a_bucket_of_another_shape(tmp_path):
    path = _image(tmp_path / "tall.png", size=(30, 90))
    transform = data.Transform(center_crop=True, random_flip=False, caption_dropout=0.0)

    sample = transform(data.Example(path, ""), random.Random(0), (16, 40))

    assert sample["pixels"].shape == (3, 40, 16)
    assert (sample["target_size"], sample["crop_top_left"]) == ((40, 16), (4, 0))


def test_random_crop_flip_and_dropout_follow_the_seed(tmp_path):
    image = Image.new("RGB", (48, 32))
    image.paste((255, 255, 255), (0, 0, 24, 32))  # left half white
    image.save(tmp_path / "half.png")
    example = data.Example(tmp_path / "half.png", "half")
    transform = data.Transform(center_crop=False, random_flip=True, caption_dropout=0.5)

    samples = [transform(example, random.Random(seed), (16, 16)) for seed in range(40)]

    again = transform(example, random.Random(7), (16, 16))
    assert torch.equal(again["pixels"], samples[7]["pixels"])
    assert {s["caption"] for s in samples} == {"", "half"}
    assert len({s["crop_top_left"] for s in samples}) > 1
    flipped = [s["pixels"][0, 8, 0] < s["pixels"][0, 8, -1] for s in samples]
    assert any(flipped) and not all(flipped)


def _resized_then_cropped(example, rng, size):
    """What the transform made before it cropped first: the whole image scaled to cover
    ``size``, then cropped; (pixels as 0-255 integers, crop_top_left)."""
    width, height = size
    image = data.load_rgb(example.image)
    scale = max(width / image.width, height / image.height)
    resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(resized, Image.Resampling.BICUBIC)
    spare_x, spare_y = resized[0] - width, resized[1] - height
    if rng is None:
        left, top = spare_x // 2, spare_y // 2
    else:
        left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
    image = image.crop((left, top, left + width, top + height))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(height, width, 3).permute(2, 0, 1).int(), (top, left)


def _photo_like(path, size):
    """A smooth gradient with soft-edged shapes: what resampling meets in photos."""
    width, height = size
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    draw = ImageDraw.Draw(image)
    for index, colour in enumerate([(200, 30, 30), (20, 160, 60), (250, 250, 250)]):
        left, top = width * index // 4, height * (2 - index) // 4
        draw.ellipse((left, top, left + width // 2, top + height // 3), fill=colour)
    image.filter(ImageFilter.GaussianBlur(0.7)).save(path)
    return path


@pytest.mark.parametrize(
    ("source", "target", "center_crop", "seed"),
    [
        pytest.param((64, 32), (16, 16), True, 0, id="wide-centre"),
        pytest.param((30, 90), (16, 40), True, 0, id="tall-to-bucket-centre"),
        pytest.param((37, 53), (20, 20), True, 0, id="odd-sizes-centre"),
        pytest.param((48, 32), (16, 16), False, 3, id="wide-random"),
        pytest.param((37, 53), (20, 20), False, 11, id="odd-sizes-random"),
        pytest.param((301, 199), (64, 48), False, 5, id="downscale-random"),
        pytest.param((10, 7), (32, 32), True, 0, id="upscale-centre"),
        pytest.param((10, 7), (32, 32), False, 2, id="upscale-random"),
        pytest.param((16, 16), (16, 16), False, 1, id="same-size"),
        pytest.param((640, 427), (128, 128), True, 0, id="photo-centre"),
        pytest.param((427, 640), (96, 128), False, 4, id="photo-random-bucket"),
    ],
)
def test_cropping_first_matches_resizing_the_whole_image(
    tmp_path, source, target, center_crop, seed
):
    example = data.Example(_photo_like(tmp_path / "photo.png", source), "")
    transform = data.Transform(center_crop=center_crop, random_flip=False, caption_dropout=0.0)

    sample = transform(example, random.Random(seed), target)

    expected, crop = _resized_then_cropped(
        example, None if center_crop else random.Random(seed), target
    )
    pixels = torch.round((sample["pixels"] + 1.0) * 127.5).int()
    assert sample["crop_top_left"] == crop
    # The same resampling; Pillow may run its two passes in the other order for the
    # smaller image, which rounds (and clips bicubic's overshoot) differently in between.
    assert (pixels - expected).abs().max() <= 2


_PEAK_MEMORY = """
import random, resource, sys
from pathlib import Path
from difftrain.trainer import data

small, thin, center_crop = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "centre"
transform = data.Transform(center_crop=center_crop, random_flip=False, caption_dropout=0.0)
transform(data.Example(small, ""), random.Random(0), (512, 512))  # libraries warmed up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sample = transform(data.Example(thin, ""), random.Random(0), (512, 512))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) // 1024, *sample["pixels"].shape)
"""


@pytest.mark.parametrize("crop", ["centre", "random"])
def test_an_extreme_aspect_ratio_needs_memory_for_the_target_size_only(tmp_path, crop):
    """A 4 x 4000 image scaled to cover 512 x 512 whole would be 512 x 512000 pixels
    (about 1 GiB of peak memory growth); cropped first, it needs a few MiB."""
    thin = _image(tmp_path / "thin.png", size=(4, 4000))
    small = _image(tmp_path / "small.png", size=(40, 40))

    result = subprocess.run(
        [sys.executable, "-c", _PEAK_MEMORY, str(small), str(thin), crop],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )

    growth_mib, *shape = (int(word) for word in result.stdout.split())
    assert shape == [3, 512, 512]
    assert growth_mib < 100, f"peak memory grew by {growth_mib} MiB"


def test_prefetched_batches_equal_batches_made_one_at_a_time(tmp_path):
    examples = [
        data.Example(_image(tmp_path / f"{i}.png", colour=(i * 20, 0, 0)), str(i)) for i in range(8)
    ]
    transform = data.Transform(center_crop=False, random_flip=True, caption_dropout=0.3)
    dataset = data.TrainingSet(examples, transform)
    batches = data.Batches(_square(8), repeats=3, batch_size=2, world_size=1, rank=0, seed=5)
    keys = list(batches.epoch(0))

    made = list(data.prefetched(dataset, keys, workers=3))

    assert len(made) == len(keys) == 12
    for batch, key_batch in zip(made, keys, strict=True):
        serial = data.collate([dataset[key] for key in key_batch])
        assert torch.equal(batch["pixels"], serial["pixels"])
        assert batch["captions"] == serial["captions"]


def test_closing_prefetched_batches_stops_making_them(tmp_path):
    examples = [data.Example(_image(tmp_path / "0.png"), "")]
    made = []

    class Counting(data.TrainingSet):
        def __getitem__(self, key):
            made.append(key)
            return super().__getitem__(key)

    dataset = Counting(examples, data.Transform(True, False, 0.0))
    keys = ([(0, seed, 8, 8)] for seed in range(1000))
    batches = data.prefetched(dataset, keys, workers=2)

    assert next(batches)["pixels"].shape == (1, 3, 8, 8)
    batches.close()
    assert len(made) <= 4  # the one used and at most the workers' few ahead


def _square(count, side=8):
    return ((side, side),) * count


def test_shards_are_disjoint_and_epochs_differ():
    def shard(rank, epoch):
        batches = data.Batches(
            _square(10), repeats=2, batch_size=3, world_size=2, rank=rank, seed=1
        )
        return [key for batch in batches.epoch(epoch) for key in batch]

    first, second = shard(0, 0), shard(1, 0)

    assert len(first) == len(second) == 9  # 6 whole batches of the 20 positions, 3 each
    assert {key[0] for key in first + second} <= set(range(10))
    assert not {key[1] for key in first} & {key[1] for key in second}
    assert {key[2:] for key in first} == {(8, 8)}
    assert shard(0, 0) == first and shard(0, 1) != first


def test_resuming_mid_epoch_continues_the_same_order():
    batches = data.Batches(_square(20), repeats=1, batch_size=2, world_size=1, rank=0, seed=3)

    whole = list(batches.epoch(4))

    assert list(batches.epoch(4, start=3)) == whole[3:]


def test_dataset_smaller_than_a_batch_per_process():
    batches = data.Batches(_square(5), repeats=1, batch_size=2, world_size=4, rank=0, seed=0)

    with pytest.raises(DatasetError, match="fewer than one batch for each of 4 processes"):
        batches.check()


def test_bucket_sizes_keep_the_area_and_bounds():
    buckets = data.bucket_sizes(512, 256, 1024, 64)

    assert (512, 512) in buckets and (256, 1024) in buckets and (1024, 256) in buckets
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert all(256 <= side <= 1024 for bucket in buckets for side in bucket)


@pytest.mark.parametrize(
    ("size", "bucket"),
    [((1000, 1000), (512, 512)), ((1920, 1080), (640, 384)), ((600, 2400), (256, 1024))],
)
def test_images_go_to_the_nearest_aspect_ratio(size, bucket):
    assert data.nearest_bucket(size, data.bucket_sizes(512, 256, 1024, 64)) == bucket


def test_a_batch_never_mixes_buckets():
    targets = ((8, 8),) * 7 + ((16, 4),) * 5
    batches = data.Batches(targets, repeats=3, batch_size=2, world_size=2, rank=0, seed=0)
    other = data.Batches(targets, repeats=3, batch_size=2, world_size=2, rank=1, seed=0)

    mine, theirs = list(batches.epoch(0)), list(other.epoch(0))

    assert len(mine) == len(theirs) == batches.batches_per_epoch == 8  # (10 + 7) // 2
    assert all(len({key[2:] for key in batch}) == 1 for batch in mine + theirs)
    assert {key[2:] for batch in mine + theirs for key in batch} == {(8, 8), (16, 4)}


# The scan of a dataset's images, kept on the node.


def _images(folder, sizes) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    examples = []
    for k, size in enumerate(sizes):
        path = folder / f"{k}.png"
        if size is None:
            path.write_bytes(b"not an image")
        else:
            Image.new("RGB", size, (200, 0, 0)).save(path)
        examples.append(data.Example(path, ""))
    return examples


@pytest.fixture
def decodes(monkeypatch):
    """The paths data.load_rgb decodes, in order."""
    seen, load = [], data.load_rgb

    def counting(path):
        seen.append(path)
        return load(path)

    monkeypatch.setattr(data, "load_rgb", counting)
    return seen


def test_a_second_scan_decodes_no_image_and_finds_the_same(tmp_path, decodes):
    examples = _images(tmp_path / "images", [(32, 16), None, (8, 8)])
    scans = tmp_path / "scans"

    first = data.image_sizes(examples, scans, "rank0")
    decoded = len(decodes)
    second = data.image_sizes(examples, scans, "rank0")

    assert first == second == [(32, 16), None, (8, 8)]
    assert decoded == 3 and len(decodes) == 3  # none the second time


def test_a_replaced_image_is_decoded_again(tmp_path, decodes):
    examples = _images(tmp_path / "images", [(32, 16), (8, 8)])
    scans = tmp_path / "scans"
    data.image_sizes(examples, scans, "rank0")
    Image.new("RGB", (20, 10)).save(examples[1].image)

    sizes = data.image_sizes(examples, scans, "rank0")

    assert sizes == [(32, 16), (20, 10)]
    assert decodes[2:] == [examples[1].image]


def test_every_process_share_is_reused_by_any_process(tmp_path, decodes):
    examples = _images(tmp_path / "images", [(8, 8), (16, 8), (8, 16), (4, 4)])
    scans = tmp_path / "scans"
    data.image_sizes(examples[0::2], scans, "rank0")  # two processes, a share each
    data.image_sizes(examples[1::2], scans, "rank1")
    decoded = len(decodes)

    sizes = data.image_sizes(examples, scans, "rank0")  # one process, all of them

    assert sizes == [(8, 8), (16, 8), (8, 16), (4, 4)]
    assert decoded == 4 and len(decodes) == 4


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"x": 3}'])
def test_an_unreadable_scan_file_is_ignored_and_written_anew(tmp_path, decodes, content):
    examples = _images(tmp_path / "images", [(8, 8)])
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "rank0.json").write_text(content)

    assert data.image_sizes(examples, scans, "rank0") == [(8, 8)]
    assert data.image_sizes(examples, scans, "rank0") == [(8, 8)]
    assert len(decodes) == 1  # decoded once, then read from the new scan file


def test_a_dangling_link_is_skipped_as_unreadable_and_scanned_again(tmp_path):
    examples = _images(tmp_path / "images", [(8, 8)])
    link = tmp_path / "images" / "gone.png"
    link.symlink_to(tmp_path / "nowhere.png")
    examples.append(data.Example(link, ""))
    scans = tmp_path / "scans"

    assert data.image_sizes(examples, scans, "rank0") == [(8, 8), None]
    (tmp_path / "nowhere.png").write_bytes((tmp_path / "images" / "0.png").read_bytes())
    assert data.image_sizes(examples, scans, "rank0") == [(8, 8), (8, 8)]  # now there


def test_two_jobs_on_a_node_scanning_at_once_both_start(tmp_path):
    """Two trainers of rank 0 on one node (two jobs) write the same scan file at once;
    neither may fail on the other's temporary file."""
    examples = _images(tmp_path / "images", [(8, 8)] * 40)
    scans = tmp_path / "scans"
    script = (
        "import sys\nfrom pathlib import Path\nfrom difftrain.trainer import data\n"
        "examples = [data.Example(p, '') for p in sorted(Path(sys.argv[1]).glob('*.png'))]\n"
        "for _ in range(30):\n"
        "    for p in Path(sys.argv[2]).glob('*.json'):\n"
        "        p.unlink(missing_ok=True)\n"
        "    data.image_sizes(examples, Path(sys.argv[2]), 'rank0')\n"
    )
    command = [sys.executable, "-c", script, str(examples[0].image.parent), str(scans)]
    processes = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in processes]
    assert [code for code, _ in results] == [0, 0], results
