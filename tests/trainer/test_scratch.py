"""Scratch disk: nothing uploaded stays on it, and a disk too small is named, whether
the limit or the disk itself runs out."""

import json
import subprocess
import uuid

import pytest
import torch

from difftrain.errors import DiskFull
from difftrain.trainer.scratch import Scratch
from tests.trainer import runner


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_scratch_keeps_no_uploaded_copies(tmp_path, shapes_folder, trainer_cache):
    output = tmp_path / "out"
    validation = {"prompts": ["a red circle"], "everySteps": 2, "inferenceSteps": 2}
    config = runner.write_config(
        tmp_path,
        {
            "dataset": {"uri": f"file://{shapes_folder}"},
            "output": {"uri": f"file://{output}"},
            "training": {"steps": 5},
            "checkpoints": {"everySteps": 1, "keepLast": 2},
            "validation": validation,
        },
    )

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 0, log
    assert [p.name for p in sorted((output / "checkpoints").iterdir())] == [
        "step-00000004",
        "step-00000005",
    ]
    left = _files(tmp_path / "scratch")
    assert not [f for f in left if "/checkpoints/" in f or "/samples/" in f or "/model/" in f]
    assert "scratch-rank0/metrics.jsonl" in left  # the curve is rewritten whole each time


def test_a_scratch_limit_too_small_is_named_before_writing(tmp_path, shapes_folder, trainer_cache):
    output = tmp_path / "out"
    config = runner.write_config(
        tmp_path,
        {
            "dataset": {"uri": f"file://{shapes_folder}"},
            "output": {"uri": f"file://{output}"},
            "training": {"steps": 4},
            "checkpoints": {"everySteps": 2},
            "resources": {"scratchSize": "4Ki"},
        },
    )

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 2, log
    reason = json.loads((tmp_path / "termination-log").read_text())
    assert reason["reason"] == "DiskFull"
    assert reason["message"].startswith(
        f"no room in {tmp_path}/scratch/scratch-rank0/checkpoints/step-00000002 for the "
        "checkpoint of step 2: it needs about 0.00 GiB and 0.00 GiB is left (scratch limit "
        "0.00 GiB); raise spec.resources.scratchSize"
    )
    assert not (output / "checkpoints" / "step-00000002" / "COMPLETE").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KiB file system (tmpfs), for a disk that really fills up."""
    folder = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "--lazy", str(folder)], check=True)  # a failed write may hold it


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(lambda path: path.write_bytes(b"x" * 2**20), id="plain-file"),
        pytest.param(lambda path: torch.save(torch.zeros(2**18), path), id="torch-save"),
    ],
)
def test_a_disk_that_fills_while_writing_is_named(small_disk, write):
    scratch = Scratch(small_disk, limit=2**30)

    with pytest.raises(DiskFull) as full, scratch.writing(small_disk, "the checkpoint", need=0):
        write(small_disk / "big")

    assert str(full.value).startswith(f"no room in {small_disk} for the checkpoint: it needs")


def test_the_free_space_of_the_disk_is_checked_too(small_disk):
    scratch = Scratch(small_disk, limit=2**40)

    with pytest.raises(DiskFull) as full:
        scratch.ensure_room(small_disk / "model", "the exported model", need=2**20)

    assert "it needs about 0.00 GiB and 0.00 GiB is left (scratch limit 1024.00 GiB)" in str(
        full.value
    )
