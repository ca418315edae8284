"""The quickstart's model learns what it is told: a shortened run of
examples/quickstart.yaml draws the prompted colours, and DreamBooth on that model with
a few pictures of one subject teaches it the subject's colour. So does a Flux model over
the quickstart's autoencoder and text encoder: fine-tuned on the shapes, then taught the
subject by a LoRA."""

import json
import shutil
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
    base = shapes_model / "model"

    lora = _teach_subject(tmp_path, trainer_cache, base, steps=200, rate=1e-3)

    before = _colours(_pipeline(base), "a sks")
    pipeline = _pipeline(base)
    pipeline.load_lora_weights(lora)
    after = _colours(pipeline, "a sks")
    assert after.count("green") >= 6, after
    assert after.count("green") >= before.count("green") + 4, (before, after)


# Flux's two stages: its transformer fine-tuned on the shapes (it starts from random
# weights), then the subject's LoRA; about the fewest steps that pass with a margin.
FLUX = {"base_steps": 500, "base_rate": 3e-3, "lora_steps": 300, "lora_rate": 1e-2}


def test_a_lora_teaches_a_flux_model_the_subjects_colour(tmp_path, trainer_cache, shapes_model):
    base = _flux_model(shapes_model / "model", tmp_path / "new")
    shapes = shapes_model.parent / "shapes"
    spec = {
        "method": "finetune",
        "model": {"base": f"file://{base}"},
        "dataset": {
            "uri": f"file://{shapes}",
            "resolution": SHORT["resolution"],
            "captionDropout": 0.1,  # for classifier-free guidance, as the quickstart's
        },
        "training": {
            "steps": FLUX["base_steps"],
            "batchSize": 8,
            "learningRate": FLUX["base_rate"],
            "scheduler": {"type": "cosine", "warmupSteps": 50},
        },
        "output": {"uri": f"file://{tmp_path}/base", "dtype": "fp32"},
    }
    config = runner.write_config(tmp_path, spec, name="base")
    code, log = runner.run(config, tmp_path, trainer_cache, timeout=600)
    assert code == 0, log
    base = tmp_path / "base" / "model"

    lora = _teach_subject(
        tmp_path, trainer_cache, base, steps=FLUX["lora_steps"], rate=FLUX["lora_rate"]
    )

    from diffusers import FluxPipeline

    options = {"max_sequence_length": 32}  # the tiny T5 tokenizer's length
    before = _colours(FluxPipeline.from_pretrained(base), "a sks", options)
    pipeline = FluxPipeline.from_pretrained(base)
    pipeline.load_lora_weights(lora)
    after = _colours(pipeline, "a sks", options)
    assert after.count("green") >= 6, after
    assert after.count("green") >= before.count("green") + 4, (before, after)


def _teach_subject(tmp_path, cache, base: Path, steps: int, rate: float) -> Path:
    """Train DreamBooth's LoRA (rank 8) of the subject, named "a sks", on ``base``; the
    folder of the exported LoRA."""
    spec = {
        "method": "dreambooth",
        "dreambooth": {"instancePrompt": "a sks"},
        "lora": {"rank": 8},
        "model": {"base": f"file://{base}"},
        "dataset": {"uri": f"file://{_subject(tmp_path)}", "resolution": SHORT["resolution"]},
        "training": {"steps": steps, "batchSize": 8, "learningRate": rate},
        "output": {"uri": f"file://{tmp_path}/out", "dtype": "fp32"},
    }
    code, log = runner.run(runner.write_config(tmp_path, spec, name="dreambooth"), tmp_path, cache)
    assert code == 0, log
    return tmp_path / "out" / "model"


def _subject(folder: Path) -> Path:
    """The subject: green circles, large on white; "sks" is the rare word that names it."""
    return write_dataset(
        folder / "subject",
        count=16,
        extents=("large",),
        colours=("green",),
        shapes=("circle",),
        backgrounds=("white",),
    )


def _flux_model(trained: Path, folder: Path) -> Path:
    """A Flux model folder over the quickstart model's (``trained``) VAE and CLIP text
    encoder, with the preset's T5 encoder and a new transformer (random weights from a
    fixed seed) whose input fits the VAE's 4 latent channels."""
    import torch
    from diffusers import FluxTransformer2DModel

    from difftrain.trainer.presets import write_preset

    write_preset("tiny-flux", folder)
    for part in ("vae", "text_encoder", "tokenizer"):
        shutil.rmtree(folder / part)
        shutil.copytree(trained / part, folder / part)
    _edit_config(folder / "vae", shift_factor=0.0)  # Flux's pipeline reads one
    transformer = folder / "transformer"
    _edit_config(transformer, in_channels=16)  # 4 channels, packed 2 x 2
    torch.manual_seed(0)
    new = FluxTransformer2DModel.from_config(_config(transformer))
    shutil.rmtree(transformer)
    new.save_pretrained(transformer)
    return folder


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _edit_config(folder: Path, **changes) -> None:
    (folder / "config.json").write_text(json.dumps({**_config(folder), **changes}))


def _pipeline(folder: Path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)


def _colours(pipeline, prompt: str, options: dict | None = None) -> list[str | None]:
    """The colour of each of eight samples of ``prompt``, sampled as the quickstart's (a
    UNet model with a fast multistep sampler, Flux with its own)."""
    from diffusers import DPMSolverMultistepScheduler

    from difftrain.trainer.sampling import generate

    if hasattr(pipeline, "unet"):
        pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    images = generate(
        pipeline,
        [prompt],
        size=SHORT["resolution"],
        seed=0,
        per_prompt=8,
        steps=20,
        guidance=5.0,
        options=options,
    )
    return [shape_colour(image) for _, _, image in images]
