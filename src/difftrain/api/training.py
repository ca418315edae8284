"""How to optimise, when to checkpoint, and what to sample and evaluate along the way."""

from typing import Annotated, Literal

from pydantic import Field, StringConstraints, model_validator

from difftrain.api.base import ApiModel, raise_problems, section, with_rules
from difftrain.api.uris import Uri

Prompt = Annotated[str, StringConstraints(max_length=2048)]


class SchedulerSpec(ApiModel):
    """Learning-rate schedule: a warmup, then the chosen curve."""

    model_config = with_rules(
        {
            # has() first: the API server also checks the rule on the schema's default ({}).
            "rule": "!has(self.type) || self.type != 'step' || has(self.stepSize)",
            "message": "spec.training.scheduler.stepSize is required when type is step",
            "fieldPath": ".stepSize",
        }
    )

    type: Literal["constant", "cosine", "linear", "step"] = Field(
        "cosine", description="Shape of the schedule after warmup."
    )
    warmup_steps: int | None = Field(
        None,
        ge=0,
        le=10_000_000,
        description="Optimiser steps of linear warmup. Overrides warmupRatio when set.",
    )
    warmup_ratio: float = Field(
        0.05, ge=0, lt=1, description="Warmup length as a fraction of all optimiser steps."
    )
    step_size: int | None = Field(
        None, ge=1, le=10_000_000, description="type step: optimiser steps between decays."
    )
    gamma: float = Field(0.5, gt=0, le=1, description="type step: factor of each decay.")

    @model_validator(mode="after")
    def _step_needs_size(self):
        if self.type == "step" and self.step_size is None:
            raise_problems([(("stepSize",), "is required when type is step")])
        return self


class OptimizerSpec(ApiModel):
    """The optimiser and its hyperparameters."""

    type: Literal["adamw", "adamw8bit", "prodigy", "adafactor"] = Field(
        "adamw",
        description="adamw (fused where available); adamw8bit needs bitsandbytes; "
        "prodigy needs prodigyopt and usually learningRate 1.0.",
    )
    betas: list[Annotated[float, Field(ge=0, lt=1)]] = Field(
        [0.9, 0.999], min_length=2, max_length=2, description="Adam's beta1 and beta2."
    )
    epsilon: float = Field(1e-8, gt=0, le=1, description="Adam's epsilon.")
    weight_decay: float = Field(1e-2, ge=0, le=1, description="Decoupled weight decay.")


class EmaSpec(ApiModel):
    """An exponential moving average of the trained weights, exported instead of the raw ones."""

    enabled: bool = Field(False, description="Keep and export an EMA of the trained weights.")
    decay: float = Field(0.9999, gt=0, lt=1, description="EMA decay per optimiser step.")


class FlowMatchingSpec(ApiModel):
    """The flow-matching objective of transformer families (SD3, Flux): how training
    timesteps are drawn and how their losses are weighted (the SD3 paper's choices)."""

    timestep_density: Literal["logitNormal", "mode", "uniform"] = Field(
        "logitNormal",
        description="Density of the training timesteps: logit-normal (logitMean, logitStd), "
        "the mode density (modeScale), or uniform.",
    )
    logit_mean: float = Field(0.0, ge=-10, le=10, description="logitNormal: the normal's mean.")
    logit_std: float = Field(1.0, gt=0, le=10, description="logitNormal: the normal's std.")
    mode_scale: float = Field(1.29, ge=-1, le=10, description="mode: the density's scale.")
    guidance: float | None = Field(
        None,
        ge=0,
        le=100,
        description="The guidance value given to guidance-distilled models (Flux.1 dev) in "
        "training: 1 when not set. Refused for a model without a guidance embedding.",
    )
    loss_weighting: Literal["none", "sigmaSqrt", "cosmap"] = Field(
        "none", description="Per-timestep loss weights: none, sigmaSqrt (1/sigma^2) or cosmap."
    )
    shift: float | None = Field(
        None,
        gt=0,
        le=100,
        description="The shift of the sigma schedule (sigma' = s*sigma / (1 + (s-1)*sigma)) "
        "for training, samples and the exported model's scheduler: the model's scheduler "
        "config when not set (SD3's 3.0, for 1024 px; Flux's grows with the image's size). "
        "Lower it for smaller images: 1 is no shift. Flow-matching models only.",
    )


class TrainingSpec(ApiModel):
    """The optimisation loop."""

    model_config = with_rules(
        {
            "rule": "has(self.steps) != has(self.epochs)",
            "message": "spec.training: set exactly one of steps and epochs",
        },
        {
            "rule": "!has(self.compile) || !self.compile || !has(self.strategy) || "
            "self.strategy != 'fsdp'",
            "message": "spec.training.compile: not with strategy fsdp; leave one of them out",
            "fieldPath": ".compile",
        },
    )

    steps: int | None = Field(
        None, ge=1, le=10_000_000, description="Optimiser steps to train. Exclusive with epochs."
    )
    epochs: int | None = Field(
        None, ge=1, le=100_000, description="Passes over the dataset. Exclusive with steps."
    )
    batch_size: int = Field(1, ge=1, le=1024, description="Images per device per micro-step.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=1024, description="Micro-steps accumulated into one optimiser step."
    )
    learning_rate: float = Field(1e-4, gt=0, le=10, description="Peak learning rate.")
    text_encoder_learning_rate: float | None = Field(
        None,
        gt=0,
        le=10,
        description="Learning rate of the text encoder(s) when trained. Defaults to learningRate.",
    )
    scheduler: SchedulerSpec = section(SchedulerSpec, "Learning-rate schedule.")
    optimizer: OptimizerSpec = section(OptimizerSpec, "Optimiser.")
    max_grad_norm: float = Field(
        1.0, ge=0, le=1e6, description="Clip the gradient norm to this value; 0 disables clipping."
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "bf16", description="Autocast precision of the forward pass (weights stay fp32)."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass to save memory."
    )
    compile: bool = Field(
        False,
        description="torch.compile each of the denoiser's repeated blocks (the first steps "
        "take the compile time, logged apart; not with strategy fsdp).",
    )
    snr_gamma: float | None = Field(
        None,
        gt=0,
        le=100,
        description="Min-SNR loss weighting gamma (5 is common); off when absent.",
    )
    noise_offset: float = Field(
        0.0, ge=0, le=1, description="Offset noise strength (helps very dark/bright images)."
    )
    ema: EmaSpec = section(EmaSpec, "Exponential moving average of the trained weights.")
    flow_matching: FlowMatchingSpec = section(
        FlowMatchingSpec, "Timesteps and loss weights of flow-matching models (SD3, Flux)."
    )
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed for weights, noise and data order.")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Distributed strategy across processes: ddp (replicas) or fsdp (the "
        "denoiser's parameters, gradients and optimiser state sharded across them; method "
        "finetune, or dreambooth with unet full).",
    )

    @model_validator(mode="after")
    def _compile_not_sharded(self):
        if self.compile and self.strategy == "fsdp":
            raise_problems([(("compile",), "not with strategy fsdp; leave one of them out")])
        return self

    @model_validator(mode="after")
    def _steps_or_epochs(self):
        if (self.steps is None) == (self.epochs is None):
            both = "both are set" if self.steps is not None else "neither is set"
            raise_problems([((), f"set exactly one of steps and epochs ({both})")])
        return self


class CheckpointSpec(ApiModel):
    """Checkpoints under OUTPUT/checkpoints/, which make training preemption-safe."""

    every_steps: int = Field(500, ge=1, le=10_000_000, description="Checkpoint every N steps.")
    keep_last: int = Field(3, ge=1, le=1000, description="Complete checkpoints kept; older go.")
    resume: Literal["auto", "never"] = Field(
        "auto",
        description="auto: start from the latest complete checkpoint if one exists; "
        "never: always start from the base model (this run's checkpoints then replace "
        "earlier ones).",
    )


class ValidationSpec(ApiModel):
    """Sample images generated during training, under OUTPUT/samples/."""

    prompts: list[Prompt] = Field(
        [], max_length=64, description="Prompts to sample; no samples are made when empty."
    )
    negative_prompt: Prompt = Field("", description="Negative prompt for every sample.")
    every_steps: int = Field(500, ge=1, le=10_000_000, description="Sample every N steps.")
    images_per_prompt: int = Field(1, ge=1, le=16, description="Images per prompt.")
    inference_steps: int = Field(25, ge=1, le=1000, description="Denoising steps per image.")
    guidance_scale: float = Field(7.5, ge=0, le=50, description="Classifier-free guidance scale.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the first image; fixed per run.")


class FidSpec(ApiModel):
    """Frechet Inception Distance of generated images against reference images."""

    reference_uri: Uri("s3", "file", "builtin") = Field(
        description="Folder of reference images (its captions, if any, are not read)."
    )
    weights_uri: Uri("s3", "file") = Field(
        description="InceptionV3 weights file in torch-fidelity's format (the standard "
        "weights-inception-2015-12-05 file); fetched from here, never from the internet."
    )
    features: Literal[64, 192, 768, 2048] = Field(
        2048, description="Inception layer compared: 2048 (the pool layer) is standard FID."
    )


class ClipScoreSpec(ApiModel):
    """CLIP score of generated images against their prompts."""

    model_uri: Uri("s3", "file") = Field(
        description="Folder of a CLIP model in transformers format (CLIPModel and its "
        "processor, as save_pretrained writes them)."
    )


class ValidationLossSpec(ApiModel):
    """The training loss on images held out of training, at fixed timesteps and noise."""

    model_config = with_rules(
        {
            "rule": "has(self.fraction) != has(self.uri)",
            "message": "spec.evaluation.validationLoss needs exactly one of fraction and uri",
        }
    )

    fraction: float | None = Field(
        None,
        gt=0,
        le=0.5,
        description="Share of the dataset held out of training (the same images every run "
        "of the same dataset).",
    )
    uri: Uri("s3", "file", "builtin") | None = Field(
        None, description="A separate dataset of images and captions to hold out."
    )
    timesteps: int = Field(
        4, ge=1, le=100, description="Fixed timesteps each held-out image is noised at."
    )
    max_images: int = Field(
        256, ge=1, le=100_000, description="At most this many held-out images are used."
    )

    @model_validator(mode="after")
    def _one_source(self):
        if (self.fraction is None) == (self.uri is None):
            both = "both are set" if self.fraction is not None else "neither is set"
            raise_problems([((), f"needs exactly one of fraction and uri ({both})")])
        return self


class EvaluationSpec(ApiModel):
    """Quantitative evaluation of the trained model, during training and after it."""

    model_config = with_rules(
        {
            "rule": "has(self.fid) || has(self.clipScore) || has(self.validationLoss)",
            "message": "spec.evaluation needs fid, clipScore or validationLoss (or leave "
            "evaluation out)",
        },
        {
            "rule": "!has(self.promptsUri) || !has(self.prompts) || size(self.prompts) == 0",
            "message": "spec.evaluation.promptsUri: set prompts or promptsUri, not both",
            "fieldPath": ".promptsUri",
        },
    )

    every_steps: int | None = Field(
        None, ge=1, le=10_000_000, description="Evaluate every N steps; only at the end if absent."
    )
    prompts: list[Prompt] = Field(
        [],
        max_length=10_000,
        description="Prompts to generate from, in turn; from promptsUri, else the dataset's "
        "captions, when empty.",
    )
    prompts_uri: Uri("s3", "file") | None = Field(
        None, description="A text file of prompts, one per line (instead of prompts)."
    )
    num_images: int = Field(256, ge=1, le=100_000, description="Images generated per evaluation.")
    inference_steps: int = Field(25, ge=1, le=1000, description="Denoising steps per image.")
    guidance_scale: float = Field(7.5, ge=0, le=50, description="Classifier-free guidance scale.")
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Seed of the first image (image k uses seed + k)."
    )
    fid: FidSpec | None = Field(None, description="Compute FID.")
    clip_score: ClipScoreSpec | None = Field(None, description="Compute CLIP score.")
    validation_loss: ValidationLossSpec | None = Field(
        None, description="Compute the loss on held-out images."
    )

    @model_validator(mode="after")
    def _some_metric(self):
        if self.fid is None and self.clip_score is None and self.validation_loss is None:
            raise_problems(
                [((), "needs fid, clipScore or validationLoss (or leave evaluation out)")]
            )
        if self.prompts and self.prompts_uri:
            raise_problems([(("promptsUri",), "set prompts or promptsUri, not both")])
        return self

    @property
    def generates(self) -> bool:
        """Whether the evaluation generates images (FID and CLIP score do)."""
        return self.fid is not None or self.clip_score is not None
