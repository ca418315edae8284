"""Per-method settings: LoRA, DreamBooth, Textual Inversion and training from scratch."""

from typing import Literal

from pydantic import Field, field_validator, model_validator

from difftrain.api.base import ApiModel, ShortStr, raise_problems, section, with_rules
from difftrain.api.uris import Uri

PROMPT_MAX = 2048
DEFAULT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class LoraSpec(ApiModel):
    """Adapters on the denoiser's attention projections (and optionally the text encoders):
    LoRA, DoRA, LoKr or LoHa."""

    model_config = with_rules(
        {
            "rule": "!has(self.dora) || !self.dora || !has(self.type) || self.type == 'lora'",
            "message": "spec.lora.dora applies only to type lora",
            "fieldPath": ".dora",
        }
    )

    type: Literal["lora", "lokr", "loha"] = Field(
        "lora",
        description="The adapter: lora (two low-rank factors), lokr (a Kronecker product of "
        "two factors, LyCORIS's LoKr) or loha (a Hadamard product of two low-rank pairs, "
        "LyCORIS's LoHa), each through peft.",
    )
    dora: bool = Field(
        False,
        description="Weight-decomposed LoRA (DoRA): a learned magnitude per output feature "
        "beside the low-rank update of the direction. Type lora only.",
    )
    rank: int = Field(16, ge=1, le=1024, description="Rank of each adapter's two factors.")
    alpha: float | None = Field(
        None,
        gt=0,
        le=4096,
        description="Scaling numerator: the update is scaled by alpha/rank. Defaults to the rank.",
    )
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout on the adapter's input (lora); on its rank dimension (lokr, loha).",
    )
    target_modules: list[ShortStr] = Field(
        DEFAULT_LORA_TARGETS,
        min_length=1,
        max_length=64,
        description="Names (suffixes) of the linear layers that get adapters.",
    )
    train_text_encoder: bool = Field(
        False, description="Also put adapters on the text encoder(s)' attention projections."
    )

    @model_validator(mode="after")
    def _dora_is_lora(self):
        if self.dora and self.type != "lora":
            raise_problems([(("dora",), f"applies only to type lora (type is {self.type})")])
        return self

    @property
    def kohya_layout(self) -> bool:
        """Whether the kohya layout is written for these adapters: LoRA in kohya's keys,
        LoKr and LoHa in LyCORIS's; not DoRA."""
        return not self.dora


class DreamBoothSpec(ApiModel):
    """Teach the model one subject from a few images, optionally preserving its class prior."""

    model_config = with_rules(
        {
            "rule": "!has(self.classData) || has(self.classPrompt)",
            "message": "spec.dreambooth.classData needs spec.dreambooth.classPrompt",
            "fieldPath": ".classData",
        }
    )

    instance_prompt: str = Field(
        min_length=1,
        max_length=PROMPT_MAX,
        description='Prompt naming the subject with its rare token, e.g. "a photo of sks dog".',
    )
    class_prompt: str | None = Field(
        None,
        min_length=1,
        max_length=PROMPT_MAX,
        description='Prompt for the subject\'s class, e.g. "a photo of a dog". Setting it turns '
        "on prior preservation.",
    )
    class_data: Uri("s3", "file") | None = Field(
        None,
        description="Class images to use for prior preservation. When absent, they are "
        "generated with the base model before training and saved under the output URI.",
    )
    num_class_images: int = Field(
        100, ge=1, le=100_000, description="How many class images to generate (or use)."
    )
    class_inference_steps: int = Field(
        30, ge=1, le=1000, description="Denoising steps when generating class images."
    )
    class_seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed for generating class images.")
    prior_loss_weight: float = Field(
        1.0, ge=0, le=100, description="Weight of the prior-preservation loss term."
    )
    unet: Literal["lora", "full"] = Field(
        "lora",
        description="Train LoRA adapters on the UNet (settings in spec.lora) or the full UNet.",
    )
    train_text_encoder: bool = Field(False, description="Also train the text encoder(s).")

    @model_validator(mode="after")
    def _class_data_needs_prompt(self):
        if self.class_data is not None and self.class_prompt is None:
            raise_problems(
                [(("classData",), "needs spec.dreambooth.classPrompt (the class the images show)")]
            )
        return self


class TextualInversionSpec(ApiModel):
    """Learn new token embeddings for a concept; the rest of the model stays frozen."""

    placeholder_token: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^\S+$",
        description='The new token to add to the vocabulary, e.g. "<my-cat>".',
    )
    initializer_token: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^\S+$",
        description='An existing single token whose embedding starts the new one, e.g. "cat".',
    )
    vectors: int = Field(
        1, ge=1, le=64, description="Embedding vectors learned for the placeholder token."
    )
    template: Literal["object", "style"] = Field(
        "object",
        description="Prompt templates used for training: an object ('a photo of a <token>') "
        "or a style ('a painting in the style of <token>').",
    )

    @field_validator("placeholder_token", "initializer_token", mode="before")
    @classmethod
    def _one_word(cls, value):
        if isinstance(value, str) and value and any(c.isspace() for c in value):
            raise ValueError(f"must be a single token without spaces (got '{value}')")
        return value


class AutoencoderSpec(ApiModel):
    """The first stage of method full: training the autoencoder (VAE) from scratch."""

    steps: int = Field(
        2000, ge=1, le=10_000_000, description="Optimiser steps of the autoencoder stage."
    )
    learning_rate: float = Field(
        1e-4, gt=0, le=1, description="Learning rate of the autoencoder stage (AdamW)."
    )
    kl_weight: float = Field(
        1e-6,
        ge=0,
        le=1,
        description="Weight of the KL term that keeps the latent space close to a normal "
        "distribution, next to the pixel reconstruction loss.",
    )


class FullSpec(ApiModel):
    """Training a new model from scratch (method full)."""

    model_config = with_rules(
        {
            "rule": "self.reuse.all(c, self.reuse.exists_one(d, d == c))",
            "message": "spec.full.reuse lists a component twice",
            "fieldPath": ".reuse",
        }
    )

    reuse: list[Literal["vae", "textEncoders"]] = Field(
        [],
        max_length=2,
        description="Components taken with their trained weights from spec.model.base and "
        "kept frozen (e.g. a released model's VAE and text encoders). Every other component "
        "starts from random initialisation and trains: the VAE in a first, autoencoder stage; "
        "the UNet and text encoders together in the diffusion stage.",
    )
    autoencoder: AutoencoderSpec = section(
        AutoencoderSpec, "The autoencoder stage; it runs when the VAE is not reused."
    )

    @field_validator("reuse")
    @classmethod
    def _unique(cls, value):
        if len(set(value)) != len(value):
            raise ValueError("lists a component twice")
        return value
