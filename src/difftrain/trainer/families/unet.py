"""What the UNet families (SD 1.x/2.x, SDXL) share: VAE latents, the denoising objective
(noise or velocity prediction over a DDPM schedule, min-SNR weights), CLIP text encoders
and diffusers' LoRA layout. A base class, not a family: it registers nothing."""

from difftrain.errors import InvalidSpec
from difftrain.trainer import loss
from difftrain.trainer.families import Family, kohya_encoder

# Attention projections of CLIP text encoders.
CLIP_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


class UNetFamily(Family):
    def scale_latents(self, components, sampled):
        return sampled.float() * components.vae.config.scaling_factor

    def objective(self, components, training, device):
        return loss.Denoising(
            alphas_cumprod=components.noise_scheduler.alphas_cumprod.to(device),
            timesteps=components.noise_scheduler.config.num_train_timesteps,
            prediction_type=components.prediction_type,
            noise_offset=training.noise_offset,
            snr_gamma=training.snr_gamma,
        )

    def predict(self, denoiser, noisy, timesteps, text: dict, extra: dict):
        return denoiser(noisy, timesteps, **text, **extra).sample

    def check(self, spec, components) -> None:
        if spec.training.flow_matching.shift is not None:
            raise InvalidSpec(
                "spec.training.flowMatching.shift: shifts the sigmas of flow-matching "
                f"models (SD3, Flux); {self.name} models learn by denoising over their DDPM "
                "schedule; remove it"
            )

    def check_fit(self, components) -> None:
        unet, vae = components.denoiser.config, components.vae.config
        if unet.in_channels != vae.latent_channels:
            raise InvalidSpec(
                f"spec.model.components: the UNet's in_channels ({unet.in_channels}) must "
                f"equal the VAE's latent_channels ({vae.latent_channels})"
            )
        widths = [encoder.config.hidden_size for encoder in components.text_encoders]
        if isinstance(unet.cross_attention_dim, int) and unet.cross_attention_dim != sum(widths):
            raise InvalidSpec(
                f"spec.model.components: the UNet's cross_attention_dim "
                f"({unet.cross_attention_dim}) must equal the text encoders' hidden_size "
                f"({' + '.join(map(str, widths))})"
            )

    def blocks(self, denoiser) -> list:
        return [*denoiser.down_blocks, denoiser.mid_block, *denoiser.up_blocks]

    def sampler(self, config: dict):
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler.from_config(config)  # a fast multistep sampler

    def lora_targets(self, requested: list[str]) -> list[str]:
        return list(requested)  # the API's default is the UNet's attention projections

    def text_encoder_lora_targets(self) -> list[str]:
        return list(CLIP_LORA_TARGETS)

    def kohya_component(self, prefix: str) -> str:
        if prefix == "unet":
            return "unet"
        return kohya_encoder(prefix)

    def save_lora(self, folder, states: dict, metadata: dict) -> None:
        from diffusers.utils import convert_state_dict_to_diffusers

        layers = {
            f"{part}_lora_layers": convert_state_dict_to_diffusers(state)
            for part, state in states.items()
        }
        self.pipeline_class().save_lora_weights(
            folder, safe_serialization=True, **layers, **metadata
        )

    def pipeline_class(self):
        raise NotImplementedError
