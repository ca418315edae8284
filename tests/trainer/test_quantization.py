"""A frozen base in int8 or nf4 under trained adapters: smaller weights, first losses
close to the full-precision run's, adapters that load into the ordinary model; fp8 is
refused where it cannot run."""

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


@pytest.mark.parametrize(
    ("kind", "size", "error"),
    # measured on tiny-flux: int8 0.28 of the size, nf4 0.14, outputs 2% and 13% off
    [("int8", 0.4, 0.05), ("nf4", 0.2, 0.25)],
)
def test_quantized_weights_are_smaller_and_still_run(kind, size, error):
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

    quantization.quantize(transformer, kind, torch.device("cpu"), "transformer")

    after = quantization.weight_bytes(transformer)
    assert after < size * before, (before, after)
    with torch.no_grad():
        quantized = transformer(**inputs)[0]
    assert not torch.equal(quantized, full)
    assert (quantized - full).abs().max() < error * full.abs().max()


def test_quantized_bases_train_like_the_full_one_and_their_lora_loads(
    tmp_path, trainer_cache, shapes_folder
):
    runs = []
    for name, kind in (("full", None), ("int8", "int8"), ("nf4", "nf4")):
        folder = tmp_path / name
        folder.mkdir()
        config = runner.write_config(folder, _spec(tmp_path, shapes_folder, name, kind))
        runs.append((config, folder, trainer_cache, ONE_THREAD))

    results = runner.run_together(runs)

    for code, log in results:
        assert code == 0, log
    full = _losses(tmp_path / "full")
    # measured over six steps: int8 within 5e-5 of the full run's losses, nf4 within 6e-3
    for (_, log), kind, tolerance in zip(results[1:], ("int8", "nf4"), (1e-3, 1e-2), strict=True):
        assert f"the frozen transformer in {kind}:" in log
        assert f"the frozen text_encoder_2 in {kind}:" in log  # T5, which never trains
        quantized = _losses(tmp_path / kind)
        assert quantized != full  # the base really was quantized
        assert all(abs(q - f) < tolerance * f for q, f in zip(quantized, full, strict=True)), (
            kind,
            full,
            quantized,
        )
        pipeline = build_preset("tiny-flux")  # the ordinary model, not quantized
        pipeline.load_lora_weights(tmp_path / kind / "model")
        assert pipeline.transformer.peft_config


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        (
            "fp8",
            "spec.model.quantization: fp8 needs a GPU (compute capability 8.9 or later) and "
            "this job trains on CPUs; use int8, which any device runs",
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


def test_two_nodes_train_adapters_on_a_quantized_base(tmp_path, shapes_folder, trainer_cache):
    # DDP broadcasts a model's weights when it wraps it; quantized ones it cannot, so they
    # are kept out of its sync (every node quantizes the same base the same way). Any
    # tensor subclass is kept out alike: nf4 passed this too, left out for the suite's time.
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


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_a_quantized_unet_base_trains_under_bf16_autocast_on_a_cpu(
    tmp_path, shapes_folder, trainer_cache, kind
):
    """The quantized base's norms and biases stay fp32: CPU autocast leaves GroupNorm's
    input in fp32 beside quantized layers, and a bf16 norm weight there is a dtype error."""
    spec = _spec(tmp_path, shapes_folder, "int8-bf16", kind)
    spec["model"]["base"] = "preset:tiny-sd"
    spec["training"] |= {"steps": 2, "mixedPrecision": "bf16"}

    code, log = runner.run(
        runner.write_config(tmp_path, spec, name="int8-bf16"), tmp_path, trainer_cache
    )

    assert code == 0, log
    assert f"the frozen unet in {kind}:" in log
    assert "the frozen base under the adapters" not in log
    assert len(_losses(tmp_path / "int8-bf16")) == 2
