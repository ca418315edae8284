"""The diffusion loss against hand computation on tiny tensors."""

import math

import pytest
import torch

from difftrain.trainer import loss

# A 3-step schedule: alphas_cumprod = [0.9, 0.5, 0.1]
ALPHAS = torch.tensor([0.9, 0.5, 0.1])


def test_add_noise_is_the_forward_process():
    latents = torch.full((2, 1, 1, 2), 2.0)
    noise = torch.full((2, 1, 1, 2), -1.0)
    timesteps = torch.tensor([0, 2])

    noisy = loss.add_noise(latents, noise, timesteps, ALPHAS)

    first = math.sqrt(0.9) * 2 - math.sqrt(0.1)
    second = math.sqrt(0.1) * 2 - math.sqrt(0.9)
    assert torch.allclose(noisy, torch.tensor([[[[first, first]]], [[[second, second]]]]))


@pytest.mark.parametrize(
    ("prediction_type", "expected"),
    [
        ("epsilon", -1.0),
        ("v_prediction", math.sqrt(0.5) * -1.0 - math.sqrt(0.5) * 2.0),
    ],
)
def test_target_by_prediction_type(prediction_type, expected):
    latents = torch.full((1, 1, 1, 1), 2.0)
    noise = torch.full((1, 1, 1, 1), -1.0)

    got = loss.target(prediction_type, latents, noise, torch.tensor([1]), ALPHAS)

    assert got.item() == pytest.approx(expected)


def test_unknown_prediction_type_is_refused():
    with pytest.raises(ValueError, match="unknown prediction type 'sample'"):
        loss.target(
            "sample", torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.tensor([0]), ALPHAS
        )


def test_snr_and_min_snr_weights():
    timesteps = torch.tensor([0, 1, 2])

    ratios = loss.snr(timesteps, ALPHAS)
    epsilon = loss.min_snr_weights(timesteps, ALPHAS, gamma=5.0, prediction_type="epsilon")
    velocity = loss.min_snr_weights(timesteps, ALPHAS, 5.0, "v_prediction")

    assert ratios.tolist() == pytest.approx([9.0, 1.0, 1 / 9])
    assert epsilon.tolist() == pytest.approx([5 / 9, 1.0, 1.0])
    assert velocity.tolist() == pytest.approx([5 / 10, 1 / 2, (1 / 9) / (1 / 9 + 1)])


def test_diffusion_loss_weights_each_sample():
    prediction = torch.zeros(2, 1, 2, 2)
    expected = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 3.0)])

    plain = loss.diffusion_loss(prediction, expected)
    weighted = loss.diffusion_loss(prediction, expected, torch.tensor([1.0, 0.5]))

    assert plain.item() == pytest.approx((1 + 9) / 2)
    assert weighted.item() == pytest.approx((1 + 4.5) / 2)


def test_loss_is_computed_in_fp32_for_half_inputs():
    prediction = torch.full((1, 1, 1, 1), 300.0, dtype=torch.float16)
    expected = torch.zeros(1, 1, 1, 1, dtype=torch.float16)

    value = loss.diffusion_loss(prediction, expected)

    assert value.dtype == torch.float32
    assert value.item() == 90000.0  # 300**2 overflows nothing in fp32 (fp16 max is 65504)


def test_noise_offset_shifts_whole_channels():
    generator = torch.Generator().manual_seed(0)
    latents = torch.zeros(4, 3, 8, 8)

    plain = loss.sample_noise(latents, torch.Generator().manual_seed(0))
    offset = loss.sample_noise(latents, generator, offset=0.5)

    shift = offset - plain
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift))  # constant per channel
    assert shift.abs().sum() > 0


# Flow matching (SD3): the formulas, written out by hand.


def test_flow_noisy_latents_lie_on_the_straight_path():
    latents = torch.full((2, 1, 1, 2), 2.0)
    noise = torch.full((2, 1, 1, 2), -1.0)

    noisy = loss.flow_noisy(latents, noise, torch.tensor([0.25, 1.0]))

    # (1 - 0.25) * 2 + 0.25 * -1 = 1.25; at sigma 1 only the noise is left
    assert torch.allclose(noisy, torch.tensor([[[[1.25, 1.25]]], [[[-1.0, -1.0]]]]))
    assert torch.equal(loss.flow_target(latents, noise), torch.full((2, 1, 1, 2), -3.0))


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("none", None),
        ("sigmaSqrt", [1 / 0.25**2, 1 / 0.5**2]),
        ("cosmap", [2 / (math.pi * (1 - 0.5 + 0.125)), 2 / (math.pi * (1 - 1 + 0.5))]),
    ],
)
def test_flow_loss_weights(kind, expected):
    weights = loss.flow_weights(kind, torch.tensor([0.25, 0.5]))

    if expected is None:
        assert weights is None
    else:
        assert torch.allclose(weights, torch.tensor(expected))


def _draws(kind, **settings):
    generator = torch.Generator().manual_seed(3)
    return loss.timestep_density(kind, 5, generator, "cpu", **settings)


def test_logit_normal_density_is_the_sigmoid_of_a_normal():
    normal = torch.randn(5, generator=torch.Generator().manual_seed(3))

    drawn = _draws("logitNormal", mean=0.5, std=2.0)

    assert torch.allclose(drawn, 1 / (1 + torch.exp(-(normal * 2.0 + 0.5))))


def test_mode_density_and_uniform_density():
    u = torch.rand(5, generator=torch.Generator().manual_seed(3))
    mode = 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)

    assert torch.allclose(_draws("mode", mode_scale=1.29), mode)
    assert torch.equal(_draws("uniform"), u)
    assert torch.allclose(_draws("mode", mode_scale=0.0), 1 - u)  # scale 0: uniform, mirrored


def test_unknown_density_or_weighting_is_refused():
    with pytest.raises(ValueError, match="timestep density 'beta'"):
        _draws("beta")
    with pytest.raises(ValueError, match="loss weighting 'edm'"):
        loss.flow_weights("edm", torch.ones(1))


def test_flow_matching_takes_sigma_and_timestep_at_the_drawn_index():
    from types import SimpleNamespace

    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25])
    objective = loss.FlowMatching(
        sigmas=sigmas,
        timesteps=sigmas * 1000,
        settings=SimpleNamespace(
            timestep_density="uniform",
            logit_mean=0.0,
            logit_std=1.0,
            mode_scale=1.29,
            loss_weighting="sigmaSqrt",
        ),
    )
    latents = torch.ones(3, 1, 1, 1)
    generator = torch.Generator().manual_seed(0)

    noised = objective(latents, generator)

    replay = torch.Generator().manual_seed(0)
    noise = torch.randn(latents.shape, generator=replay)
    index = (torch.rand(3, generator=replay) * 4).long()
    sigma = sigmas[index]
    assert torch.equal(noised.timesteps, sigma * 1000)
    assert torch.allclose(
        noised.noisy, (1 - sigma)[:, None, None, None] + sigma[:, None, None, None] * noise
    )
    assert torch.allclose(noised.target, noise - 1)
    assert torch.allclose(noised.weights, sigma**-2)
