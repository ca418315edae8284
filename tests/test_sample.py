"""``difftrain sample`` on a real LoRA run (read from the local S3 server and from disk),
on diffusers folders in each mode, and on every bad input it names."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from difftrain.cli import main
from difftrain.storage import S3Settings, open_store
from difftrain.trainer.presets import write_preset


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """Base models fetched by the command stay in a folder of the session."""
    monkeypatch.setenv("DIFFTRAIN_CACHE", str(tmp_path_factory.getbasetemp() / "sample-cache"))


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return write_preset("tiny-sd", tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """A 32 px init image, a mask of its size, and a mask of another size."""
    folder = tmp_path_factory.mktemp("pictures")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / "init.png")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    mask.save(folder / "mask.png")
    Image.new("L", (16, 16), 0).save(folder / "small-mask.png")
    (folder / "notes.png").write_text("not a picture")
    return folder


def _sample(capsys, *args) -> tuple[int, str, str]:
    code = main(["sample", *args])
    said = capsys.readouterr()
    return code, said.out, said.err


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_a_lora_jobs_output_on_s3_samples_its_base_with_the_lora(
    tmp_path, capsys, two_runs, s3_env, bucket, tiny_sd
):
    settings = S3Settings(endpoint=s3_env.endpoint, path_style=True)
    open_store(f"s3://{bucket}/runs/a", settings).upload_tree(two_runs[0], "")
    out = tmp_path / "out"

    code, said, err = _sample(
        capsys,
        f"s3://{bucket}/runs/a",
        "--prompt",
        "a green star",
        "--steps",
        "2",
        "--seed",
        "5",
        "-n",
        "2",
        "-o",
        str(out),
    )

    assert code == 0, err
    assert "wrote 2 image(s)" in said
    summary = json.loads((out / "samples.json").read_text())
    assert summary["mode"] == "text-to-image"
    assert summary["pipeline"] == "StableDiffusionPipeline"
    assert summary["images"] == [
        {"file": "000-seed5.png", "seed": 5},
        {"file": "001-seed6.png", "seed": 6},
    ]
    assert summary["size"] == [32, 32]  # the job's resolution
    assert len(summary["modelDigest"]) == 64
    assert Image.open(out / "grid.png").size == (64, 32)
    # The same image as diffusers makes from the base with the job's LoRA.
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipeline.load_lora_weights(two_runs[0] / "model")
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(
        "a green star",
        height=32,
        width=32,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(6),
    ).images[0]
    assert np.array_equal(_pixels(out / "001-seed6.png"), np.asarray(expected))


def test_a_loras_weight_changes_the_image_and_the_digest(tmp_path, capsys, two_runs, tiny_sd):
    lora = two_runs[1] / "model" / "pytorch_lora_weights.safetensors"
    made = {}
    for name, extra in (("base", []), ("lora", ["--lora", f"{lora}:1.0"])):
        out = tmp_path / name
        code, _, err = _sample(
            capsys, str(tiny_sd), "--prompt", "a red circle", "--steps", "2",
            "--size", "32", "-o", str(out), *extra,
        )  # fmt: skip
        assert code == 0, err
        summary = json.loads((out / "samples.json").read_text())
        made[name] = (_pixels(out / "000-seed0.png"), summary)
    assert not np.array_equal(made["base"][0], made["lora"][0])
    assert made["base"][1]["modelDigest"] != made["lora"][1]["modelDigest"]
    assert made["lora"][1]["loras"] == [{"file": str(lora), "weight": 1.0}]


@pytest.mark.parametrize(
    ("extra", "pipeline"),
    [
        (["--strength", "0.5"], "StableDiffusionImg2ImgPipeline"),
        (["--mask", "mask.png"], "StableDiffusionInpaintPipeline"),
    ],
)
def test_an_init_image_chooses_image_to_image_and_a_mask_inpainting(
    tmp_path, capsys, tiny_sd, pictures, extra, pipeline
):
    extra = [str(pictures / e) if e.endswith(".png") else e for e in extra]

    code, _, err = _sample(
        capsys, str(tiny_sd), "--prompt", "a red circle", "--steps", "4",
        "--image", str(pictures / "init.png"), "-o", str(tmp_path), *extra,
    )  # fmt: skip

    assert code == 0, err
    summary = json.loads((tmp_path / "samples.json").read_text())
    assert summary["pipeline"] == pipeline
    assert summary["size"] == [32, 32]
    assert Image.open(tmp_path / "000-seed0.png").size == (32, 32)


def test_an_embedding_is_loaded_under_its_token(tmp_path, capsys, tiny_sd):
    file = tmp_path / "shape.safetensors"
    save_file({"<shape>": torch.randn(2, 32)}, file)

    code, _, err = _sample(
        capsys, str(tiny_sd), "--embedding", str(file), "--prompt", "a <shape>",
        "--steps", "2", "--size", "32", "-o", str(tmp_path / "out"),
    )  # fmt: skip

    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert summary["embeddings"] == [{"file": str(file), "token": "<shape>"}]


def _sag(folder, tiny_sd):
    """tiny_sd's weights under a pipeline class that has no image-to-image sibling."""
    import shutil

    shutil.copytree(tiny_sd, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionSAGPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_bad_inputs_are_named(tmp_path, capsys, two_runs, tiny_sd, pictures):
    lora = two_runs[0] / "model" / "pytorch_lora_weights.safetensors"
    wide = tmp_path / "wide.safetensors"
    save_file({"<wide>": torch.randn(1, 768)}, wide)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    record = json.loads((two_runs[0] / "model" / "difftrain.json").read_text())
    record["spec"]["model"]["base"] = "s3://redacted/models/sd"
    (adapter / "difftrain.json").write_text(json.dumps(record))
    init, mask = str(pictures / "init.png"), str(pictures / "mask.png")
    cases = [
        (
            ["--image", init, "--mask", str(pictures / "small-mask.png")],
            f"--mask: {pictures}/small-mask.png is 16x16 but --image {init} is 32x32; "
            "they must be the same size",
        ),
        (["--mask", mask], "--mask: inpainting needs --image"),
        (["--image", str(pictures / "notes.png")], "is not an image PIL can read"),
        (["--image", str(tmp_path / "gone.png")], f"--image: {tmp_path}/gone.png does not exist"),
        (["--image", init, "--strength", "0"], "--strength: must be in (0, 1], got 0.0"),
        (["-n", "0"], "-n: must be at least 1, got 0"),
        (["--size", "30"], "--size: must be a multiple of 8, got 30"),
        (["--lora", f"{lora}:strong"], "the weight after ':' must be a number (FILE:0.8)"),
        (["--lora", str(tmp_path / "none.safetensors")], "--lora: "),
        (
            ["--embedding", str(wide)],
            f"--embedding {wide}: its vectors are 768 wide, but text_encoder of this "
            "StableDiffusionPipeline model embeds tokens in 32; it was trained for another model",
        ),
    ]
    for extra, message in cases:
        code, _, err = _sample(
            capsys, str(tiny_sd), "--prompt", "x", "--steps", "2", "-o", str(tmp_path), *extra
        )
        assert code == 2 and message in err, (extra, err)
    models = [
        (
            ["preset:tiny-sdxl", "--lora", str(lora)],
            f"--lora {lora}: it does not fit this StableDiffusionXLPipeline model (trained "
            "for another family or size?): size mismatch for",
        ),
        (
            [str(_sag(tmp_path / "sag", tiny_sd)), "--image", init],
            "--image: diffusers has no image-to-image pipeline for a "
            "StableDiffusionSAGPipeline model; sample it text-to-image",
        ),
        ([str(tmp_path / "empty")], f"MODEL: {tmp_path}/empty holds no model"),
        ([str(adapter)], "its record does not keep (s3://redacted/models/sd); name the base"),
    ]
    (tmp_path / "empty").mkdir()
    for args, message in models:
        code, _, err = _sample(capsys, *args, "--prompt", "x", "--steps", "2", "-o", str(tmp_path))
        assert code == 2 and message in err, (args, err)
