"""Golden losses: the first ten losses of a fixed tiny run, for every method on every
model family, equal what was recorded (one CPU thread).

A change to the trainer's structure must not change a number it computes; a change that
means to (a new default, a fixed bug) rewrites the files with ``pytest --update-golden``
and says why. On the machine that recorded them the losses are equal bit for bit; other
CPUs round differently in their vector kernels (measured: at most 7e-6 apart, relatively,
after ten steps of a full fine-tune), so values may differ by :data:`TOLERANCE`, far
below what a changed default or a different random draw moves them (1e-3 and more).
"""

import json
import math

import pytest

from tests.builders import merge
from tests.trainer import runner
from tests.trainer.test_resume import ONE_THREAD

STEPS = 10
TOLERANCE = 5e-5  # relative

# Each method with the settings that reach most of its code: adapters on the text
# encoders, EMA, min-SNR, offset noise, accumulation, prior preservation, several vectors.
METHODS = {
    "lora": {
        "lora": {"rank": 4, "alpha": 8, "trainTextEncoder": True},
        "training": {"snrGamma": 5.0},
    },
    "finetune": {
        "method": "finetune",
        "training": {
            "ema": {"enabled": True, "decay": 0.9},
            "noiseOffset": 0.05,
            "gradientAccumulationSteps": 2,
            "batchSize": 2,
        },
        "model": {"predictionType": "v_prediction"},
    },
    "dreambooth": {
        "method": "dreambooth",
        "lora": {"rank": 4},
        "dreambooth": {
            "instancePrompt": "a photo of sks shape",
            "classPrompt": "a shape",
            "numClassImages": 4,
            "classInferenceSteps": 2,
            "priorLossWeight": 0.5,
        },
        "training": {"batchSize": 2},
    },
    "dreambooth-full": {
        "method": "dreambooth",
        "dreambooth": {
            "instancePrompt": "a photo of sks shape",
            "unet": "full",
            "trainTextEncoder": True,
        },
    },
    "textualInversion": {
        "method": "textualInversion",
        "textualInversion": {
            "placeholderToken": "<shape>",
            "initializerToken": "circle",
            "vectors": 2,
        },
        "training": {"learningRate": 5e-2},
    },
    "full": {
        "method": "full",
        "full": {"autoencoder": {"steps": 5, "learningRate": 1e-3}},
    },
}
# The flow-matching families (SD3, Flux) with each method they train and the settings
# of their own objective in place of noise prediction's (min-SNR, offset noise,
# v-prediction, which they refuse).
FLOW = {"flowMatching": {"timestepDensity": "mode", "lossWeighting": "cosmap"}}
FLOW_METHODS = {
    "lora": {
        "lora": {"rank": 4, "alpha": 8, "trainTextEncoder": True},
        "training": FLOW,
    },
    "finetune": {
        "method": "finetune",
        "training": {
            "ema": {"enabled": True, "decay": 0.9},
            "gradientAccumulationSteps": 2,
            "batchSize": 2,
            "flowMatching": {"logitMean": 0.5, "lossWeighting": "sigmaSqrt"},
        },
    },
    "dreambooth": METHODS["dreambooth"],
    "full": METHODS["full"],
}
FAMILIES = {"sd": METHODS, "sdxl": METHODS, "sd3": FLOW_METHODS, "flux": FLOW_METHODS}
CASES = [(family, method) for family, methods in FAMILIES.items() for method in methods]


@pytest.fixture(scope="module")
def losses(tmp_path_factory, trainer_cache, shapes_folder) -> dict:
    """Every case's losses by stage, from runs two at a time (one thread each)."""
    runs = []
    for family, method in CASES:
        folder = tmp_path_factory.mktemp(f"{family}-{method}")
        output = folder / "out"
        spec = merge(
            {
                "model": {"base": f"preset:tiny-{family}"},
                "dataset": {"uri": f"file://{shapes_folder}"},
                "output": {"uri": f"file://{output}"},
                "training": {"steps": STEPS, "seed": 3},
                "checkpoints": {"everySteps": 1000},
            },
            FAMILIES[family][method],
        )
        runs.append((runner.write_config(folder, spec), folder, trainer_cache, ONE_THREAD))
    found = {}
    for start in range(0, len(runs), 2):
        pairs = zip(CASES[start : start + 2], runs[start : start + 2], strict=True)
        for (case, (_, folder, *_)), (code, log) in zip(
            pairs, runner.run_together(runs[start : start + 2]), strict=True
        ):
            assert code == 0, log
            stages = {}
            for stage, path in (
                ("autoencoder", "autoencoder/metrics.jsonl"),
                ("diffusion", "metrics.jsonl"),
            ):
                if (folder / "out" / path).exists():
                    lines = (folder / "out" / path).read_text().splitlines()
                    stages[stage] = [json.loads(line)["loss"] for line in lines]
            found[case] = stages
    return found


@pytest.mark.parametrize(("family", "method"), CASES)
def test_first_losses_are_as_recorded(losses, golden, family, method):
    stages = losses[family, method]
    assert all(
        len(values) == (5 if stage == "autoencoder" else STEPS) for stage, values in stages.items()
    ), stages
    # repr() of a float reads back as the same float: the text is exact.
    text = "".join(f"{stage} {value!r}\n" for stage, values in stages.items() for value in values)
    golden(f"losses/{family}-{method}.txt", text, same_losses)


def same_losses(text: str, recorded: str) -> bool:
    """The same stages and steps, each loss within :data:`TOLERANCE` of the recorded one."""
    now, then = ([line.split() for line in t.splitlines()] for t in (text, recorded))
    return len(now) == len(then) and all(
        a[0] == b[0] and math.isclose(float(a[1]), float(b[1]), rel_tol=TOLERANCE)
        for a, b in zip(now, then, strict=False)
    )


def test_losses_agree_within_the_tolerance_and_no_further():
    recorded = "autoencoder 0.5\ndiffusion 1.0\n"

    assert same_losses("autoencoder 0.500001\ndiffusion 1.0\n", recorded)
    assert not same_losses("autoencoder 0.5001\ndiffusion 1.0\n", recorded)
    assert not same_losses("diffusion 0.5\ndiffusion 1.0\n", recorded)
    assert not same_losses("autoencoder 0.5\n", recorded)
