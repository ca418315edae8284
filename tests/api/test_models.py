"""The pydantic models: defaults, strictness, and what the trainer gets from load_job."""

import pytest
from pydantic import BaseModel

from difftrain.api import DiffusionTrainingJob
from difftrain.api.job import longest_hostname
from difftrain.api.spec import DiffusionTrainingJobSpec
from difftrain.api.validation import load_job
from difftrain.errors import InvalidSpec
from tests.builders import job


def test_minimal_job_gets_documented_defaults():
    spec = DiffusionTrainingJob.model_validate(job()).spec

    assert spec.model_dump(by_alias=True, exclude_none=True) == {
        "method": "lora",
        "model": {"base": "preset:tiny-sd", "architecture": "auto", "predictionType": "auto"},
        "dataset": {
            "uri": "builtin:shapes",
            "resolution": 32,
            "centerCrop": False,
            "randomFlip": False,
            "captionDropout": 0.0,
            "repeats": 1,
            "maxSkippedFraction": 0.1,
            "bucketing": {
                "enabled": False,
                "minResolution": 256,
                "maxResolution": 1024,
                "step": 64,
            },
        },
        "training": {
            "steps": 10,
            "batchSize": 1,
            "gradientAccumulationSteps": 1,
            "learningRate": 1e-4,
            "scheduler": {"type": "cosine", "warmupRatio": 0.05, "gamma": 0.5},
            "optimizer": {
                "type": "adamw",
                "betas": [0.9, 0.999],
                "epsilon": 1e-8,
                "weightDecay": 0.01,
            },
            "maxGradNorm": 1.0,
            "mixedPrecision": "bf16",
            "gradientCheckpointing": False,
            "compile": False,
            "noiseOffset": 0.0,
            "ema": {"enabled": False, "decay": 0.9999},
            "flowMatching": {
                "timestepDensity": "logitNormal",
                "logitMean": 0.0,
                "logitStd": 1.0,
                "modeScale": 1.29,
                "lossWeighting": "none",
            },
            "seed": 42,
            "strategy": "ddp",
        },
        "checkpoints": {"everySteps": 500, "keepLast": 3, "resume": "auto"},
        "validation": {
            "prompts": [],
            "negativePrompt": "",
            "everySteps": 500,
            "imagesPerPrompt": 1,
            "inferenceSteps": 25,
            "guidanceScale": 7.5,
            "seed": 0,
        },
        "output": {"uri": "file://out/demo", "dtype": "fp16"},
        "storage": {"region": "us-east-1", "pathStyle": False},
        "cache": {"latents": True, "textEmbeddings": True},
        "resources": {
            "nodes": 1,
            "gpusPerNode": 1,
            "requests": {},
            "limits": {},
            "nodeSelector": {},
            "tolerations": [],
            "volumes": [],
        },
        "runPolicy": {
            "maxRestarts": 3,
            "cleanPodPolicy": "Running",
            "suspend": False,
            "terminationGracePeriodSeconds": 300,
            "collectiveTimeoutSeconds": 1800,
        },
    }


def test_lora_block_defaults():
    spec = DiffusionTrainingJob.model_validate(job(spec={"lora": {}})).spec

    assert spec.lora.model_dump(by_alias=True) == {
        "type": "lora",
        "dora": False,
        "rank": 16,
        "alpha": None,
        "dropout": 0.0,
        "targetModules": ["to_q", "to_k", "to_v", "to_out.0"],
        "trainTextEncoder": False,
    }


def test_mutable_defaults_are_not_shared():
    first = DiffusionTrainingJob.model_validate(job()).spec
    first.validation.prompts.append("changed")

    second = DiffusionTrainingJob.model_validate(job()).spec

    assert second.validation.prompts == []


@pytest.mark.parametrize(
    ("spec", "lora", "full"),
    [
        ({}, True, False),
        ({"method": "finetune"}, False, True),
        ({"method": "full"}, False, True),
        ({"method": "dreambooth", "dreambooth": {"instancePrompt": "p"}}, True, False),
        (
            {"method": "dreambooth", "dreambooth": {"instancePrompt": "p", "unet": "full"}},
            False,
            True,
        ),
        (
            {
                "method": "textualInversion",
                "textualInversion": {"placeholderToken": "<t>", "initializerToken": "t"},
            },
            False,
            False,
        ),
    ],
    ids=["lora", "finetune", "full", "dreambooth-lora", "dreambooth-full", "ti"],
)
def test_what_each_method_trains(spec, lora, full):
    parsed = DiffusionTrainingJob.model_validate(job(spec=spec)).spec

    assert (parsed.trains_lora, parsed.trains_full_weights) == (lora, full)


def test_spec_round_trips_through_json():
    """The operator writes spec JSON into the ConfigMap; the trainer reads it back."""
    spec = DiffusionTrainingJob.model_validate(job(spec={"lora": {"rank": 4}})).spec

    text = spec.model_dump_json(by_alias=True, exclude_none=True)

    assert DiffusionTrainingJobSpec.model_validate_json(text) == spec


def test_longest_hostname_uses_last_attempt_and_index():
    """Preemptions do not count against maxRestarts, so the attempt number's bound is
    fixed (MAX_ATTEMPTS), not maxRestarts + 1."""
    spec = DiffusionTrainingJob.model_validate(
        job(spec={"resources": {"nodes": 16}, "runPolicy": {"maxRestarts": 9}})
    ).spec

    assert longest_hostname("demo", spec) == "demo-a999-15"


def test_load_job_raises_invalid_spec_with_every_problem():
    manifest = job(spec={"resources": {"nodes": 0}, "training": {"learningRate": 0}})

    with pytest.raises(InvalidSpec) as raised:
        load_job(manifest)

    assert raised.value.exit_code == 2
    assert str(raised.value) == (
        "invalid job: spec.training.learningRate: must be > 0 (got 0); "
        "spec.resources.nodes: must be >= 1 (got 0)"
    )


def _models(model: type[BaseModel], seen: set) -> set:
    if model in seen:
        return seen
    seen.add(model)
    for field in model.model_fields.values():
        for arg in _types_in(field.annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                _models(arg, seen)
    return seen


def _types_in(annotation):
    yield annotation
    for arg in getattr(annotation, "__args__", ()):
        yield from _types_in(arg)


@pytest.mark.parametrize(
    "model",
    sorted(_models(DiffusionTrainingJob, set()), key=lambda m: m.__name__),
    ids=lambda m: m.__name__,
)
def test_every_model_and_field_is_described(model):
    assert model.__doc__
    if model is DiffusionTrainingJob:
        return
    undocumented = [name for name, f in model.model_fields.items() if not f.description]
    assert undocumented == []
