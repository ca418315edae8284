"""Training speed and memory of the trainer, beside a bare training loop as the baseline.

    python bench/train_speed.py [--steps 30] [--resolution 64] [--batch 8]
    python bench/train_speed.py --model sd15 --gpu --resolution 512 --batch 8 --steps 40
    python bench/train_speed.py --samples 10 [...]

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
GPU in practice. ``--gpu`` trains on one GPU in bf16 mixed precision.
"""

import argparse
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


def write_sd15(folder: Path) -> str:
    """An SD 1.5-shaped pipeline with random weights at ``folder``; its model URI."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from difftrain.trainer.presets import _SCHEDULER
    from difftrain.trainer.tokenizer import build_tokenizer

    if not (folder / "model_index.json").exists():
        tokenizer = build_tokenizer()
        text = CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **SD15_TEXT,
        )
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


PROMPTS = [
    "a red circle on a white background",
    "a blue square on a black background",
    "a green triangle on a gray background",
    "a yellow circle on a black background",
]


def _trainer_run(method: str, base: str, args, work: Path, every: int = 0) -> dict:
    from difftrain.api.config import TrainerConfig

    name = f"{method}-samples" if every else method
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


def _components(base: str):
    """(unet, vae, text encoder, tokenizer, noise scheduler) of ``base``."""
    if base.startswith("preset:"):
        from difftrain.trainer.presets import build_preset

        pipeline = build_preset(base.removeprefix("preset:"))
    else:
        from diffusers import StableDiffusionPipeline

        pipeline = StableDiffusionPipeline.from_pretrained(base.removeprefix("file://"))
    return (
        pipeline.unet,
        pipeline.vae,
        pipeline.text_encoder,
        pipeline.tokenizer,
        pipeline.scheduler,
    )


def bare_loop(method: str, base: str, args) -> dict:
    """images/s (and peak GPU memory) of the same work without the trainer around it."""
    import torch

    torch.manual_seed(0)
    device = torch.device("cuda" if args.gpu else "cpu")
    unet, vae, encoder, tokenizer, scheduler = _components(base)
    for module in (unet, vae, encoder):
        module.to(device)
    vae.requires_grad_(False)
    encoder.requires_grad_(False)
    if method == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(
            LoraConfig(r=16, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        )
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
    batch, resolution = args.batch, args.resolution
    pixels = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
    ids = tokenizer(
        ["a red circle on a white background"] * batch,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids.to(device)
    alphas = scheduler.alphas_cumprod.to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.gpu)
    timings = []
    for _ in range(args.steps):
        started = time.perf_counter()
        with autocast:
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                states = encoder(ids)[0]
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (batch,), device=device)
            a = alphas[t][:, None, None, None]
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            prediction = unet(noisy, t, states).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--model", choices=["tiny-sd", "sd15"], default="tiny-sd")
    parser.add_argument("--gpu", action="store_true", help="one GPU, bf16 mixed precision")
    parser.add_argument("--methods", nargs="+", default=["lora", "finetune"])
    parser.add_argument(
        "--samples",
        type=int,
        default=0,
        metavar="N",
        help="also train with validation samples every N steps",
    )
    parser.add_argument("--bare", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        print(json.dumps(bare_loop(args.bare, args.base, args)))
        return
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        base = "preset:tiny-sd" if args.model == "tiny-sd" else write_sd15(work / "sd15")
        for method in args.methods:
            results[f"difftrain {method}"] = _trainer_run(method, base, args, work)
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
            ]
            out = work / "bare.json"
            with out.open("w") as handle:
                child = _child(command, stdout=handle)
            results[f"bare {method}"] = {**child, **json.loads(out.read_text())}
    where = "1 GPU, bf16" if args.gpu else f"CPU ({os.cpu_count()} cores), fp32"
    memory = "peak GPU MiB" if args.gpu else "peak RSS MiB"
    print(f"{args.model}, {args.resolution} px, batch {args.batch}, {args.steps} steps, {where}")
    print(f"{'run':<32}{'images/s':>10}{memory:>14}{'wall s':>9}")
    for name, r in results.items():
        print(
            f"{name:<32}{r['imagesPerSecond']:>10.2f}{r['peakMiB']:>14.0f}{r['wallSeconds']:>9.1f}"
        )


if __name__ == "__main__":
    main()
