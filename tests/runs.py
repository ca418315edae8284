"""Finished runs that several test modules read: made once a session by the real trainer."""

from pathlib import Path

from tests.trainer import runner

PROMPTS = ["a red circle", "a blue square"]


def train_lora(folder: Path, shapes_folder, clip_folder, trainer_cache, learning_rate: float):
    """A short LoRA run on the tiny SD preset with samples and evaluations; its output."""
    spec = {
        "dataset": {"uri": f"file://{shapes_folder}"},
        "output": {"uri": f"file://{folder}/out"},
        "lora": {"rank": 4},
        "training": {"steps": 4, "learningRate": learning_rate},
        "validation": {"prompts": PROMPTS, "everySteps": 2, "inferenceSteps": 2},
        "evaluation": {
            "prompts": PROMPTS,
            "numImages": 2,
            "inferenceSteps": 2,
            "clipScore": {"modelUri": f"file://{clip_folder}"},
            "validationLoss": {"fraction": 0.125, "timesteps": 2},
        },
    }
    folder.mkdir()
    config = runner.write_config(folder, spec, name=f"lr-{learning_rate:g}")
    code, log = runner.run(config, folder, trainer_cache)
    assert code == 0, log
    return folder / "out"
