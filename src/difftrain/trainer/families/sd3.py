"""Stable Diffusion 3 and 3.5 (MMDiT): a transformer over 2x2 patches of 16-channel
latents, conditioned on three text encoders (two CLIP with projection, one T5) and
trained by flow matching over a shifted schedule."""

import torch

from difftrain.errors import InvalidSpec
from difftrain.trainer.families import register
from difftrain.trainer.families.flow import TINY_VAE, FlowFamily, tiny_t5

T5 = 2  # the T5 encoder's place among the text encoders

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
_TINY_VAE = {**TINY_VAE, "shift_factor": 0.0609, "scaling_factor": 1.5305}  # SD3's

# kohya's (sd-scripts') names of SD3's layers, those of Stability's MMDiT checkpoints
# (see flow.kohya_transformer).
KOHYA_LAYERS = {
    "joint_blocks": (
        "transformer_blocks",
        {
            "x_block_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
            "x_block_attn_proj": ("attn.to_out.0",),
            "x_block_attn2_qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),  # SD3.5's
            "x_block_attn2_proj": ("attn2.to_out.0",),
            "x_block_mlp_fc1": ("ff.net.0.proj",),
            "x_block_mlp_fc2": ("ff.net.2",),
            "x_block_adaLN_modulation_1": ("norm1.linear",),
            "context_block_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
            "context_block_attn_proj": ("attn.to_add_out",),
            "context_block_mlp_fc1": ("ff_context.net.0.proj",),
            "context_block_mlp_fc2": ("ff_context.net.2",),
            "context_block_adaLN_modulation_1": ("norm1_context.linear",),
        },
    ),
}


class StableDiffusion3(FlowFamily):
    name = "sd3"
    title = "SD3"
    kohya_layers = KOHYA_LAYERS
    text_encoders = 3
    presets = ("tiny-sd3",)
    t5 = T5
    transformer_class, pipeline_name = "SD3Transformer2DModel", "StableDiffusion3Pipeline"
    # T5 tokens per caption (what SD3's trainers use; the pipeline's own default, 256,
    # costs more and teaches the same).
    t5_tokens = 77

    def fit_pairs(self, components) -> list:
        transformer, vae = components.denoiser.config, components.vae.config
        clip = [encoder.config for encoder in components.text_encoders[:T5]]
        projections = sum(c.projection_dim for c in clip)
        return [
            (
                "in_channels",
                transformer.in_channels,
                "the VAE's latent_channels",
                vae.latent_channels,
            ),
            (
                "pooled_projection_dim",
                transformer.pooled_projection_dim,
                "the CLIP encoders' projection_dim together",
                projections,
            ),
        ]

    def check_fit(self, components) -> None:
        super().check_fit(components)
        t5 = components.text_encoders[T5].config
        clip = [encoder.config for encoder in components.text_encoders[:T5]]
        if sum(c.hidden_size for c in clip) > t5.d_model:
            raise InvalidSpec(
                "spec.model.components: the CLIP encoders' hidden_size together "
                f"({sum(c.hidden_size for c in clip)}) must not exceed the T5 encoder's "
                f"d_model ({t5.d_model})"
            )

    def kohya_state(self, states: dict, trainable, dtype) -> dict:
        kohya = super().kohya_state(states, trainable, dtype)
        # The last block's text stream ends in a norm whose output halves (scale, shift)
        # Stability's checkpoints hold the other way round (shift, scale).
        last = len(trainable.modules[self.denoiser].transformer_blocks) - 1
        key = f"lora_unet_joint_blocks_{last}_context_block_adaLN_modulation_1.lora_up.weight"
        if key in kohya:
            scale, shift = kohya[key].chunk(2)
            kohya[key] = torch.cat([shift, scale])
        return kohya

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

    def pipeline_class(self):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def preset_parts(self, name: str) -> dict:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection

        from difftrain.trainer import presets

        def clip():
            return CLIPTextModelWithProjection(presets.text_config(presets.tokenizer(), 32))

        parts = {
            "vae": AutoencoderKL(**_TINY_VAE),
            "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
            "transformer": SD3Transformer2DModel(**_TINY_TRANSFORMER),
            "text_encoder": clip(),
            "text_encoder_2": clip(),
        }
        parts["text_encoder_3"], parts["tokenizer_3"] = tiny_t5()
        return {**parts, "tokenizer": presets.tokenizer(), "tokenizer_2": presets.tokenizer()}


register(StableDiffusion3())
