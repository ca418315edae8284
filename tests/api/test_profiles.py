"""DiffusionTrainingProfile: the merge (the job wins, field by field), its validation, and
`difftrain validate / render --profile`."""

import pytest
import yaml

from difftrain.api.profile import merge
from difftrain.api.validation import applied, validate_job, validate_profile
from difftrain.cli import main
from tests import examples
from tests.builders import job

PLATFORM = {
    "resources": {
        "image": "registry.example/difftrain:1",
        "nodes": 2,
        "gpusPerNode": 8,
        "requests": {"cpu": "32", "memory": "256Gi"},
        "nodeSelector": {"pool": "a100"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
    "storage": {
        "endpoint": "https://minio.example",
        "pathStyle": True,
        "secretRef": {"name": "s3-credentials"},
    },
    "cache": {"uri": "s3://platform/cache"},
    "runPolicy": {"queueName": "training", "maxRestarts": 5},
}


def profile(spec=None, name="platform"):
    return {
        "apiVersion": "difftrain.io/v1alpha1",
        "kind": "DiffusionTrainingProfile",
        "metadata": {"name": name},
        "spec": PLATFORM if spec is None else spec,
    }


def short_job(spec=None):
    return job(spec={"profile": "platform", "output": {"uri": "s3://team/runs/a"}, **(spec or {})})


def test_a_short_job_takes_every_group_of_its_profile():
    merged, problems = applied(short_job(), profile())
    found, invalid = validate_job(merged)

    assert problems == [] and invalid == []
    assert found.spec.resources.image == "registry.example/difftrain:1"
    assert found.spec.resources.nodes == 2
    assert found.spec.resources.node_selector == {"pool": "a100"}
    assert found.spec.storage.endpoint == "https://minio.example"
    assert found.spec.storage.secret_ref.name == "s3-credentials"
    assert found.spec.cache.uri == "s3://platform/cache"
    assert found.spec.run_policy.queue_name == "training"
    assert found.spec.run_policy.max_restarts == 5


def test_the_job_wins_field_by_field():
    mine = short_job(
        {
            "resources": {
                "nodes": 1,
                "requests": {"memory": "512Gi"},
                "nodeSelector": {"zone": "b"},
                "tolerations": [],
            },
            "runPolicy": {"maxRestarts": 0, "suspend": True},
            "storage": {"region": "eu-west-1"},
        }
    )

    spec = merge(mine, PLATFORM)["spec"]

    assert spec["resources"]["nodes"] == 1  # a value the job sets wins
    assert spec["resources"]["gpusPerNode"] == 8  # what it leaves out comes from the profile
    assert spec["resources"]["requests"] == {"cpu": "32", "memory": "512Gi"}  # maps merge
    assert spec["resources"]["nodeSelector"] == {"pool": "a100", "zone": "b"}
    assert spec["resources"]["tolerations"] == []  # a list the job sets replaces the profile's
    assert spec["runPolicy"] == {"queueName": "training", "maxRestarts": 0, "suspend": True}
    assert spec["storage"]["region"] == "eu-west-1"
    assert spec["storage"]["endpoint"] == "https://minio.example"


def test_only_the_profile_groups_merge_and_nothing_is_shared():
    mine = short_job()
    before = yaml.safe_dump(PLATFORM)

    merged = merge(mine, {**PLATFORM, "training": {"steps": 99}})
    merged["spec"]["resources"]["requests"]["cpu"] = "1"

    assert merged["spec"]["training"] == mine["spec"]["training"]
    assert yaml.safe_dump(PLATFORM) == before


def test_a_null_in_the_job_leaves_the_profiles_value():
    spec = merge(short_job({"resources": {"image": None}}), PLATFORM)["spec"]

    assert spec["resources"]["image"] == "registry.example/difftrain:1"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param(
            {"runPolicy": {"suspend": True}},
            "spec.runPolicy.suspend: is each job's own switch and cannot come from a profile; "
            "remove it (set spec.runPolicy.suspend in the job)",
            id="suspend",
        ),
        pytest.param(
            {"training": {"steps": 5}},
            "spec.training: unknown field; allowed here: resources, storage, cache, runPolicy",
            id="not-a-profile-group",
        ),
        pytest.param(
            {"resources": {"nodez": 2}},
            "spec.resources.nodez: unknown field; did you mean 'nodes'?",
            id="typo",
        ),
        pytest.param(
            {"resources": {"nodes": 0}},
            "spec.resources.nodes: must be >= 1 (got 0)",
            id="bound",
        ),
    ],
)
def test_bad_profiles_name_the_field(spec, expected):
    found, problems = validate_profile(profile(spec))

    assert found is None
    assert [str(problem) for problem in problems] == [expected]


def test_a_profile_with_a_bad_name_is_refused():
    _, problems = validate_profile(profile({}, name="GPU_pool"))

    assert [problem.path for problem in problems] == ["metadata.name"]


def test_a_profile_that_is_not_the_one_named_is_refused():
    _, problems = applied(short_job(), profile(name="other"), "p.yaml:1")

    assert [str(problem) for problem in problems] == [
        "spec.profile: names profile 'platform', but p.yaml:1 is profile 'other'"
    ]


def test_spec_profile_must_be_a_name():
    _, problems = validate_job(job(spec={"profile": "Not A Name"}))

    assert [problem.path for problem in problems] == ["spec.profile"]


# The CLI: validate, render and run read profiles from --profile or among the files.


def test_render_merges_the_profile_given_with_profile(write_manifest, capsys):
    mine = write_manifest(short_job())
    platform = write_manifest(profile(), name="profile.yaml")

    assert main(["render", str(mine), "--profile", str(platform)]) == 0

    objects = list(yaml.safe_load_all(capsys.readouterr().out))
    pods = next(o for o in objects if o["kind"] == "Job")["spec"]["template"]["spec"]
    assert pods["containers"][0]["image"] == "registry.example/difftrain:1"
    assert pods["nodeSelector"] == {"pool": "a100"}
    batch = next(o for o in objects if o["kind"] == "Job")
    assert batch["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "training"


def test_render_without_the_named_profile_says_how_to_get_it(write_manifest, capsys):
    mine = write_manifest(short_job())

    assert main(["render", str(mine)]) == 2

    assert capsys.readouterr().err.splitlines() == [
        f"{mine}:16: spec.profile: names profile 'platform': pass its manifest with --profile "
        "FILE (kubectl get diffusiontrainingprofiles platform -o yaml > FILE)"
    ]


def test_validate_checks_each_job_merged_with_its_profile_from_the_folder(
    tmp_path, write_manifest, capsys
):
    # With the profile's 2 nodes, this name no longer fits the pods' hostnames.
    write_manifest(short_job() | {"metadata": {"name": "x" * 56}}, name="job.yaml")
    write_manifest(profile(), name="profile.yaml")

    assert main(["validate", str(tmp_path)]) == 0  # 2 nodes: index 1 still fits
    write_manifest(
        profile({**PLATFORM, "resources": {**PLATFORM["resources"], "nodes": 11}}),
        name="profile.yaml",
    )
    assert main(["validate", str(tmp_path)]) == 2

    err = capsys.readouterr().err
    assert "job.yaml:4: metadata.name: is too long" in err


def test_validate_reports_a_bad_profile_at_its_line(tmp_path, write_manifest, capsys):
    write_manifest(
        [profile(), profile({"resources": {"gpusPerNode": -1}}, name="broken")],
        name="profiles.yaml",
    )

    assert main(["validate", str(tmp_path / "profiles.yaml")]) == 2

    assert capsys.readouterr().err.splitlines() == [
        f"{tmp_path / 'profiles.yaml'}:36: spec.resources.gpusPerNode: must be >= 0 (got -1)"
    ]


def test_validate_notes_a_profile_it_cannot_see(write_manifest, capsys):
    mine = write_manifest(short_job())

    assert main(["validate", str(mine)]) == 0

    out, err = capsys.readouterr()
    assert err.splitlines() == [
        f"{mine}:16: spec.profile names 'platform', which none of the files defines; "
        "checked without it"
    ]
    assert out == "1 file(s) valid\n"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param([], "no YAML documents found", id="empty"),
        pytest.param([profile(), profile(name="two")], "--profile needs a file with one", id="two"),
        pytest.param([job()], "is not a DiffusionTrainingProfile", id="a-job"),
    ],
)
def test_a_profile_file_that_holds_not_one_profile_is_refused(
    write_manifest, capsys, content, expected
):
    mine = write_manifest(short_job())
    given = write_manifest(content, name="profile.yaml")

    assert main(["render", str(mine), "--profile", str(given)]) == 2

    assert expected in capsys.readouterr().err


def test_a_problem_from_the_merge_points_at_the_profile(write_manifest, capsys):
    mine = write_manifest(short_job({"resources": {"requests": {"nvidia.com/gpu": 1}}}))
    platform = write_manifest(profile(), name="profile.yaml")

    assert main(["validate", str(mine), "--profile", str(platform)]) == 2

    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            "spec.resources.requests: set GPUs with spec.resources.gpusPerNode, not requests "
            f"(merged with the profile at {platform}:1)"
        )
    )


def test_the_examples_folder_checks_its_job_with_its_profile(capsys):
    assert main(["validate", str(examples.FOLDER)]) == 0

    assert "checked without it" not in capsys.readouterr().err
    assert examples.PROFILES, "an example profile"


def test_run_without_the_named_profile_starts_nothing(write_manifest, tmp_path, capsys):
    mine = write_manifest(short_job())

    assert main(["run", str(mine), "--workdir", str(tmp_path / "work")]) == 2

    assert "spec.profile: names profile 'platform': pass its manifest" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()
