"""DreamBooth: class images made once and reused, the prior term counts, LoRA and full
exports load, and bad class data fails with a clear message."""

import json
import re
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from difftrain.local import free_port
from difftrain.shapes import write_dataset
from difftrain.trainer import data
from difftrain.trainer.methods.dreambooth import WithPrior
from difftrain.trainer.presets import build_preset
from tests.trainer import runner
from tests.trainer.test_resume import ONE_THREAD, _run_until

PRIOR = {
    "instancePrompt": "a photo of sks shape",
    "classPrompt": "a photo of a shape",
    "numClassImages": 6,
    "classInferenceSteps": 2,
    "classSeed": 11,
}


@pytest.fixture(scope="module")
def instance_folder(tmp_path_factory):
    """Eight images of one subject: as a user's few photos would be."""
    folder = tmp_path_factory.mktemp("instance")
    write_dataset(folder, count=8)
    return folder


def _spec(output, instance_folder, dreambooth: dict, **extra) -> dict:
    spec = {
        "method": "dreambooth",
        "dreambooth": dreambooth,
        "dataset": {"uri": f"file://{instance_folder}"},
        "output": {"uri": f"file://{output}", "dtype": "fp32"},
        "training": {"steps": 8, "batchSize": 2},
        "checkpoints": {"everySteps": 3},
        "lora": {"rank": 4},
    }
    spec.update(extra)
    return spec


def _pixels(path):
    return torch.tensor(list(Image.open(path).get_flattened_data()), dtype=torch.int16)


def test_class_images_are_made_once_and_reused_after_a_restart(
    tmp_path, trainer_cache, instance_folder
):
    output = tmp_path / "out"
    config = runner.write_config(tmp_path, _spec(output, instance_folder, PRIOR))

    first = runner.start(config, tmp_path, trainer_cache, ONE_THREAD)
    log = _run_until(first, "step 4/8 ", signal.SIGKILL)

    assert "class images: 6 of 6 to make" in log, log
    images = output / "class-images"
    assert sorted(p.name for p in images.iterdir()) == [
        "00000.png",
        "00001.png",
        "00002.png",
        "00003.png",
        "00004.png",
        "00005.png",
        "difftrain.json",
    ]
    record = json.loads((images / "difftrain.json").read_text())
    assert (record["classPrompt"], record["count"], record["seed"]) == ("a photo of a shape", 6, 11)
    # Mark one image (a remade one would lose the mark) and lose another.
    Image.new("RGB", (32, 32), (255, 0, 255)).save(images / "00002.png")
    original = _pixels(images / "00005.png")
    (images / "00005.png").unlink()

    code, log = runner.run(config, tmp_path, trainer_cache, ONE_THREAD)

    assert code == 0, log
    assert "class images: 1 of 6 to make" in log
    assert "resumed from checkpoint step 3" in log
    assert _pixels(images / "00002.png").unique().tolist() == [0, 255]  # still the mark
    assert (_pixels(images / "00005.png") - original).abs().max() <= 2  # the same seed
    card = (output / "model" / "README.md").read_text()
    assert "| Instance prompt | a photo of sks shape |" in card
    assert "| Prior preservation | 6 class images of a photo of a shape, weight 1.0 |" in card

    pipeline = build_preset("tiny-sd")
    pipeline.set_progress_bar_config(disable=True)
    before = _sample(pipeline)
    pipeline.load_lora_weights(output / "model")
    assert (_sample(pipeline) - before).abs().max() > 1e-3


def _sample(pipeline) -> torch.Tensor:
    images = pipeline(
        "a photo of sks shape",
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    return images[0]


def _final_loras(tmp_path, trainer_cache, instance_folder, settings: list[dict]):
    """The final LoRA weights of a short run for each DreamBooth settings, and the first
    run's log; the runs share the cores."""
    runs = []
    for index, dreambooth in enumerate(settings):
        folder = tmp_path / f"run{index}"
        folder.mkdir()
        spec = _spec(folder / "out", instance_folder, dreambooth)
        spec["training"] = {"steps": 3, "batchSize": 2}
        runs.append((runner.write_config(folder, spec), folder, trainer_cache, ONE_THREAD))
    results = runner.run_together(runs)
    assert [code for code, _ in results] == [0] * len(runs), results
    weights = [
        load_file(folder / "out" / "model" / "pytorch_lora_weights.safetensors")
        for _, folder, _, _ in runs
    ]
    return weights, results[0][1]


def test_the_prior_term_changes_training(tmp_path, trainer_cache, instance_folder, shapes_folder):
    settings = {**PRIOR, "classData": f"file://{shapes_folder}"}
    black = tmp_path / "black"
    black.mkdir()
    for index in range(6):
        Image.new("RGB", (32, 32)).save(black / f"{index}.png")

    (weighted, ignored, other), log = _final_loras(
        tmp_path,
        trainer_cache,
        instance_folder,
        [
            settings,
            {**settings, "priorLossWeight": 0},
            {**settings, "classData": f"file://{black}"},
        ],
    )

    assert "class images:" not in log  # given, not made
    assert weighted.keys() == ignored.keys() == other.keys()
    assert any(not torch.equal(weighted[k], ignored[k]) for k in weighted)  # the term counts
    assert any(not torch.equal(weighted[k], other[k]) for k in weighted)  # its images count


def test_full_unet_and_text_encoder_export_a_pipeline(tmp_path, trainer_cache, instance_folder):
    output = tmp_path / "out"
    settings = {"instancePrompt": "a photo of sks shape", "unet": "full", "trainTextEncoder": True}
    spec = _spec(output, instance_folder, settings)
    spec["training"] = {"steps": 2, "batchSize": 2, "learningRate": 1e-3}
    del spec["lora"]
    config = runner.write_config(tmp_path, spec)

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 0, log
    checkpoint = load_file(output / "checkpoints" / "step-00000002" / "trainable.safetensors")
    assert {key.split(".")[0] for key in checkpoint} == {"unet", "text_encoder"}
    from diffusers import StableDiffusionPipeline

    trained = StableDiffusionPipeline.from_pretrained(output / "model", safety_checker=None)
    base = build_preset("tiny-sd")
    for part in ("unet", "text_encoder"):
        new, old = getattr(trained, part).state_dict(), getattr(base, part).state_dict()
        assert any(not torch.equal(new[k], old[k]) for k in old), part
    assert type(trained.scheduler).__name__ == type(base.scheduler).__name__


def test_two_processes_share_the_class_images(tmp_path, trainer_cache, instance_folder):
    single = tmp_path / "single"
    single.mkdir()
    settings = {**PRIOR, "numClassImages": 4}
    spec = _spec(single / "out", instance_folder, settings)
    spec["training"] = {"steps": 1, "batchSize": 2}
    code, log = runner.run(runner.write_config(single, spec), single, trainer_cache, ONE_THREAD)
    assert code == 0, log
    output = tmp_path / "out"
    spec = {**spec, "output": {"uri": f"file://{output}"}, "resources": {"nodes": 2}}
    config = runner.write_config(tmp_path, spec)
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "difftrain.launch",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
    ]
    # As difftrain run on a terminal: the bars of the node's first process alone.
    progress = {**ONE_THREAD, "DIFFTRAIN_PROGRESS": "1"}
    env = runner.trainer_env(config, tmp_path, trainer_cache, progress)

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stdout + done.stderr
    log = done.stdout + done.stderr
    assert re.search(r"class images: 4 of 4 to make, 2 by each of 2 processes", log), log
    lines = log.splitlines()
    assert sum(line.startswith("class images:   0%") for line in lines) == 1, log
    assert any(line.startswith("class images: 100%") and "2/2" in line for line in lines)
    for index in range(4):
        name = f"{index:05d}.png"
        alone = _pixels(single / "out" / "class-images" / name)
        shared = _pixels(output / "class-images" / name)
        assert (alone - shared).abs().max() <= 2, name  # image i comes from seed classSeed + i


@pytest.mark.parametrize(
    ("count", "readable", "message"),
    [
        pytest.param(
            1,
            True,
            "1 class images are fewer than one batch for each of 1 processes "
            "(spec.training.batchSize 2); raise spec.dreambooth.numClassImages",
            id="too-few",
        ),
        pytest.param(
            6, False, "no readable class images; add images or remove it", id="unreadable"
        ),
    ],
)
def test_bad_class_data_fails_before_training(
    tmp_path, trainer_cache, instance_folder, count, readable, message
):
    classes = tmp_path / "classes"
    classes.mkdir()
    for name in ("a.png", "b.png")[:count]:
        if readable:
            Image.new("RGB", (32, 32)).save(classes / name)
        else:
            (classes / name).write_bytes(b"not an image")
    settings = {**PRIOR, "numClassImages": count, "classData": f"file://{classes}"}
    config = runner.write_config(tmp_path, _spec(tmp_path / "out", instance_folder, settings))

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 3, log
    reason = json.loads((tmp_path / "termination-log").read_text())
    assert message in reason["message"], reason
    assert "step 1/" not in log


def test_without_an_instance_prompt_the_trainer_exits_2(tmp_path, trainer_cache, instance_folder):
    spec = _spec(tmp_path / "out", instance_folder, {"classPrompt": "a photo of a shape"})
    config = runner.write_config(tmp_path, {"dataset": spec["dataset"]})
    job = json.loads(config.read_text())
    job["spec"].update(method="dreambooth", dreambooth=spec["dreambooth"])
    config.write_text(json.dumps(job))

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 2, log
    reason = json.loads((tmp_path / "termination-log").read_text())
    assert "spec.dreambooth.instancePrompt" in reason["message"], reason


def test_each_instance_batch_is_followed_by_a_class_batch_of_its_size():
    def batches(count, seed):
        return data.Batches(
            ((16, 8),) * count, repeats=1, batch_size=2, world_size=1, rank=0, seed=seed
        )

    paired = WithPrior(batches(4, 1), batches(6, 2), offset=4)
    epochs = [list(paired.epoch(e)) for e in range(3)]  # 2 instance batches, 3 class batches

    class_keys = [key for epoch in epochs for keys in epoch for key in keys[2:]]
    assert all(len(keys) == 4 for epoch in epochs for keys in epoch)
    assert {key[0] for key in class_keys} == {4, 5, 6, 7, 8, 9}  # after the instance images
    assert {key[2:] for key in class_keys} == {(16, 8)}
    # Three instance epochs of two batches walk through the class images twice.
    assert sorted(k[0] for k in class_keys[:6]) == sorted(k[0] for k in class_keys[6:])
    assert list(paired.epoch(2, start=1)) == epochs[2][1:]  # resuming mid-epoch
