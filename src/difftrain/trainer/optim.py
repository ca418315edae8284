"""Optimisers and learning-rate schedules from ``spec.training``."""

import math

import torch

from difftrain.api.training import SchedulerSpec, TrainingSpec
from difftrain.errors import InvalidSpec


def build_optimizer(training: TrainingSpec, groups: list[dict]) -> torch.optim.Optimizer:
    """The optimiser over parameter ``groups`` (each ``{"params": [...], "lr": float}``)."""
    settings = training.optimizer
    betas = tuple(settings.betas)
    if settings.type == "adamw":
        return torch.optim.AdamW(
            groups,
            betas=betas,
            eps=settings.epsilon,
            weight_decay=settings.weight_decay,
            fused=_fusable(groups),
        )
    if settings.type == "adamw8bit":
        bnb = _optional("bitsandbytes", "adamw8bit")
        return bnb.optim.AdamW8bit(
            groups, betas=betas, eps=settings.epsilon, weight_decay=settings.weight_decay
        )
    if settings.type == "prodigy":
        prodigy = _optional("prodigyopt", "prodigy")
        return prodigy.Prodigy(groups, betas=betas, weight_decay=settings.weight_decay)
    from transformers.optimization import Adafactor

    return Adafactor(
        groups,
        relative_step=False,
        scale_parameter=False,
        warmup_init=False,
        weight_decay=settings.weight_decay,
    )


# Devices whose fused AdamW kernel takes every parameter's update in one pass: on a CPU
# it cuts the optimiser's share of a tiny model's step by two thirds (bench/train_speed.py
# --kernels).
FUSED_DEVICES = ("cpu", "cuda")


def _fusable(groups: list[dict]) -> bool:
    """Whether AdamW's fused kernel can take every parameter of ``groups``: floating point,
    on one device of :data:`FUSED_DEVICES`."""
    params = [p for group in groups for p in group["params"]]
    devices = {p.device for p in params}
    return (
        len(devices) == 1
        and next(iter(devices)).type in FUSED_DEVICES
        and all(p.is_floating_point() for p in params)
    )


def _optional(module: str, optimizer: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise InvalidSpec(
            f"spec.training.optimizer.type {optimizer} needs the {module} package, which this "
            f"trainer image lacks; install it in the image or use adamw"
        ) from None


def warmup_steps(schedule: SchedulerSpec, total: int) -> int:
    if schedule.warmup_steps is not None:
        return schedule.warmup_steps
    return int(schedule.warmup_ratio * total)


def lr_factor(step: int, total: int, schedule: SchedulerSpec) -> float:
    """The learning rate at optimiser step ``step`` as a fraction of the peak."""
    warmup = warmup_steps(schedule, total)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule.type == "constant":
        return 1.0
    if schedule.type == "step":
        return schedule.gamma ** ((step - warmup) // schedule.step_size)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule.type == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, training: TrainingSpec, total: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, training.scheduler)
    )
