"""The loss curve picture and the sample files: pure functions over small inputs, and
seeded sampling from a tiny model."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from difftrain.api.data import ModelSpec
from difftrain.trainer import plots, sampling
from difftrain.trainer.models import load_components
from difftrain.trainer.presets import write_preset


def test_smoothing_is_a_debiased_moving_average():
    assert plots.smooth([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])
    # 0.9 * 0.1 * 2 + 0.1 * 4 over 1 - 0.81, by hand
    assert plots.smooth([2.0, 4.0]) == pytest.approx([2.0, (0.18 + 0.4) / 0.19])


def _colour_pixels(image: Image.Image, colour) -> int:
    return sum(1 for pixel in image.get_flattened_data() if pixel == colour)


def test_loss_curve_draws_the_falling_loss():
    entries = [{"step": s, "loss": 1.0 / s} for s in range(1, 101)]

    image = plots.loss_curve(entries, "job: diffusion loss")

    assert image.size == (plots.WIDTH, plots.HEIGHT)
    assert _colour_pixels(image, plots.SMOOTH) > 200
    # The curve falls: its first point is high on the left, its last low on the right.
    left = [
        y for y in range(plots.HEIGHT) if image.getpixel((plots.MARGIN_LEFT + 2, y)) != (255,) * 3
    ]
    assert min(left) < plots.HEIGHT // 3


def test_loss_curve_without_steps_says_so():
    image = plots.loss_curve([], "job")

    assert _colour_pixels(image, plots.SMOOTH) == 0
    assert _colour_pixels(image, plots.INK) > 0


def test_write_loss_curve_reads_metrics_jsonl(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(
        "".join(json.dumps({"step": s, "loss": 2.0 - s / 10}) + "\n" for s in range(1, 6))
    )

    path = plots.write_loss_curve(metrics, tmp_path / "loss.png", "job")

    assert Image.open(path).size == (plots.WIDTH, plots.HEIGHT)


def test_samples_are_written_with_their_prompts_and_a_grid(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9)]
    results = [
        (f"prompt {k // 2}", 100 + k, Image.new("RGB", (32, 32), colour))
        for k, colour in enumerate(colours)
    ]

    sampling.write_samples(results, tmp_path, per_prompt=2)

    index = json.loads((tmp_path / "prompts.json").read_text())
    assert [e["file"] for e in index] == ["000-00.png", "000-01.png", "001-00.png", "001-01.png"]
    assert [e["prompt"] for e in index] == ["prompt 0", "prompt 0", "prompt 1", "prompt 1"]
    assert [e["seed"] for e in index] == [100, 101, 102, 103]
    assert Image.open(tmp_path / "001-00.png").getpixel((5, 5)) == (0, 0, 255)
    sheet = Image.open(tmp_path / "grid.png")
    # A row per prompt, enlarged 8x so that 32-pixel images can be seen.
    assert sheet.size == (2 * 256, 2 * 256)
    assert sheet.getpixel((300, 10)) == (0, 255, 0)
    assert sheet.getpixel((10, 300)) == (0, 0, 255)


def test_grid_is_about_square_for_one_image_per_prompt():
    images = [Image.new("RGB", (8, 8)) for _ in range(5)]

    assert sampling.grid(images).size == (3 * 8, 2 * 8)


def test_samples_are_the_same_for_a_seed_and_leave_the_random_state_alone(tmp_path):
    folder = write_preset("tiny-sd", tmp_path / "tiny-sd")
    pipeline = sampling.pipeline_for(load_components(folder, ModelSpec(base="preset:tiny-sd")))
    prompts = ["a red circle", "a blue square"]

    torch.manual_seed(7)
    state = torch.get_rng_state()
    first = sampling.generate(pipeline, prompts, size=32, seed=3, steps=2)
    unchanged = torch.equal(torch.get_rng_state(), state)
    again = sampling.generate(pipeline, prompts, size=32, seed=3, steps=2)
    moved = sampling.generate(pipeline, prompts, size=32, seed=4, steps=2)

    assert unchanged
    assert [(p, s) for p, s, _ in first] == [("a red circle", 3), ("a blue square", 4)]
    pixels = [[np.asarray(image) for _, _, image in run] for run in (first, again, moved)]
    assert all(np.array_equal(a, b) for a, b in zip(pixels[0], pixels[1], strict=True))
    assert not np.array_equal(pixels[0][0], pixels[2][0])  # another seed, another image
