"""The autoencoder stage of method full: a VAE trained from scratch before the UNet.

A randomly initialised VAE cannot decode, and a diffusion model can only learn in a
latent space that already exists, so ``full`` first trains the VAE on the same images
(pixel reconstruction plus a small KL term, as in the latent diffusion paper without its
perceptual and adversarial losses) and freezes it. The stage is an ordinary run of the
training loop rooted at ``OUTPUT/autoencoder/``: it checkpoints and resumes the same
way, and its result is ``OUTPUT/autoencoder/model/`` (a diffusers AutoencoderKL folder)
whose ``difftrain.json``, written last, marks the stage done. Its latent scaling factor
is measured on the training images, so the diffusion stage sees unit-variance latents.
"""

import itertools
import json
import logging
from pathlib import Path

import torch

from difftrain import contract
from difftrain.errors import InvalidSpec
from difftrain.storage import Store
from difftrain.trainer import data

log = logging.getLogger(__name__)

FOLDER = contract.AUTOENCODER_STAGE
MODEL = contract.MODEL
RECORD = "difftrain.json"
# Batches measured for the latent scaling factor.
SCALE_BATCHES = 8


class Objective(torch.nn.Module):
    """The VAE's training forward pass, one module so that DDP sees all of it."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor, generator: torch.Generator):
        posterior = self.vae.encode(pixels).latent_dist
        reconstruction = self.vae.decode(posterior.sample(generator)).sample
        return reconstruction, posterior.kl()


def loss(pixels, reconstruction, kl, kl_weight: float) -> torch.Tensor:
    """Mean squared pixel error plus ``kl_weight`` times the mean per-image KL."""
    error = torch.nn.functional.mse_loss(reconstruction.float(), pixels.float())
    return error + kl_weight * kl.float().mean()


def is_done(output: Store, spec_hash: str) -> bool:
    """Whether the stage was finished by a run of the same training spec (identity.py);
    an autoencoder trained for another spec is trained again, not reused."""
    try:
        record = json.loads(output.child(FOLDER).read_bytes(f"{MODEL}/{RECORD}"))
    except (FileNotFoundError, ValueError):
        return False
    return isinstance(record, dict) and record.get("specHash") == spec_hash


def scaling_factor(vae, batches, generator: torch.Generator) -> float:
    """1 / the standard deviation of the latents of ``batches`` (pixel tensors)."""
    latents = []
    with torch.no_grad():
        for pixels in batches:
            posterior = vae.encode(pixels.to(vae.device, dtype=vae.dtype)).latent_dist
            latents.append(posterior.sample(generator).float().flatten())
    std = float(torch.cat(latents).std())
    return 1.0 / std if std > 0 else 1.0


def export(vae, factor: float, folder: Path, store: Store, facts: dict) -> None:
    """Save the trained VAE with its scaling factor and mark the stage done."""
    vae.register_to_config(scaling_factor=factor)
    vae.save_pretrained(folder, safe_serialization=True)
    store.upload_tree(folder, MODEL)
    store.write_bytes(f"{MODEL}/{RECORD}", json.dumps(facts, indent=2).encode() + b"\n")
    log.info("autoencoder stage done: latent scaling factor %.4f, %s", factor, store.uri)


def export_stage(stage) -> None:
    """Measure the latent scale on the first batches of the data, then save the VAE."""
    first = itertools.islice(stage.batches.epoch(0, 0), SCALE_BATCHES)
    pixels = (data.collate([stage.dataset[key] for key in keys])["pixels"] for keys in first)
    vae = stage.trainable.modules["vae"]
    factor = scaling_factor(vae, pixels, stage.generator)
    facts = {
        "stage": FOLDER,
        "steps": stage.total_steps,
        "finalLoss": stage.losses[-1] if stage.losses else None,
        "scalingFactor": factor,
        "specHash": stage.identity.spec_hash,
    }
    export(vae, factor, stage.scratch / MODEL, stage.output, facts)


def load(output: Store, scratch: Path):
    """The trained VAE of a finished autoencoder stage."""
    from diffusers import AutoencoderKL

    local = scratch / FOLDER / "trained"
    output.child(FOLDER).download_tree(MODEL, local, unsafe_error=InvalidSpec)
    return AutoencoderKL.from_pretrained(local)
