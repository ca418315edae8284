"""Preemption safety: a killed run resumes from its latest complete checkpoint and ends
with exactly the weights of a run that was never interrupted."""

import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer import runner

STEPS = 12
# One thread: results are bitwise reproducible between runs only at a fixed thread count,
# and multi-threaded CPU kernels (MKL, oneDNN) may pick their split of the work at run
# time, which changes the order of floating-point sums.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# What each method trains (and on which family, when not SD), for the exact-resume test;
# every other setting is shared.
METHODS = {
    "lora": {"lora": {"rank": 4, "dropout": 0.1}},
    "sd3-lora": {  # flow matching: its timestep draws must resume too
        "model": {"base": "preset:tiny-sd3"},
        "lora": {"rank": 4, "dropout": 0.1, "trainTextEncoder": True},
    },
    "flux-lora": {  # and with sigmas shifted by the image size, and guidance
        "model": {"base": "preset:tiny-flux"},
        "lora": {"rank": 4, "dropout": 0.1},
        "training": {"steps": STEPS, "batchSize": 8, "flowMatching": {"guidance": 2.0}},
    },
    "textualInversion": {
        "method": "textualInversion",
        "textualInversion": {"placeholderToken": "<shape>", "initializerToken": "circle"},
    },
    "dreambooth": {  # with class images made before training
        "method": "dreambooth",
        "lora": {"rank": 4},
        "dreambooth": {
            "instancePrompt": "a photo of sks shape",
            "classPrompt": "a shape",
            "numClassImages": 8,
            "classInferenceSteps": 2,
        },
    },
}


def _config(folder, shapes_folder, output, method="lora"):
    return runner.write_config(
        folder,
        {
            "dataset": {"uri": f"file://{shapes_folder}", "randomFlip": True},
            "output": {"uri": f"file://{output}"},
            "training": {"steps": STEPS, "batchSize": 8},
            "checkpoints": {"everySteps": 5, "keepLast": 5},
            **METHODS[method],
        },
    )


def _run_until(process, marker: str, sig: int) -> str:
    """Read the trainer's log until ``marker`` appears, then send ``sig``."""
    seen = []
    for line in process.stdout:
        seen.append(line)
        if marker in line:
            process.send_signal(sig)
            break
    rest, _ = process.communicate(timeout=120)
    return "".join(seen) + rest


def _weights(output, step):
    return load_file(output / "checkpoints" / f"step-{step:08d}" / "trainable.safetensors")


@pytest.mark.parametrize("method", list(METHODS))
def test_killed_run_resumes_to_identical_weights(tmp_path, trainer_cache, shapes_folder, method):
    reference = tmp_path / "reference"
    reference.mkdir()
    config = _config(reference, shapes_folder, reference / "out", method)
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    output = interrupted / "out"
    with runner.running(config, reference, trainer_cache, ONE_THREAD) as reference_run:
        config = _config(interrupted, shapes_folder, output, method)
        first = runner.start(config, interrupted, trainer_cache, ONE_THREAD)
        log = _run_until(first, f"step 7/{STEPS} ", signal.SIGKILL)
        code, reference_log = reference_run()

    assert code == 0, reference_log
    assert first.returncode == -signal.SIGKILL, log
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-00000005"]
    # A checkpoint of this run interrupted mid-write: its run.json (written first) and
    # some files, but no COMPLETE. It must be ignored, then pruned.
    partial = output / "checkpoints" / "step-00000009"
    partial.mkdir()
    (partial / "run.json").write_text(
        (output / "checkpoints" / "step-00000005" / "run.json").read_text()
    )
    (partial / "trainable.safetensors").write_bytes(b"half a file")
    # A stray folder of no known run is left alone.
    stray = output / "checkpoints" / "step-00000011"
    stray.mkdir()
    (stray / "notes.txt").write_text("not a checkpoint of this run")

    code, log = runner.run(config, interrupted, trainer_cache, ONE_THREAD)

    assert code == 0, log
    assert "resumed from checkpoint step 5" in log
    assert not partial.exists()  # pruned once newer checkpoints completed
    assert (stray / "notes.txt").exists()
    expected, got = _weights(reference / "out", STEPS), _weights(output, STEPS)
    assert expected.keys() == got.keys()
    differences = {k: float((expected[k] - got[k]).abs().max()) for k in expected}
    assert not any(differences.values()), {k: d for k, d in differences.items() if d}
    steps = [
        json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, STEPS + 1))  # the lost steps 6-7 are logged once


def test_sigterm_checkpoints_and_exits_and_resume_never_ignores_it(
    tmp_path, trainer_cache, shapes_folder
):
    output = tmp_path / "out"
    config = _config(tmp_path, shapes_folder, output)

    process = runner.start(config, tmp_path, trainer_cache)
    log = _run_until(process, f"step 2/{STEPS} ", signal.SIGTERM)

    assert process.returncode == 143, log
    checkpoints = sorted((output / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and (checkpoints[0] / "COMPLETE").exists(), log
    position = json.loads((checkpoints[0] / "position.json").read_text())
    assert 2 <= position["step"] < 5
    assert checkpoints[0].name == f"step-{position['step']:08d}"
    reason = json.loads((tmp_path / "termination-log").read_text())
    assert reason["reason"] == "Stopped"

    # resume: never starts afresh beside that checkpoint.
    spec = json.loads(config.read_text())
    spec["spec"]["checkpoints"]["resume"] = "never"
    config.write_text(json.dumps(spec))
    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 0, log
    assert "resumed" not in log
    assert f"step 1/{STEPS} " in log


def test_taking_samples_does_not_change_the_training_run(tmp_path, trainer_cache, shapes_folder):
    configs = {}
    for name, validation in (("plain", {}), ("sampled", {"prompts": ["a red circle"]})):
        folder = tmp_path / name
        folder.mkdir()
        configs[name] = runner.write_config(
            folder,
            {
                "dataset": {"uri": f"file://{shapes_folder}"},
                "output": {"uri": f"file://{folder / 'out'}"},
                "training": {"steps": 4},
                "lora": {"rank": 4, "dropout": 0.1},
                "validation": {**validation, "everySteps": 2, "inferenceSteps": 2},
            },
        )
    results = runner.run_together(
        [(config, tmp_path / name, trainer_cache, ONE_THREAD) for name, config in configs.items()]
    )

    assert [code for code, _ in results] == [0, 0], results
    plain, sampled = (_weights(tmp_path / name / "out", 4) for name in ("plain", "sampled"))
    samples = tmp_path / "sampled" / "out" / "samples"
    assert [p.name for p in sorted(samples.iterdir())] == ["step-00000002", "step-00000004"]
    assert all(torch.equal(plain[k], sampled[k]) for k in plain)
