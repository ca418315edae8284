"""``loss.png``: the loss curve of ``metrics.jsonl``, drawn with Pillow alone."""

import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 800, 450
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 70, 20, 40, 50
RAW = (170, 190, 225)
SMOOTH = (30, 80, 200)
INK = (40, 40, 40)
GRID = (225, 225, 225)


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """An exponential moving average, debiased at the start (as TensorBoard draws it)."""
    result, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        result.append(average / (1 - weight**count))
    return result


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def loss_curve(entries: list[dict], title: str) -> Image.Image:
    """The loss of each logged step (light) and its moving average (dark)."""
    image = Image.new("RGB", (WIDTH, HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    draw.text((MARGIN_LEFT, 12), title, fill=INK, font=font)
    points = [(e["step"], e["loss"]) for e in entries if e.get("loss") is not None]
    left, top = MARGIN_LEFT, MARGIN_TOP
    right, bottom = WIDTH - MARGIN_RIGHT, HEIGHT - MARGIN_BOTTOM
    draw.rectangle((left, top, right, bottom), outline=INK)
    if not points:
        draw.text((left + 10, top + 10), "no steps logged yet", fill=INK, font=font)
        return image
    steps = [s for s, _ in points]
    losses = [v for _, v in points]
    first, last = min(steps), max(max(steps), min(steps) + 1)
    low, high = min(losses), max(losses)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5

    def x(step: float) -> float:
        return left + (step - first) / (last - first) * (right - left)

    def y(value: float) -> float:
        return bottom - (value - low) / (high - low) * (bottom - top)

    for value in _ticks(low, high):
        draw.line((left, y(value), right, y(value)), fill=GRID)
        draw.text((8, y(value) - 7), f"{value:.4g}", fill=INK, font=font)
    for step in _ticks(first, last):
        draw.text((x(step) - 10, bottom + 8), f"{step:.0f}", fill=INK, font=font)
    draw.text(((left + right) // 2 - 15, bottom + 28), "step", fill=INK, font=font)
    if len(points) > 1:
        draw.line([(x(s), y(v)) for s, v in points], fill=RAW, width=1)
        draw.line(
            [(x(s), y(v)) for s, v in zip(steps, smooth(losses), strict=True)], fill=SMOOTH, width=2
        )
    else:
        draw.ellipse(
            (x(steps[0]) - 3, y(losses[0]) - 3, x(steps[0]) + 3, y(losses[0]) + 3), fill=SMOOTH
        )
    return image


def write_loss_curve(metrics: Path, target: Path, title: str) -> Path:
    """Draw the ``metrics.jsonl`` at ``metrics`` into the PNG ``target``."""
    entries = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    loss_curve(entries, title).save(target)
    return target
