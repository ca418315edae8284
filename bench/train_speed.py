"""Training speed and memory of the trainer, beside a bare training loop as the baseline.

    python bench/train_speed.py [--steps 30] [--resolution 64] [--batch 8]
    python bench/train_speed.py --model sd15 --gpu --resolution 512 --batch 8 --steps 40
    python bench/train_speed.py --samples 10 [...]
    python bench/train_speed.py --model sd3-small --resolution 64 --batch 8
    python bench/train_speed.py --model flux-small --resolution 64 --batch 8
    python bench/train_speed.py --model flux-dev --gpu --resolution 1024 --batch 1 \
        --steps 20 --methods lora --rank 16 --gradient-checkpointing --quantization int8 fp8
    python bench/train_speed.py --cache [--model small-sd] [...]
    python bench/train_speed.py --compile --methods lora [...]
    python bench/train_speed.py --kernels [--model small-sd] [...]

Runs ``python -m difftrain.trainer`` (LoRA, then full fine-tune) over the built-in shapes
data, and a bare loop doing the same work per step (VAE encode, text encode, UNet forward
and backward, AdamW) with no data loading, checkpointing or logging. Each runs in its
own process; reported: images/s over the steps after the first few (warm-up), and peak
memory: the process's resident memory on a CPU, the GPU memory PyTorch allocated with
``--gpu`` (the trainer reports its own in ``metrics.jsonl``).

``--samples N`` adds, for each method, a trainer run that also takes validation samples
every N steps (4 prompts, 25 sampler steps): what sampling costs in time and memory.
``--model tiny-sd`` is the built-in preset. ``--model sd15`` has the architecture of
Stable Diffusion 1.5 (860M-parameter UNet, its VAE, a CLIP ViT-L-sized text encoder over
the offline tokenizer) with random weights, written once as a diffusers folder; it needs a
GPU in practice. ``--model sd3-small`` is an SD3.5-shaped model of a few million
parameters (a 4-block MMDiT of width 128, the tiny preset's VAE, CLIP and a 256-wide T5)
for CPUs; its bare loop does SD3's flow-matching step (logit-normal timesteps, the shifted
sigmas, the velocity target; LoRA on both streams). ``--model flux-small`` is the same
for Flux.1 dev's shape (3 double- and 6 single-stream blocks of width 128, the guidance
embedding; latents packed 2x2, sigmas shifted by the image's size). ``--model flux-dev``
has Flux.1 dev's architecture (the 12B transformer, a T5-XXL-sized encoder, CLIP ViT-L,
the 16-channel VAE) with random weights, written once in bf16 (about 34 GB) by the GPU;
its LoRA needs one large GPU. ``--gpu`` trains on one GPU in bf16 mixed precision, where
a LoRA's frozen base is held in bf16 in the bare loop as in the trainer. ``--rank`` and
``--gradient-checkpointing`` apply to both; ``--quantization KIND...`` adds a LoRA
trainer row on a base quantized to each kind (the bare loop stays unquantized).

The trainer rows run without the cache of latents and text embeddings unless asked:
``--cache`` gives three rows for each method instead, the cache off, filling a fresh
cache (its images/s are of the steps; the fill is in the wall time) and finding it
filled (another job over the same cache); ``--cache-default`` runs the plain rows with
the default cache. ``--compile`` sets ``training.compile`` on the trainer rows (the
compile time is in the wall time and the log, not in images/s). ``--model small-sd`` is
the tiny preset with a UNet of block channels 64/128/256. ``--kernels`` adds bare-loop
rows with one change each: AdamW's fused kernel (which the trainer uses wherever every
parameter sits on one CPU or GPU), and channels_last memory format. Every row is also
given as a ratio to the bare loop of its method, measured in the same run.
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARMUP_STEPS = 5
MiB = 2**20

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "sample_size": 512,
}
SD15_TEXT = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "hidden_act": "quick_gelu",
}


def _clip_config(tokenizer, **extra):
    """A CLIP ViT-L-sized text encoder's config over the offline ``tokenizer``."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **SD15_TEXT,
        **extra,
    )


def write_sd15(folder: Path) -> str:
    """An SD 1.5-shaped pipeline with random weights at ``folder``; its model URI."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    from difftrain.trainer.presets import _SCHEDULER
    from difftrain.trainer.tokenizer import build_tokenizer

    if not (folder / "model_index.json").exists():
        tokenizer = build_tokenizer()
        text = _clip_config(tokenizer)
        torch.manual_seed(0)
        # Initialising on the GPU takes seconds where the CPU takes minutes.
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            pipeline = StableDiffusionPipeline(
                vae=AutoencoderKL(**SD15_VAE),
                text_encoder=CLIPTextModel(text),
                tokenizer=tokenizer,
                unet=UNet2DConditionModel(**SD15_UNET),
                scheduler=DDPMScheduler(**_SCHEDULER),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        pipeline.save_pretrained(folder, safe_serialization=True)
    return f"file://{folder}"


SD3_SMALL_TRANSFORMER = {
    "sample_size": 32,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 4,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": 256,
    "caption_projection_dim": 128,
    "pooled_projection_dim": 64,
    "pos_embed_max_size": 96,
    "qk_norm": "rms_norm",
    "dual_attention_layers": (0, 1),
}
SD3_SMALL_T5 = {"d_model": 256, "d_kv": 64, "d_ff": 512, "num_layers": 2, "num_heads": 4}


def write_sd3_small(folder: Path) -> str:
    """The tiny SD3 preset with a larger transformer and T5 at ``folder``; its URI."""
    import torch
    from diffusers import SD3Transformer2DModel
    from transformers import T5EncoderModel

    from difftrain.trainer.presets import build_preset

    if not (folder / "model_index.json").exists():
        torch.manual_seed(0)
        pipeline = build_preset("tiny-sd3")
        t5 = pipeline.text_encoder_3.config.to_dict() | SD3_SMALL_T5
        pipeline.text_encoder_3 = T5EncoderModel(type(pipeline.text_encoder_3.config)(**t5))
        pipeline.transformer = SD3Transformer2DModel(**SD3_SMALL_TRANSFORMER)
        pipeline.register_modules(
            transformer=pipeline.transformer, text_encoder_3=pipeline.text_encoder_3
        )
        pipeline.save_pretrained(folder, safe_serialization=True)
    return f"file://{folder}"


FLUX_SMALL_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 3,
    "num_single_layers": 6,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": 256,
    "pooled_projection_dim": 32,
    "guidance_embeds": True,
    "axes_dims_rope": (8, 12, 12),
}


def write_flux_small(folder: Path) -> str:
    """The tiny Flux preset with a larger transformer and T5 at ``folder``; its URI."""
    import torch
    from diffusers import FluxTransformer2DModel
    from transformers import T5EncoderModel

    from difftrain.trainer.presets import build_preset

    if not (folder / "model_index.json").exists():
        torch.manual_seed(0)
        pipeline = build_preset("tiny-flux")
        t5 = pipeline.text_encoder_2.config.to_dict() | SD3_SMALL_T5
        pipeline.register_modules(
            transformer=FluxTransformer2DModel(**FLUX_SMALL_TRANSFORMER),
            text_encoder_2=T5EncoderModel(type(pipeline.text_encoder_2.config)(**t5)),
        )
        pipeline.save_pretrained(folder, safe_serialization=True)
    return f"file://{folder}"


# Flux.1 dev's architecture (12B transformer, T5-XXL encoder, CLIP ViT-L, 16-channel VAE)
# with random weights, for one GPU: a LoRA's speed and memory at 1024 px.
FLUX_DEV_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
FLUX_DEV_VAE = {
    **SD15_VAE,
    "latent_channels": 16,
    "sample_size": 1024,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
}
FLUX_DEV_T5 = {
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "feed_forward_proj": "gated-gelu",
    "dropout_rate": 0.0,
}


def write_flux_dev(folder: Path, scale: float = 1.0) -> str:
    """A Flux.1 dev-shaped pipeline with random weights at ``folder`` (in bf16, as Flux.1
    dev is published: about 34 GB); its model URI. ``scale`` below 1 shrinks the depths
    and widths alike, to check the bench itself on a CPU."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    from difftrain.trainer.families.flux import _SCHEDULER as FLUX_SCHEDULER  # Flux.1 dev's
    from difftrain.trainer.tokenizer import build_t5_tokenizer, build_tokenizer

    if not (folder / "model_index.json").exists():
        transformer, t5 = dict(FLUX_DEV_TRANSFORMER), dict(FLUX_DEV_T5)
        if scale < 1:
            for config, keys in (
                (transformer, ("num_layers", "num_single_layers", "num_attention_heads")),
                (t5, ("num_layers", "num_heads")),
            ):
                config.update({key: max(1, round(config[key] * scale)) for key in keys})
            transformer["joint_attention_dim"] = t5["d_model"] = max(64, round(4096 * scale))
            t5["d_ff"] = 2 * t5["d_model"]
        tokenizer, t5_tokenizer = build_tokenizer(), build_t5_tokenizer(512)
        t5_config = T5Config(
            vocab_size=len(t5_tokenizer),
            pad_token_id=t5_tokenizer.pad_token_id,
            eos_token_id=t5_tokenizer.eos_token_id,
            decoder_start_token_id=t5_tokenizer.pad_token_id,
            **t5,
        )
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)
        try:
            # Initialising on the GPU takes seconds where the CPU takes many minutes.
            with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
                pipeline = FluxPipeline(
                    scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
                    vae=AutoencoderKL(**FLUX_DEV_VAE),
                    text_encoder=CLIPTextModel(_clip_config(tokenizer, projection_dim=768)),
                    tokenizer=tokenizer,
                    text_encoder_2=T5EncoderModel(t5_config),
                    tokenizer_2=t5_tokenizer,
                    transformer=FluxTransformer2DModel(**transformer),
                )
        finally:
            torch.set_default_dtype(torch.float32)
        pipeline.save_pretrained(folder, safe_serialization=True)
    return f"file://{folder}"


SMALL_SD_UNET = {
    "block_out_channels": [64, 128, 256],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}


def write_small_sd(folder: Path) -> str:
    """The tiny SD preset with a UNet of block channels 64/128/256 at ``folder``; its URI."""
    import torch
    from diffusers import UNet2DConditionModel

    from difftrain.trainer.presets import UNET, build_preset

    if not (folder / "model_index.json").exists():
        torch.manual_seed(0)
        pipeline = build_preset("tiny-sd")
        pipeline.register_modules(unet=UNet2DConditionModel(**(UNET | SMALL_SD_UNET)))
        pipeline.save_pretrained(folder, safe_serialization=True)
    return f"file://{folder}"


PROMPTS = [
    "a red circle on a white background",
    "a blue square on a black background",
    "a green triangle on a gray background",
    "a yellow circle on a black background",
]


# The cache rows (--cache): spec.cache of each, by row name; "filling" and "warm" share
# one cache, filled by the first and found filled by the second.
CACHE_ROWS = {
    "cache off": {"latents": False, "textEmbeddings": False},
    "cache filling": {"uri": "CACHE"},
    "cache warm": {"uri": "CACHE"},
}


def _trainer_run(
    method: str,
    base: str,
    args,
    work: Path,
    every: int = 0,
    cache: str | None = None,
    quantization: str | None = None,
) -> dict:
    from difftrain.api.config import TrainerConfig

    name = f"{method}-samples" if every else method
    if cache:
        name = f"{method}-{cache.replace(' ', '-')}"
    if quantization:
        name = f"{method}-{quantization}"
    spec = {
        "method": method,
        "model": {"base": base},
        "dataset": {"uri": "builtin:shapes", "resolution": args.resolution},
        "training": {
            "steps": args.steps,
            "batchSize": args.batch,
            "mixedPrecision": "bf16" if args.gpu else "no",
        },
        "checkpoints": {"everySteps": args.steps * 10},
        "output": {"uri": f"file://{work / name}"},
        "resources": {"gpusPerNode": 1 if args.gpu else 0},
    }
    if every:
        spec["validation"] = {"prompts": PROMPTS, "everySteps": every, "inferenceSteps": 25}
    if args.rank:
        spec["lora"] = {"rank": args.rank}
    if args.gradient_checkpointing:
        spec["training"]["gradientCheckpointing"] = True
    if quantization:
        spec["model"]["quantization"] = quantization
    if cache:
        settings = dict(CACHE_ROWS[cache])
        if settings.get("uri") == "CACHE":
            settings["uri"] = f"file://{work / f'cache-{method}'}"
        spec["cache"] = settings
    elif not args.cache_default:  # the rows without --cache: as before the cache
        spec["cache"] = CACHE_ROWS["cache off"]
    if args.compile:
        spec["training"]["compile"] = True
    config = work / f"{name}.json"
    config.write_text(TrainerConfig.model_validate({"name": name, "spec": spec}).to_json())
    env = dict(os.environ, DIFFTRAIN_CONFIG=str(config), DIFFTRAIN_SCRATCH=str(work / "scratch"))
    result = _child([sys.executable, "-m", "difftrain.trainer"], env)
    entries = [json.loads(line) for line in (work / name / "metrics.jsonl").open()]
    rates = [entry["imagesPerSecond"] for entry in entries][WARMUP_STEPS:]
    result["imagesPerSecond"] = sum(rates) / len(rates)
    if args.gpu:
        result["peakMiB"] = max(entry["peakMemoryBytes"] for entry in entries) / MiB
    return result


def _child(command: list[str], env: dict | None = None, stdout=subprocess.DEVNULL) -> dict:
    """Run ``command``; its wall time and its own peak resident memory."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=stdout)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command)
    return {"wallSeconds": time.perf_counter() - started, "peakMiB": usage.ru_maxrss / 1024}


def _pipeline(base: str):
    if base.startswith("preset:"):
        from difftrain.trainer.presets import build_preset

        return build_preset(base.removeprefix("preset:"))
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(base.removeprefix("file://"))


def _ids(tokenizer, batch: int, device, length: int | None = None):
    return tokenizer(
        ["a red circle on a white background"] * batch,
        padding="max_length",
        max_length=length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


def _sd_step(pipeline, batch: int, device):
    """SD's denoising step as a closure over fixed inputs: pixels -> loss."""
    import torch

    unet, vae, encoder = pipeline.unet, pipeline.vae, pipeline.text_encoder
    ids = _ids(pipeline.tokenizer, batch, device)
    alphas = pipeline.scheduler.alphas_cumprod.to(device)

    def step(pixels):
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            states = encoder(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,), device=device)
        a = alphas[t][:, None, None, None]
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        prediction = unet(noisy, t, states).sample
        return torch.nn.functional.mse_loss(prediction.float(), noise.float())

    return unet, ["to_q", "to_k", "to_v", "to_out.0"], step


def _sd3_step(pipeline, batch: int, device):
    """SD3's flow-matching step as a closure over fixed inputs: pixels -> loss."""
    import torch

    transformer, vae = pipeline.transformer, pipeline.vae
    clips = [pipeline.text_encoder, pipeline.text_encoder_2]
    ids = [_ids(pipeline.tokenizer, batch, device), _ids(pipeline.tokenizer_2, batch, device)]
    t5_ids = _ids(
        pipeline.tokenizer_3, batch, device, min(pipeline.tokenizer_3.model_max_length, 77)
    )
    sigmas = pipeline.scheduler.sigmas.to(device)
    timesteps = pipeline.scheduler.timesteps.to(device)
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor

    def step(pixels):
        with torch.no_grad():
            latents = (vae.encode(pixels).latent_dist.sample() - shift) * scale
            outputs = [e(i, output_hidden_states=True) for e, i in zip(clips, ids, strict=True)]
            t5 = pipeline.text_encoder_3(t5_ids)[0]
            clip = torch.cat([o.hidden_states[-2] for o in outputs], dim=-1)
            clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            states = torch.cat([clip, t5], dim=-2)
            pooled = torch.cat([o[0] for o in outputs], dim=-1)
        noise = torch.randn_like(latents)
        index = (torch.sigmoid(torch.randn(batch, device=device)) * len(sigmas)).long()
        sigma = sigmas[index][:, None, None, None]
        noisy = (1 - sigma) * latents + sigma * noise
        prediction = transformer(
            hidden_states=noisy,
            timestep=timesteps[index],
            encoder_hidden_states=states,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        return torch.nn.functional.mse_loss(prediction.float(), (noise - latents).float())

    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"]
    return transformer, [*targets, "to_add_out"], step


def _flux_step(pipeline, batch: int, device):
    """Flux's flow-matching step as a closure over fixed inputs: pixels -> loss."""
    import math

    import torch

    transformer, vae = pipeline.transformer, pipeline.vae
    clip_ids = _ids(pipeline.tokenizer, batch, device)
    t5_ids = _ids(
        pipeline.tokenizer_2, batch, device, min(pipeline.tokenizer_2.model_max_length, 512)
    )
    sigmas = pipeline.scheduler.sigmas.to(device)
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    guidance = torch.full((batch,), 1.0, device=device)

    def step(pixels):
        with torch.no_grad():
            latents = (vae.encode(pixels).latent_dist.sample() - shift) * scale
            pooled = pipeline.text_encoder(clip_ids).pooler_output
            states = pipeline.text_encoder_2(t5_ids)[0]
        b, c, h, w = latents.shape
        tokens = (h // 2) * (w // 2)
        mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (tokens - 256)
        index = (torch.sigmoid(torch.randn(batch, device=device)) * len(sigmas)).long()
        sigma = math.exp(mu) / (math.exp(mu) + 1 / sigmas[index] - 1)
        noise = torch.randn_like(latents)
        noisy = (1 - sigma[:, None, None, None]) * latents + sigma[:, None, None, None] * noise
        packed = noisy.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        ids = torch.zeros(h // 2, w // 2, 3, device=device)
        ids[..., 1] += torch.arange(h // 2, device=device)[:, None]
        ids[..., 2] += torch.arange(w // 2, device=device)[None, :]
        prediction = transformer(
            hidden_states=packed.reshape(b, tokens, c * 4),
            timestep=sigma,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=states,
            txt_ids=torch.zeros(states.shape[1], 3, device=device),
            img_ids=ids.reshape(tokens, 3),
            return_dict=False,
        )[0]
        prediction = prediction.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        target = (noise - latents).float()
        return torch.nn.functional.mse_loss(prediction.reshape(b, c, h, w).float(), target)

    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"]
    return transformer, [*targets, "to_add_out"], step


def bare_loop(method: str, base: str, args) -> dict:
    """images/s (and peak GPU memory) of the same work without the trainer around it."""
    import torch

    torch.manual_seed(0)
    device = torch.device("cuda" if args.gpu else "cpu")
    pipeline = _pipeline(base)
    # A LoRA's frozen base in the training precision, as the trainer holds it on a GPU;
    # fp32 otherwise, whatever the folder holds (flux-dev's is bf16).
    frozen = torch.bfloat16 if args.gpu and method == "lora" else torch.float32
    pipeline.to(device, dtype=frozen)
    for module in pipeline.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    name = type(pipeline).__name__
    make = {"FluxPipeline": _flux_step, "StableDiffusion3Pipeline": _sd3_step}.get(name, _sd_step)
    denoiser, targets, step = make(pipeline, args.batch, device)
    if method == "lora":
        from peft import LoraConfig

        rank = args.rank or 16
        denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
    else:
        denoiser.requires_grad_(True)
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    trained = [p for p in denoiser.parameters() if p.requires_grad]
    for parameter in trained:  # what trains stays fp32
        parameter.data = parameter.data.float()
    optimizer = torch.optim.AdamW(trained, lr=1e-4, fused=args.variant == "fused AdamW")
    batch, resolution = args.batch, args.resolution
    pixels = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
    if args.variant == "channels_last":
        pipeline.vae.to(memory_format=torch.channels_last)
        denoiser.to(memory_format=torch.channels_last)
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.gpu)
    timings = []
    for _ in range(args.steps):
        started = time.perf_counter()
        with autocast:
            loss = step(pixels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if args.gpu:
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - started)
    measured = timings[WARMUP_STEPS:]
    result = {"imagesPerSecond": batch * len(measured) / sum(measured)}
    if args.gpu:
        result["peakMiB"] = torch.cuda.max_memory_allocated() / MiB
    return result


# What --kernels measures alone in the bare loop, each beside the plain one: AdamW's fused
# kernel (what the trainer uses), and the denoiser and VAE in channels_last memory format.
VARIANTS = ("fused AdamW", "channels_last")

MODELS = {
    "tiny-sd": lambda folder: "preset:tiny-sd",
    "small-sd": write_small_sd,
    "sd15": write_sd15,
    "sd3-small": write_sd3_small,
    "flux-small": write_flux_small,
    "flux-dev": write_flux_dev,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--model", choices=list(MODELS), default="tiny-sd")
    parser.add_argument("--gpu", action="store_true", help="one GPU, bf16 mixed precision")
    parser.add_argument("--methods", nargs="+", default=["lora", "finetune"])
    parser.add_argument(
        "--samples",
        type=int,
        default=0,
        metavar="N",
        help="also train with validation samples every N steps",
    )
    parser.add_argument(
        "--cache",
        action="store_true",
        help="trainer rows with the cache off, filling it, and finding it filled",
    )
    parser.add_argument(
        "--cache-default",
        action="store_true",
        help="the plain trainer rows with the default cache (node-local) instead of none",
    )
    parser.add_argument("--compile", action="store_true", help="training.compile: true")
    parser.add_argument("--rank", type=int, help="lora.rank (default: the trainer's; 16 bare)")
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="training.gradientCheckpointing: true, and the same in the bare loop",
    )
    parser.add_argument(
        "--quantization",
        nargs="+",
        default=[],
        choices=["int8", "fp8", "nf4"],
        help="also a trainer row with model.quantization set to each (LoRA)",
    )
    parser.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--kernels",
        action="store_true",
        help="bare-loop rows with each of " + ", ".join(VARIANTS) + " alone",
    )
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--bare", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scale != 1 and args.model != "flux-dev":
        parser.error("--scale shrinks --model flux-dev only")
    if args.bare:
        print(json.dumps(bare_loop(args.bare, args.base, args)))
        return
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        write = MODELS[args.model]
        if args.scale != 1:  # a smaller flux-dev, to check the bench on a CPU
            write = functools.partial(write_flux_dev, scale=args.scale)
        base = write(work / args.model)
        for method in args.methods:
            if args.cache:
                for row in CACHE_ROWS:
                    results[f"difftrain {method}, {row}"] = _trainer_run(
                        method, base, args, work, cache=row
                    )
            else:
                results[f"difftrain {method}"] = _trainer_run(method, base, args, work)
            for kind in args.quantization if method == "lora" else []:
                results[f"difftrain {method}, {kind} base"] = _trainer_run(
                    method, base, args, work, quantization=kind
                )
            if args.samples:
                results[f"difftrain {method} + samples"] = _trainer_run(
                    method, base, args, work, args.samples
                )
            command = [
                sys.executable,
                __file__,
                "--bare",
                method,
                "--base",
                base,
                "--steps",
                str(args.steps),
                "--resolution",
                str(args.resolution),
                "--batch",
                str(args.batch),
                *(["--gpu"] if args.gpu else []),
                *(["--rank", str(args.rank)] if args.rank else []),
                *(["--gradient-checkpointing"] if args.gradient_checkpointing else []),
            ]
            for variant in [None, *(VARIANTS if args.kernels else [])]:
                out = work / "bare.json"
                with out.open("w") as handle:
                    extra = ["--variant", variant] if variant else []
                    child = _child(command + extra, stdout=handle)
                row = f"bare {method}, {variant}" if variant else f"bare {method}"
                results[row] = {**child, **json.loads(out.read_text())}
    where = "1 GPU, bf16" if args.gpu else f"CPU ({os.cpu_count()} cores), fp32"
    memory = "peak GPU MiB" if args.gpu else "peak RSS MiB"
    print(f"{args.model}, {args.resolution} px, batch {args.batch}, {args.steps} steps, {where}")
    print(f"{'run':<36}{'images/s':>10}{'x bare':>8}{memory:>14}{'wall s':>9}")
    for name, r in results.items():
        method = next(m for m in args.methods if f" {m}" in name)
        ratio = r["imagesPerSecond"] / results[f"bare {method}"]["imagesPerSecond"]
        print(
            f"{name:<36}{r['imagesPerSecond']:>10.2f}{ratio:>8.2f}{r['peakMiB']:>14.0f}"
            f"{r['wallSeconds']:>9.1f}"
        )


if __name__ == "__main__":
    main()
