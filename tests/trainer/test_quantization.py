"""A frozen base in int8 under trained adapters: smaller weights, first losses close to
the full-precision run's, adapters that load into the ordinary model; fp8 and nf4 are
refused where they cannot run."""

import concurrent.futures
import json

import pytest
import torch

from difftrain.trainer import quantization
from difftrain.trainer.presets import build_preset
from tests.trainer import runner
from tests.trainer.test_resume import ONE_THREAD


def _spec(tmp_path, shapes_folder, name: str, quantize: str | None) -> dict:
    model = {"base": "preset:tiny-flux"}
    if quantize:
        model["quantization"] = quantize
    return {
        "model": model,
        "dataset": {"uri": f"file://{shapes_folder}", "resolution": 32},
        "output": {"uri": f"file://{tmp_path}/{name}", "dtype": "fp32"},
        "lora": {"rank": 4},
        "training": {"steps": 6, "batchSize": 4, "learningRate": 1e-3, "seed": 5},
    }


def _losses(folder) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").open()]


def test_int8_weights_are_a_third_of_the_size_and_still_run():
    pipeline = build_preset("tiny-flux")
    transformer = pipeline.transformer
    before = quantization.weight_bytes(transformer)
    inputs = {
        "hidden_states": torch.randn(1, 16, 64),
        "encoder_hidden_states": torch.randn(1, 4, 80),
        "pooled_projections": torch.randn(1, 32),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([1.0]),
        "txt_ids": torch.zeros(4, 3),
        "img_ids": torch.zeros(16, 3),
        "return_dict": False,
    }
    with torch.no_grad():
        full = transformer(**inputs)[0]

    quantization.quantize(transformer, "int8", torch.device("cpu"), "transformer")

    after = quantization.weight_bytes(transformer)
    assert after < 0.4 * before, (before, after)
    with torch.no_grad():
        quantized = transformer(**inputs)[0]
    assert not torch.equal(quantized, full)
    assert (quantized - full).abs().max() < 0.05 * full.abs().max()


def test_an_int8_base_trains_like_the_full_one_and_its_lora_loads(
    tmp_path, trainer_cache, shapes_folder
):
    runs = []
    for name, kind in (("full", None), ("int8", "int8")):
        folder = tmp_path / name
        folder.mkdir()
        config = runner.write_config(folder, _spec(tmp_path, shapes_folder, name, kind))
        runs.append((config, folder, trainer_cache, ONE_THREAD))

    (full_code, full_log), (code, log) = runner.run_together(runs)

    assert full_code == 0, full_log
    assert code == 0, log
    assert "the frozen transformer in int8:" in log
    assert "the frozen text_encoder_2 in int8:" in log  # T5, which never trains
    full, quantized = _losses(tmp_path / "full"), _losses(tmp_path / "int8")
    assert quantized != full  # the base really was quantized
    # measured: within 6e-5 of each other over six steps
    assert all(abs(q - f) < 1e-3 * f for q, f in zip(quantized, full, strict=True)), (
        full,
        quantized,
    )
    pipeline = build_preset("tiny-flux")  # the ordinary model, not quantized
    pipeline.load_lora_weights(tmp_path / "int8" / "model")
    assert pipeline.transformer.peft_config


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        (
            "fp8",
            "spec.model.quantization: fp8 needs a GPU (compute capability 8.9 or later) and "
            "this job trains on CPUs; use int8, which any device runs",
        ),
        (
            "nf4",
            "spec.model.quantization: nf4 is not available in this trainer version; use int8 "
            "(or fp8 on a GPU of compute capability 8.9 or later)",
        ),
    ],
)
def test_formats_the_device_cannot_run_are_refused_before_training(
    tmp_path, trainer_cache, shapes_folder, kind, message
):
    config = runner.write_config(tmp_path, _spec(tmp_path, shapes_folder, "out", kind))

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 2, log
    assert json.loads((tmp_path / "termination-log").read_text())["message"] == message
    assert "step 1/" not in log
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_two_nodes_train_adapters_on_an_int8_base(tmp_path, shapes_folder, trainer_cache):
    # DDP broadcasts a model's weights when it wraps it; quantized ones it cannot, so they
    # are kept out of its sync (every node quantizes the same base the same way).
    spec = _spec(tmp_path, shapes_folder, "out", "int8")
    spec["training"] = {"steps": 4, "batchSize": 2}
    spec["resources"] = {"nodes": 2}
    config = runner.write_config(tmp_path, spec)

    nodes = runner.start_nodes(config, tmp_path)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        logs = [
            done.result()[0] for done in [pool.submit(n.communicate, timeout=300) for n in nodes]
        ]

    assert [node.returncode for node in nodes] == [0, 0], logs
    pipeline = build_preset("tiny-flux")
    pipeline.load_lora_weights(tmp_path / "out" / "model")
    assert pipeline.transformer.peft_config


def test_an_int8_unet_base_trains_under_bf16_autocast_on_a_cpu(
    tmp_path, shapes_folder, trainer_cache
):
    """The quantized base's norms and biases stay fp32: CPU autocast leaves GroupNorm's
    input in fp32 beside int8 layers, and a bf16 norm weight there is a dtype error."""
    spec = _spec(tmp_path, shapes_folder, "int8-bf16", "int8")
    spec["model"]["base"] = "preset:tiny-sd"
    spec["training"] |= {"steps": 2, "mixedPrecision": "bf16"}

    code, log = runner.run(
        runner.write_config(tmp_path, spec, name="int8-bf16"), tmp_path, trainer_cache
    )

    assert code == 0, log
    assert "the frozen base under the adapters" not in log
    assert len(_losses(tmp_path / "int8-bf16")) == 2
