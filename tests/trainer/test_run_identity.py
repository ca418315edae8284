"""Checkpoints know their run: a changed spec is refused, the same manifest re-created
resumes, and a fresh run beside an old one never prunes or resumes the wrong one."""

import json
import shutil

import pytest

from difftrain.errors import InvalidSpec
from difftrain.trainer import identity
from tests.trainer import runner

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SPEC = {
    "training": {"steps": 4, "learningRate": 1e-3},
    "checkpoints": {"everySteps": 2, "keepLast": 3},
}


def _config(folder, shapes_folder, output, patch=None, name="run", uid="uid-a"):
    folder.mkdir(parents=True, exist_ok=True)
    spec = runner.merge(SPEC, patch or {})
    spec.update(dataset={"uri": f"file://{shapes_folder}"}, output={"uri": f"file://{output}"})
    path = runner.write_config(folder, spec, name=name)
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "uid": uid}))
    return path


def _runs(output) -> dict[int, str]:
    return {
        int(folder.name[5:]): json.loads((folder / "run.json").read_text())["run"]
        for folder in sorted((output / "checkpoints").iterdir())
    }


def test_resume_follows_the_run_of_the_spec(tmp_path, shapes_folder, trainer_cache):
    first = tmp_path / "first" / "out"
    code, log = runner.run(
        _config(tmp_path / "first", shapes_folder, first), tmp_path / "first", trainer_cache
    )
    assert code == 0, log
    old = _runs(first)
    assert sorted(old) == [2, 4] and len(set(old.values())) == 1
    outputs = {name: tmp_path / name / "out" for name in ("changed", "recreated", "fresh")}
    for output in outputs.values():
        shutil.copytree(first, output)
    patches = {
        "changed": ({"training": {"learningRate": 5e-4}}, "tuned", "uid-b"),
        "recreated": ({}, "run", "uid-c"),  # the same manifest applied again: a new uid
        "fresh": (
            {
                "training": {"steps": 3},
                "checkpoints": {"everySteps": 1, "keepLast": 2, "resume": "never"},
            },
            "run",
            "uid-d",
        ),
    }
    runs = [
        (
            _config(tmp_path / name, shapes_folder, outputs[name], *patch),
            tmp_path / name,
            trainer_cache,
            ONE_THREAD,
        )
        for name, patch in patches.items()
    ]

    (changed, changed_log), (recreated, recreated_log), (fresh, fresh_log) = runner.run_together(
        runs
    )

    assert changed == 2, changed_log
    assert (
        f"InvalidSpec: the newest checkpoint, file://{outputs['changed']}/checkpoints/"
        "step-00000004, was written by job default/run with a different training spec: "
        "training.learningRate 0.001 → 0.0005. Resuming it would continue that run"
    ) in changed_log
    assert _runs(outputs["changed"]) == old  # nothing written
    assert recreated == 0, recreated_log
    assert "resumed from checkpoint step 4" in recreated_log
    assert fresh == 0, fresh_log
    assert "resumed" not in fresh_log
    runs = _runs(outputs["fresh"])
    new = runs[3]
    # Its own newest two, step 2 replacing the old run's; the old run's step 4 kept.
    assert runs == {2: new, 3: new, 4: old[4]} and new != old[4]

    # resume: auto now continues the run written last, not the old run's higher step.
    auto = patches["fresh"][0] | {"checkpoints": {"everySteps": 1, "keepLast": 2}}
    again = _config(tmp_path / "again", shapes_folder, outputs["fresh"], auto)
    code, log = runner.run(again, tmp_path / "again", trainer_cache)

    assert code == 0, log
    assert "resumed from checkpoint step 3" in log


SPEC_A = {"model": {"base": "preset:tiny-sd"}, "training": {"learningRate": 0.001}, "processes": 2}


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        pytest.param(SPEC_A, SPEC_A, [], id="same"),
        pytest.param(
            SPEC_A,
            {**SPEC_A, "training": {"learningRate": 0.002, "steps": 9}},
            ["training.learningRate 0.001 → 0.002", "training.steps (default) → 9"],
            id="changed-and-added",
        ),
        pytest.param(
            SPEC_A,
            {**SPEC_A, "processes": 1},
            ["processes (spec.resources.nodes times gpusPerNode) 2 → 1"],
            id="world-size",
        ),
        pytest.param(
            {**SPEC_A, "lora": {"rank": 8}}, SPEC_A, ["lora.rank 8 → (default)"], id="removed"
        ),
    ],
)
def test_differences_name_each_field(old, new, expected):
    assert identity.differences(old, new) == expected


def test_a_checkpoint_without_a_run_record_is_not_resumed():
    with pytest.raises(InvalidSpec) as refused:
        identity.check_resumable(None, SPEC_A, "s3://b/out/checkpoints/step-00000005")

    assert str(refused.value) == (
        "the newest checkpoint, s3://b/out/checkpoints/step-00000005, has no run.json telling "
        "which run wrote it, so it cannot be resumed safely: give this job a new "
        "spec.output.uri, or set spec.checkpoints.resume: never to start afresh here (the "
        "existing checkpoints are kept)"
    )
