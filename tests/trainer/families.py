"""What the model-family tests share: a seeded sample of a pipeline, a job on a preset,
a job from scratch with the preset's transformer changed, and a refused run's reason."""

import json

import torch

from difftrain.trainer.presets import write_preset
from tests.trainer import runner


def sample(pipeline, prompt: str = "a red circle on a white background", steps: int = 3):
    """A 32 px image of ``prompt`` from a fixed seed, as a tensor; the transformer
    families read as many T5 tokens as the tiny tokenizer has."""
    extra = {"max_sequence_length": 32} if hasattr(pipeline, "transformer") else {}
    return pipeline(
        prompt,
        num_inference_steps=steps,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **extra,
    ).images


def job(tmp_path, shapes_folder, preset: str, **extra) -> dict:
    """A short fp32 job on ``preset`` over the shapes at 32 px, writing under tmp_path."""
    spec = {
        "model": {"base": f"preset:{preset}"},
        "dataset": {"uri": f"file://{shapes_folder}", "resolution": 32},
        "output": {"uri": f"file://{tmp_path}/out", "dtype": "fp32"},
        "training": {"steps": 4, "batchSize": 4, "learningRate": 1e-3},
    }
    spec.update(extra)
    return spec


def from_scratch(tmp_path, shapes_folder, preset: str, **changes) -> dict:
    """A job training ``preset``'s transformer anew with ``changes`` to its config (the
    VAE and text encoders kept)."""
    base = write_preset(preset, tmp_path / "base")
    transformer = json.loads((base / "transformer" / "config.json").read_text())
    transformer.update(changes)
    return job(
        tmp_path,
        shapes_folder,
        preset,
        method="full",
        model={"base": f"preset:{preset}", "components": {"transformer": transformer}},
        full={"reuse": ["vae", "textEncoders"]},
    )


def refused(tmp_path, cache, spec) -> str:
    """Run ``spec``, which must fail with exit 2 before any step or checkpoint; the
    termination log's message."""
    config = runner.write_config(tmp_path, spec)
    code, log = runner.run(config, tmp_path, cache)
    assert code == 2, log
    assert "step 1/" not in log
    assert not (tmp_path / "out" / "checkpoints").exists()
    return json.loads((tmp_path / "termination-log").read_text())["message"]
