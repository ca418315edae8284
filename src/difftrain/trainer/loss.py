"""The diffusion training objective as pure functions over tensors.

Shapes: latents, noise, predictions ``(B, C, H, W)``; timesteps ``(B,)`` integers;
``alphas_cumprod`` ``(T,)``, the noise schedule's cumulative product of alphas.
"""

import math
from dataclasses import dataclass

import torch


def sample_noise(latents: torch.Tensor, generator: torch.Generator | None, offset: float = 0.0):
    """Gaussian noise like ``latents``; with ``offset`` > 0, plus a per-channel constant
    ("offset noise"), which lets the model learn very dark and very bright images."""
    noise = torch.randn(
        latents.shape, generator=generator, device=latents.device, dtype=latents.dtype
    )
    if offset:
        shift = torch.randn(
            latents.shape[:2], generator=generator, device=latents.device, dtype=latents.dtype
        )
        noise = noise + offset * shift[:, :, None, None]
    return noise


def _at(values: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """``values[timesteps]`` shaped ``(B, 1, 1, 1)`` for broadcasting over images."""
    return values.to(timesteps.device)[timesteps].float()[:, None, None, None]


def add_noise(latents, noise, timesteps, alphas_cumprod) -> torch.Tensor:
    """The forward process ``sqrt(a) * x0 + sqrt(1 - a) * noise``, ``a = alphas_cumprod[t]``."""
    alpha = _at(alphas_cumprod, timesteps)
    noisy = alpha.sqrt() * latents.float() + (1 - alpha).sqrt() * noise.float()
    return noisy.to(latents.dtype)


def target(prediction_type: str, latents, noise, timesteps, alphas_cumprod) -> torch.Tensor:
    """What the model should output: the noise (epsilon) or the velocity (v_prediction)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        alpha = _at(alphas_cumprod, timesteps)
        velocity = alpha.sqrt() * noise.float() - (1 - alpha).sqrt() * latents.float()
        return velocity.to(noise.dtype)
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``a / (1 - a)`` per sample, shape ``(B,)``."""
    alpha = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha / (1 - alpha)


def min_snr_weights(timesteps, alphas_cumprod, gamma: float, prediction_type: str):
    """Min-SNR-gamma loss weights (Hang et al. 2023), shape ``(B,)``.

    For epsilon the MSE is weighted by ``min(snr, gamma) / snr``; for v-prediction, whose
    loss already carries a factor ``snr + 1``, by ``min(snr, gamma) / (snr + 1)``.
    """
    ratio = snr(timesteps, alphas_cumprod)
    clipped = torch.clamp(ratio, max=gamma)
    return clipped / (ratio + 1 if prediction_type == "v_prediction" else ratio)


def per_sample_mse(prediction: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample, in fp32, shape ``(B,)``."""
    return ((prediction.float() - expected.float()) ** 2).mean(dim=(1, 2, 3))


def diffusion_loss(prediction, expected, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The batch's loss: per-sample MSE, optionally weighted, averaged over the batch."""
    losses = per_sample_mse(prediction, expected)
    if weights is not None:
        losses = losses * weights
    return losses.mean()


@dataclass
class Noised:
    """One batch made ready for the denoiser: its input, the timesteps, what it should
    output, and the per-sample loss weights (None for none)."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weights: torch.Tensor | None


@dataclass
class Denoising:
    """The objective of DDPM-trained models: noise the latents at a uniformly drawn
    timestep; the target is the noise or the velocity; min-SNR weights when asked."""

    alphas_cumprod: torch.Tensor  # on the training device
    timesteps: int  # the schedule's length
    prediction_type: str
    noise_offset: float = 0.0
    snr_gamma: float | None = None

    def __call__(self, latents: torch.Tensor, generator: torch.Generator) -> Noised:
        noise = sample_noise(latents, generator, self.noise_offset)
        steps = torch.randint(
            0, self.timesteps, (latents.shape[0],), generator=generator, device=latents.device
        )
        alphas = self.alphas_cumprod
        weights = None
        if self.snr_gamma:
            weights = min_snr_weights(steps, alphas, self.snr_gamma, self.prediction_type)
        return Noised(
            noisy=add_noise(latents, noise, steps, alphas),
            timesteps=steps,
            target=target(self.prediction_type, latents, noise, steps, alphas),
            weights=weights,
        )

    def fixed(self, latents: torch.Tensor, noise: torch.Tensor, u: torch.Tensor) -> Noised:
        """The batch noised with the given ``noise`` at timesteps ``floor(u * T)``, ``u``
        in [0, 1) of shape ``(B,)``; no loss weights (held-out losses compare runs)."""
        steps = (u * self.timesteps).long().clamp(0, self.timesteps - 1).to(latents.device)
        alphas = self.alphas_cumprod
        return Noised(
            noisy=add_noise(latents, noise, steps, alphas),
            timesteps=steps,
            target=target(self.prediction_type, latents, noise, steps, alphas),
            weights=None,
        )


# Flow matching (rectified flow, as SD3 trains): x_t = (1 - sigma) x0 + sigma noise, and
# the model predicts the velocity noise - x0.


def timestep_density(
    kind: str, size: int, generator, device, mean=0.0, std=1.0, mode_scale=1.29
) -> torch.Tensor:
    """``size`` draws of u in [0, 1] from the SD3 paper's densities: ``logitNormal``
    (sigmoid of a normal), ``mode`` (u - s (cos^2(pi u / 2) - 1 + u), mirrored) or
    ``uniform``."""
    if kind == "logitNormal":
        normal = torch.randn(size, generator=generator, device=device) * std + mean
        return torch.sigmoid(normal)
    uniform = torch.rand(size, generator=generator, device=device)
    if kind == "mode":
        return 1 - uniform - mode_scale * (torch.cos(torch.pi * uniform / 2) ** 2 - 1 + uniform)
    if kind == "uniform":
        return uniform
    raise ValueError(f"unknown timestep density {kind!r}")


def flow_noisy(latents, noise, sigmas) -> torch.Tensor:
    """``(1 - sigma) * x0 + sigma * noise``, ``sigmas`` of shape ``(B,)``."""
    sigma = sigmas.float()[:, None, None, None]
    return ((1 - sigma) * latents.float() + sigma * noise.float()).to(latents.dtype)


def flow_target(latents, noise) -> torch.Tensor:
    """The velocity along the straight path from the image to the noise."""
    return noise - latents


def flow_weights(kind: str, sigmas: torch.Tensor) -> torch.Tensor | None:
    """Per-sample loss weights: none, ``sigmaSqrt`` (1 / sigma^2) or ``cosmap``
    (2 / (pi (1 - 2 sigma + 2 sigma^2)))."""
    sigma = sigmas.float()
    if kind == "none":
        return None
    if kind == "sigmaSqrt":
        return sigma**-2
    if kind == "cosmap":
        return 2 / (torch.pi * (1 - 2 * sigma + 2 * sigma**2))
    raise ValueError(f"unknown loss weighting {kind!r}")


@dataclass(frozen=True)
class Shift:
    """A resolution-dependent shift of sigmas (Flux's ``use_dynamic_shifting``): its
    exponent mu grows linearly with the image's token count, from ``base_shift`` at
    ``base_length`` tokens to ``max_shift`` at ``max_length``."""

    base_length: int
    max_length: int
    base_shift: float
    max_shift: float

    def mu(self, length: int) -> float:
        slope = (self.max_shift - self.base_shift) / (self.max_length - self.base_length)
        return self.base_shift + slope * (length - self.base_length)


def shift_sigmas(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """Sigmas moved towards the noise by ``e^mu``: ``e^mu / (e^mu + 1 / sigma - 1)``."""
    scale = math.exp(mu)
    return scale / (scale + (1 / sigmas - 1))


@dataclass
class FlowMatching:
    """The objective of flow-matching models: a timestep u from the density, the
    scheduler's (shifted) sigma and timestep at index ``u * T``, the noisy latents on the
    straight path, and the velocity as the target."""

    sigmas: torch.Tensor  # the training scheduler's sigmas, on the device, (T,)
    timesteps: torch.Tensor  # and its timesteps, (T,)
    settings: object  # spec.training.flowMatching
    train_steps: int = 1000  # timestep = sigma * train_steps
    shift: Shift | None = None  # shift sigmas by the image's size (Flux)
    patch: int = 2  # latents per token side, for the image's token count

    def __call__(self, latents: torch.Tensor, generator: torch.Generator) -> Noised:
        settings = self.settings
        noise = torch.randn(
            latents.shape, generator=generator, device=latents.device, dtype=latents.dtype
        )
        u = timestep_density(
            settings.timestep_density,
            latents.shape[0],
            generator,
            latents.device,
            settings.logit_mean,
            settings.logit_std,
            settings.mode_scale,
        )
        sigmas, timesteps = self._sigmas(latents, u)
        return Noised(
            noisy=flow_noisy(latents, noise, sigmas),
            timesteps=timesteps,
            target=flow_target(latents, noise),
            weights=flow_weights(settings.loss_weighting, sigmas),
        )

    def fixed(self, latents: torch.Tensor, noise: torch.Tensor, u: torch.Tensor) -> Noised:
        """The batch on the path to the given ``noise`` at positions ``u`` in [0, 1) of
        the schedule, shape ``(B,)``; no loss weights (held-out losses compare runs)."""
        sigmas, timesteps = self._sigmas(latents, u.to(latents.device))
        return Noised(
            noisy=flow_noisy(latents, noise, sigmas),
            timesteps=timesteps,
            target=flow_target(latents, noise),
            weights=None,
        )

    def _sigmas(self, latents: torch.Tensor, u: torch.Tensor) -> tuple:
        """The (shifted) sigmas and timesteps at positions ``u`` of the schedule."""
        count = len(self.sigmas)
        indices = (u * count).long().clamp(0, count - 1)
        sigmas, timesteps = self.sigmas[indices], self.timesteps[indices]
        if self.shift is not None:
            height, width = latents.shape[-2:]
            length = (height // self.patch) * (width // self.patch)
            sigmas = shift_sigmas(sigmas, self.shift.mu(length))
            timesteps = sigmas * self.train_steps
        return sigmas, timesteps
