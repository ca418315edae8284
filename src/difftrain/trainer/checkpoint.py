"""Checkpoints under ``OUTPUT/checkpoints/step-XXXXXXXX/``, and resuming from them.

A checkpoint holds the trained weights, the optimiser and schedule, the trainer's
position (step, epoch, batch) and every process's random state. Each process uploads its
own random state; once all have, the main process writes ``COMPLETE`` last. Only
checkpoints with ``COMPLETE`` are resumed from; others are ignored and later pruned.
"""

import io
import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from difftrain.storage import Store

log = logging.getLogger(__name__)

FOLDER = "checkpoints"
MARKER = "COMPLETE"
WEIGHTS = "trainable.safetensors"
EMA = "ema.pt"


@dataclass
class Position:
    """Where training stands: optimiser steps done, and the next batch to draw."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


def step_prefix(step: int) -> str:
    return f"{FOLDER}/step-{step:08d}"


def _step_of(key: str) -> int | None:
    name = key.split("/")[1] if key.count("/") >= 2 else ""
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else None


def complete_steps(store: Store) -> list[int]:
    """Steps of the complete checkpoints, oldest first."""
    keys = store.keys(FOLDER)
    return sorted(
        step for key in keys if key.endswith("/" + MARKER) and (step := _step_of(key)) is not None
    )


def rng_state(generator: torch.Generator) -> dict:
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "noise": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["noise"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tensor_bytes(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A cheap summary of weights (sums and sums of squares): equal weights, equal text."""
    total = sum(float(v.double().sum()) for v in state.values())
    squares = sum(float(v.double().square().sum()) for v in state.values())
    return f"{total:.17g}/{squares:.17g}"


class OutOfSync(RuntimeError):
    """Processes hold different weights: a bug or a hardware fault, never to be saved."""


def save(store: Store, scratch: Path, position: Position, trainer, rank: int, gather) -> None:
    """Write the checkpoint for ``position``.

    ``gather(obj)`` collects one object from every process (and so synchronises them);
    ``trainer`` provides ``trainable``, ``optimizer``, ``scheduler``, ``generator`` and
    ``ema`` (None without EMA). Replicas must hold identical weights; the checkpoint is
    refused if they do not.
    """
    prints = gather(fingerprint(trainer.trainable.state_dict()))
    log.info("step %d: weights fingerprint %s", position.step, prints[rank])
    if len(set(prints)) > 1:
        raise OutOfSync(f"step {position.step}: processes hold different weights: {prints}")
    prefix = step_prefix(position.step)
    target = store.child(prefix)
    target.write_bytes(f"rng-{rank}.pt", _tensor_bytes(rng_state(trainer.generator)))
    if rank == 0:
        local = scratch / prefix
        local.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous().cpu() for k, v in trainer.trainable.state_dict().items()},
            local / WEIGHTS,
        )
        torch.save(trainer.optimizer.state_dict(), local / "optimizer.pt")
        torch.save(trainer.scheduler.state_dict(), local / "scheduler.pt")
        (local / "position.json").write_text(json.dumps(asdict(position)))
        if trainer.ema is not None:
            torch.save(trainer.ema.state_dict(), local / EMA)
        target.upload_tree(local, "")
    gather(None)  # every process's files are up before COMPLETE
    if rank == 0:
        target.write_bytes(MARKER, b"")
        log.info("checkpoint complete: %s", target.uri)


def load(store: Store, scratch: Path, step: int, trainer, rank: int) -> Position:
    """Restore the complete checkpoint of ``step`` into ``trainer``."""
    prefix = step_prefix(step)
    local = scratch / "resume" / prefix
    source = store.child(prefix)
    for name in (WEIGHTS, "optimizer.pt", "scheduler.pt", "position.json", f"rng-{rank}.pt"):
        source.download(name, local / name)
    trainer.trainable.load_state_dict(load_file(local / WEIGHTS))
    trainer.optimizer.load_state_dict(torch.load(local / "optimizer.pt", weights_only=True))
    trainer.scheduler.load_state_dict(torch.load(local / "scheduler.pt", weights_only=True))
    restore_rng(torch.load(local / f"rng-{rank}.pt", weights_only=False), trainer.generator)
    if trainer.ema is not None:
        source.download(EMA, local / EMA)
        trainer.ema.load_state_dict(torch.load(local / EMA, weights_only=False))
    return Position(**json.loads((local / "position.json").read_text()))


def prune(store: Store, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop older ones and older incomplete
    ones (left by a crash mid-save)."""
    complete = complete_steps(store)
    if not complete:
        return
    kept = set(complete[-keep:])
    newest = complete[-1]
    steps = {step for key in store.keys(FOLDER) if (step := _step_of(key)) is not None}
    for step in sorted(steps):
        if step not in kept and step < newest:
            # COMPLETE goes first: a half-deleted checkpoint must never look complete.
            store.delete([f"{step_prefix(step)}/{MARKER}"])
            store.delete_tree(step_prefix(step))
            log.info("pruned checkpoint step %d", step)
