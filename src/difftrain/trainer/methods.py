"""Training methods: what each makes trainable, and which weights it checkpoints.

A method prepares the loaded components (freezing, adding adapters) and names the
modules whose trainable parameters the optimiser updates and checkpoints save. The
training loop is the same for all of them.
"""

import logging
from dataclasses import dataclass

import torch

from difftrain.api.methods import LoraSpec
from difftrain.api.spec import DiffusionTrainingJobSpec
from difftrain.errors import InvalidSpec
from difftrain.trainer.models import encoder_name

log = logging.getLogger(__name__)

# Attention projections of CLIP text encoders, where text-encoder LoRA goes.
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class Trainable:
    """The modules being trained, by component name (``unet``, ``text_encoder``, ...)."""

    modules: dict[str, torch.nn.Module]
    lora: bool

    def parameters(self, name: str) -> list[torch.nn.Parameter]:
        return [p for p in self.modules[name].parameters() if p.requires_grad]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable tensors, keyed ``component.parameter``, for checkpoints."""
        return {
            f"{name}.{key}": value.detach()
            for name, module in self.modules.items()
            for key, value in module.named_parameters()
            if value.requires_grad
        }

    def after_step(self) -> None:
        """Called after each optimiser step; methods that must undo part of it do so here."""

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(
                f"checkpoint holds other weights than this job trains "
                f"(missing {sorted(expected - set(state))[:3]}, "
                f"extra {sorted(set(state) - expected)[:3]})"
            )
        with torch.no_grad():
            for name, module in self.modules.items():
                for key, value in module.named_parameters():
                    if value.requires_grad:
                        value.copy_(state[f"{name}.{key}"])


def prepare(components, spec: DiffusionTrainingJobSpec) -> Trainable:
    """Freeze and adapt ``components`` for ``spec.method``; the trainable modules."""
    components.vae.requires_grad_(False)
    for encoder in components.text_encoders:
        encoder.requires_grad_(False)
    if spec.method == "lora":
        return _lora(components, spec, (spec.lora or LoraSpec()).train_text_encoder)
    if spec.method == "dreambooth":
        return _dreambooth(components, spec)
    if spec.method == "textualInversion":
        from difftrain.trainer import textual_inversion

        components.unet.requires_grad_(False)
        return textual_inversion.prepare(components, spec.textual_inversion)
    components.unet.requires_grad_(True)  # finetune (check_supported ruled out the rest)
    modules = {"unet": components.unet}
    if spec.method == "full" and "textEncoders" not in spec.full_settings.reuse:
        _whole_text_encoders(components, modules)  # a new model's text encoders learn with it
    return Trainable(modules, lora=False)


def check_supported(spec: DiffusionTrainingJobSpec) -> None:
    """Refuse, before any work, settings the API accepts but this trainer cannot do yet."""
    if spec.method not in ("lora", "finetune", "full", "dreambooth", "textualInversion"):
        raise InvalidSpec(
            f"spec.method: {spec.method} is not supported by this trainer version; "
            "use lora, finetune, full, dreambooth or textualInversion"
        )
    if spec.training.strategy != "ddp":
        raise InvalidSpec(
            f"spec.training.strategy: {spec.training.strategy} is not supported by this "
            "trainer version; use ddp"
        )
    if spec.evaluation is not None:
        raise InvalidSpec(
            "spec.evaluation: evaluation is not available in this trainer version; leave "
            "spec.evaluation out (validation samples show progress meanwhile)"
        )
    if "singleFile" in (spec.output.formats or []):
        raise InvalidSpec(
            "spec.output.formats: singleFile export is not available in this trainer version; "
            "use diffusers"
        )


def _dreambooth(components, spec: DiffusionTrainingJobSpec) -> Trainable:
    """LoRA adapters (spec.lora) or the whole UNet; the text encoders too when asked."""
    settings = spec.dreambooth
    if settings.unet == "lora":
        return _lora(components, spec, settings.train_text_encoder)
    components.unet.requires_grad_(True)
    modules = {"unet": components.unet}
    if settings.train_text_encoder:
        _whole_text_encoders(components, modules)
    return Trainable(modules, lora=False)


def _whole_text_encoders(components, modules: dict) -> None:
    for index, encoder in enumerate(components.text_encoders):
        encoder.requires_grad_(True)
        modules[encoder_name(index)] = encoder


def _lora(components, spec: DiffusionTrainingJobSpec, text_encoders: bool) -> Trainable:
    """LoRA adapters on the UNet (settings from spec.lora), and on the text encoders when
    ``text_encoders``."""
    from peft import LoraConfig

    settings = spec.lora or LoraSpec()
    alpha = settings.alpha or settings.rank
    components.unet.requires_grad_(False)
    try:
        components.unet.add_adapter(
            LoraConfig(
                r=settings.rank,
                lora_alpha=alpha,
                lora_dropout=settings.dropout,
                init_lora_weights="gaussian",
                target_modules=settings.target_modules,
            )
        )
    except ValueError as error:  # peft: no module matched
        raise InvalidSpec(f"spec.lora.targetModules: {error}") from None
    modules = {"unet": components.unet}
    if text_encoders:
        for index, encoder in enumerate(components.text_encoders):
            encoder.add_adapter(
                LoraConfig(
                    r=settings.rank,
                    lora_alpha=alpha,
                    lora_dropout=settings.dropout,
                    init_lora_weights="gaussian",
                    target_modules=TEXT_ENCODER_TARGETS,
                )
            )
            modules[encoder_name(index)] = encoder
    return Trainable(modules, lora=True)
