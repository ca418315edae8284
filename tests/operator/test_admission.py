"""The checks the operator makes before it creates anything, that only a cluster needs."""

import pytest

from difftrain.api.validation import load_job
from difftrain.operator.admission import policy_problems, problems
from difftrain.operator.builders import Defaults
from tests.builders import job

ON_VOLUMES = {
    "volumes": [
        {"name": "models", "claimName": "models", "mountPath": "/models", "readOnly": True},
        {"name": "runs", "claimName": "runs", "mountPath": "/mnt/runs"},
    ]
}
HINT = (
    "use s3://, or mount a PersistentVolumeClaim (spec.resources.volumes) and use a path "
    "under its mountPath"
)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param({"output": {"uri": "s3://bucket/runs/demo"}}, [], id="s3-output"),
        pytest.param(
            {},
            [
                f"spec.output.uri: file://out/demo is a relative path, which a pod "
                f"resolves on its own disk and loses with it; {HINT}"
            ],
            id="relative-file-output",
        ),
        pytest.param(
            {"output": {"uri": "file:///data/out"}},
            [
                f"spec.output.uri: file:///data/out is not on a volume the job mounts, so "
                f"a pod would lose it with its own disk; {HINT}"
            ],
            id="file-output-off-volumes",
        ),
        pytest.param(
            {"output": {"uri": "file:///mnt/runs/demo"}, "resources": ON_VOLUMES},
            [],
            id="file-output-on-a-volume",
        ),
        pytest.param(
            {"output": {"uri": "file:///mnt/runs/../elsewhere"}, "resources": ON_VOLUMES},
            [
                f"spec.output.uri: file:///mnt/runs/../elsewhere is not on a volume the job "
                f"mounts, so a pod would lose it with its own disk; {HINT}"
            ],
            id="dot-dot-leaves-the-volume",
        ),
        pytest.param(
            {"output": {"uri": "file:///models/out"}, "resources": ON_VOLUMES},
            [
                "spec.output.uri: file:///models/out is on volume models, which is mounted "
                "read-only; set its readOnly to false, or write elsewhere"
            ],
            id="output-on-a-read-only-volume",
        ),
        pytest.param(
            {
                "model": {"base": "file:///models/sd15"},
                "dataset": {"uri": "file:///data/shapes"},
                "output": {"uri": "s3://bucket/out"},
                "resources": ON_VOLUMES,
            },
            [
                f"spec.dataset.uri: file:///data/shapes is not on a volume the job mounts, "
                f"so a pod would lose it with its own disk; {HINT}"
            ],
            id="model-on-a-read-only-volume-is-fine-the-dataset-is-not",
        ),
    ],
)
def test_file_uris_must_lie_on_a_mounted_volume(spec, expected):
    assert problems(load_job(job(spec=spec))) == expected


POLICY = Defaults(
    image="registry.example/difftrain-trainer:1",
    allowed_images=("registry.example/ml/*",),
    allowed_service_accounts=("robot",),
)


@pytest.mark.parametrize(
    ("resources", "refused"),
    [
        pytest.param({}, None, id="the-operators-image-and-the-default-account"),
        pytest.param({"image": "registry.example/difftrain-trainer:1"}, None, id="trainer-image"),
        pytest.param({"image": "registry.example/ml/sdxl:2"}, None, id="image-matching-a-pattern"),
        pytest.param(
            {"image": "evil.example/miner:1"},
            "spec.resources.image: evil.example/miner:1 is not allowed here (allowed: "
            "registry.example/difftrain-trainer:1, registry.example/ml/*)",
            id="other-image",
        ),
        pytest.param({"image": "registry.example/ml"}, "spec.resources.image", id="not-under-it"),
        pytest.param({"serviceAccountName": "default"}, None, id="default-account-named"),
        pytest.param({"serviceAccountName": "robot"}, None, id="allowed-account"),
        pytest.param(
            {"serviceAccountName": "admin"},
            "spec.resources.serviceAccountName: admin "
            "is not allowed here (allowed: default, robot)",
            id="other-account",
        ),
    ],
)
def test_the_policy_allows_its_images_and_accounts_only(resources, refused):
    found = policy_problems(load_job(job(spec={"resources": resources})), POLICY)

    if refused is None:
        assert found == []
    else:
        (problem,) = found
        assert problem.startswith(refused), problem


def test_with_no_policy_set_only_the_trainer_image_and_default_account_pass():
    spec = job(
        spec={"resources": {"image": "registry.example/ml/sdxl:2", "serviceAccountName": "robot"}}
    )

    assert len(policy_problems(load_job(spec), Defaults())) == 2
