"""The builtin:shapes dataset and `difftrain dataset shapes`."""

from PIL import Image

from difftrain.cli import main
from difftrain.shapes import (
    BACKGROUNDS,
    COLOURS,
    border_colour,
    render,
    shape_colour,
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
