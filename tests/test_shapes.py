"""The builtin:shapes dataset and `difftrain dataset shapes`."""

from PIL import Image

from difftrain.cli import main
from difftrain.shapes import (
    BACKGROUNDS,
    COLOURS,
    border_colour,
    draw_shape,
    judge,
    render,
    shape_background,
    shape_colour,
    shape_kind,
    write_dataset,
)


def test_images_are_deterministic_and_match_their_captions():
    image, caption = render(7, size=32)
    again, same = render(7, size=32)

    assert (image.tobytes(), caption) == (again.tobytes(), same)
    colour, shape, background = caption.split()[1], caption.split()[2], caption.split()[-2]
    assert shape in ("circle", "square", "triangle")
    pixels = {image.getpixel((x, y)) for x in range(32) for y in range(32)}
    assert COLOURS[colour] in pixels and BACKGROUNDS[background] in pixels


def test_dataset_command_writes_the_images_and_captions_layout(tmp_path, capsys):
    assert (
        main(["dataset", "shapes", str(tmp_path / "shapes"), "--count", "5", "--size", "16"]) == 0
    )

    images = sorted((tmp_path / "shapes" / "images").iterdir())
    captions = sorted((tmp_path / "shapes" / "captions").iterdir())
    assert [p.stem for p in images] == [p.stem for p in captions] == [f"00000{i}" for i in range(5)]
    assert Image.open(images[0]).size == (16, 16)
    assert captions[0].read_text() == render(0)[1] + "\n"
    assert "wrote 5 images" in capsys.readouterr().out


def test_one_subject_only(tmp_path):
    write_dataset(
        tmp_path,
        count=4,
        extents=("large",),
        colours=("red",),
        shapes=("square",),
        backgrounds=("white",),
    )

    captions = {p.read_text() for p in (tmp_path / "captions").iterdir()}
    pictures = {p.read_bytes() for p in (tmp_path / "images").iterdir()}
    assert captions == {"a red square on a white background\n"}
    assert len(pictures) == 4  # the same subject in four places


def test_shape_colour_names_the_colour_drawn_on_the_background():
    for index in range(0, 108, 5):  # every colour, shape and background
        image, caption = render(index, size=32)
        words = caption.split()
        assert shape_colour(image, words[-2]) == words[1], caption


def test_shape_colour_of_a_blank_image_is_none_and_noise_is_judged_by_its_mean():
    assert shape_colour(Image.new("RGB", (16, 16), BACKGROUNDS["white"]), "white") is None
    reddish = Image.new("RGB", (16, 16), BACKGROUNDS["black"])
    for x in range(8):
        reddish.putpixel((x, 0), (200, 60, 50) if x % 2 else (240, 30, 30))
    assert shape_colour(reddish, "black") == "red"


def test_without_a_named_background_the_border_is_the_background():
    for index in range(0, 108, 5):
        image, caption = render(index, size=32)
        words = caption.split()
        assert border_colour(image) == BACKGROUNDS[words[-2]], caption
        assert shape_colour(image) == words[1], caption


def test_shape_kind_and_background_name_what_is_drawn_at_the_quickstarts_size():
    for index in range(108 * 2):  # every combination, twice, in other places
        image, caption = render(index)
        words = caption.split()
        drawn = (words[2], words[-2])
        assert (shape_kind(image), shape_background(image)) == drawn, caption
        if _extent(index) == "large":  # small ones are judged at the dataset's size only
            small = image.resize((32, 32), Image.BICUBIC)
            assert (shape_kind(small), shape_background(small)) == drawn, caption


def _extent(index: int) -> str:
    """Whether image ``index`` draws a small or a large shape."""
    from difftrain.shapes import _COMBINATIONS

    return _COMBINATIONS[index % len(_COMBINATIONS)][2]


def test_shape_kind_of_a_blank_image_is_none_and_a_blob_is_not_a_square_or_triangle():
    assert shape_kind(Image.new("RGB", (32, 32), BACKGROUNDS["gray"])) is None
    blob = Image.new("RGB", (32, 32), BACKGROUNDS["black"])
    for x, y in [(10, 10), (11, 10), (10, 11), (20, 20)]:  # a few scattered pixels
        blob.putpixel((x, y), COLOURS["red"])
    assert shape_kind(blob) != "square"


def test_shape_kind_judges_the_drawn_shape_not_specks_or_holes():
    for shape in ("circle", "square", "triangle"):
        image = Image.new("RGB", (32, 32), BACKGROUNDS["white"])
        draw_shape(image, shape, (8, 8, 28, 28), "blue")
        for corner in [(0, 0), (1, 0), (31, 1), (0, 30), (2, 31)]:  # specks on the border
            image.putpixel(corner, COLOURS["red"])
        image.putpixel((18, 22), BACKGROUNDS["white"])  # a hole inside the shape
        image.putpixel((19, 22), BACKGROUNDS["white"])

        assert shape_kind(image) == shape


def test_shape_kind_judges_the_largest_of_two_shapes():
    image = Image.new("RGB", (32, 32), BACKGROUNDS["black"])
    draw_shape(image, "square", (2, 2, 24, 24), "green")
    draw_shape(image, "circle", (26, 26, 31, 31), "green")

    assert shape_kind(image) == "square"


def test_large_shapes_sit_near_the_centre_as_their_spread_says():
    from difftrain.shapes import LARGE_SPREAD, SIZES

    side = SIZES["large"] * 64
    free = 64 - side
    offsets = []
    for index in range(0, 216, 2):  # the large ones among every combination
        if _extent(index) != "large":
            continue
        anywhere, _ = render(index)
        near, _ = render(index, spread=LARGE_SPREAD)
        for image, limit in ((anywhere, free / 2), (near, LARGE_SPREAD * free / 2)):
            left, top = _box(image)[:2]
            offset = max(abs(left - free / 2), abs(top - free / 2))
            assert offset <= limit + 1.5
        offsets.append(max(abs(x - free / 2) for x in _box(anywhere)[:2]))
    assert max(offsets) > 2 * LARGE_SPREAD * free / 2  # anywhere is wider than near


def _box(image: Image.Image) -> tuple[int, int]:
    """(left, top) of what stands out from the image's background."""
    ground = border_colour(image)
    points = [
        (x, y)
        for y in range(image.height)
        for x in range(image.width)
        if image.getpixel((x, y)) != ground
    ]
    return min(x for x, _ in points), min(y for _, y in points)


def test_judge_names_what_a_sample_gets_wrong():
    image, caption = render(0, size=32)  # a red circle on a white background
    assert caption == "a red circle on a white background"

    assert judge(caption, image) == set()
    assert judge("a blue circle on a white background", image) == {"colour"}
    assert judge("a red square on a black background", image) == {"shape", "background"}
    assert judge("an orange triangle on a gray background", image) == {
        "colour",
        "shape",
        "background",
    }
    blank = Image.new("RGB", (32, 32), BACKGROUNDS["white"])
    assert judge(caption, blank) == {"colour", "shape"}


def test_judge_refuses_a_prompt_it_cannot_read():
    import pytest

    with pytest.raises(ValueError, match="not a prompt of the shapes dataset"):
        judge("a photo of a cat", render(0)[0])


def test_builtin_shapes_large_is_the_large_shapes_alone(tmp_path):
    from difftrain.storage import S3Settings
    from difftrain.trainer.data import fetch_dataset

    folder = fetch_dataset("builtin:shapes-large", S3Settings(), tmp_path / "cache")

    images = sorted((folder / "images").iterdir())
    assert len(images) == 1024
    assert {_extent(int(path.stem)) for path in images} == {"large"}
    again = fetch_dataset("builtin:shapes-large", S3Settings(), tmp_path / "cache")
    assert again == folder  # written once per node
    assert fetch_dataset("builtin:shapes", S3Settings(), tmp_path / "cache") != folder


def test_a_built_in_dataset_of_another_version_is_written_anew(tmp_path, monkeypatch):
    from difftrain import shapes
    from difftrain.storage import S3Settings
    from difftrain.trainer.data import fetch_dataset

    older = fetch_dataset("builtin:shapes-large", S3Settings(), tmp_path / "cache")
    monkeypatch.setattr(shapes, "VERSION", shapes.VERSION + 1)

    newer = fetch_dataset("builtin:shapes-large", S3Settings(), tmp_path / "cache")

    assert newer != older and len(list((newer / "images").iterdir())) == 1024


def test_the_api_knows_every_builtin_dataset_the_trainer_writes():
    from difftrain.api.uris import BUILTIN_DATASETS
    from difftrain.shapes import BUILTIN

    assert set(BUILTIN_DATASETS) == set(BUILTIN)


def test_an_unknown_builtin_dataset_names_the_known_ones():
    import pytest

    from difftrain.api.uris import check_uri

    assert check_uri("builtin:shapes-large", ("builtin",)) == "builtin:shapes-large"
    with pytest.raises(ValueError, match="known: shapes, shapes-large"):
        check_uri("builtin:shapes-small", ("builtin",))
