"""How much scratch disk a trainer pod needs: the size limit of its ``/scratch`` emptyDir.

Scratch holds one checkpoint at a time while it is uploaded (then deleted) and the final
model while it is exported, so the need is the larger of the two, with a margin. Without
``spec.resources.scratchSize`` it is estimated from the architecture and the method;
an architecture that cannot be known before the model is loaded (``auto`` with a base
other than a preset) is taken to be SDXL, so that the estimate errs on the side of room
for the UNet families; a full fine-tune of SD3.5 Large or Flux should say its
``architecture`` (sd3, flux) or set scratchSize. A limit larger than used costs nothing:
it only caps.
"""

import math

from difftrain.api.quantity import format_bytes, parse_quantity

GIB = 2**30
SMALLEST = 2 * GIB
MARGIN = 1.25
# Parameters (millions) of each architecture's denoiser and of the whole pipeline (SD3:
# 3.5 Large, whose T5-XXL encoder is most of the rest).
_PARAMETERS = {
    "sd": (860, 1070),
    "sdxl": (2570, 3470),
    "sd3": (8100, 13770),
    "flux": (11900, 16860),  # Flux.1 dev: the transformer, then with T5-XXL, CLIP and VAE
}
_ADAM_BYTES = 4 + 8  # fp32 weights and two moments per parameter
_EMA_BYTES = 4


def architecture_of(spec) -> str | None:
    """The architecture the estimate uses; None for the tiny presets."""
    if spec.model.base.startswith("preset:"):
        return None
    if spec.model.architecture in ("sd", "sd3", "flux"):
        return spec.model.architecture
    return "sdxl"  # sdxl, custom, or auto


def estimated_bytes(spec) -> int:
    """Scratch bytes needed for ``spec``'s checkpoints and export."""
    architecture = architecture_of(spec)
    if architecture is None or not spec.trains_full_weights:
        return SMALLEST  # adapters and embeddings: megabytes
    unet, pipeline = (millions * 10**6 for millions in _PARAMETERS[architecture])
    state = unet * (_ADAM_BYTES + (_EMA_BYTES if spec.training.ema.enabled else 0))
    copies = 2 if "singleFile" in (spec.output.formats or []) else 1
    export = pipeline * 4 * copies  # fp32 at worst
    need = max(state, export) * MARGIN
    return max(SMALLEST, math.ceil(need / GIB) * GIB)


def scratch_bytes(spec) -> int:
    """The scratch size limit: ``spec.resources.scratchSize``, or the estimate."""
    if spec.resources.scratch_size is not None:
        return int(parse_quantity(spec.resources.scratch_size))
    return estimated_bytes(spec)


def scratch_size(spec) -> str:
    """:func:`scratch_bytes` as a quantity for the emptyDir's ``sizeLimit``."""
    if spec.resources.scratch_size is not None:
        return str(spec.resources.scratch_size)
    return format_bytes(estimated_bytes(spec))
