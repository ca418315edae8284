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
