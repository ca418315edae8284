"""`difftrain validate`: every bad input is rejected with exit 2 and a line naming the field."""

import json
import subprocess
import sys

import pytest

from difftrain.cli import main
from tests.builders import DELETE, job

# (id, manifest, the problem expected after "FILE:LINE: ")
BAD_MANIFESTS = [
    (
        "unknown-field",
        job(spec={"trainng": {"steps": 1}}),
        "spec.trainng: unknown field; did you mean 'training'?",
    ),
    (
        "unknown-field-no-match",
        job(spec={"dataset": {"zzz": 1}}),
        "spec.dataset.zzz: unknown field; allowed here: uri, resolution, centerCrop, randomFlip, "
        "captionDropout, bucketing, repeats, maxSkippedFraction",
    ),
    (
        "wrong-type",
        job(spec={"training": {"steps": "ten"}}),
        "spec.training.steps: must be an integer (got string 'ten')",
    ),
    (
        "quoted-number",
        job(spec={"training": {"batchSize": "4"}}),
        "spec.training.batchSize: must be an integer (got string '4')",
    ),
    (
        "missing-method-block",
        job(spec={"method": "textualInversion"}),
        "spec.textualInversion: is required for method textualInversion",
    ),
    (
        "missing-dreambooth-block",
        job(spec={"method": "dreambooth"}),
        "spec.dreambooth: is required for method dreambooth",
    ),
    (
        "lora-on-textual-inversion",
        job(
            spec={
                "method": "textualInversion",
                "lora": {"rank": 4},
                "textualInversion": {"placeholderToken": "<x>", "initializerToken": "cat"},
            }
        ),
        "spec.lora: applies only to method lora or dreambooth; remove it (method is "
        "textualInversion)",
    ),
    (
        "lora-on-full-dreambooth",
        job(
            spec={
                "method": "dreambooth",
                "lora": {"rank": 4},
                "dreambooth": {"instancePrompt": "a sks dog", "unet": "full"},
            }
        ),
        "spec.lora: applies only when spec.dreambooth.unet is lora",
    ),
    (
        "zero-learning-rate",
        job(spec={"training": {"learningRate": 0}}),
        "spec.training.learningRate: must be > 0 (got 0)",
    ),
    (
        "negative-learning-rate",
        job(spec={"training": {"learningRate": -1.0e-4}}),
        "spec.training.learningRate: must be > 0 (got -0.0001)",
    ),
    (
        "resolution-500",
        job(spec={"dataset": {"resolution": 500}}),
        "spec.dataset.resolution: must be a multiple of 8 (got 500); use 496 or 504",
    ),
    (
        "flow-logit-std-0",
        job(spec={"training": {"flowMatching": {"logitStd": 0}}}),
        "spec.training.flowMatching.logitStd: must be > 0 (got 0)",
    ),
    (
        "flow-negative-guidance",
        job(spec={"training": {"flowMatching": {"guidance": -1}}}),
        "spec.training.flowMatching.guidance: must be >= 0 (got -1)",
    ),
    (
        "flow-zero-shift",
        job(spec={"training": {"flowMatching": {"shift": 0}}}),
        "spec.training.flowMatching.shift: must be > 0 (got 0)",
    ),
    (
        "flow-unknown-density",
        job(spec={"training": {"flowMatching": {"timestepDensity": "beta"}}}),
        "spec.training.flowMatching.timestepDensity: must be one of 'logitNormal', 'mode' "
        "or 'uniform' (got 'beta')",
    ),
    (
        "steps-and-epochs",
        job(spec={"training": {"steps": 10, "epochs": 2}}),
        "spec.training: set exactly one of steps and epochs (both are set)",
    ),
    (
        "neither-steps-nor-epochs",
        job(spec={"training": {"steps": DELETE}}),
        "spec.training: set exactly one of steps and epochs (neither is set)",
    ),
    (
        "unsupported-scheme",
        job(spec={"dataset": {"uri": "gs://bucket/data"}}),
        "spec.dataset.uri: scheme 'gs' is not supported here; use one of s3://, file://, "
        "builtin: (got 'gs://bucket/data')",
    ),
    (
        "hf-dataset",
        job(spec={"dataset": {"uri": "hf://org/data"}}),
        "spec.dataset.uri: scheme 'hf' is not supported here; use one of s3://, file://, "
        "builtin: (got 'hf://org/data')",
    ),
    (
        "cache-scheme",
        job(spec={"cache": {"uri": "builtin:shapes"}}),
        "spec.cache.uri: scheme 'builtin' is not supported here; use one of s3://, file:// "
        "(got 'builtin:shapes')",
    ),
    (
        "no-scheme",
        job(spec={"output": {"uri": "/tmp/out"}}),
        "spec.output.uri: no scheme is not supported here; use one of s3://, file:// "
        "(got '/tmp/out')",
    ),
    (
        "bad-bucket",
        job(spec={"output": {"uri": "s3://B"}}),
        "spec.output.uri: 's3://B' is not a valid s3 URI; expected e.g. "
        "s3://my-bucket/path/to/prefix",
    ),
    (
        "unknown-preset",
        job(spec={"model": {"base": "preset:huge"}}),
        "spec.model.base: unknown preset 'preset:huge'; known presets: tiny-sd, tiny-sdxl, "
        "tiny-sd3, tiny-flux",
    ),
    (
        "nodes-0",
        job(spec={"resources": {"nodes": 0}}),
        "spec.resources.nodes: must be >= 1 (got 0)",
    ),
    (
        "output-inside-the-dataset",
        job(
            spec={"dataset": {"uri": "s3://team/shapes"}, "output": {"uri": "s3://team/shapes/out"}}
        ),
        "spec.output.uri: must not be inside spec.dataset.uri: the job's samples would become "
        "training images on its next start; write the output beside the dataset "
        "(spec.dataset.uri is s3://team/shapes)",
    ),
    (
        "volume-on-a-reserved-mount",
        job(
            spec={
                "resources": {
                    "volumes": [{"name": "data", "claimName": "data", "mountPath": "/scratch/data"}]
                }
            }
        ),
        "spec.resources.volumes[0].mountPath: must not be, or be inside, one of the trainer's "
        "own mounts (/etc/difftrain, /dev/shm, /scratch, /cache, /tmp); got /scratch/data",
    ),
    (
        "two-volumes-on-one-path",
        job(
            spec={
                "resources": {
                    "volumes": [
                        {"name": "a", "claimName": "a", "mountPath": "/mnt/data"},
                        {"name": "b", "claimName": "b", "mountPath": "/mnt/data"},
                    ]
                }
            }
        ),
        "spec.resources.volumes: each mountPath may be used once; used more than once: /mnt/data",
    ),
    (
        "over-long-name",
        job({"metadata": {"name": "n" * 60}}),
        "metadata.name: is too long: pod hostnames <name>-a<attempt>-<index> must fit in 63 "
        f"characters; '{'n' * 60}-a999-0' would have 67, so shorten the name to at most 56 "
        "characters",
    ),
    (
        "long-name-many-nodes",
        job({"metadata": {"name": "n" * 58}}, spec={"resources": {"nodes": 100}}),
        "metadata.name: is too long: pod hostnames <name>-a<attempt>-<index> must fit in 63 "
        f"characters; '{'n' * 58}-a999-99' would have 66, so shorten the name to at most 55 "
        "characters",
    ),
    (
        "name-not-dns-label",
        job({"metadata": {"name": "1-Job"}}),
        "metadata.name: must start with a lowercase letter and hold only lowercase letters, "
        "digits and '-', as it names a Service (got '1-Job')",
    ),
    (
        "other-kind",
        job({"kind": "Deployment"}),
        "kind: 'Deployment' is not a DiffusionTrainingJob; only DiffusionTrainingJob and "
        "DiffusionTrainingProfile manifests are checked here",
    ),
    (
        "other-api-version",
        job({"apiVersion": "difftrain.io/v1"}),
        "apiVersion: must be difftrain.io/v1alpha1 (got 'difftrain.io/v1')",
    ),
    ("missing-spec", job({"spec": DELETE}), "spec: required field is missing"),
    ("missing-fields", job(spec={"dataset": DELETE}), "spec.dataset: required field is missing"),
    (
        "scalar-document",
        "just a string\n",
        "expected a DiffusionTrainingJob mapping, got string 'just a string'",
    ),
    (
        "revision-without-hf",
        job(spec={"model": {"revision": "main"}}),
        "spec.model.revision: only applies to an hf:// base; remove it",
    ),
    (
        "components-without-full",
        job(spec={"model": {"components": {"unet": {}}}}),
        "spec.model.components: applies only to method full (training from scratch); remove it "
        "or use method full",
    ),
    (
        "step-scheduler-without-size",
        job(spec={"training": {"scheduler": {"type": "step"}}}),
        "spec.training.scheduler.stepSize: is required when type is step",
    ),
    (
        "ema-on-lora",
        job(spec={"training": {"ema": {"enabled": True}}}),
        "spec.training.ema.enabled: applies only when full weights are trained (finetune, "
        "full, dreambooth with unet full)",
    ),
    (
        "kohya-on-finetune",
        job(spec={"method": "finetune", "output": {"formats": ["kohya"]}}),
        "spec.output.formats: kohya applies only when a LoRA is trained",
    ),
    (
        "single-file-on-lora",
        job(spec={"output": {"formats": ["singleFile"]}}),
        "spec.output.formats: singleFile applies when full weights are trained, or with "
        "merged (a LoRA fused into its base)",
    ),
    (
        "merged-without-lora",
        job(spec={"method": "finetune", "output": {"formats": ["merged"]}}),
        "spec.output.formats: merged applies only when a LoRA (type lora, with or without "
        "dora) is trained",
    ),
    (
        "unknown-format",
        job(spec={"output": {"formats": ["ckpt"]}}),
        "spec.output.formats[0]: must be one of 'diffusers', 'kohya', 'singleFile' or 'merged' "
        "(got 'ckpt')",
    ),
    (
        "class-data-without-prompt",
        job(
            spec={
                "method": "dreambooth",
                "dreambooth": {"instancePrompt": "a sks dog", "classData": "s3://b-1/dogs"},
            }
        ),
        "spec.dreambooth.classData: needs spec.dreambooth.classPrompt (the class the images show)",
    ),
    (
        "placeholder-with-space",
        job(
            spec={
                "method": "textualInversion",
                "textualInversion": {"placeholderToken": "my cat", "initializerToken": "cat"},
            }
        ),
        "spec.textualInversion.placeholderToken: must be a single token without spaces "
        "(got 'my cat')",
    ),
    (
        "evaluation-without-metric",
        job(spec={"evaluation": {"numImages": 10}}),
        "spec.evaluation: needs fid, clipScore or validationLoss (or leave evaluation out)",
    ),
    (
        "validation-loss-both-sources",
        job(spec={"evaluation": {"validationLoss": {"fraction": 0.1, "uri": "file:///held"}}}),
        "spec.evaluation.validationLoss: needs exactly one of fraction and uri (both are set)",
    ),
    (
        "evaluation-prompts-twice",
        job(
            spec={
                "evaluation": {
                    "prompts": ["a cat"],
                    "promptsUri": "file:///prompts.txt",
                    "validationLoss": {"fraction": 0.1},
                }
            }
        ),
        "spec.evaluation.promptsUri: set prompts or promptsUri, not both",
    ),
    (
        "fid-features",
        job(
            spec={
                "evaluation": {
                    "fid": {
                        "referenceUri": "file:///ref",
                        "weightsUri": "file:///inception.pth",
                        "features": 100,
                    }
                }
            }
        ),
        "spec.evaluation.fid.features: must be one of 64, 192, 768 or 2048 (got 100)",
    ),
    (
        "bucketing-min-over-max",
        job(spec={"dataset": {"bucketing": {"minResolution": 1024, "maxResolution": 512}}}),
        "spec.dataset.bucketing.minResolution: must be <= maxResolution (512)",
    ),
    (
        "gpu-in-limits",
        job(spec={"resources": {"limits": {"nvidia.com/gpu": 8}}}),
        "spec.resources.limits: set GPUs with spec.resources.gpusPerNode, not limits",
    ),
    (
        "bad-quantity",
        job(spec={"resources": {"requests": {"memory": "lots"}}}),
        "spec.resources.requests.memory: 'lots' is not a quantity; write e.g. 4, 500m or 16Gi",
    ),
    (
        "bad-toleration-effect",
        job(spec={"resources": {"tolerations": [{"key": "gpu", "effect": "NoRun"}]}}),
        "spec.resources.tolerations[0].effect: must be one of 'NoSchedule', 'PreferNoSchedule' "
        "or 'NoExecute' (got 'NoRun')",
    ),
    (
        "too-many-restarts",
        job(spec={"runPolicy": {"maxRestarts": 100}}),
        "spec.runPolicy.maxRestarts: must be <= 99 (got 100)",
    ),
    (
        "bad-queue-name",
        job(spec={"runPolicy": {"queueName": "Team A"}}),
        "spec.runPolicy.queueName: 'Team A' does not match the pattern "
        "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
    ),
    (
        "empty-instance-prompt",
        job(spec={"method": "dreambooth", "dreambooth": {"instancePrompt": ""}}),
        "spec.dreambooth.instancePrompt: must not be empty",
    ),
    (
        "bool-as-string",
        job(spec={"dataset": {"randomFlip": "yes"}}),
        "spec.dataset.randomFlip: must be true or false (got string 'yes')",
    ),
]


@pytest.mark.parametrize(
    ("manifest", "expected"),
    [pytest.param(m, e, id=name) for name, m, e in BAD_MANIFESTS],
)
def test_bad_manifest_is_rejected_naming_the_field(write_manifest, capsys, manifest, expected):
    path = write_manifest(manifest)

    assert main(["validate", str(path)]) == 2

    lines = capsys.readouterr().err.splitlines()
    location, _, problem = lines[0].partition(": ")
    assert (lines, problem) == ([lines[0]], expected)
    assert location.startswith(f"{path}:")


def test_problem_lines_point_at_the_field(write_manifest, capsys):
    path = write_manifest(
        "apiVersion: difftrain.io/v1alpha1\n"
        "kind: DiffusionTrainingJob\n"
        "metadata:\n"
        "  name: demo\n"
        "spec:\n"
        "  method: lora\n"
        "  model:\n"
        "    base: preset:tiny-sd\n"
        "  dataset:\n"
        "    uri: builtin:shapes\n"
        "    resolution: 500\n"
        "  training:\n"
        "    steps: 10\n"
        "    learningRate: 0\n"
        "  output:\n"
        "    uri: file://out\n"
    )

    assert main(["validate", str(path)]) == 2

    assert capsys.readouterr().err.splitlines() == [
        f"{path}:11: spec.dataset.resolution: must be a multiple of 8 (got 500); use 496 or 504",
        f"{path}:14: spec.training.learningRate: must be > 0 (got 0)",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "spec:\n  method: [lora\n  model: {}\n",
            ":3:8: invalid YAML: expected ',' or ']', but got ':'",
            id="unclosed-flow-sequence",
        ),
        pytest.param(
            "a: 1\n\tb: 2\n",
            ":2:1: invalid YAML: found character '\\t' that cannot start any token",
            id="tab-indent",
        ),
        pytest.param(
            "spec:\n  method: lora\n  method: full\n",
            ":3: duplicate key 'method'; keep one of them",
            id="duplicate-key",
        ),
        pytest.param("# only a comment\n", ": no YAML documents found", id="empty"),
    ],
)
def test_malformed_yaml_names_file_and_line(write_manifest, capsys, text, expected):
    path = write_manifest(text)

    assert main(["validate", str(path)]) == 2

    assert capsys.readouterr().err.splitlines() == [f"{path}{expected}"]


def test_missing_file_is_reported(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"

    assert main(["validate", str(missing)]) == 2

    err = capsys.readouterr().err
    assert err.startswith(f"{missing}: cannot read: ")
    assert "No such file" in err


def test_every_document_and_file_is_checked(write_manifest, capsys):
    valid = write_manifest(job(), name="valid.yaml")
    several = write_manifest(
        [job(spec={"resources": {"nodes": 0}}), job(), job({"kind": "Pod"})], name="multi.yaml"
    )

    assert main(["validate", str(valid), str(several)]) == 2

    problems = [line.split(": ", 1)[1] for line in capsys.readouterr().err.splitlines()]
    assert problems == [
        "spec.resources.nodes: must be >= 1 (got 0)",
        "kind: 'Pod' is not a DiffusionTrainingJob; only DiffusionTrainingJob and "
        "DiffusionTrainingProfile manifests are checked here",
    ]


def test_valid_manifest_exits_zero(write_manifest, capsys):
    path = write_manifest(job())

    assert main(["validate", str(path)]) == 0

    assert capsys.readouterr().out == "1 file(s) valid\n"


def test_installed_console_script_validates(write_manifest):
    bad = write_manifest(job(spec={"resources": {"nodes": 0}}))

    result = subprocess.run(
        [sys.executable, "-m", "difftrain.cli", "validate", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode == 2
    assert result.stderr.endswith("spec.resources.nodes: must be >= 1 (got 0)\n")


def _folder(tmp_path):
    """A GitOps folder: jobs beside other kinds, a file of other kinds only, a bad job
    one level down, and a file that is not a manifest."""
    import yaml

    folder = tmp_path / "fleet"
    (folder / "team-b").mkdir(parents=True)
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ml"}}
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {}}
    (folder / "a.yaml").write_text(yaml.safe_dump(job({"metadata": {"name": "a"}})))
    (folder / "b.yml").write_text(yaml.safe_dump_all([namespace, job({"metadata": {"name": "b"}})]))
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "notes.txt").write_text("not a manifest")
    bad = job({"metadata": {"name": "c"}}, spec={"training": {"learningRate": 0}})
    (folder / "team-b" / "c.yaml").write_text(yaml.safe_dump(bad))
    return folder


def test_a_folder_is_its_manifests_and_other_kinds_are_skipped(tmp_path, capsys):
    folder = _folder(tmp_path)

    assert main(["validate", str(folder)]) == 0
    said = capsys.readouterr()
    assert said.err.strip() == f"{folder}/config.json: no DiffusionTrainingJob; skipped"
    assert said.out.strip() == "2 file(s) valid"

    assert main(["validate", "-R", str(folder)]) == 2
    said = capsys.readouterr()
    assert f"{folder}/team-b/c.yaml:" in said.err and "spec.training.learningRate" in said.err

    assert main(["render", str(folder)]) == 0
    rendered = capsys.readouterr().out
    assert "name: a-a1" in rendered and "name: b-a1" in rendered


def test_a_folder_without_manifests_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()

    assert main(["validate", str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.strip() == f"{tmp_path}/empty: no .yaml, .yml or .json files"
