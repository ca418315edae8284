"""The checks the operator makes before it creates anything, that only a cluster needs."""

import pytest

from difftrain.api.validation import load_job
from difftrain.operator.admission import problems
from tests.builders import job

ON_VOLUMES = {"volumes": [
    {"name": "models", "claimName": "models", "mountPath": "/models", "readOnly": True},
    {"name": "runs", "claimName": "runs", "mountPath": "/mnt/runs"},
]}  # fmt: skip
HINT = ("use s3://, or mount a PersistentVolumeClaim (spec.resources.volumes) and use a path "
        "under its mountPath")  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param({"output": {"uri": "s3://bucket/runs/demo"}}, [], id="s3-output"),
        pytest.param({}, [f"spec.output.uri: file://out/demo is a relative path, which a pod "
                          f"resolves on its own disk and loses with it; {HINT}"],
                     id="relative-file-output"),
        pytest.param({"output": {"uri": "file:///data/out"}},
                     [f"spec.output.uri: file:///data/out is not on a volume the job mounts, so "
                      f"a pod would lose it with its own disk; {HINT}"],
                     id="file-output-off-volumes"),
        pytest.param({"output": {"uri": "file:///mnt/runs/demo"}, "resources": ON_VOLUMES}, [],
                     id="file-output-on-a-volume"),
        pytest.param({"output": {"uri": "file:///mnt/runs/../elsewhere"}, "resources": ON_VOLUMES},
                     [f"spec.output.uri: file:///mnt/runs/../elsewhere is not on a volume the job "
                      f"mounts, so a pod would lose it with its own disk; {HINT}"],
                     id="dot-dot-leaves-the-volume"),
        pytest.param({"output": {"uri": "file:///models/out"}, "resources": ON_VOLUMES},
                     ["spec.output.uri: file:///models/out is on volume models, which is mounted "
                      "read-only; set its readOnly to false, or write elsewhere"],
                     id="output-on-a-read-only-volume"),
        pytest.param({"model": {"base": "file:///models/sd15"}, "dataset": {"uri":
                      "file:///data/shapes"}, "output": {"uri": "s3://bucket/out"},
                      "resources": ON_VOLUMES},
                     [f"spec.dataset.uri: file:///data/shapes is not on a volume the job mounts, "
                      f"so a pod would lose it with its own disk; {HINT}"],
                     id="model-on-a-read-only-volume-is-fine-the-dataset-is-not"),
    ],
)  # fmt: skip
def test_file_uris_must_lie_on_a_mounted_volume(spec, expected):
    assert problems(load_job(job(spec=spec))) == expected
