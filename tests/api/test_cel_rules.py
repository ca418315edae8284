"""The CRD's CEL rules: they compile, they agree with the Python validators on every
cross-field rule, and they make the spec immutable except for suspend and TTL."""

import cel
import pytest
import yaml

from difftrain.api.crd import crd_manifest, profile_crd_manifest
from difftrain.api.validation import validate_job, validate_profile
from tests import examples
from tests.builders import DELETE, job, merge
from tests.kube_schema import all_rules, apply_defaults, failed_rules

EXAMPLES = examples.JOBS
# The schemas the API server gets (the job's profile groups carry no defaults there).
SCHEMA = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
PROFILE_SCHEMA = profile_crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def cel_failures(manifest, old=None):
    new = apply_defaults(SCHEMA, manifest)
    return failed_rules(SCHEMA, new, apply_defaults(SCHEMA, old) if old else None)


def model_problem_paths(manifest):
    _, problems = validate_job(manifest)
    return [problem.path for problem in problems]


@pytest.mark.parametrize("rule", all_rules(SCHEMA) + all_rules(PROFILE_SCHEMA))
def test_rule_compiles(rule):
    cel.compile(rule)


@pytest.mark.parametrize(
    "manifest",
    [pytest.param(yaml.safe_load(p.read_text()), id=p.name) for p in EXAMPLES]
    + [pytest.param(job(), id="minimal")]
    + [
        pytest.param(
            job(spec={"lora": {"type": kind}, "output": {"formats": ["kohya"]}}),
            id=f"kohya-for-{kind}",
        )
        for kind in ("lokr", "loha")
    ],
)
def test_valid_manifests_pass_every_rule(manifest):
    assert cel_failures(manifest) == []
    assert model_problem_paths(manifest) == []


DB = {"instancePrompt": "a photo of sks dog"}
TI = {"placeholderToken": "<t>", "initializerToken": "cat"}

# (id, manifest, the one CEL message expected, the one field path the models report)
CROSS_FIELD = [
    (
        "output-inside-dataset",
        job(
            spec={
                "dataset": {"uri": "s3://team/data/"},
                "output": {"uri": "s3://team/data/runs/one"},
            }
        ),
        "spec.output.uri must not be inside spec.dataset.uri: the job's samples would become "
        "training images",
        "spec.output.uri",
    ),
    (
        "output-is-the-dataset",
        job(spec={"dataset": {"uri": "s3://team/data"}, "output": {"uri": "s3://team/data/"}}),
        "spec.output.uri must not be inside spec.dataset.uri: the job's samples would become "
        "training images",
        "spec.output.uri",
    ),
    (
        "dreambooth-block-missing",
        job(spec={"method": "dreambooth"}),
        "spec.dreambooth is required for method dreambooth",
        "spec.dreambooth",
    ),
    (
        "ti-block-missing",
        job(spec={"method": "textualInversion"}),
        "spec.textualInversion is required for method textualInversion",
        "spec.textualInversion",
    ),
    (
        "lora-on-ti",
        job(spec={"method": "textualInversion", "textualInversion": TI, "lora": {}}),
        "spec.lora applies only to method lora or dreambooth",
        "spec.lora",
    ),
    (
        "dreambooth-on-lora",
        job(spec={"dreambooth": DB}),
        "spec.dreambooth applies only to method dreambooth",
        "spec.dreambooth",
    ),
    (
        "ti-on-lora",
        job(spec={"textualInversion": TI}),
        "spec.textualInversion applies only to method textualInversion",
        "spec.textualInversion",
    ),
    (
        "full-on-lora",
        job(spec={"full": {}}),
        "spec.full applies only to method full",
        "spec.full",
    ),
    (
        "full-reuse-twice",
        job(spec={"method": "full", "full": {"reuse": ["vae", "vae"]}}),
        "spec.full.reuse lists a component twice",
        "spec.full.reuse",
    ),
    (
        "lora-with-full-dreambooth",
        job(spec={"method": "dreambooth", "dreambooth": {**DB, "unet": "full"}, "lora": {}}),
        "spec.lora applies only when spec.dreambooth.unet is lora",
        "spec.lora",
    ),
    (
        "components-on-lora",
        job(spec={"model": {"components": {"unet": {"a": 1}}}}),
        "spec.model.components applies only to method full (training from scratch)",
        "spec.model.components",
    ),
    (
        "ema-on-lora",
        job(spec={"training": {"ema": {"enabled": True}}}),
        "spec.training.ema.enabled applies only when full weights are trained (finetune, full, "
        "dreambooth with unet full)",
        "spec.training.ema.enabled",
    ),
    (
        "kohya-on-finetune",
        job(spec={"method": "finetune", "output": {"formats": ["kohya"]}}),
        "spec.output.formats: kohya applies only when a LoRA is trained",
        "spec.output.formats",
    ),
    (
        "single-file-on-ti",
        job(
            spec={
                "method": "textualInversion",
                "textualInversion": TI,
                "output": {"formats": ["singleFile"]},
            }
        ),
        "spec.output.formats: singleFile applies when full weights are trained, or with "
        "merged (a LoRA fused into its base)",
        "spec.output.formats",
    ),
    (
        "int8-on-lora",
        job(spec={"output": {"dtype": "int8"}}),
        "spec.output.dtype: int8 applies to whole-model exports (method finetune or full, "
        "dreambooth with unet full, or formats merged)",
        "spec.output.dtype",
    ),
    (
        "merged-lokr",
        job(spec={"lora": {"type": "lokr"}, "output": {"formats": ["merged"]}}),
        "spec.output.formats: merged applies only when a LoRA (type lora, with or without "
        "dora) is trained",
        "spec.output.formats",
    ),
    (
        "steps-and-epochs",
        job(spec={"training": {"epochs": 1}}),
        "spec.training: set exactly one of steps and epochs",
        "spec.training",
    ),
    (
        "compile-fsdp",
        job(
            spec={
                "method": "finetune",
                "training": {"compile": True, "strategy": "fsdp"},
                "resources": {"nodes": 2},
            }
        ),
        "spec.training.compile: not with strategy fsdp; leave one of them out",
        "spec.training.compile",
    ),
    (
        "no-steps-no-epochs",
        job(spec={"training": {"steps": DELETE}}),
        "spec.training: set exactly one of steps and epochs",
        "spec.training",
    ),
    (
        "step-scheduler",
        job(spec={"training": {"scheduler": {"type": "step"}}}),
        "spec.training.scheduler.stepSize is required when type is step",
        "spec.training.scheduler.stepSize",
    ),
    (
        "revision-not-hf",
        job(spec={"model": {"revision": "main"}}),
        "spec.model.revision only applies to an hf:// base",
        "spec.model.revision",
    ),
    (
        "class-data-no-prompt",
        job(spec={"method": "dreambooth", "dreambooth": {**DB, "classData": "file:///dogs"}}),
        "spec.dreambooth.classData needs spec.dreambooth.classPrompt",
        "spec.dreambooth.classData",
    ),
    (
        "evaluation-empty",
        job(spec={"evaluation": {}}),
        "spec.evaluation needs fid, clipScore or validationLoss (or leave evaluation out)",
        "spec.evaluation",
    ),
    (
        "validation-loss-neither",
        job(spec={"evaluation": {"validationLoss": {"timesteps": 2}}}),
        "spec.evaluation.validationLoss needs exactly one of fraction and uri",
        "spec.evaluation.validationLoss",
    ),
    (
        "validation-loss-both",
        job(spec={"evaluation": {"validationLoss": {"fraction": 0.1, "uri": "file:///held"}}}),
        "spec.evaluation.validationLoss needs exactly one of fraction and uri",
        "spec.evaluation.validationLoss",
    ),
    (
        "bucketing-order",
        job(spec={"dataset": {"bucketing": {"minResolution": 512, "maxResolution": 256}}}),
        "spec.dataset.bucketing.minResolution must be <= maxResolution",
        "spec.dataset.bucketing.minResolution",
    ),
    (
        "gpu-limit",
        job(spec={"resources": {"limits": {"nvidia.com/gpu": 1}}}),
        "set GPUs with spec.resources.gpusPerNode, not limits",
        "spec.resources.limits",
    ),
    (
        "gpu-request",
        job(spec={"resources": {"requests": {"nvidia.com/gpu": 1}}}),
        "set GPUs with spec.resources.gpusPerNode, not requests",
        "spec.resources.requests",
    ),
    (
        "name-too-long",
        job({"metadata": {"name": "x" * 59}}),
        "metadata.name is too long: pod hostnames <name>-a<attempt>-<index> must fit in 63 "
        "characters",
        "metadata.name",
    ),
    (
        "name-too-long-for-restarts",
        job(
            {"metadata": {"name": "x" * 57}},
            spec={"runPolicy": {"maxRestarts": 99}, "resources": {"nodes": 10}},
        ),
        "metadata.name is too long: pod hostnames <name>-a<attempt>-<index> must fit in 63 "
        "characters",
        "metadata.name",
    ),
    (
        "quantized-finetune",
        job(
            spec={"method": "finetune", "model": {"base": "preset:tiny-sd", "quantization": "int8"}}
        ),
        "spec.model.quantization applies only when adapters are trained (method lora, or "
        "dreambooth with unet lora): the weights that train stay in full precision",
        "spec.model.quantization",
    ),
    (
        "dora-on-lokr",
        job(spec={"lora": {"type": "lokr", "dora": True}}),
        "spec.lora.dora applies only to type lora",
        "spec.lora.dora",
    ),
    (
        "dora-on-nf4",
        job(
            spec={
                "model": {"base": "preset:tiny-sd", "quantization": "nf4"},
                "lora": {"dora": True},
            }
        ),
        "spec.lora.dora: not with model.quantization nf4: DoRA reads its layers' whole base "
        "weights, which NF4 layers do not give back; use int8, or plain LoRA (dora false)",
        "spec.lora.dora",
    ),
    (
        "kohya-for-dora",
        job(spec={"lora": {"dora": True}, "output": {"formats": ["kohya"]}}),
        "spec.output.formats: kohya is not written for DoRA (kohya's layout has no place for "
        "its magnitudes); use diffusers",
        "spec.output.formats",
    ),
    (
        "dora-with-text-encoders",
        job(spec={"lora": {"dora": True, "trainTextEncoder": True}}),
        "spec.lora.dora: not with trainTextEncoder: diffusers' pipelines load a text encoder's "
        "DoRA without its trained magnitudes; leave trainTextEncoder off, or train the text "
        "encoders with plain LoRA (dora false)",
        "spec.lora.dora",
    ),
    (
        "dora-with-dreambooth-text-encoders",
        job(
            spec={
                "method": "dreambooth",
                "dreambooth": {**DB, "trainTextEncoder": True},
                "lora": {"dora": True},
            }
        ),
        "spec.lora.dora: not with trainTextEncoder: diffusers' pipelines load a text encoder's "
        "DoRA without its trained magnitudes; leave trainTextEncoder off, or train the text "
        "encoders with plain LoRA (dora false)",
        "spec.lora.dora",
    ),
    (
        "name-not-a-label",
        job({"metadata": {"name": "my_job"}}),
        "metadata.name must start with a lowercase letter and hold only lowercase letters, digits "
        "and '-', as it names a Service",
        "metadata.name",
    ),
]


@pytest.mark.parametrize(
    ("manifest", "message", "path"),
    [pytest.param(m, msg, p, id=name) for name, m, msg, p in CROSS_FIELD],
)
def test_cel_and_models_reject_the_same_manifests(manifest, message, path):
    assert cel_failures(manifest) == [message]
    assert model_problem_paths(manifest) == [path]


@pytest.mark.parametrize(
    ("name", "nodes", "max_restarts"),
    [("x" * 56, 1, 3), ("x" * 55, 10, 3), ("x" * 55, 10, 99), ("a", 512, 99), ("x" * 56, 0, 3)],
)
def test_longest_allowed_names_pass_both(name, nodes, max_restarts):
    resources = {"nodes": nodes} if nodes else {}  # no nodes: the default, 1
    manifest = job(
        {"metadata": {"name": name}},
        spec={"resources": resources, "runPolicy": {"maxRestarts": max_restarts}},
    )

    assert cel_failures(manifest) == []
    assert model_problem_paths(manifest) == []


BASE = job(spec={"runPolicy": {"ttlSecondsAfterFinished": 60}})


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param({}, [], id="same-manifest-reapplied"),
        pytest.param({"runPolicy": {"suspend": True}}, [], id="suspend"),
        pytest.param({"runPolicy": {"ttlSecondsAfterFinished": 3600}}, [], id="ttl"),
        pytest.param({"runPolicy": {"ttlSecondsAfterFinished": DELETE}}, [], id="ttl-removed"),
        pytest.param(
            {"training": {"learningRate": 1e-3}},
            ["spec.training is immutable; create a new job to change it"],
            id="training",
        ),
        pytest.param(
            {"method": "finetune"},
            ["spec.method is immutable; create a new job to change it"],
            id="method",
        ),
        pytest.param(
            {"dataset": {"uri": "file:///other"}},
            ["spec.dataset is immutable; create a new job to change it"],
            id="dataset",
        ),
        pytest.param(
            {"evaluation": {"clipScore": {"modelUri": "s3://models/clip"}}},
            ["spec.evaluation is immutable; create a new job to change it"],
            id="optional-block-added",
        ),
        pytest.param(
            {"resources": {"nodes": 2}},
            ["spec.resources is immutable; create a new job to change it"],
            id="nodes",
        ),
        pytest.param(
            {"runPolicy": {"maxRestarts": 5}},
            ["spec.runPolicy.maxRestarts is immutable"],
            id="max-restarts",
        ),
        pytest.param(
            {"runPolicy": {"queueName": "q"}},
            ["spec.runPolicy.queueName is immutable"],
            id="queue-added",
        ),
        pytest.param(
            {"checkpoints": {"everySteps": 500}}, [], id="default-written-out-is-no-change"
        ),
    ],
)
def test_spec_is_immutable_except_suspend_and_ttl(change, expected):
    updated = merge(BASE, {"spec": change})

    assert cel_failures(updated, old=BASE) == expected


def test_every_spec_field_but_run_policy_is_covered_by_an_immutability_rule():
    spec = SCHEMA["properties"]["spec"]
    guarded = {
        rule["rule"].split("has(self.")[1].split(")")[0]
        for rule in spec["x-kubernetes-validations"]
        if "oldSelf" in rule["rule"]
    }

    assert guarded == set(spec["properties"]) - {"runPolicy"}


def test_a_name_one_too_long_fails_both_without_resources():
    manifest = job({"metadata": {"name": "x" * 57}})

    assert len(cel_failures(manifest)) == 1
    assert model_problem_paths(manifest) == ["metadata.name"]


def test_a_profile_group_written_out_later_is_a_change():
    """With a profile, resources.nodes: 1 written out is not the same spec as nodes left to
    the profile, so the CRD keeps no defaults there and refuses the change."""
    base = job()

    assert cel_failures(merge(base, {"spec": {"resources": {"nodes": 1}}}), old=base) == [
        "spec.resources is immutable; create a new job to change it"
    ]


def profile(spec):
    return {
        "apiVersion": "difftrain.io/v1alpha1",
        "kind": "DiffusionTrainingProfile",
        "metadata": {"name": "gpu"},
        "spec": spec,
    }


@pytest.mark.parametrize(
    ("spec", "message", "path"),
    [
        pytest.param(
            {"runPolicy": {"suspend": False}},
            "spec.runPolicy.suspend is each job's own switch and cannot come from a profile",
            "spec.runPolicy.suspend",
            id="suspend",
        ),
        pytest.param(
            {"resources": {"limits": {"nvidia.com/gpu": 1}}},
            "set GPUs with spec.resources.gpusPerNode, not limits",
            "spec.resources.limits",
            id="gpu-limits",
        ),
    ],
)
def test_cel_and_models_reject_the_same_profiles(spec, message, path):
    manifest = profile(spec)
    _, problems = validate_profile(manifest)

    assert failed_rules(PROFILE_SCHEMA, manifest) == [message]
    assert [problem.path for problem in problems] == [path]


def test_a_profile_may_change_what_a_job_may_not():
    old = profile({"runPolicy": {"queueName": "a", "maxRestarts": 3}})
    new = profile({"runPolicy": {"queueName": "b", "maxRestarts": 5}})

    assert failed_rules(PROFILE_SCHEMA, new, old) == []
