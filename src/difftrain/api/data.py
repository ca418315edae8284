"""Where things come from and go: base model, dataset, outputs, and the object store."""

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from difftrain.api.base import ApiModel, ShortStr, raise_problems, section, with_rules
from difftrain.api.uris import Uri

FreeForm = dict[str, Any]


class ComponentConfigs(ApiModel):
    """Inline configs of a new architecture (training from scratch), overriding the base's.

    Each value is the component's ``config.json`` as diffusers/transformers write it.
    """

    unet: FreeForm | None = Field(None, description="UNet2DConditionModel config.")
    transformer: FreeForm | None = Field(
        None, description="Transformer config (SD3Transformer2DModel, FluxTransformer2DModel)."
    )
    vae: FreeForm | None = Field(None, description="AutoencoderKL config.")
    text_encoder: FreeForm | None = Field(None, description="First text encoder config (CLIP).")
    text_encoder_2: FreeForm | None = Field(
        None, description="Second text encoder config (SDXL, SD3; Flux's T5)."
    )
    text_encoder_3: FreeForm | None = Field(
        None, description="Third text encoder config (the T5 encoder of SD3 architectures)."
    )
    scheduler: FreeForm | None = Field(None, description="Noise scheduler config.")


class ModelSpec(ApiModel):
    """The model to start from (or, for method full, the architecture to build)."""

    model_config = with_rules(
        {
            "rule": "!has(self.revision) || self.base.startsWith('hf://')",
            "message": "spec.model.revision only applies to an hf:// base",
            "fieldPath": ".revision",
        }
    )

    base: Uri("s3", "hf", "file", "preset") = Field(
        description="Diffusers-format model folder: s3://, file://, hf://org/name, or a "
        "built-in preset (preset:tiny-sd, preset:tiny-sdxl, preset:tiny-sd3, "
        "preset:tiny-flux). For method full only its configs and tokenizers are used "
        "(spec.model.components can override the configs).",
    )
    architecture: Literal["auto", "sd", "sdxl", "sd3", "flux", "custom"] = Field(
        "auto",
        description="auto detects the family (SD 1.x/2.x, SDXL, SD3/3.5, Flux.1) from the model's "
        "configs; custom accepts any pipeline of a supported family.",
    )
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = Field(
        "auto",
        description="What the UNet predicts; auto reads it from the scheduler config.",
    )
    components: ComponentConfigs | None = Field(
        None, description="Component configs overriding the base's; only with method full."
    )
    revision: ShortStr | None = Field(None, description="hf:// only: branch, tag or commit.")
    variant: ShortStr | None = Field(None, description='Weight file variant to load, e.g. "fp16".')
    quantization: Literal["int8", "fp8", "nf4"] | None = Field(
        None,
        description="Keep the frozen denoiser (and the text encoders that do not train) in "
        "low precision while adapters train in full (LoRA methods only): int8 (weights of "
        "8-bit integers with a scale per row, any device), fp8 (a GPU of compute capability "
        "8.9 or later) or nf4 (4-bit NormalFloat, QLoRA's, a scale per block of 64 weights; "
        "any device; not with DoRA). Unset: the training precision.",
    )

    @model_validator(mode="after")
    def _revision_needs_hf(self):
        if self.revision is not None and not self.base.startswith("hf://"):
            raise_problems([(("revision",), "only applies to an hf:// base; remove it")])
        return self


class BucketingSpec(ApiModel):
    """Aspect-ratio bucketing: batch images of similar shape instead of square-cropping all."""

    model_config = with_rules(
        {
            # has() first: the API server also checks the rule on the schema's default ({}).
            "rule": "!has(self.minResolution) || !has(self.maxResolution) || "
            "self.minResolution <= self.maxResolution",
            "message": "spec.dataset.bucketing.minResolution must be <= maxResolution",
            "fieldPath": ".minResolution",
        }
    )

    enabled: bool = Field(False, description="Group images into aspect-ratio buckets.")
    min_resolution: int = Field(
        256, ge=8, le=8192, multiple_of=8, description="Shortest bucket side, pixels."
    )
    max_resolution: int = Field(
        1024, ge=8, le=8192, multiple_of=8, description="Longest bucket side, pixels."
    )
    step: int = Field(64, ge=8, le=1024, multiple_of=8, description="Bucket side increment.")

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_resolution > self.max_resolution:
            raise_problems(
                [(("minResolution",), f"must be <= maxResolution ({self.max_resolution})")]
            )
        return self


class DatasetSpec(ApiModel):
    """Images with captions: images/ + captions/ folders, or a same-stem .txt beside each image."""

    uri: Uri("s3", "file", "builtin") = Field(
        description="Dataset folder (s3://, file://) or a built-in dataset (builtin:shapes, "
        "builtin:shapes-large)."
    )
    resolution: int = Field(
        512,
        ge=8,
        le=8192,
        description="Training side length in pixels (the target area when bucketing). "
        "A multiple of 8.",
        json_schema_extra={"multipleOf": 8},
    )
    center_crop: bool = Field(False, description="Crop the centre; a random crop otherwise.")
    random_flip: bool = Field(False, description="Flip images horizontally at random.")
    caption_dropout: float = Field(
        0.0, ge=0, le=1, description="Probability of training on an empty caption."
    )
    bucketing: BucketingSpec = section(BucketingSpec, "Aspect-ratio bucketing.")
    repeats: int = Field(1, ge=1, le=10_000, description="Times each image appears per epoch.")
    max_skipped_fraction: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Fail if more than this fraction of images cannot be read.",
    )

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            low = value - value % 8
            raise ValueError(
                f"must be a multiple of 8 (got {value}); use {max(low, 8)} or {low + 8}"
            )
        return value


# A Secret's name (a DNS subdomain), as both Secret references write it.
SecretName = Annotated[
    str, Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
]


class MlflowSpec(ApiModel):
    """An MLflow tracking server whose model registry keeps a version per finished job."""

    tracking_uri: Uri("http", "https") = Field(
        description="The tracking server (http:// or https://); its artifact store keeps "
        "the logged files."
    )
    model_name: str = Field(
        min_length=1,
        max_length=256,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Registered model that gets a new version (created when missing).",
    )
    experiment: ShortStr = Field(
        "difftrain", min_length=1, description="Experiment the job's run is logged in."
    )
    secret_ref: SecretName | None = Field(
        None,
        description="Secret in the job's namespace with the server's credentials: "
        "MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
        "(each key optional).",
    )


class RegistrySpec(ApiModel):
    """A model registry that records each finished job's model as a version."""

    mlflow: MlflowSpec = Field(description="MLflow's model registry.")


class OutputSpec(ApiModel):
    """Where checkpoints, samples and the final model go, and in which formats."""

    uri: Uri("s3", "file") = Field(description="Output folder (s3:// or file://).")
    formats: list[Literal["diffusers", "kohya", "singleFile", "merged"]] | None = Field(
        None,
        max_length=4,
        description="Export formats: diffusers (pipeline folder, LoRA or embeddings file; "
        "LoKr and LoHa as peft folders), kohya (one file for ComfyUI and A1111: LoRA in "
        "kohya's keys, LoKr and LoHa in LyCORIS's; not DoRA), singleFile (SD 1.x/2.x and "
        "SDXL: the whole model in one safetensors, in the original Stable Diffusion layout "
        "that ComfyUI and A1111 load), merged (a LoRA fused into its base, as a pipeline "
        "folder under merged/). Default: diffusers and kohya for adapters other than DoRA on "
        "SD 1.x/2.x and SDXL, diffusers otherwise.",
    )
    dtype: Literal["fp32", "fp16", "bf16", "int8"] = Field(
        "fp16",
        description="Precision of exported weights. int8 (whole-model exports): the "
        "denoiser's linear layers as int8 weights (torchao, weight-only), the rest in bf16; "
        "load it with torchao installed and torch_dtype bfloat16.",
    )
    metrics_file: str | None = Field(
        None,
        max_length=1024,
        pattern=r"^/.*[^/]$",
        description="A file in the main pod to which every logged step's values (loss, "
        "lr, images_per_second) and every evaluation's scores (fid, clip_score, "
        "validation_loss) are also appended, one JSON object per line with string values "
        "and a timestamp: the format of Katib's File metrics collector (format JSON). An "
        "absolute path in a folder the pod can write (Katib mounts one there).",
    )
    registry: RegistrySpec | None = Field(
        None,
        description="Register the finished model in a model registry (MLflow): the run "
        "with the spec, loss curve, scores, model card, samples and files; its version goes "
        "to status.outputs.registryVersion.",
    )


class SecretKeysRef(ApiModel):
    """A Secret in the job's namespace holding S3 credentials."""

    name: SecretName = Field(description="Name of the Secret.")
    access_key_id_key: ShortStr = Field(
        "AWS_ACCESS_KEY_ID", min_length=1, description="Key holding the access key id."
    )
    secret_access_key_key: ShortStr = Field(
        "AWS_SECRET_ACCESS_KEY", min_length=1, description="Key holding the secret access key."
    )
    session_token_key: ShortStr | None = Field(
        None, min_length=1, description="Key holding a session token, if the Secret has one."
    )


class SecretKeyRef(ApiModel):
    """One key of a Secret in the job's namespace."""

    name: SecretName = Field(description="Name of the Secret.")
    key: ShortStr = Field("HF_TOKEN", min_length=1, description="Key holding the value.")


class CacheSpec(ApiModel):
    """Latents and text embeddings computed once and reused by later epochs, restarts
    and jobs over the same images and model parts (docs/trainer.md, "The cache")."""

    uri: Uri("s3", "file") | None = Field(
        None,
        description="Where the cache is kept, shared by every node and job that names it; "
        "the operator's default (Helm value trainer.cacheUri) when absent, else each node's "
        "local disk.",
    )
    latents: bool = Field(
        True,
        description="Cache the VAE's latents of each image (of centre crops, and of images "
        "with nothing to crop; random crops are encoded at each step).",
    )
    text_embeddings: bool = Field(
        True, description="Cache the text encoders' outputs (while no text encoder trains)."
    )


class StorageSpec(ApiModel):
    """The S3-compatible object store behind every s3:// URI of the job, and the Hugging
    Face Hub token for gated or private hf:// models."""

    endpoint: str | None = Field(
        None,
        max_length=1024,
        pattern=r"^https?://[^\s/]+(/\S*)?$",
        description="Endpoint URL (MinIO, Ceph, R2, ...); AWS when absent.",
    )
    region: ShortStr = Field("us-east-1", min_length=1, description="Region.")
    secret_ref: SecretKeysRef | None = Field(
        None,
        description="Credentials from a Secret; the pod's ambient identity (IRSA, workload "
        "identity) when absent.",
    )
    path_style: bool = Field(
        False, description="Path-style addressing (most self-hosted stores need it)."
    )
    hugging_face_token_secret_ref: SecretKeyRef | None = Field(
        None,
        description="A Hugging Face access token (for gated or private hf:// models) from a "
        "Secret; the trainer gets it as HF_TOKEN, and it is never logged or written.",
    )
