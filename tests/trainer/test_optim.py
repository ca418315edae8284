"""Learning-rate schedules and optimiser choice."""

import sys

import pytest
import torch

from difftrain.api.training import SchedulerSpec, TrainingSpec
from difftrain.errors import InvalidSpec
from difftrain.trainer import optim


@pytest.mark.parametrize(
    ("schedule", "factors"),
    [
        ({"type": "constant", "warmupSteps": 0}, [1, 1, 1, 1, 1]),
        ({"type": "constant", "warmupSteps": 3}, [0.25, 0.5, 0.75, 1, 1]),
        ({"type": "linear", "warmupSteps": 0}, [1, 0.8, 0.6, 0.4, 0.2]),
        ({"type": "cosine", "warmupSteps": 0}, [1, 0.9045, 0.6545, 0.3455, 0.0955]),
        ({"type": "step", "warmupSteps": 1, "stepSize": 2, "gamma": 0.5}, [0.5, 1, 1, 0.5, 0.5]),
        ({"type": "cosine", "warmupRatio": 0.2}, [0.5, 1, 0.8536, 0.5, 0.1464]),
    ],
    ids=["constant", "warmup", "linear", "cosine", "step", "warmup-ratio"],
)
def test_lr_factor(schedule, factors):
    spec = SchedulerSpec.model_validate(schedule)

    got = [optim.lr_factor(step, 5, spec) for step in range(5)]

    assert got == pytest.approx(factors, abs=1e-4)


def test_each_group_keeps_its_learning_rate_under_the_schedule():
    training = TrainingSpec.model_validate(
        {"steps": 1, "learningRate": 1e-3, "scheduler": {"type": "linear", "warmupSteps": 0}}
    )
    groups = [
        {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-3},
        {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-5},
    ]

    optimizer = optim.build_optimizer(training, groups)
    scheduler = optim.build_scheduler(optimizer, training, total=10)
    optimizer.step()
    scheduler.step()

    assert isinstance(optimizer, torch.optim.AdamW)
    assert scheduler.get_last_lr() == pytest.approx([0.9e-3, 0.9e-5])


def test_missing_optional_optimizer_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if absent
    training = TrainingSpec.model_validate({"steps": 1, "optimizer": {"type": "adamw8bit"}})

    with pytest.raises(InvalidSpec, match="adamw8bit needs the bitsandbytes package"):
        optim.build_optimizer(training, [{"params": [torch.nn.Parameter(torch.zeros(1))]}])


def test_adamw_on_a_cpu_is_fused_and_steps_as_the_unfused_one():
    training = TrainingSpec.model_validate({"steps": 1, "learningRate": 1e-2})
    start = torch.randn(64, generator=torch.Generator().manual_seed(0))
    results = []
    for fused in (True, False):
        weight = torch.nn.Parameter(start.clone())
        optimizer = optim.build_optimizer(training, [{"params": [weight], "lr": 1e-2}])
        if not fused:
            optimizer.param_groups[0]["fused"] = None  # the loop over tensors instead
        for _ in range(3):
            weight.grad = torch.sin(weight.detach() * 3)
            optimizer.step()
        results.append((optimizer.param_groups[0]["fused"], weight.detach()))

    (fused_flag, fused_weight), (plain_flag, plain_weight) = results
    assert fused_flag is True and not plain_flag
    assert torch.allclose(fused_weight, plain_weight, atol=1e-6)
    assert not torch.equal(fused_weight, start)


def test_adamw_is_not_fused_over_parameters_it_cannot_fuse():
    training = TrainingSpec.model_validate({"steps": 1})
    on_meta = torch.nn.Parameter(torch.zeros(2, device="meta"))
    mixed = [torch.nn.Parameter(torch.zeros(2)), on_meta]

    for params in ([on_meta], mixed):
        optimizer = optim.build_optimizer(training, [{"params": params, "lr": 1e-3}])
        assert not optimizer.param_groups[0]["fused"]
