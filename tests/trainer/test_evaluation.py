"""Evaluation during training: FID and CLIP score of generated images, the loss on
held-out images; the metrics' numbers checked against formulas written out here."""

import json
import math
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file

from difftrain.api.spec import DiffusionTrainingJobSpec
from difftrain.errors import DatasetError
from difftrain.shapes import render
from difftrain.trainer import evaluation
from difftrain.trainer.data import Example
from tests import evaluators
from tests.builders import job
from tests.trainer import families, runner
from tests.trainer.test_resume import _run_until


def _images(first: int, count: int, inverted: bool = False) -> list[torch.Tensor]:
    """``count`` shapes images (uint8, 32 px) from index ``first``; ``inverted``: in
    negative, another distribution of images."""
    images = [render(first + i, 32)[0] for i in range(count)]
    return [evaluation.as_tensor(ImageOps.invert(i) if inverted else i) for i in images]


def _fid_by_formula(first: torch.Tensor, second: torch.Tensor) -> float:
    """FID of two feature sets (rows), as the paper defines it, with scipy's sqrtm."""
    a, b = first.double().numpy(), second.double().numpy()
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b)
    root = root.real
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_fid_equals_the_formula_on_the_same_features(inception):
    metric = evaluation.fid_metric(inception, 64, "cpu")
    reference, generated = _images(0, 40), _images(40, 40, inverted=True)

    evaluation.add_images(metric, reference, real=True)
    evaluation.add_images(metric, generated, real=False)
    computed = float(metric.compute())

    features_a = metric.inception(torch.stack(reference))
    features_b = metric.inception(torch.stack(generated))
    assert computed == pytest.approx(_fid_by_formula(features_a, features_b), rel=1e-3)


def test_fid_of_images_against_themselves_is_about_zero(inception):
    metric = evaluation.fid_metric(inception, 2048, "cpu")
    reference = _images(0, 8)
    evaluation.add_images(metric, reference, real=True)

    evaluation.add_images(metric, reference, real=False)
    same = float(metric.compute())
    metric.reset()  # the reference's features stay
    evaluation.add_images(metric, _images(8, 8, inverted=True), real=False)
    other = float(metric.compute())

    assert abs(same) < 1e-3 * other
    assert other > 0


def test_clip_score_is_100_times_the_cosine_clipped_at_0(clip_folder):
    """torchmetrics clips the mean over the images at 0 (the paper clips each image's
    cosine; with a trained CLIP, whose cosines are positive, the two agree)."""
    from transformers import CLIPModel, CLIPProcessor

    images = _images(7, 6)
    prompts = ["a red circle", "a blue square", "a cat", "green", "a yellow star", "sky"]
    metric = evaluation.clip_metric(clip_folder, "cpu")

    evaluation.add_captioned(metric, list(zip(prompts, images, strict=True)))

    model, processor = (
        CLIPModel.from_pretrained(clip_folder),
        CLIPProcessor.from_pretrained(clip_folder),
    )
    with torch.no_grad():
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
        seen = model.get_image_features(pixel_values=pixels).pooler_output
        tokens = processor(text=prompts, return_tensors="pt", padding=True)
        said = model.get_text_features(**tokens).pooler_output
    cosine = torch.nn.functional.cosine_similarity(seen, said)
    expected = max(float((100 * cosine).mean()), 0.0)
    assert float(metric.compute()) == pytest.approx(float(expected), rel=1e-4)


def _examples(count: int) -> list[Example]:
    return [Example(Path(f"images/{i:03d}.png"), f"caption {i}") for i in range(count)]


def _spec(evaluation_spec: dict) -> DiffusionTrainingJobSpec:
    return DiffusionTrainingJobSpec.model_validate(
        job(spec={"evaluation": evaluation_spec})["spec"]
    )


def test_the_same_images_are_held_out_whatever_their_order():
    spec = _spec({"validationLoss": {"fraction": 0.25}})
    examples = _examples(20)
    sizes = [(i, i) for i in range(20)]

    kept, kept_sizes, held = evaluation.hold_out(spec, examples, sizes)
    shuffled = examples[::-1]
    _, _, held_again = evaluation.hold_out(spec, shuffled, sizes[::-1])

    assert len(held) == 5 and len(kept) == 15
    assert sorted(e.image for e in held) == sorted(e.image for e in held_again)
    assert not set(held) & set(kept)
    assert kept_sizes == [sizes[examples.index(e)] for e in kept]


def test_holding_out_every_image_is_refused_naming_the_field():
    spec = _spec({"validationLoss": {"fraction": 0.5}})

    with pytest.raises(DatasetError, match=r"^spec\.evaluation\.validationLoss\.fraction: "):
        evaluation.hold_out(spec, _examples(1), [(1, 1)])


def test_shares_cover_every_image_once_and_pad_evenly_when_asked():
    items = list(range(7))
    shares = [evaluation.share(items, rank, 3, even=False) for rank in range(3)]
    padded = [evaluation.share(items, rank, 3, even=True) for rank in range(3)]

    assert sorted(i for mine, _ in shares for i in mine) == items
    assert [len(mine) for mine, _ in padded] == [3, 3, 3]
    assert [count for _, count in padded] == [3, 2, 2]
    assert [mine[:count] for mine, count in padded] == [mine for mine, _ in shares]


def test_evaluation_images_take_the_prompts_in_turn_at_consecutive_seeds():
    spec = _spec({"numImages": 5, "seed": 10, "validationLoss": {"fraction": 0.1}})

    wanted = evaluation.wanted_images(spec.evaluation, ["a", "b"])

    assert wanted == [("a", 10), ("b", 11), ("a", 12), ("b", 13), ("a", 14)]


def _evaluated_job(tmp_path, shapes_folder, inception, clip_folder, **extra) -> Path:
    spec = {
        "dataset": {"uri": f"file://{shapes_folder}"},
        "output": {"uri": f"file://{tmp_path}/out"},
        "lora": {"rank": 4},
        "evaluation": evaluators.all_scores(
            shapes_folder, inception, clip_folder, everySteps=3, numImages=6, inferenceSteps=3
        ),
        **extra,
    }
    return runner.write_config(tmp_path, spec, name="evaluated")


def test_a_job_evaluates_during_training_and_after_it(
    tmp_path, trainer_cache, shapes_folder, inception, clip_folder
):
    config = _evaluated_job(tmp_path, shapes_folder, inception, clip_folder)

    code, log = runner.run(config, tmp_path, trainer_cache, {"DIFFTRAIN_PROGRESS": "1"})

    assert code == 0, log
    assert "4 images held out of training for the validation loss" in log
    # One bar for each evaluation, at steps 3 and 6 (tqdm draws its last state twice).
    lines = log.splitlines()
    starts = [line for line in lines if line.startswith("evaluation images:   0%")]
    assert len(starts) == 2 and all("| 0/6 " in line for line in starts), log
    assert any(line.startswith("evaluation images: 100%") and "6/6" in line for line in lines)
    out = tmp_path / "out"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluations = [line["evaluation"] for line in lines if "evaluation" in line]
    assert [e["step"] for e in evaluations] == [3, 6]
    for scores in evaluations:
        assert scores["fid"] > 0 and math.isfinite(scores["fid"])
        assert 0 <= scores["clipScore"] <= 100
        assert scores["validationLoss"] > 0 and math.isfinite(scores["validationLoss"])
    result = json.loads((out / "model" / "evaluation.json").read_text())
    assert {key: result[key] for key in evaluations[-1]} == evaluations[-1]
    assert result["history"] == evaluations
    assert result["settings"]["numImages"] == 6
    card = (out / "model" / "README.md").read_text()
    assert f"| FID (step 6) | {evaluations[-1]['fid']:.4f} |" in card
    assert f"| Validation loss (step 6) | {evaluations[-1]['validationLoss']:.4f} |" in card
    assert "evaluation at step 3: fid " in log


def test_a_missing_inception_file_fails_before_training_naming_the_field(
    tmp_path, trainer_cache, shapes_folder, clip_folder
):
    config = _evaluated_job(tmp_path, shapes_folder, tmp_path / "nowhere.pth", clip_folder)

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 2, log
    reason = json.loads((tmp_path / "termination-log").read_text())
    assert reason["message"] == (
        f"spec.evaluation.fid.weightsUri: no file at file://{tmp_path}/nowhere.pth"
    )
    assert "step 1/" not in log


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param(
            "one-reference",
            "spec.evaluation.fid.referenceUri: FID needs at least 2 reference images; ",
            id="one-reference",
        ),
        pytest.param(
            "no-clip-config",
            "spec.evaluation.clipScore.modelUri: no CLIP model at ",
            id="clip-folder",
        ),
        pytest.param("empty-prompts", "spec.evaluation.promptsUri: ", id="empty-prompts"),
    ],
)
def test_bad_evaluation_inputs_fail_before_training(
    tmp_path, trainer_cache, shapes_folder, inception, change, message
):
    one = tmp_path / "one"
    one.mkdir()
    Image.new("RGB", (8, 8)).save(one / "only.png")
    clip = tmp_path / "not-clip"
    clip.mkdir()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n  \n")
    evaluation_spec = {
        "one-reference": {
            "fid": {"referenceUri": f"file://{one}", "weightsUri": f"file://{inception}"}
        },
        "no-clip-config": {"clipScore": {"modelUri": f"file://{clip}"}},
        "empty-prompts": {
            "promptsUri": f"file://{prompts}",
            "validationLoss": {"fraction": 0.1},
        },
    }[change]
    spec = {
        "dataset": {"uri": f"file://{shapes_folder}"},
        "output": {"uri": f"file://{tmp_path}/out"},
        "evaluation": evaluation_spec,
    }
    config = runner.write_config(tmp_path, spec)

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 2, log
    reason = json.loads((tmp_path / "termination-log").read_text())
    assert reason["message"].startswith(message)
    assert not (tmp_path / "out" / "checkpoints").exists()


ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_evaluating_does_not_change_the_training_run(
    tmp_path, trainer_cache, shapes_folder, clip_folder
):
    """LoRA dropout draws from the global random state; evaluations fork it and run in
    eval mode, so the weights trained are the same with evaluations or without."""
    configs = {}
    for name in ("plain", "evaluated"):
        folder = tmp_path / name
        folder.mkdir()
        evaluated = {
            "evaluation": {
                "everySteps": 2,
                "prompts": ["a red circle"],
                "numImages": 2,
                "inferenceSteps": 2,
                "clipScore": {"modelUri": f"file://{clip_folder}"},
                # Held-out images of their own: the training set stays the same.
                "validationLoss": {"uri": f"file://{shapes_folder}", "maxImages": 4},
            }
        }
        spec = {
            "dataset": {"uri": f"file://{shapes_folder}"},
            "output": {"uri": f"file://{folder / 'out'}"},
            "training": {"steps": 4},
            "lora": {"rank": 4, "dropout": 0.1},
            "checkpoints": {"everySteps": 4},
            **(evaluated if name == "evaluated" else {}),
        }
        configs[name] = runner.write_config(folder, spec)
    results = runner.run_together(
        [(config, tmp_path / name, trainer_cache, ONE_THREAD) for name, config in configs.items()]
    )

    assert [code for code, _ in results] == [0, 0], results
    plain, evaluated = (
        load_file(
            tmp_path / name / "out" / "checkpoints" / "step-00000004" / "trainable.safetensors"
        )
        for name in ("plain", "evaluated")
    )
    assert "evaluation at step 2: clipScore " in results[1][1]
    assert all(torch.equal(plain[k], evaluated[k]) for k in plain)


def test_a_resumed_run_keeps_its_earlier_evaluations_once(
    tmp_path, trainer_cache, shapes_folder, clip_folder
):
    """Stopped once step 4 is logged: while its evaluation generates (cut short, so not
    recorded; the resumed run makes it first), or after it: either way the resumed run
    has every evaluation once."""
    spec = {
        "dataset": {"uri": f"file://{shapes_folder}"},
        "output": {"uri": f"file://{tmp_path}/out"},
        "training": {"steps": 6},
        "lora": {"rank": 4},
        "checkpoints": {"everySteps": 100},
        "evaluation": {
            "everySteps": 2,
            "prompts": ["a red circle"],
            "numImages": 48,  # in 3 chunks: a stop in the middle cuts it short
            "inferenceSteps": 2,
            "clipScore": {"modelUri": f"file://{clip_folder}"},
            "validationLoss": {"fraction": 0.1, "timesteps": 1},
        },
    }
    config = runner.write_config(tmp_path, spec)
    first = runner.start(config, tmp_path, trainer_cache)
    stopped = _run_until(first, "step 4/6 ", signal.SIGTERM)
    assert first.returncode == 143, stopped

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 0, log
    assert re.search(r"resumed from checkpoint step [45]\b", log), log
    result = json.loads((tmp_path / "out" / "model" / "evaluation.json").read_text())
    assert [e["step"] for e in result["history"]] == [2, 4, 6]


# Families and methods besides the SD LoRA of the tests above.
TRAINED = {
    "sdxl-lora": ("tiny-sdxl", {"lora": {"rank": 4}}),
    "sd3-lora": ("tiny-sd3", {"lora": {"rank": 4}}),
    "flux-lora": ("tiny-flux", {"lora": {"rank": 4}}),
    "sd-textual-inversion": (
        "tiny-sd",
        {
            "method": "textualInversion",
            "textualInversion": {"placeholderToken": "<shape>", "initializerToken": "circle"},
        },
    ),
}


@pytest.mark.parametrize("trained", list(TRAINED))
def test_every_family_and_method_evaluates(
    tmp_path, trainer_cache, shapes_folder, inception, clip_folder, trained
):
    preset, method = TRAINED[trained]
    spec = families.job(
        tmp_path,
        shapes_folder,
        preset,
        **method,
        training={"steps": 2, "batchSize": 4, "learningRate": 1e-3},
        evaluation=evaluators.all_scores(
            shapes_folder, inception, clip_folder, numImages=2, inferenceSteps=2
        ),
    )
    config = runner.write_config(tmp_path, spec)

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 0, log
    result = json.loads((tmp_path / "out" / "model" / "evaluation.json").read_text())
    assert result["step"] == 2
    assert all(math.isfinite(result[key]) for key in ("fid", "clipScore", "validationLoss"))


def test_a_clip_score_without_prompts_or_captions_is_refused_before_training(
    tmp_path, trainer_cache, shapes_folder, clip_folder
):
    uncaptioned = tmp_path / "uncaptioned"
    uncaptioned.mkdir()
    for image in sorted((shapes_folder / "images").iterdir())[:8]:
        (uncaptioned / image.name).write_bytes(image.read_bytes())
    spec = {
        "dataset": {"uri": f"file://{uncaptioned}"},
        "output": {"uri": f"file://{tmp_path}/out"},
        "evaluation": {"clipScore": {"modelUri": f"file://{clip_folder}"}},
    }
    config = runner.write_config(tmp_path, spec)

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 2, log
    reason = json.loads((tmp_path / "termination-log").read_text())
    assert reason["message"] == (
        "spec.evaluation.prompts: the CLIP score needs prompts, and the dataset has no "
        "captions to use instead; set evaluation.prompts or promptsUri"
    )
    assert "step 1/" not in log
