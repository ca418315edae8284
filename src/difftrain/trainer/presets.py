"""Built-in tiny models (``preset:NAME``; each model family names its own), made from
configs.

They have the architecture of their family at a fraction of the size, random weights
from a fixed seed and the offline tokenizer, so every code path runs on a CPU in seconds
and nothing is downloaded. :func:`write_preset` saves one as an ordinary diffusers folder,
so presets load through exactly the same code as real models.
"""

from pathlib import Path

import torch

from difftrain.trainer.tokenizer import build_tokenizer

_SEED = 0

_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "steps_offset": 1,
}

# The presets' VAE (the UNet families'; families/flow.py widens its latents).
VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "layers_per_block": 1,
    "sample_size": 32,
}

# The UNet families' denoiser, at the size of the presets (each family adds its own).
UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
}


def text_config(tokenizer, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    extra = {"projection_dim": projection_dim} if projection_dim else {}
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def tokenizer():
    """The offline CLIP tokenizer of every preset."""
    return build_tokenizer()


def build_preset(name: str):
    """A diffusers pipeline for preset ``name`` with seeded random weights: the VAE and
    scheduler every preset shares, and its family's own parts."""
    from diffusers import AutoencoderKL, DDPMScheduler

    from difftrain.trainer import families

    family = families.of_preset(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        shared = {"vae": AutoencoderKL(**VAE), "scheduler": DDPMScheduler(**_SCHEDULER)}
        return family.pipeline({**shared, **family.preset_parts(name)})


def write_preset(name: str, folder: Path) -> Path:
    """Save preset ``name`` as a diffusers folder at ``folder``."""
    build_preset(name).save_pretrained(folder, safe_serialization=True)
    return folder
