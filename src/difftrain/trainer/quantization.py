"""A frozen denoiser (and the text encoders that do not train) in low precision under
trained adapters (spec.model.quantization), through torchao: their linear layers'
weights become 8-bit (int8: integers with a scale per output row; fp8: e4m3 floats on
GPUs that have them), and peft's adapters on them train in full precision."""

import logging

import torch

from difftrain.errors import InvalidSpec

log = logging.getLogger(__name__)

# Compute capability fp8 weights need (Ada, Hopper and later).
FP8_CAPABILITY = (8, 9)


def _config(kind: str, device: torch.device):
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    if kind == "int8":
        return Int8WeightOnlyConfig()
    if kind == "fp8":
        if device.type != "cuda":
            raise InvalidSpec(
                "spec.model.quantization: fp8 needs a GPU (compute capability 8.9 or later) "
                "and this job trains on CPUs; use int8, which any device runs"
            )
        if torch.cuda.get_device_capability(device) < FP8_CAPABILITY:
            found = ".".join(map(str, torch.cuda.get_device_capability(device)))
            raise InvalidSpec(
                f"spec.model.quantization: fp8 needs a GPU of compute capability 8.9 or later "
                f"(this one is {found}); use int8"
            )
        return Float8WeightOnlyConfig()
    raise InvalidSpec(
        f"spec.model.quantization: {kind} is not available in this trainer version; use int8 "
        "(or fp8 on a GPU of compute capability 8.9 or later)"
    )


def quantize(module: torch.nn.Module, kind: str, device: torch.device, name: str) -> None:
    """Put the weights of ``module``'s linear layers in ``kind``, in place (before
    adapters go on it); logs the weights' size before and after."""
    from torchao.quantization import quantize_

    config = _config(kind, device)
    before = weight_bytes(module)
    module.to(device)
    quantize_(module, config)
    log.info(
        "the frozen %s in %s: %.1f MB of weights (%.1f MB before)",
        name,
        kind,
        weight_bytes(module) / 1e6,
        before / 1e6,
    )


def keep_out_of_sync(module: torch.nn.Module) -> None:
    """Tell DDP to leave ``module``'s quantized weights alone: every process quantizes the
    same base the same way, they take no gradients, and DDP's broadcast cannot view them.
    Called once the adapters are on (they rename the wrapped layers' weights)."""
    quantized = [name for name, p in module.named_parameters() if _is_subclass(p)]
    if quantized:
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            module, quantized
        )


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes the parameters of ``module`` hold, quantized ones at their stored size."""
    total = 0
    for parameter in module.parameters():
        if _is_subclass(parameter):  # a quantized tensor: the tensors it holds
            names = parameter.__tensor_flatten__()[0]
            inner = [getattr(parameter, name) for name in names]
            total += sum(t.numel() * t.element_size() for t in inner if t is not None)
        else:
            total += parameter.numel() * parameter.element_size()
    return total


def _is_subclass(tensor) -> bool:
    return hasattr(tensor, "__tensor_flatten__")
