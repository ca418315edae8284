"""The cache of latents and text embeddings (features.py): filled by the first job, found
filled by the next, exact (the losses of a run without it), rebuilt where a shard is
corrupt, shared through S3 by the nodes of a job, and never in the way of training."""

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from difftrain.shapes import write_dataset
from tests.builders import merge
from tests.trainer import runner
from tests.trainer.test_resume import ONE_THREAD

STEPS = 6
BATCH = 4
DRAWN = STEPS * BATCH  # samples a run draws


def spec(tmp_path: Path, name: str, cache: dict, **extra) -> dict:
    """A job over ``tmp_path/data``, writing ``tmp_path/NAME``."""
    return merge(
        {
            "dataset": {
                "uri": f"file://{tmp_path / 'data'}",
                "centerCrop": True,
                "randomFlip": True,
                "captionDropout": 0.3,
            },
            "output": {"uri": f"file://{tmp_path / name}"},
            "training": {"steps": STEPS, "batchSize": BATCH},
            "cache": cache,
        },
        extra,
    )


def train(tmp_path: Path, name: str, trainer_cache, cache: dict, **extra) -> tuple[int, str]:
    folder = tmp_path / f"{name}-work"
    folder.mkdir()
    config = runner.write_config(folder, spec(tmp_path, name, cache, **extra), name)
    return runner.run(config, folder, trainer_cache, ONE_THREAD)


def computed(log: str) -> dict[str, int]:
    """Entries computed before the first step, by kind (the log's cache lines)."""
    found = re.findall(r"cache: \d+ (\w+) entries at \S+.*; computing (\d+) here", log)
    return {kind: int(count) for kind, count in found}


def encoded(log: str) -> tuple[int, int]:
    """Images and captions the steps encoded themselves."""
    match = re.search(r"the steps encoded (\d+) images and (\d+) captions", log)
    assert match, log
    return int(match[1]), int(match[2])


def losses(output: Path) -> list[float]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.fixture(scope="module")
def first(tmp_path_factory, trainer_cache):
    """A first job over a fresh cache: (its folder, the cache folder, its log)."""
    folder = tmp_path_factory.mktemp("first")
    write_dataset(folder / "data", count=24, size=32)
    cache = folder / "cache"
    code, log = train(folder, "a", trainer_cache, {"uri": f"file://{cache}"})
    assert code == 0, log
    return folder, cache, log


def test_the_first_job_fills_the_cache_and_trains_on_it(first):
    _, cache, log = first
    filled = computed(log)
    # One latent per drawn (image, flip); the distinct captions drawn, "" among them.
    assert 0 < filled["latents"] <= DRAWN and 0 < filled["text"] <= DRAWN, log
    assert encoded(log) == (0, 0)  # the steps took every sample from the cache
    shards = sorted(cache.rglob("*.safetensors"))
    assert shards and all(hashlib.sha256(p.read_bytes()).hexdigest() == p.stem for p in shards)


def test_a_second_job_finds_it_filled_and_a_run_without_it_has_the_same_losses(
    first, trainer_cache
):
    folder, cache, _ = first
    runs = {
        "b": {"uri": f"file://{cache}"},  # another job, the same cache
        "c": {"latents": False, "textEmbeddings": False},  # no cache
    }
    configs = []
    for name, settings in runs.items():
        work = folder / f"{name}-work"
        work.mkdir()
        configs.append(runner.write_config(work, spec(folder, name, settings), name))
    (code_b, log_b), (code_c, log_c) = runner.run_together(
        [(config, config.parent, trainer_cache, ONE_THREAD) for config in configs]
    )
    assert code_b == 0 and code_c == 0, (log_b, log_c)

    assert computed(log_b) == {"latents": 0, "text": 0}, log_b  # no VAE or text-encoder work
    assert encoded(log_b) == (0, 0), log_b
    assert computed(log_c) == {} and encoded(log_c) == (DRAWN, DRAWN), log_c
    a, b, c = (losses(folder / name) for name in "abc")
    assert len(a) == STEPS and a == b
    assert c == pytest.approx(a, rel=1e-5, abs=1e-7)


def test_a_corrupt_shard_is_found_deleted_and_rebuilt(first, trainer_cache, tmp_path):
    folder, cache, _ = first
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    shard = next(p for p in copy.rglob("*.safetensors") if "/latents/" in str(p))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one byte of some latent, the size unchanged
    shard.write_bytes(bytes(raw))

    code, log = train(folder, "d", trainer_cache, {"uri": f"file://{copy}"})

    assert code == 0, log
    assert f"{shard.name} is corrupt or incomplete" in log
    assert computed(log)["latents"] > 0 and computed(log)["text"] == 0, log
    assert encoded(log) == (0, 0), log
    # Its entries are computed alone, so the same ones make the same bytes: the rebuilt
    # shard may well have the corrupt one's name, but it holds what its name says.
    shards = list(copy.rglob("*.safetensors"))
    assert all(hashlib.sha256(p.read_bytes()).hexdigest() == p.stem for p in shards)
    assert losses(folder / "d") == losses(folder / "a")  # never trained on the bad bytes


def test_random_crops_and_trained_text_encoders_are_not_served_from_the_cache(
    tmp_path, trainer_cache
):
    data = tmp_path / "data"
    data.mkdir()
    for index in range(8):  # wider than square: a random crop moves with the seed
        Image.new("RGB", (48, 32), (40 * index, 90, 160)).save(data / f"{index}.png")
        (data / f"{index}.txt").write_text(f"a wide picture {index}")
    cache = {"uri": f"file://{tmp_path / 'cache'}"}

    code, log = train(
        tmp_path,
        "wide",
        trainer_cache,
        cache,
        dataset={"centerCrop": False, "randomFlip": False, "captionDropout": 0.0},
        lora={"trainTextEncoder": True},
    )

    assert code == 0, log
    assert computed(log) == {"latents": 0}, log  # no random crop cached, no text at all
    assert encoded(log) == (DRAWN, DRAWN), log


def test_a_cache_that_cannot_be_written_is_a_warning_and_training_goes_on(tmp_path, trainer_cache):
    write_dataset(tmp_path / "data", count=8, size=32)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")

    code, log = train(tmp_path, "out", trainer_cache, {"uri": f"file://{blocker}/cache"})

    assert code == 0, log
    assert f"cache: cannot write file://{blocker}/cache" in log
    assert encoded(log) == (DRAWN, DRAWN), log
    assert len(losses(tmp_path / "out")) == STEPS


def test_the_nodes_of_a_job_fill_an_s3_cache_together(tmp_path, s3_env, bucket):
    write_dataset(tmp_path / "data", count=24, size=32)
    job = merge(
        spec(tmp_path, "out", {"uri": f"s3://{bucket}/cache"}),
        {
            "storage": {"endpoint": s3_env.endpoint, "pathStyle": True},
            "resources": {"nodes": 2},
            "training": {"batchSize": 2},
        },
    )
    config = runner.write_config(tmp_path, job)
    nodes = runner.start_nodes(config, tmp_path)
    logs = [node.communicate(timeout=300)[0] for node in nodes]

    assert [node.returncode for node in nodes] == [0, 0], logs
    shares = [computed(log) for log in logs]
    assert all(share["latents"] > 0 for share in shares), logs  # each node its share
    assert [encoded(log) for log in logs] == [(0, 0), (0, 0)], logs  # and the other's too
    # Node 1 read node 0's shards from S3 into its own disk, checked.
    copies = list((tmp_path / "node1" / "cache" / "features-copies").rglob("*.safetensors"))
    assert copies and all(hashlib.sha256(p.read_bytes()).hexdigest() == p.stem for p in copies)
