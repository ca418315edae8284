"""Sharded training (strategy fsdp) on two torchrun nodes over gloo: the losses and EMA
of replicated training, sharded checkpoints that resume exactly, and a whole model out."""

import concurrent.futures
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests import evaluators
from tests.trainer import runner
from tests.trainer.test_resume import ONE_THREAD

STEPS = 6


def _spec(shapes_folder, output, strategy: str, steps: int = STEPS) -> dict:
    return {
        "method": "finetune",
        "model": {"base": "preset:tiny-flux"},
        "dataset": {"uri": f"file://{shapes_folder}", "resolution": 32},
        "output": {"uri": f"file://{output}", "dtype": "fp32"},
        "training": {
            "steps": steps,
            "batchSize": 2,
            "learningRate": 1e-3,
            "strategy": strategy,
            "gradientAccumulationSteps": 2,
            "maxGradNorm": 1.0,
            # constant: a run told to stop at step 3, then to go on to 6, must have the
            # learning rates of one that ran to 6 (a cosine's depend on the last step)
            "scheduler": {"type": "constant", "warmupRatio": 0},
            # exported: the averages, sharded as their parameters (a low decay, so they
            # differ from the last weights)
            "ema": {"enabled": True, "decay": 0.5},
        },
        "checkpoints": {"everySteps": 3},
        "validation": {"prompts": ["a red circle"], "everySteps": 3, "inferenceSteps": 2},
        "resources": {"nodes": 2},
    }


def _train(folder, spec) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    config = runner.write_config(folder, spec)
    nodes = runner.start_nodes(config, folder, ONE_THREAD)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = [pool.submit(node.communicate, timeout=300) for node in nodes]
        logs = [done.result()[0] for done in running]
    assert [node.returncode for node in nodes] == [0, 0], logs
    return logs


def _losses(output) -> list[float]:
    return [json.loads(line)["loss"] for line in (output / "metrics.jsonl").open()]


def _transformer(output) -> dict[str, torch.Tensor]:
    return load_file(output / "model" / "transformer" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, shapes_folder):
    """A sharded run of STEPS steps, and its output."""
    folder = tmp_path_factory.mktemp("fsdp")
    logs = _train(folder, _spec(shapes_folder, folder / "out", "fsdp"))
    return folder / "out", logs


def test_sharded_training_has_the_losses_of_replicated_training(sharded, tmp_path, shapes_folder):
    output, logs = sharded
    _train(tmp_path, _spec(shapes_folder, tmp_path / "out", "ddp"))

    assert "FluxTransformer2DModel sharded across 2 processes (3 blocks)" in logs[0]
    # samples of the sharded model, made by both processes, written once
    assert (output / "samples" / "step-00000003" / "grid.png").is_file()
    assert [log.count("samples written to") for log in logs] == [2, 0]
    replicated = _losses(tmp_path / "out")
    losses = _losses(output)
    assert len(losses) == STEPS
    assert losses == pytest.approx(replicated, rel=1e-4)
    expected, got = _transformer(tmp_path / "out"), _transformer(output)
    assert expected.keys() == got.keys()
    assert all(torch.allclose(expected[k], got[k], rtol=1e-3, atol=1e-5) for k in got)


def test_sharded_checkpoints_hold_each_process_part_and_resume_exactly(
    sharded, tmp_path, shapes_folder
):
    output, _ = sharded
    files = {p.name for p in (output / "checkpoints" / "step-00000003" / "shards").iterdir()}
    assert files == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    assert not (output / "checkpoints" / "step-00000003" / "trainable.safetensors").exists()

    # A run stopped after step 3's checkpoint (that of the run above: its learning rate
    # is constant, so the first three steps are those of a run told to stop at 3), then
    # started again to go on to step 6.
    resumed = tmp_path / "out"
    step = "checkpoints/step-00000003"
    shutil.copytree(output / step, resumed / step)
    logs = _train(tmp_path, _spec(shapes_folder, resumed, "fsdp"))

    assert "resumed from checkpoint step 3" in logs[0]
    expected, got = _transformer(output), _transformer(resumed)
    assert all(torch.equal(expected[k], got[k]) for k in got)
    from diffusers import FluxPipeline

    pipeline = FluxPipeline.from_pretrained(resumed / "model")
    assert type(pipeline.transformer).__name__ == "FluxTransformer2DModel"


def test_a_unets_sharded_checkpoints_go_to_s3_and_come_back(
    tmp_path, shapes_folder, s3_env, bucket
):
    """A UNet family shards by its down, mid and up blocks; its shards go to S3, a later
    run resumes from them, and the model it exports there loads."""
    from diffusers import StableDiffusionXLPipeline

    from difftrain.errors import InvalidSpec
    from difftrain.storage import S3Settings, open_store

    uri = f"s3://{bucket}/runs/fsdp"
    spec = _spec(shapes_folder, tmp_path / "unused", "fsdp", steps=2)
    spec["model"] = {"base": "preset:tiny-sdxl"}
    spec["output"] = {"uri": uri, "dtype": "fp32"}
    spec["storage"] = {"endpoint": s3_env.endpoint, "pathStyle": True}
    spec["checkpoints"] = {"everySteps": 2}
    spec["validation"] = {}  # samples are not what this checks
    logs = _train(tmp_path / "first", spec)
    assert "UNet2DConditionModel sharded across 2 processes (5 blocks)" in logs[0]
    spec["training"]["steps"] = 4

    logs = _train(tmp_path / "second", spec)

    assert "resumed from checkpoint step 2" in logs[0]
    store = open_store(uri, S3Settings(endpoint=s3_env.endpoint, path_style=True))
    shards = sorted(store.keys("checkpoints/step-00000002/shards/"))
    assert [key.rsplit("/", 1)[1] for key in shards] == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    assert store.exists("checkpoints/step-00000004/COMPLETE")
    store.download_tree("model/", tmp_path / "model", unsafe_error=InvalidSpec)
    pipeline = StableDiffusionXLPipeline.from_pretrained(tmp_path / "model")
    assert pipeline.unet.config.addition_embed_type == "text_time"


def test_a_sharded_model_evaluates_as_a_whole_one_does(
    tmp_path, shapes_folder, trainer_cache, inception, clip_folder
):
    """Shares of 3 images and 3 held-out images on two processes: the shorter one pads
    its share, so both make the same forward passes of the sharded model. With a
    learning rate too small to move the weights, the scores equal one process's."""
    evaluation = evaluators.all_scores(
        shapes_folder,
        inception,
        clip_folder,
        numImages=3,
        inferenceSteps=2,
        validationLoss={"fraction": 0.1, "timesteps": 2},
    )
    results = {}
    for strategy, nodes in (("fsdp", 2), ("ddp", 1)):
        folder = tmp_path / strategy
        spec = _spec(shapes_folder, folder / "out", strategy, steps=1)
        spec["training"]["learningRate"] = 1e-12
        spec["resources"]["nodes"] = nodes
        spec.update(evaluation=evaluation, validation={})
        if nodes == 2:
            logs = _train(folder, spec)
        else:
            folder.mkdir()
            code, log = runner.run(runner.write_config(folder, spec), folder, trainer_cache)
            assert code == 0, log
            logs = [log]
        result = folder / "out" / "model" / "evaluation.json"
        results[strategy] = json.loads(result.read_text()), logs

    (sharded, sharded_logs), (whole, _) = results["fsdp"], results["ddp"]
    assert "evaluation: 2 of its 3 images made by this process" in sharded_logs[0]
    assert "evaluation: 1 of its 3 images made by this process" in sharded_logs[1]
    for key in ("fid", "clipScore", "validationLoss"):
        assert sharded[key] == pytest.approx(whole[key], rel=1e-4), key
