"""Stable Diffusion 3 and 3.5 (MMDiT): a transformer over 2x2 patches of 16-channel
latents, conditioned on three text encoders (two CLIP with projection, one T5) and
trained by flow matching over a shifted schedule."""

from typing import ClassVar

import torch

from difftrain.api.methods import DEFAULT_LORA_TARGETS
from difftrain.errors import InvalidSpec
from difftrain.trainer import loss
from difftrain.trainer.families import Family, register
from difftrain.trainer.families.unet import CLIP_LORA_TARGETS

# The projections of the text stream's attention, beside the image stream's (which the
# API's default targets name).
CONTEXT_LORA_TARGETS = ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
# T5 tokens per caption, in training and in samples alike (what SD3's trainers use; the
# pipeline's own default, 256, costs more and teaches the same).
T5_TOKENS = 77
T5 = 2  # the T5 encoder's place among the text encoders

_TINY_T5 = {
    "d_model": 80,  # wider than the two CLIP encoders together, as in SD3 (4096 > 2048)
    "d_kv": 16,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 2,
    "relative_attention_num_buckets": 8,
    "feed_forward_proj": "gated-gelu",  # T5 v1.1, the encoder SD3 uses
    "dropout_rate": 0.0,
}
_TINY_TRANSFORMER = {
    "sample_size": 16,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 80,  # the T5 encoder's width
    "caption_projection_dim": 64,  # the transformer's own width (heads x head dim): a
    # patch's 2 x 2 x 16 latents fit it, as SD3's fit its 1536
    "pooled_projection_dim": 64,  # both CLIP projections, side by side
    "pos_embed_max_size": 64,
    "qk_norm": "rms_norm",  # as in SD3.5
    "dual_attention_layers": (0,),  # SD3.5 Medium's second image attention
}
_TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "layers_per_block": 1,
    "sample_size": 32,
    "shift_factor": 0.0609,
    "scaling_factor": 1.5305,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


class StableDiffusion3(Family):
    name = "sd3"
    denoiser = "transformer"
    denoiser_title = "transformer"
    text_encoders = 3
    presets = ("tiny-sd3",)
    refused_methods: ClassVar[dict[str, str]] = {
        "textualInversion": "its T5 encoder reads every prompt beside the CLIP encoders, so "
        "a new CLIP token alone teaches little; use lora or dreambooth",
    }

    def matches(self, index: dict, configs: dict[str, dict]) -> bool:
        transformer = configs.get("transformer") or {}
        return (
            transformer.get("_class_name") == "SD3Transformer2DModel"
            or index.get("_class_name") == "StableDiffusion3Pipeline"
        )

    def check_fit(self, components) -> None:
        transformer, vae = components.denoiser.config, components.vae.config
        t5 = components.text_encoders[T5].config
        clip = [encoder.config for encoder in components.text_encoders[:T5]]
        pairs = [
            (
                "in_channels",
                transformer.in_channels,
                "the VAE's latent_channels",
                vae.latent_channels,
            ),
            (
                "joint_attention_dim",
                transformer.joint_attention_dim,
                "the T5 encoder's d_model",
                t5.d_model,
            ),
            (
                "pooled_projection_dim",
                transformer.pooled_projection_dim,
                "the CLIP encoders' projection_dim together",
                sum(c.projection_dim for c in clip),
            ),
        ]
        for field, value, what, wanted in pairs:
            if value != wanted:
                raise InvalidSpec(
                    f"spec.model.components.transformer: {field} ({value}) must equal {what} "
                    f"({wanted})"
                )
        if sum(c.hidden_size for c in clip) > t5.d_model:
            raise InvalidSpec(
                "spec.model.components: the CLIP encoders' hidden_size together "
                f"({sum(c.hidden_size for c in clip)}) must not exceed the T5 encoder's "
                f"d_model ({t5.d_model})"
            )

    def check(self, spec, components) -> None:
        training = spec.training
        for field, value in (
            ("snrGamma", training.snr_gamma),
            ("noiseOffset", training.noise_offset),
        ):
            if value:
                raise InvalidSpec(
                    f"spec.training.{field}: applies to noise-prediction models; {self.name} "
                    "models learn by flow matching (see spec.training.flowMatching); remove it"
                )
        if spec.model.prediction_type != "auto":
            raise InvalidSpec(
                f"spec.model.predictionType: {self.name} models predict the flow's velocity; "
                "leave predictionType at auto"
            )
        if "kohya" in (spec.output.formats or []):
            raise InvalidSpec(
                f"spec.output.formats: the kohya layout is not written for {self.name} "
                "LoRA in this trainer version; use diffusers (ComfyUI and Forge load it too)"
            )
        if components.noise_scheduler.config.get("use_dynamic_shifting"):
            raise InvalidSpec(
                f"spec.model.base: the scheduler of this {self.name} model shifts by "
                "resolution (use_dynamic_shifting), which SD3 models do not; set a fixed shift"
            )

    def pixel_multiple(self, components) -> int:
        return super().pixel_multiple(components) * components.denoiser.config.patch_size

    # Training.

    def prediction_type(self, scheduler) -> str:
        return "flow"  # the velocity from the image to the noise

    def latents(self, components, pixels, generator):
        vae = components.vae
        sampled = vae.encode(pixels).latent_dist.sample(generator).float()
        return (sampled - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor

    def objective(self, components, training, device):
        scheduler = components.noise_scheduler
        fresh = type(scheduler).from_config(scheduler.config)  # the training schedule, unset
        return loss.FlowMatching(
            sigmas=fresh.sigmas.to(device),
            timesteps=fresh.timesteps.to(device),
            settings=training.flow_matching,
        )

    def token_length(self, index: int, tokenizer) -> int:
        if index == T5:
            return min(tokenizer.model_max_length, T5_TOKENS)
        return tokenizer.model_max_length

    def trained_encoders(self) -> list[str]:
        return self.encoder_names()[:T5]  # the CLIP encoders; T5 stays as it is

    def encode_text(self, components, ids: list) -> dict:
        """The CLIP encoders' penultimate hidden states side by side, zero-padded to the
        T5 width and followed by T5's tokens ``(B, 77 + L, D)``; the CLIP projections
        side by side as ``pooled_projections`` ``(B, P)``."""
        states, pooled = [], []
        for tokens, encoder in zip(ids[:T5], components.text_encoders[:T5], strict=True):
            output = encoder(tokens, output_hidden_states=True)
            states.append(output.hidden_states[-2])
            pooled.append(output[0])
        t5 = components.text_encoders[T5](ids[T5])[0]
        clip = torch.cat(states, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {
            "encoder_hidden_states": torch.cat([clip, t5.to(clip.dtype)], dim=-2),
            "pooled_projections": torch.cat(pooled, dim=-1),
        }

    def predict(self, denoiser, noisy, timesteps, text: dict, extra: dict):
        return denoiser(hidden_states=noisy, timestep=timesteps, **text, return_dict=False)[0]

    # Sampling and export.

    def sampler(self, config: dict):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(config)

    def sampling_options(self, components) -> dict:
        return {"max_sequence_length": self.token_length(T5, components.tokenizers[T5])}

    def export_formats(self, lora: bool) -> list[str]:
        return ["diffusers"]

    def pipeline_class(self):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def pipeline(self, parts: dict):
        return self.pipeline_class()(**parts)

    def lora_targets(self, requested: list[str]) -> list[str]:
        if list(requested) == DEFAULT_LORA_TARGETS:  # both streams' attention
            return [*requested, *CONTEXT_LORA_TARGETS]
        return list(requested)

    def text_encoder_lora_targets(self) -> list[str]:
        return list(CLIP_LORA_TARGETS)

    def save_lora(self, folder, states: dict, metadata: dict) -> None:
        layers = {f"{part}_lora_layers": state for part, state in states.items()}  # peft's keys
        self.pipeline_class().save_lora_weights(
            folder, safe_serialization=True, **layers, **metadata
        )

    def preset_parts(self, name: str) -> dict:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

        from difftrain.trainer import presets
        from difftrain.trainer.tokenizer import build_t5_tokenizer

        t5_tokenizer = build_t5_tokenizer()
        t5 = T5Config(
            vocab_size=len(t5_tokenizer),
            pad_token_id=t5_tokenizer.pad_token_id,
            eos_token_id=t5_tokenizer.eos_token_id,
            decoder_start_token_id=t5_tokenizer.pad_token_id,
            **_TINY_T5,
        )
        return {
            "vae": AutoencoderKL(**_TINY_VAE),
            "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
            "transformer": SD3Transformer2DModel(**_TINY_TRANSFORMER),
            "text_encoder": CLIPTextModelWithProjection(
                presets.text_config(presets.tokenizer(), 32)
            ),
            "text_encoder_2": CLIPTextModelWithProjection(
                presets.text_config(presets.tokenizer(), 32)
            ),
            "text_encoder_3": T5EncoderModel(t5),
            "tokenizer": presets.tokenizer(),
            "tokenizer_2": presets.tokenizer(),
            "tokenizer_3": t5_tokenizer,
        }


register(StableDiffusion3())
