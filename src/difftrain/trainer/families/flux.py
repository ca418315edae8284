"""Flux.1 (dev, schnell and their fine-tunes): a transformer over 16-channel latents
packed 2x2 into tokens with their position ids, conditioned on CLIP's pooled embedding
and T5's tokens, a guidance embedding in guidance-distilled models (dev), and flow
matching with sigmas shifted by the image's size."""

import torch

from difftrain.errors import InvalidSpec
from difftrain.trainer.families import register
from difftrain.trainer.families.flow import TINY_VAE, FlowFamily, tiny_t5

T5 = 1  # the T5 encoder's place among the text encoders
DEFAULT_GUIDANCE = 1.0  # what guidance-distilled models train with when the job says none

_TINY_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,  # 16 latent channels, packed 2 x 2
    "num_layers": 1,  # double-stream blocks
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 80,  # the T5 encoder's width
    "pooled_projection_dim": 32,  # CLIP's width
    "guidance_embeds": True,  # as Flux.1 dev
    "axes_dims_rope": (4, 6, 6),  # rotary dims of (text, row, column): the head dim
}
_TINY_VAE = {**TINY_VAE, "shift_factor": 0.1159, "scaling_factor": 0.3611}  # Flux's
_SCHEDULER = {  # Flux.1 dev's: shifted by resolution
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


# kohya's (sd-scripts') names of Flux's layers (see flow.kohya_transformer).
KOHYA_LAYERS = {
    "double_blocks": (
        "transformer_blocks",
        {
            "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
            "img_attn_proj": ("attn.to_out.0",),
            "img_mlp_0": ("ff.net.0.proj",),
            "img_mlp_2": ("ff.net.2",),
            "img_mod_lin": ("norm1.linear",),
            "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
            "txt_attn_proj": ("attn.to_add_out",),
            "txt_mlp_0": ("ff_context.net.0.proj",),
            "txt_mlp_2": ("ff_context.net.2",),
            "txt_mod_lin": ("norm1_context.linear",),
        },
    ),
    "single_blocks": (
        "single_transformer_blocks",
        {
            "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
            "linear2": ("proj_out",),
            "modulation_lin": ("norm.linear",),
        },
    ),
}


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` latents as ``(B, H/2 * W/2, 4C)`` tokens, each a 2x2 patch."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack` for latents of ``height`` x ``width``."""
    b, _, features = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, features // 4, 2, 2)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(b, features // 4, height, width)


def image_ids(rows: int, columns: int, device, dtype) -> torch.Tensor:
    """Each token's position ``(rows * columns, 3)``: (0, row, column)."""
    ids = torch.zeros(rows, columns, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(rows, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(columns, device=device, dtype=dtype)[None, :]
    return ids.reshape(rows * columns, 3)


class Flux(FlowFamily):
    name = "flux"
    text_encoders = 2
    presets = ("tiny-flux",)
    t5 = T5
    transformer_class, pipeline_name = "FluxTransformer2DModel", "FluxPipeline"
    t5_tokens = 512  # Flux.1 dev's (schnell's tokenizer or the job may say fewer)
    title = "Flux"
    kohya_layers = KOHYA_LAYERS
    # proj_out would also reach the final layer, which the layout does not name.
    kohya_unnamed = frozenset({"proj_out"})

    def fit_pairs(self, components) -> list:
        transformer, vae = components.denoiser.config, components.vae.config
        clip = components.text_encoders[0].config
        rope = sum(transformer.axes_dims_rope)
        return [
            (
                "in_channels",
                transformer.in_channels,
                "4 x the VAE's latent_channels",
                4 * vae.latent_channels,
            ),
            (
                "pooled_projection_dim",
                transformer.pooled_projection_dim,
                "CLIP's hidden_size",
                clip.hidden_size,
            ),
            (
                "axes_dims_rope",
                rope,
                "attention_head_dim",
                transformer.attention_head_dim,
                f"summing to {rope}",
            ),
        ]

    def check(self, spec, components) -> None:
        super().check(spec, components)
        guidance = spec.training.flow_matching.guidance
        if guidance is not None and not components.denoiser.config.guidance_embeds:
            raise InvalidSpec(
                "spec.training.flowMatching.guidance: this Flux model has no guidance "
                "embedding (guidance_embeds is false, as in Flux.1 schnell), so there is "
                "nothing to give the value to; remove it"
            )

    def patch(self, components) -> int:
        return 2 * components.denoiser.config.patch_size  # 2x2 latents per token

    # Training.

    def encode_text(self, components, ids: list) -> dict:
        """CLIP's pooled embedding ``(B, D)`` as ``pooled_projections`` and T5's tokens
        ``(B, L, D5)`` as the sequence."""
        clip, t5 = components.text_encoders
        return {
            "pooled_projections": clip(ids[0]).pooler_output,
            "encoder_hidden_states": t5(ids[T5])[0],
        }

    def conditioning(self, components, batch: dict, training, device) -> dict:
        if not components.denoiser.config.guidance_embeds:
            return {}
        value = training.flow_matching.guidance
        count = len(batch["captions"])
        guidance = DEFAULT_GUIDANCE if value is None else value
        return {"guidance": torch.full((count,), guidance, device=device)}

    def predict(self, denoiser, noisy, timesteps, text: dict, extra: dict):
        height, width = noisy.shape[-2:]
        states = text["encoder_hidden_states"]
        output = denoiser(
            hidden_states=pack(noisy),
            timestep=timesteps / 1000,  # Flux reads sigma, not the timestep
            guidance=extra.get("guidance"),
            pooled_projections=text["pooled_projections"],
            encoder_hidden_states=states,
            txt_ids=torch.zeros(states.shape[1], 3, device=states.device, dtype=states.dtype),
            img_ids=image_ids(height // 2, width // 2, noisy.device, noisy.dtype),
            return_dict=False,
        )[0]
        return unpack(output, height, width)

    # Sampling and export.

    def pipeline_class(self):
        from diffusers import FluxPipeline

        return FluxPipeline

    def preset_parts(self, name: str) -> dict:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel

        from difftrain.trainer import presets

        parts = {
            "vae": AutoencoderKL(**_TINY_VAE),
            "scheduler": FlowMatchEulerDiscreteScheduler(**_SCHEDULER),
            "transformer": FluxTransformer2DModel(**_TINY_TRANSFORMER),
            "text_encoder": CLIPTextModel(presets.text_config(presets.tokenizer())),
        }
        parts["text_encoder_2"], parts["tokenizer_2"] = tiny_t5()
        return {**parts, "tokenizer": presets.tokenizer()}


register(Flux())
