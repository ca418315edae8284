"""The DiffusionTrainingJob spec: its groups and the rules that span them."""

from typing import Literal

from pydantic import Field, model_validator

from difftrain.api.base import ApiModel, immutable_rule, raise_problems, section, with_rules
from difftrain.api.cluster import ResourcesSpec, RunPolicySpec
from difftrain.api.data import CacheSpec, DatasetSpec, ModelSpec, OutputSpec, StorageSpec
from difftrain.api.methods import DreamBoothSpec, FullSpec, LoraSpec, TextualInversionSpec
from difftrain.api.profile import PROFILE_NAME_PATTERN
from difftrain.api.training import (
    CheckpointSpec,
    EvaluationSpec,
    TrainingSpec,
    ValidationSpec,
)

Method = Literal["lora", "finetune", "dreambooth", "textualInversion", "full"]

# Which methods a per-method block belongs to.
_BLOCK_METHODS = {
    "lora": ("lora", "dreambooth"),
    "dreambooth": ("dreambooth",),
    "textualInversion": ("textualInversion",),
    "full": ("full",),
}
_REQUIRED_BLOCK = {"dreambooth": "dreambooth", "textualInversion": "textualInversion"}


def _cel_list(values) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


_DORA_TEXT = (
    "not with trainTextEncoder: diffusers' pipelines load a text encoder's DoRA without "
    "its trained magnitudes; leave trainTextEncoder off, or train the text encoders with "
    "plain LoRA (dora false)"
)
_DORA_NF4_TEXT = (
    "not with model.quantization nf4: DoRA reads its layers' whole base weights, which NF4 "
    "layers do not give back; use int8, or plain LoRA (dora false)"
)

# CEL twins of DiffusionTrainingJobSpec.trains_lora and .trains_full_weights.
_CEL_DREAMBOOTH_UNET = (
    "(self.method == 'dreambooth' && has(self.dreambooth) && self.dreambooth.unet == '{}')"
)
_SINGLE_FILE_TEXT = (
    "singleFile applies when full weights are trained, or with merged (a LoRA fused into its base)"
)
_INT8_TEXT = (
    "int8 applies to whole-model exports (method finetune or full, dreambooth with unet "
    "full, or formats merged)"
)
_MERGED_TEXT = "merged applies only when a LoRA (type lora, with or without dora) is trained"
_CEL_TRAINS_LORA = f"(self.method == 'lora' || {_CEL_DREAMBOOTH_UNET.format('lora')})"
_CEL_TRAINS_FULL = f"(self.method in ['finetune', 'full'] || {_CEL_DREAMBOOTH_UNET.format('full')})"

# Everything but runPolicy is fixed once created: a re-apply of the same manifest is a
# no-op and a changed one is refused instead of silently restarting training.
# runPolicy's own rules let suspend and ttlSecondsAfterFinished change.
_IMMUTABLE_FIELDS = [
    "profile",
    "method",
    "model",
    "dataset",
    "lora",
    "dreambooth",
    "textualInversion",
    "full",
    "training",
    "checkpoints",
    "validation",
    "evaluation",
    "output",
    "storage",
    "cache",
    "resources",
]

_RULES = (
    *(
        {
            "rule": f"self.method != '{method}' || has(self.{block})",
            "message": f"spec.{block} is required for method {method}",
            "fieldPath": f".{block}",
        }
        for method, block in _REQUIRED_BLOCK.items()
    ),
    *(
        {
            "rule": f"!has(self.{block}) || self.method in {_cel_list(methods)}",
            "message": f"spec.{block} applies only to method {' or '.join(methods)}",
            "fieldPath": f".{block}",
        }
        for block, methods in _BLOCK_METHODS.items()
    ),
    {
        "rule": f"!has(self.lora) || self.method != 'dreambooth' || {_CEL_TRAINS_LORA}",
        "message": "spec.lora applies only when spec.dreambooth.unet is lora",
        "fieldPath": ".lora",
    },
    {
        "rule": "!has(self.model.components) || self.method == 'full'",
        "message": "spec.model.components applies only to method full (training from scratch)",
        "fieldPath": ".model.components",
    },
    {
        "rule": f"!self.training.ema.enabled || {_CEL_TRAINS_FULL}",
        "message": "spec.training.ema.enabled applies only when full weights are trained "
        "(finetune, full, dreambooth with unet full)",
        "fieldPath": ".training.ema.enabled",
    },
    {
        "rule": "!has(self.output.formats) || !('kohya' in self.output.formats) || "
        + _CEL_TRAINS_LORA,
        "message": "spec.output.formats: kohya applies only when a LoRA is trained",
        "fieldPath": ".output.formats",
    },
    {
        "rule": "!has(self.output.formats) || !('kohya' in self.output.formats) || "
        "!has(self.lora) || !has(self.lora.dora) || !self.lora.dora",
        "message": "spec.output.formats: kohya is not written for DoRA (kohya's layout has "
        "no place for its magnitudes); use diffusers",
        "fieldPath": ".output.formats",
    },
    {
        "rule": "!has(self.lora) || !has(self.lora.dora) || !self.lora.dora || "
        "((!has(self.lora.trainTextEncoder) || !self.lora.trainTextEncoder) && "
        "(self.method != 'dreambooth' || !has(self.dreambooth) || "
        "!has(self.dreambooth.trainTextEncoder) || !self.dreambooth.trainTextEncoder))",
        "message": "spec.lora.dora: " + _DORA_TEXT,
        "fieldPath": ".lora.dora",
    },
    {
        "rule": "!has(self.model.quantization) || self.model.quantization != 'nf4' || "
        "!has(self.lora) || !has(self.lora.dora) || !self.lora.dora",
        "message": "spec.lora.dora: " + _DORA_NF4_TEXT,
        "fieldPath": ".lora.dora",
    },
    {
        "rule": f"!has(self.model.quantization) || {_CEL_TRAINS_LORA}",
        "message": "spec.model.quantization applies only when adapters are trained (method "
        "lora, or dreambooth with unet lora): the weights that train stay in full precision",
        "fieldPath": ".model.quantization",
    },
    {
        "rule": "!has(self.output.formats) || !('singleFile' in self.output.formats) || "
        f"{_CEL_TRAINS_FULL} || 'merged' in self.output.formats",
        "message": "spec.output.formats: " + _SINGLE_FILE_TEXT,
        "fieldPath": ".output.formats",
    },
    {
        "rule": "!has(self.output.dtype) || self.output.dtype != 'int8' || "
        f"{_CEL_TRAINS_FULL} || (has(self.output.formats) && 'merged' in self.output.formats)",
        "message": "spec.output.dtype: " + _INT8_TEXT,
        "fieldPath": ".output.dtype",
    },
    {
        "rule": "!has(self.output.formats) || !('merged' in self.output.formats) || "
        f"({_CEL_TRAINS_LORA} && (!has(self.lora) || !has(self.lora.type) || "
        "self.lora.type == 'lora'))",
        "message": "spec.output.formats: " + _MERGED_TEXT,
        "fieldPath": ".output.formats",
    },
    {
        # The next restart would train on the job's own samples and plots.
        "rule": "!(self.output.uri + '/').startsWith(self.dataset.uri.endsWith('/') ? "
        "self.dataset.uri : self.dataset.uri + '/')",
        "message": "spec.output.uri must not be inside spec.dataset.uri: the job's samples "
        "would become training images",
        "fieldPath": ".output.uri",
    },
    *(
        immutable_rule(field, f"spec.{field} is immutable; create a new job to change it")
        for field in _IMMUTABLE_FIELDS
    ),
)


class DiffusionTrainingJobSpec(ApiModel):
    """What to train, on what, with which settings, and how to run it."""

    model_config = with_rules(*_RULES)

    profile: str | None = Field(
        None,
        max_length=253,
        pattern=PROFILE_NAME_PATTERN,
        description="A DiffusionTrainingProfile whose resources, storage, cache and "
        "runPolicy this job starts from; the job's own fields win, field by field "
        "(docs/gitops.md). Read once, when the job starts.",
    )
    method: Method = Field(
        description="lora: adapters; finetune: the full UNet; dreambooth: a subject from a few "
        "images; textualInversion: new token embeddings; full: a new model from scratch."
    )
    model: ModelSpec = Field(description="The base model, or the architecture to build.")
    dataset: DatasetSpec = Field(description="Training images and captions.")
    lora: LoraSpec | None = Field(
        None, description="LoRA settings (method lora; dreambooth with unet lora)."
    )
    dreambooth: DreamBoothSpec | None = Field(
        None, description="DreamBooth settings (method dreambooth)."
    )
    textual_inversion: TextualInversionSpec | None = Field(
        None, description="Textual Inversion settings (method textualInversion)."
    )
    full: FullSpec | None = Field(
        None, description="Training from scratch (method full); defaults when absent."
    )
    training: TrainingSpec = Field(description="The optimisation loop.")
    checkpoints: CheckpointSpec = section(CheckpointSpec, "Checkpointing and resume.")
    validation: ValidationSpec = section(ValidationSpec, "Sample images during training.")
    evaluation: EvaluationSpec | None = Field(
        None, description="FID / CLIP score evaluation; none when absent."
    )
    output: OutputSpec = Field(description="Where results go.")
    storage: StorageSpec = section(StorageSpec, "The S3-compatible object store.")
    cache: CacheSpec = section(CacheSpec, "Cached latents and text embeddings.")
    resources: ResourcesSpec = section(ResourcesSpec, "Pods, devices and placement.")
    run_policy: RunPolicySpec = section(RunPolicySpec, "Restarts, deadlines, suspend, queue.")

    @property
    def full_settings(self) -> FullSpec:
        """spec.full, or its defaults when absent."""
        return self.full or FullSpec()

    @property
    def trains_lora(self) -> bool:
        """Whether the trained weights are LoRA adapters."""
        return self.method == "lora" or (
            self.method == "dreambooth"
            and self.dreambooth is not None
            and self.dreambooth.unet == "lora"
        )

    @property
    def trains_full_weights(self) -> bool:
        """Whether whole model weights (not adapters or embeddings) are trained."""
        return self.method in ("finetune", "full") or (
            self.method == "dreambooth"
            and self.dreambooth is not None
            and self.dreambooth.unet == "full"
        )

    @model_validator(mode="after")
    def _consistent(self):
        raise_problems(self._method_block_problems() + self._setting_problems())
        return self

    def _method_block_problems(self) -> list[tuple[tuple[str, ...], str]]:
        problems = []
        present = {
            "lora": self.lora,
            "dreambooth": self.dreambooth,
            "textualInversion": self.textual_inversion,
            "full": self.full,
        }
        required = _REQUIRED_BLOCK.get(self.method)
        if required and present[required] is None:
            problems.append(((required,), f"is required for method {self.method}"))
        for block, methods in _BLOCK_METHODS.items():
            if present[block] is not None and self.method not in methods:
                problems.append(
                    (
                        (block,),
                        f"applies only to method {' or '.join(methods)}; remove it "
                        f"(method is {self.method})",
                    )
                )
        if self.lora is not None and self.dreambooth is not None and not self.trains_lora:
            problems.append((("lora",), "applies only when spec.dreambooth.unet is lora"))
        return problems

    def _setting_problems(self) -> list[tuple[tuple[str, ...], str]]:
        problems = []
        if self.model.components is not None and self.method != "full":
            problems.append(
                (
                    ("model", "components"),
                    "applies only to method full (training from "
                    "scratch); remove it or use method full",
                )
            )
        if self.training.ema.enabled and not self.trains_full_weights:
            problems.append(
                (
                    ("training", "ema", "enabled"),
                    "applies only when full weights are "
                    "trained (finetune, full, dreambooth with unet full)",
                )
            )
        dataset = self.dataset.uri.rstrip("/") + "/"
        if (self.output.uri.rstrip("/") + "/").startswith(dataset):
            problems.append(
                (
                    ("output", "uri"),
                    "must not be inside spec.dataset.uri: the job's samples would become "
                    "training images on its next start; write the output beside the "
                    f"dataset (spec.dataset.uri is {self.dataset.uri})",
                )
            )
        if self.model.quantization is not None and not self.trains_lora:
            problems.append(
                (
                    ("model", "quantization"),
                    "applies only when adapters are trained (method lora, or dreambooth with "
                    "unet lora): the weights that train stay in full precision",
                )
            )
        if self.lora is not None and self.lora.dora:
            dreambooth = self.dreambooth if self.method == "dreambooth" else None
            if self.lora.train_text_encoder or (dreambooth and dreambooth.train_text_encoder):
                problems.append((("lora", "dora"), _DORA_TEXT))
            if self.model.quantization == "nf4":
                problems.append((("lora", "dora"), _DORA_NF4_TEXT))
        formats = self.output.formats or []
        if "kohya" in formats and not self.trains_lora:
            problems.append((("output", "formats"), "kohya applies only when a LoRA is trained"))
        elif "kohya" in formats and self.lora is not None and not self.lora.kohya_layout:
            problems.append(
                (
                    ("output", "formats"),
                    "kohya is not written for DoRA (kohya's layout has no place for its "
                    "magnitudes); use diffusers",
                )
            )
        if "singleFile" in formats and not (self.trains_full_weights or "merged" in formats):
            problems.append((("output", "formats"), _SINGLE_FILE_TEXT))
        if self.output.dtype == "int8" and not (self.trains_full_weights or "merged" in formats):
            problems.append((("output", "dtype"), _INT8_TEXT))
        if "merged" in formats and not (
            self.trains_lora and (self.lora is None or self.lora.type == "lora")
        ):
            problems.append((("output", "formats"), _MERGED_TEXT))
        return problems
