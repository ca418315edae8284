"""A frozen denoiser (and the text encoders that do not train) in low precision under
trained adapters (spec.model.quantization), through torchao: their linear layers'
weights become 8-bit (int8: integers with a scale per output row; fp8: e4m3 floats on
GPUs that have them) or 4-bit (nf4: QLoRA's normal-float code, a scale per block of 64
weights, the scales themselves in 8 bits), and peft's adapters on them train in full
precision."""

import logging
import math

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
    raise InvalidSpec(f"spec.model.quantization: {kind} is not a quantization; use int8")


# NF4 keeps a scale per block of this many weights, and quantizes those scales in blocks
# of up to NF4_SCALER_BLOCK (QLoRA's sizes). A layer whose weight count is no multiple of
# the block stays in its precision.
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256


def quantize(module: torch.nn.Module, kind: str, device: torch.device, name: str) -> None:
    """Put the weights of ``module``'s linear layers in ``kind``, in place (before
    adapters go on it); logs the weights' size before and after."""
    before = weight_bytes(module)
    module.to(device)
    if kind == "nf4":
        left = _to_nf4(module)
        if left:
            log.info(
                "%d linear layers of the %s stay in their precision: no multiple of %d weights",
                left,
                name,
                NF4_BLOCK,
            )
    else:
        from torchao.quantization import quantize_

        quantize_(module, _config(kind, device))
    log.info(
        "the frozen %s in %s: %.1f MB of weights (%.1f MB before)",
        name,
        kind,
        weight_bytes(module) / 1e6,
        before / 1e6,
    )


def _to_nf4(module: torch.nn.Module) -> int:
    """Each linear layer's weight as torchao's NF4Tensor, which any device runs (it
    dequantizes for the product, so the backward pass reaches the input, not the weight);
    the scales' block is the largest that divides the layer's count of scales, so small
    layers fit too. Returns how many layers were left as they were."""
    from torchao.quantization import NF4Tensor

    left = 0
    for layer in module.modules():
        if not isinstance(layer, torch.nn.Linear):
            continue
        count = layer.weight.numel()
        if count % NF4_BLOCK:
            left += 1
            continue
        scalers = math.gcd(NF4_SCALER_BLOCK, count // NF4_BLOCK)
        weight = NF4Tensor.from_tensor(layer.weight.detach(), NF4_BLOCK, scalers)
        layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    return left


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
