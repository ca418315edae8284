"""The quickstart's model learns what it is told: a shortened run of
examples/quickstart.yaml draws the prompted colours, and DreamBooth on that model with
a few pictures of one subject teaches it the subject's colour."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from difftrain.api.validation import load_job
from difftrain.shapes import COLOURS, SHAPES, shape_colour, write_dataset
from tests.builders import merge
from tests.trainer import runner

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"
# The quickstart's recipe and its two local nodes, with fewer steps: 6 to 7 minutes on
# two cores (on one process with two threads it took a quarter longer). The smallest
# sizes that pass with a margin; see DEVELOPERS.md.
SHORT = {"resolution": 32, "autoencoder_steps": 500, "steps": 1200}

# Every colour, once on white and once on black, with shapes taking turns.
PROMPTS = [
    f"a {colour} {SHAPES[(i + k) % len(SHAPES)]} on a {background} background"
    for i, colour in enumerate(COLOURS)
    for k, background in enumerate(("white", "black"))
]


def test_quickstart_is_a_valid_two_node_job_that_samples_and_fits_a_laptop():
    job = load_job(yaml.safe_load(QUICKSTART.read_text()))
    spec = job.spec

    assert spec.method == "full" and spec.dataset.uri == "builtin:shapes"
    assert spec.resources.nodes == 2 and spec.resources.gpus_per_node == 0
    assert spec.validation.prompts and spec.output.uri.startswith("file://")


@pytest.fixture(scope="module")
def shapes_model(tmp_path_factory):
    """The shortened quickstart's output folder: a model trained from scratch on shapes by
    `difftrain run`, on the quickstart's two local nodes. builtin:shapes with its large
    shapes only: more of each image shows the prompted colour, so colours are learned in
    fewer steps."""
    work = tmp_path_factory.mktemp("quickstart")
    data = write_dataset(work / "shapes", count=1024, extents=("large",))
    manifest = yaml.safe_load(QUICKSTART.read_text())
    manifest["spec"] = merge(
        manifest["spec"],
        {
            "full": {"autoencoder": {"steps": SHORT["autoencoder_steps"]}},
            "dataset": {"uri": f"file://{data}", "resolution": SHORT["resolution"]},
            "training": {"steps": SHORT["steps"]},
            "validation": {"prompts": PROMPTS, "everySteps": SHORT["steps"]},
            "checkpoints": {"everySteps": SHORT["steps"]},
            "output": {"uri": f"file://{work}/out"},
        },
    )
    (work / "job.yaml").write_text(yaml.safe_dump(manifest))
    command = [
        sys.executable,
        "-m",
        "difftrain.cli",
        "run",
        str(work / "job.yaml"),
        "--workdir",
        str(work / "nodes"),
    ]

    result = subprocess.run(command, capture_output=True, text=True, timeout=900)

    assert result.returncode == 0, result.stdout[-20000:] + result.stderr
    return work / "out"


@pytest.mark.timeout(900)  # the module's training runs in its set-up
def test_shortened_quickstart_draws_the_prompted_colours(shapes_model):
    samples = shapes_model / "samples" / f"step-{SHORT['steps']:08d}"
    drawn = [shape_colour(Image.open(samples / f"{k:03d}-00.png")) for k in range(len(PROMPTS))]
    wanted = [prompt.split()[1] for prompt in PROMPTS]
    right = sum(d == w for d, w in zip(drawn, wanted, strict=True))
    assert right >= 0.8 * len(PROMPTS), list(zip(wanted, drawn, strict=True))


def test_dreambooth_on_the_shapes_model_teaches_it_the_subjects_colour(
    tmp_path, trainer_cache, shapes_model
):
    # The subject: green circles, large on white; "sks" is the rare word that names it.
    subject = write_dataset(
        tmp_path / "subject",
        count=16,
        extents=("large",),
        colours=("green",),
        shapes=("circle",),
        backgrounds=("white",),
    )
    base = shapes_model / "model"
    spec = {
        "method": "dreambooth",
        "dreambooth": {"instancePrompt": "a sks"},
        "lora": {"rank": 8},
        "model": {"base": f"file://{base}"},
        "dataset": {"uri": f"file://{subject}", "resolution": SHORT["resolution"]},
        "training": {"steps": 200, "batchSize": 8, "learningRate": 1e-3},
        "output": {"uri": f"file://{tmp_path}/out", "dtype": "fp32"},
    }
    config = runner.write_config(tmp_path, spec, name="dreambooth")

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 0, log
    before = _colours(_pipeline(base), "a sks")
    pipeline = _pipeline(base)
    pipeline.load_lora_weights(tmp_path / "out" / "model")
    after = _colours(pipeline, "a sks")
    assert after.count("green") >= 6, after
    assert after.count("green") >= before.count("green") + 4, (before, after)


def _pipeline(folder: Path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)


def _colours(pipeline, prompt: str) -> list[str | None]:
    """The colour of each of eight samples of ``prompt``, sampled as the quickstart's."""
    from diffusers import DPMSolverMultistepScheduler

    from difftrain.trainer.sampling import generate

    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    images = generate(
        pipeline, [prompt], size=SHORT["resolution"], seed=0, per_prompt=8, steps=20, guidance=5.0
    )
    return [shape_colour(image) for _, _, image in images]
