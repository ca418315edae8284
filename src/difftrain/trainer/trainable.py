"""What a stage trains: modules by component name, and the tensors its checkpoints hold."""

import torch


class Trainable:
    """The modules being trained, by component name (``unet``, ``text_encoder``, ...):
    their parameters that require gradients are what the optimiser updates and what
    checkpoints save, keyed ``component.parameter``."""

    def __init__(self, modules: dict[str, torch.nn.Module], lora: bool = False):
        self.modules = modules
        self.lora = lora  # the trained parameters are adapters (peft)

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

    def trained_count(self) -> int:
        """How many numbers are trained."""
        return sum(p.numel() for name in self.modules for p in self.parameters(name))
