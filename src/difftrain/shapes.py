"""``builtin:shapes``: a deterministic synthetic dataset of coloured shapes.

Each image is one filled shape (colour x shape x size x position) on a plain background,
captioned "a red circle on a white background". Image ``i`` is always the same picture,
so runs, tests and benchmarks are reproducible without any download.
``builtin:shapes-large`` holds the large shapes alone, near the centre (the quickstart's
data).
"""

import itertools
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 60, 180),
    "orange": (245, 135, 25),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.35, "large": 0.65}  # shape extent as a fraction of the image side
DEFAULT_COUNT = 2048
IMAGE_SIZE = 64

_COMBINATIONS = list(itertools.product(COLOURS, SHAPES, SIZES, BACKGROUNDS))


def caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def render(index: int, size: int = IMAGE_SIZE, spread: float = 1.0) -> tuple[Image.Image, str]:
    """Image ``index`` of the dataset and its caption. The shape sits anywhere in the
    image with ``spread`` 1, and that much closer to the centre with less (0: centred)."""
    colour, shape, extent, background = _COMBINATIONS[index % len(_COMBINATIONS)]
    jitter = random.Random(index)
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    side = SIZES[extent] * size
    free = size - side
    left = free / 2 + (jitter.uniform(0, free) - free / 2) * spread
    top = free / 2 + (jitter.uniform(0, free) - free / 2) * spread
    draw_shape(image, shape, (left, top, left + side, top + side), colour)
    return image, caption(colour, shape, background)


def draw_shape(image: Image.Image, shape: str, box: tuple, colour: str) -> None:
    """Draw one of :data:`SHAPES` filling ``box`` (left, top, right, bottom) in ``colour``
    on ``image``: a circle, a square, or a triangle with its apex up."""
    draw = ImageDraw.Draw(image)
    fill = COLOURS[colour]
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill)


def write_dataset(
    folder: Path,
    count: int = DEFAULT_COUNT,
    size: int = IMAGE_SIZE,
    extents: tuple[str, ...] = tuple(SIZES),
    colours: tuple[str, ...] = tuple(COLOURS),
    shapes: tuple[str, ...] = SHAPES,
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS),
    spread: float = 1.0,
) -> Path:
    """Write ``count`` images in the images/ + captions/ layout under ``folder``, drawing
    only the given ``extents`` (``small``, ``large``), colours, shapes and backgrounds
    (one of each makes the few pictures of one subject that personalisation learns), at
    positions as far from the centre as ``spread`` lets them (:func:`render`)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "captions").mkdir(parents=True, exist_ok=True)

    def wanted(index: int) -> bool:
        colour, shape, extent, background = _COMBINATIONS[index % len(_COMBINATIONS)]
        return (
            colour in colours
            and shape in shapes
            and extent in extents
            and background in backgrounds
        )

    indices = filter(wanted, itertools.count())
    for index in itertools.islice(indices, count):
        image, text = render(index, size, spread)
        image.save(folder / "images" / f"{index:06d}.png")
        (folder / "captions" / f"{index:06d}.txt").write_text(text + "\n")
    return folder


def write_large(folder: Path) -> Path:
    """``builtin:shapes-large``: the large shapes of the dataset alone (1024 images), near
    the centre, whose colours, shapes and backgrounds a tiny model learns in fewer steps
    (the quickstart's)."""
    return write_dataset(folder, count=LARGE_COUNT, extents=("large",), spread=LARGE_SPREAD)


LARGE_COUNT = 1024
# How far from the centre the large shapes sit: within 30% of the way to the edges. Where
# a shape may be anywhere, a tiny model trained for minutes draws the blurred average of
# its places, a blob of the right colour; near the centre it draws the shape.
LARGE_SPREAD = 0.3
# The built-in datasets by name (builtin:NAME): each writes itself into a folder.
BUILTIN = {"shapes": write_dataset, "shapes-large": write_large}
# The built-in datasets' version: part of their key in a node's dataset cache, so that
# a changed dataset is written again rather than read from an older cache.
VERSION = 2


def border_colour(image: Image.Image) -> tuple[int, int, int]:
    """The median colour of the image's outermost pixels: its background, for an image
    like this dataset's, where a shape covers at most part of the border."""
    rgb = image.convert("RGB")
    width, height = rgb.size
    frame = [(x, y) for x in range(width) for y in (0, height - 1)]
    frame += [(x, y) for y in range(1, height - 1) for x in (0, width - 1)]
    pixels = [rgb.getpixel(point) for point in frame]
    return tuple(sorted(channel)[len(channel) // 2] for channel in zip(*pixels, strict=True))


def shape_colour(
    image: Image.Image, background: str | None = None, margin: float = 60.0
) -> str | None:
    """The palette colour nearest to the mean of the pixels that stand out from the
    background (the shape's region), or None when none does. The background is the named
    one, or else the image's own (:func:`border_colour`).

    This is how a person would judge a sample of "a red circle on a white background":
    whatever is drawn on the background should be red.
    """
    ground = BACKGROUNDS[background] if background else border_colour(image)
    pixels = [
        p for p in image.convert("RGB").get_flattened_data() if _distance2(p, ground) > margin**2
    ]
    if not pixels:
        return None
    mean = [sum(channel) / len(pixels) for channel in zip(*pixels, strict=True)]
    return min(COLOURS, key=lambda name: _distance2(mean, COLOURS[name]))


def _distance2(a, b) -> float:
    """Squared distance of two RGB colours."""
    return sum((x - y) ** 2 for x, y in zip(a, b, strict=True))


def shape_background(image: Image.Image) -> str:
    """The background name nearest to the image's own (:func:`border_colour`)."""
    ground = border_colour(image)
    return min(BACKGROUNDS, key=lambda name: _distance2(ground, BACKGROUNDS[name]))


def shape_kind(image: Image.Image, margin: float = 60.0) -> str | None:
    """Which of :data:`SHAPES` the largest region that stands out from the background
    makes, or None when none does: a square fills its bounding box, a triangle (apex up)
    is much wider in its lower third than in its upper one, and a circle is neither.

    This is how a person would judge the shape of a sample of "a red circle on ...",
    whatever its colour: by the one thing drawn, with its holes filled in, and not by
    specks elsewhere on the background."""
    rgb = image.convert("RGB")
    ground = border_colour(rgb)
    width, height = rgb.size
    pixels = rgb.get_flattened_data()
    standing = {
        (x, y)
        for y in range(height)
        for x in range(width)
        if _distance2(pixels[y * width + x], ground) > margin**2
    }
    region = _filled(_largest_region(standing), width, height)
    rows = sorted({y for _, y in region})
    columns = sorted({x for x, _ in region})
    if len(rows) < 3 or len(columns) < 3:
        return None
    top, bottom, left, right = rows[0], rows[-1], columns[0], columns[-1]
    filled = len(region) / ((bottom - top + 1) * (right - left + 1))
    if filled > SQUARE_FILL:
        return "square"
    third = max(1, (bottom - top + 1) // 3)
    upper = sum(1 for _, y in region if y < top + third)
    lower = sum(1 for _, y in region if y > bottom - third)
    return "triangle" if lower > TRIANGLE_SPREAD * upper else "circle"


def _neighbours(x: int, y: int):
    return ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1))


def _largest_region(points: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """The largest 4-connected part of ``points`` (empty when it is)."""
    unseen, largest = set(points), set()
    while unseen:
        region, frontier = set(), [unseen.pop()]
        while frontier:
            point = frontier.pop()
            region.add(point)
            for near in _neighbours(*point):
                if near in unseen:
                    unseen.remove(near)
                    frontier.append(near)
        largest = max(largest, region, key=len)
    return largest


def _filled(region: set[tuple[int, int]], width: int, height: int) -> set[tuple[int, int]]:
    """``region`` with its holes: every pixel that the outside cannot reach around it."""
    outside = {(x, y) for x in (-1, width) for y in range(-1, height + 1)}
    outside |= {(x, y) for y in (-1, height) for x in range(width)}
    frontier = list(outside)
    while frontier:
        for near in _neighbours(*frontier.pop()):
            x, y = near
            inside = 0 <= x < width and 0 <= y < height
            if inside and near not in region and near not in outside:
                outside.add(near)
                frontier.append(near)
    return {(x, y) for x in range(width) for y in range(height) if (x, y) not in outside}


# Thresholds between the shapes: a square fills all of its box, a circle pi/4 (0.79) of
# it, a triangle half; a triangle's lower third holds five times its upper third's
# pixels, a circle's thirds about the same.
SQUARE_FILL = 0.88
TRIANGLE_SPREAD = 2.0


def judge(prompt: str, image: Image.Image) -> set[str]:
    """What a sample of ``prompt`` ("a COLOUR SHAPE on a BACKGROUND background") gets
    wrong: a set of "colour", "shape" and "background", empty when it is all right."""
    words = prompt.split()
    if len(words) != 7 or words[3:5] != ["on", "a"] or words[-1] != "background":
        raise ValueError(f"not a prompt of the shapes dataset: {prompt!r}")
    wanted = {"colour": words[1], "shape": words[2], "background": words[5]}
    drawn = {
        "colour": shape_colour(image),
        "shape": shape_kind(image),
        "background": shape_background(image),
    }
    return {what for what in wanted if drawn[what] != wanted[what]}
