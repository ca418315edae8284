"""The stages of a run. Every run trains the diffusion model; method full trains the
autoencoder first. A :class:`Stage` holds what its steps update (the trainable modules,
their optimiser and schedule, the noise generator) and does one micro-batch's forward
and backward pass (:meth:`Stage.forward_backward`) and the optimiser step; the loop
(loop.py) decides when each happens."""

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from difftrain.storage import Store
from difftrain.trainer import (
    autoencoder,
    checkpoint,
    identity,
    methods,
    optim,
    quantization,
    sharding,
)
from difftrain.trainer.conditioning import token_ids
from difftrain.trainer.identity import RunIdentity
from difftrain.trainer.setup import Run
from difftrain.trainer.trainable import Trainable

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel

    from difftrain.trainer.loss import Noised

log = logging.getLogger(__name__)

FROZEN_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Stage:
    """One stage of a run: the modules it trains and where its outputs go."""

    run: Run
    trainable: Trainable  # the bare modules: checkpoints and export use these
    wrapped: dict  # the same modules as the accelerator prepared them (DDP): training uses these
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    total_steps: int
    output: Store  # the stage's root: OUTPUT, or OUTPUT/autoencoder
    scratch: Path  # the stage's local folder
    ema: "EMAModel | None" = None  # of the denoiser, when spec.training.ema asks
    samples: bool = False  # whether validation samples are taken
    losses: list = field(default_factory=list)
    identity: RunIdentity | None = None  # the run its checkpoints belong to
    ledger: checkpoint.Ledger | None = None  # this run's checkpoints (main process)
    sharded_from: type | None = None  # the denoiser's class, when it is sharded (fsdp)
    gathered: dict | None = None  # the whole trained modules, gathered for export (fsdp)
    evaluations: list = field(default_factory=list)  # the run's evaluation scores so far

    name = "diffusion"

    # What checkpoints, samples and exports read of the run.
    config = property(lambda self: self.run.config)
    accelerator = property(lambda self: self.run.accelerator)
    components = property(lambda self: self.run.components)
    batches = property(lambda self: self.run.batches)
    dataset = property(lambda self: self.run.dataset)
    paths = property(lambda self: self.run.paths)
    disk = property(lambda self: self.run.disk)
    waiting = property(lambda self: self.run.waiting)
    lease = property(lambda self: self.run.lease)

    def forward_backward(self, batch: dict, accumulation: int) -> float:
        """One micro-batch: forward, loss, backward; the loss."""
        raise NotImplementedError

    def synchronising(self, sync: bool) -> contextlib.ExitStack:
        """A context in which gradients are synchronised across processes only if ``sync``."""
        stack = contextlib.ExitStack()
        if self.sharded:
            for module in self.wrapped.values():
                sharding.set_sync(module, sync)
        elif not sync:
            for module in self.wrapped.values():
                stack.enter_context(self.accelerator.no_sync(module))
        return stack

    def optimizer_step(self) -> None:
        max_norm = self.config.spec.training.max_grad_norm
        if max_norm:
            wrapped = self.wrapped.values()
            parameters = [p for m in wrapped for p in m.parameters() if p.requires_grad]
            self.accelerator.clip_grad_norm_(parameters, max_norm)
        self.optimizer.step()
        self.trainable.after_step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.denoiser_parameters())

    def denoiser_parameters(self) -> list:
        return list(self.trainable.modules[self.components.family.denoiser].parameters())

    @property
    def sharded(self) -> bool:
        return self.sharded_from is not None

    def after_sampling(self) -> None:
        """Free what sampling gathered of a sharded model (a no-op unless sharded)."""
        if self.sharded:
            for module in self.wrapped.values():
                sharding.reshard(module)

    def gather_final(self) -> None:
        """Gather a sharded model whole on the main process for export; every process
        calls it (a no-op unless sharded)."""
        if not self.sharded:
            return
        name = self.components.family.denoiser
        module = self.trainable.modules[name]
        if self.ema is not None:  # export the average, as asked (each process its part)
            self.after_sampling()  # the parameters as shards, as the averages are
            self.ema.copy_to(self.denoiser_parameters())
        whole = sharding.gather(module, self.sharded_from, self.run.main)
        self.gathered = {name: whole} if whole is not None else None

    def final_modules(self) -> dict:
        """The trained modules as exported: with the EMA weights when the job keeps one."""
        if self.gathered is not None:
            return self.gathered
        if self.ema is not None:
            self.ema.copy_to(self.denoiser_parameters())  # export the average, as asked
        return self.trainable.modules


@dataclass
class DiffusionStage(Stage):
    """The diffusion model learns to denoise the latents of the training images."""

    objective: "Callable[[torch.Tensor, torch.Generator], Noised] | None" = None  # the family's
    # What the steps encoded themselves, not served by the cache: images, captions.
    encoded: dict = field(default_factory=lambda: {"images": 0, "captions": 0})

    def forward_backward(self, batch: dict, accumulation: int) -> float:
        components, accelerator = self.components, self.accelerator
        family, device = components.family, accelerator.device
        denoiser = self.wrapped.get(family.denoiser, components.denoiser)
        # Every copy to the device first: a copy from pageable memory waits for all the work
        # queued before it, so a copy in mid-step would stall the step there.
        pixels = batch["pixels"]
        if pixels is not None:
            pixels = pixels.to(device, dtype=components.vae.dtype)
        cached = _on(batch["latents"], device)
        text = _on(batch["text"], device)
        ids = (
            None
            if text is not None
            else [t.to(device) for t in token_ids(components, batch["captions"])]
        )
        extra = family.conditioning(components, batch, self.config.spec.training, device)
        trains_text = self.trains_text
        with accelerator.autocast():
            with torch.no_grad():
                latents = self.latents(pixels, batch, cached)
            noised = self.objective(latents, self.generator)
            if text is None:
                with torch.enable_grad() if trains_text else torch.no_grad():
                    text = family.encode_text(components, ids)
                self.encoded["captions"] += len(batch["captions"])
            prediction = family.predict(denoiser, noised.noisy, noised.timesteps, text, extra)
            loss = self.run.method.loss(self.config.spec, prediction, noised.target, noised.weights)
            accelerator.backward(loss / accumulation)
        return loss.detach().item()

    @property
    def trains_text(self) -> bool:
        """Whether a text encoder (or its embeddings) trains in this stage."""
        return any(name in self.wrapped for name in self.components.family.encoder_names())

    def latents(self, pixels, batch: dict, cached: dict | None) -> torch.Tensor:
        """The batch's latents: a sample of each image's latent distribution, its moments
        from the cache or from the VAE, drawn for the whole batch at once (so the draws
        are the same with the cache or without)."""
        from diffusers.utils.torch_utils import randn_tensor

        components = self.components
        parts = []
        if pixels is not None:
            parts.append(
                (batch["pixel_rows"], *components.family.latent_moments(components, pixels))
            )
            self.encoded["images"] += len(pixels)
        if cached is not None:
            parts.append((batch["latent_rows"], cached["mean"], cached["std"]))
        if len(parts) == 1:
            _, mean, std = parts[0]
        else:  # some rows from the cache, some encoded now: in the batch's order
            first = parts[0][1]
            count = sum(len(rows) for rows, _, _ in parts)
            mean = first.new_empty((count, *first.shape[1:]))
            std = first.new_empty((count, *first.shape[1:]))
            for rows, part_mean, part_std in parts:
                index = torch.tensor(rows, device=first.device)
                mean.index_copy_(0, index, part_mean.to(first.dtype))
                std.index_copy_(0, index, part_std.to(first.dtype))
        noise = randn_tensor(
            mean.shape, generator=self.generator, device=mean.device, dtype=mean.dtype
        )
        return components.family.scale_latents(components, mean + std * noise)


def _on(fields: dict | None, device) -> dict | None:
    """A batch's cached tensors on the device."""
    if fields is None:
        return None
    return {name: tensor.to(device) for name, tensor in fields.items()}


@dataclass
class AutoencoderStage(Stage):
    """Method full's first stage: the VAE learns to reconstruct the training images."""

    name = "autoencoder"

    def forward_backward(self, batch: dict, accumulation: int) -> float:
        accelerator = self.accelerator
        weight = self.config.spec.full_settings.autoencoder.kl_weight
        with accelerator.autocast():
            pixels = batch["pixels"].to(accelerator.device)
            reconstruction, kl = self.wrapped["vae"](pixels, self.generator)
            loss = autoencoder.loss(pixels, reconstruction, kl, weight)
            accelerator.backward(loss / accumulation)
        return loss.detach().item()


def stage_steps(run: Run, name: str) -> int:
    """Optimiser steps of stage ``name``."""
    if name == methods.AUTOENCODER:
        return run.spec.full_settings.autoencoder.steps
    return diffusion_steps(run)


def finished_earlier(run: Run, name: str) -> bool:
    """Whether the stage was finished by an earlier attempt of this run (the autoencoder
    stage's result is kept; the diffusion stage always runs, from its checkpoint)."""
    if name != methods.AUTOENCODER or run.spec.checkpoints.resume != "auto":
        return False
    return autoencoder.is_done(run.output, identity.spec_hash(identity.training_spec(run.spec)))


def diffusion_steps(run: Run) -> int:
    """Optimiser steps of the diffusion stage: spec.training.steps, or its epochs."""
    training = run.spec.training
    per_epoch = run.batches.batches_per_epoch // training.gradient_accumulation_steps
    return training.steps or training.epochs * max(1, per_epoch)


def _generator(run: Run) -> torch.Generator:
    accelerator = run.accelerator
    return torch.Generator(device=accelerator.device).manual_seed(
        run.spec.training.seed * 7919 + accelerator.process_index
    )


def build_diffusion(run: Run) -> DiffusionStage:
    """The diffusion stage: what the method trains, on frozen parts."""
    spec, accelerator, components = run.spec, run.accelerator, run.components
    family, training = components.family, spec.training
    components.vae.requires_grad_(False)
    for encoder in components.text_encoders:
        encoder.requires_grad_(False)
    if spec.model.quantization:  # the frozen base under adapters (the API allows no other)
        components.denoiser.requires_grad_(False)
        quantization.quantize(
            components.denoiser, spec.model.quantization, accelerator.device, family.denoiser
        )
    trainable = run.method.prepare(components, spec)
    if training.gradient_checkpointing:
        components.denoiser.enable_gradient_checkpointing()
    if training.compile:  # in place: the state dict keeps its names
        # The backend is inductor; the tests' quicker aot_eager traces the same graphs.
        backend = os.environ.get("DIFFTRAIN_COMPILE_BACKEND", "inductor")
        for block in family.blocks(components.denoiser):
            block.compile(backend=backend)
    _place_frozen(
        components,
        trainable,
        accelerator.device,
        training.mixed_precision,
        quantized=bool(spec.model.quantization),
    )
    if spec.model.quantization:  # and the text encoders that stay frozen (T5 above all)
        for name, encoder in zip(family.encoder_names(), components.text_encoders, strict=True):
            if name not in trainable.modules:
                quantization.quantize(encoder, spec.model.quantization, accelerator.device, name)
    sharded_from = None
    if training.strategy == "fsdp":  # methods that train the denoiser alone (sharding.check)
        denoiser = components.denoiser
        blocks = family.blocks(denoiser)
        sharded_from = sharding.shard(denoiser, blocks, accelerator, training.mixed_precision)
    groups = [
        {"params": trainable.parameters(name), "lr": _learning_rate(training, name, family)}
        for name in trainable.modules
    ]
    optimizer = optim.build_optimizer(training, groups)
    if sharded_from is not None:  # FSDP is its own wrapper
        wrapped = dict(trainable.modules)
    else:
        names = list(trainable.modules)
        for module in trainable.modules.values():
            quantization.keep_out_of_sync(module)
        *prepared, optimizer = accelerator.prepare(*trainable.modules.values(), optimizer)
        wrapped = dict(zip(names, prepared, strict=True))
    # Text encoders being trained must run through their wrappers to sync gradients.
    for index, name in enumerate(family.encoder_names()):
        if name in wrapped:
            components.text_encoders[index] = wrapped[name]
    total = diffusion_steps(run)
    stage = DiffusionStage(
        run=run,
        trainable=trainable,
        wrapped=wrapped,
        optimizer=optimizer,
        scheduler=optim.build_scheduler(optimizer, training, total),
        generator=_generator(run),
        total_steps=total,
        output=run.output,
        scratch=run.paths.scratch,
        samples=bool(spec.validation.prompts),
        sharded_from=sharded_from,
        objective=family.objective(components, training, accelerator.device),
    )
    if training.ema.enabled:
        stage.ema = _ema(trainable.modules[family.denoiser], training.ema.decay)
        stage.ema.to(accelerator.device)
    return stage


def _place_frozen(
    components, trainable: Trainable, device, mixed_precision: str, quantized: bool
) -> None:
    """Move the parts that do not train to the device, in the training precision (the
    trained ones the accelerator moves, in fp32; an adapted model's frozen base in the
    training precision too, unless it is quantized: its norms and biases then stay fp32,
    which CPU autocast needs beside int8 layers)."""
    frozen = FROZEN_DTYPES.get(mixed_precision, torch.float32)
    components.vae.to(device, dtype=frozen)
    if components.family.denoiser not in trainable.modules:  # a frozen denoiser
        components.denoiser.to(device, dtype=frozen)
    trained = [id(module) for module in trainable.modules.values()]
    for encoder in components.text_encoders:
        encoder.to(device, dtype=torch.float32 if id(encoder) in trained else frozen)
    if trainable.lora and not quantized:  # no fp32 copy of the base under the adapters
        held = sum(hold_frozen(module, frozen) for module in trainable.modules.values())
        if held:
            log.info("the frozen base under the adapters: %.1f MiB in %s", held / 2**20, frozen)


def hold_frozen(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """Cast the frozen floating-point weights of ``module`` (an adapted model that is not
    quantized) to ``dtype``, leaving what trains (the adapters) in fp32; the bytes they
    hold after."""
    if dtype == torch.float32:
        return 0
    held = 0
    for parameter in module.parameters():
        if not parameter.requires_grad and parameter.is_floating_point():
            parameter.data = parameter.data.to(dtype)
            held += parameter.numel() * parameter.element_size()
    return held


def _learning_rate(training, name: str, family) -> float:
    if name == family.denoiser:
        return training.learning_rate
    return training.text_encoder_learning_rate or training.learning_rate


def _ema(module, decay: float):
    from diffusers.training_utils import EMAModel

    return EMAModel(
        module.parameters(), decay=decay, model_cls=type(module), model_config=module.config
    )


def build_autoencoder(run: Run) -> AutoencoderStage:
    """The autoencoder stage (method full without a reused VAE)."""
    spec, accelerator = run.spec, run.accelerator
    settings = spec.full_settings.autoencoder
    vae = run.components.vae
    vae.requires_grad_(True)
    vae.to(accelerator.device, dtype=torch.float32)
    trainable = Trainable({"vae": vae})
    optimizer = optim.build_optimizer(
        spec.training, [{"params": trainable.parameters("vae"), "lr": settings.learning_rate}]
    )
    objective, optimizer = accelerator.prepare(autoencoder.Objective(vae), optimizer)
    return AutoencoderStage(
        run=run,
        trainable=trainable,
        wrapped={"vae": objective},
        optimizer=optimizer,
        scheduler=optim.build_scheduler(optimizer, spec.training, settings.steps),
        generator=_generator(run),
        total_steps=settings.steps,
        output=run.output.child(autoencoder.FOLDER),
        scratch=run.paths.scratch / autoencoder.FOLDER,
    )


BUILDERS = {methods.DIFFUSION: build_diffusion, methods.AUTOENCODER: build_autoencoder}
