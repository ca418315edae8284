"""Sharded training (``strategy: fsdp``): the denoiser's parameters, gradients,
optimiser state and EMA split across the processes with PyTorch's FSDP2 (``fully_shard``, one
unit per block of the family's denoiser, then the rest), and its checkpoints written as
shards with torch.distributed.checkpoint: each process writes and uploads its own part,
and on resume downloads only the files that hold its part (a run keeps its process
count; see identity.py). The exported model is gathered whole on the main process."""

import logging
from pathlib import Path

import torch

from difftrain.errors import InvalidSpec

log = logging.getLogger(__name__)

SHARDS = "shards"  # a checkpoint's folder of shards
METADATA = ".metadata"  # torch.distributed.checkpoint's index of the shards
_PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check(spec, method) -> None:
    """Refuse, before any work, what sharded training does not do in this version."""
    if spec.training.strategy != "fsdp":
        return
    if not method.can_shard(spec):
        raise InvalidSpec(
            "spec.training.strategy: fsdp shards a denoiser that trains whole; use it with "
            "method finetune, or dreambooth with unet full and without trainTextEncoder "
            "(adapters, embeddings and training from scratch use ddp)"
        )
    if spec.training.mixed_precision == "fp16":
        raise InvalidSpec(
            "spec.training.mixedPrecision: fp16 needs a loss scaler, which sharded training "
            "does not keep in this trainer version; use bf16 (or no) with strategy fsdp"
        )


def shard(module: torch.nn.Module, blocks: list, accelerator, mixed_precision: str) -> type:
    """Shard ``module`` across the processes, each of ``blocks`` a unit of its own;
    returns its class from before (FSDP2 swaps it)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    original = type(module)
    module.to(accelerator.device)
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    precision = MixedPrecisionPolicy(
        param_dtype=_PRECISIONS.get(mixed_precision), reduce_dtype=torch.float32
    )
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=precision)
    fully_shard(module, mesh=mesh, mp_policy=precision)
    log.info(
        "%s sharded across %d processes (%d blocks)",
        original.__name__,
        accelerator.num_processes,
        len(blocks),
    )
    return original


def set_sync(module: torch.nn.Module, sync: bool) -> None:
    """Whether the next backward passes reduce gradients across processes (off while
    gradients accumulate)."""
    module.set_requires_gradient_sync(sync)


def reshard(module: torch.nn.Module) -> None:
    """Free the gathered parameters again after forward passes without a backward (the
    samples'): the outermost unit keeps them gathered, expecting one."""
    module.reshard()


def _states(module, optimizer, ema=None) -> dict:
    """What a sharded checkpoint holds: the model's and optimiser's shards, and with an
    EMA its averages (sharded as the parameters they follow, so each process keeps and
    writes its part) and its step count."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optim = get_state_dict(module, optimizer)
    states = {"model": model, "optim": optim}
    if ema is not None:  # the averages themselves: a load fills them in place
        names = [name for name, _ in module.named_parameters()]
        states["ema"] = dict(zip(names, ema.shadow_params, strict=True))
        states["ema_step"] = torch.tensor(ema.optimization_step)
    return states


def save(module, optimizer, folder: Path, ema=None) -> list[Path]:
    """Write this process's shards of the model, optimiser and EMA into ``folder`` (every
    process calls it); the files it wrote (the main process's include the index)."""
    import torch.distributed.checkpoint as dcp

    folder.mkdir(parents=True, exist_ok=True)
    dcp.save(_states(module, optimizer, ema), checkpoint_id=folder)
    return sorted(path for path in folder.iterdir() if path.is_file())


def needed_files(module, optimizer, folder: Path, ema=None) -> set[str]:
    """The shard files this process reads back, by the index in ``folder``: its own, and
    the one holding what was saved once for all (replicated values such as the
    optimiser's step count go to the lowest rank only)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    metadata = FileSystemReader(folder).read_metadata()
    planner = DefaultLoadPlanner()
    planner.set_up_planner(_states(module, optimizer, ema), metadata, is_coordinator=False)
    plan = planner.create_local_plan()
    return {metadata.storage_data[item.storage_index].relative_path for item in plan.items}


def load(module, optimizer, folder: Path, ema=None) -> None:
    """Restore this process's shards from ``folder`` into the model, optimiser and EMA."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    states = _states(module, optimizer, ema)
    dcp.load(states, checkpoint_id=folder)
    set_state_dict(
        module, optimizer, model_state_dict=states["model"], optim_state_dict=states["optim"]
    )
    if ema is not None:
        ema.optimization_step = int(states["ema_step"])


def local_bytes(module, optimizer, ema=None) -> int:
    """About how large this process's shards are."""
    tensors = [p.to_local() for p in module.parameters()]
    for state in optimizer.state.values():
        tensors += [v.to_local() for v in state.values() if hasattr(v, "to_local")]
    if ema is not None:
        tensors += [p.to_local() for p in ema.shadow_params]
    return sum(t.numel() * t.element_size() for t in tensors)


def gather(module, original: type, main: bool):
    """The whole model on the main process (a new, unsharded ``original``; every process
    calls this, the others get None)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(module, options=options)
    if not main:
        return None
    whole = original.from_config(module.config)
    whole.load_state_dict(state)
    return whole
