"""Training speed and memory of the trainer, beside a bare training loop as the baseline.

    python bench/train_speed.py [--steps 30] [--resolution 64] [--batch 8]

Runs ``python -m difftrain.trainer`` on ``preset:tiny-sd`` (LoRA, then full fine-tune)
over the built-in shapes data, and a bare loop doing the same work per step (VAE encode,
text encode, UNet forward and backward, AdamW) with no data loading, checkpointing or
logging. Each runs in its own process; reported: images/s over the steps after the
first few (warm-up), and the process's peak resident memory.
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


def _trainer_run(method: str, args, work: Path) -> dict:
    from difftrain.api.config import TrainerConfig

    spec = {
        "method": method,
        "model": {"base": "preset:tiny-sd"},
        "dataset": {"uri": "builtin:shapes", "resolution": args.resolution},
        "training": {"steps": args.steps, "batchSize": args.batch, "mixedPrecision": "no"},
        "checkpoints": {"everySteps": args.steps * 10},
        "output": {"uri": f"file://{work / method}"},
        "resources": {"gpusPerNode": 0},
    }
    config = work / f"{method}.json"
    config.write_text(TrainerConfig.model_validate({"name": method, "spec": spec}).to_json())
    env = dict(os.environ, DIFFTRAIN_CONFIG=str(config), DIFFTRAIN_SCRATCH=str(work / "scratch"))
    result = _child([sys.executable, "-m", "difftrain.trainer"], env)
    lines = (work / method / "metrics.jsonl").read_text().splitlines()
    rates = [json.loads(line)["imagesPerSecond"] for line in lines][WARMUP_STEPS:]
    return {"imagesPerSecond": sum(rates) / len(rates), **result}


def _child(command: list[str], env: dict | None = None, stdout=subprocess.DEVNULL) -> dict:
    """Run ``command``; its wall time and its own peak resident memory."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=stdout, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command)
    return {"wallSeconds": time.perf_counter() - started, "peakRssMiB": usage.ru_maxrss / 1024}


def bare_loop(method: str, steps: int, resolution: int, batch: int) -> float:
    """images/s of the same work without the trainer around it (runs in a child)."""
    import torch

    from difftrain.trainer.presets import build_preset

    torch.manual_seed(0)
    pipeline = build_preset("tiny-sd")
    unet, vae, encoder, tokenizer = (
        pipeline.unet,
        pipeline.vae,
        pipeline.text_encoder,
        pipeline.tokenizer,
    )
    vae.requires_grad_(False)
    encoder.requires_grad_(False)
    if method == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(
            LoraConfig(r=16, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        )
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
    pixels = torch.rand(batch, 3, resolution, resolution) * 2 - 1
    ids = tokenizer(
        ["a red circle on a white background"] * batch,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
    alphas = pipeline.scheduler.alphas_cumprod
    timings = []
    for _ in range(steps):
        started = time.perf_counter()
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            states = encoder(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,))
        a = alphas[t][:, None, None, None]
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        loss = torch.nn.functional.mse_loss(unet(noisy, t, states).sample, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        timings.append(time.perf_counter() - started)
    measured = timings[WARMUP_STEPS:]
    return batch * len(measured) / sum(measured)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--bare", choices=["lora", "finetune"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        print(json.dumps(bare_loop(args.bare, args.steps, args.resolution, args.batch)))
        return
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        for method in ("lora", "finetune"):
            results[f"difftrain {method}"] = _trainer_run(method, args, work)
            command = [
                sys.executable,
                __file__,
                "--bare",
                method,
                "--steps",
                str(args.steps),
                "--resolution",
                str(args.resolution),
                "--batch",
                str(args.batch),
            ]
            out = work / "bare.json"
            with out.open("w") as handle:
                result = _child(command, stdout=handle)
            results[f"bare {method}"] = {"imagesPerSecond": json.loads(out.read_text()), **result}
    print(
        f"tiny-sd, {args.resolution} px, batch {args.batch}, {args.steps} steps, CPU "
        f"({os.cpu_count()} cores)"
    )
    print(f"{'run':<22}{'images/s':>10}{'peak RSS MiB':>14}")
    for name, result in results.items():
        print(f"{name:<22}{result['imagesPerSecond']:>10.1f}{result['peakRssMiB']:>14.0f}")


if __name__ == "__main__":
    main()
