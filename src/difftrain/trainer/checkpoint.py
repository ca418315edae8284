"""Checkpoints under ``OUTPUT/checkpoints/step-XXXXXXXX/``, and resuming from them.

A checkpoint holds the trained weights, the optimiser and schedule, the trainer's
position (step, epoch, batch), every process's random state, and ``run.json``, which
says which run wrote it (see identity.py). ``run.json`` is written first, so that even a
half-written checkpoint can be told apart; then every process uploads its random state
and the main process the rest; once all are up, the main process writes ``COMPLETE``
last. Only checkpoints with ``COMPLETE`` are resumed from. A run prunes only its own
checkpoints: the complete ones beyond ``keepLast`` and its own half-written ones.

The main process stages its files on the node's scratch disk and deletes them once
uploaded, so scratch holds at most one checkpoint, and only while it is being saved.
Everything is loaded with ``weights_only=True``: a checkpoint is data, never code.
"""

import io
import json
import logging
import random
import shutil
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import load_file, save_file

from difftrain import contract
from difftrain.storage import Store
from difftrain.trainer import identity, sharding

log = logging.getLogger(__name__)

FOLDER = contract.CHECKPOINTS
MARKER = "COMPLETE"
WEIGHTS = "trainable.safetensors"
EMA = "ema.pt"


@dataclass
class Position:
    """Where training stands: optimiser steps done, and the next batch to draw."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


step_prefix = contract.checkpoint_prefix


def _step_of(key: str) -> int | None:
    name = key.split("/")[1] if key.count("/") >= 2 else ""
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else None


@dataclass(frozen=True)
class Found:
    """A checkpoint folder in the output: its step, whether it is complete, and its
    ``run.json`` (None when it has none or it cannot be read)."""

    step: int
    complete: bool
    record: dict | None

    @property
    def run(self) -> str | None:
        return (self.record or {}).get("run")


def catalog(store: Store) -> list[Found]:
    """Every checkpoint folder under ``store``, by step."""
    names: dict[int, set[str]] = {}
    for key in store.keys(FOLDER):
        if (step := _step_of(key)) is not None:
            names.setdefault(step, set()).add(key.split("/", 2)[2])
    return [
        Found(step, MARKER in files, _record(store, step) if identity.RECORD in files else None)
        for step, files in sorted(names.items())
    ]


def _record(store: Store, step: int) -> dict | None:
    try:
        record = json.loads(store.read_bytes(f"{step_prefix(step)}/{identity.RECORD}"))
    except (FileNotFoundError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def complete_steps(store: Store) -> list[int]:
    """Steps of the complete checkpoints, oldest first."""
    return [found.step for found in catalog(store) if found.complete]


def newest(found: list[Found]) -> Found | None:
    """The complete checkpoint written last (by its record's time, then step): the one
    that ``resume: auto`` continues, whichever run wrote it."""
    complete = [f for f in found if f.complete]
    return max(complete, key=lambda f: ((f.record or {}).get("savedAt", ""), f.step), default=None)


@dataclass
class Ledger:
    """One run's checkpoint folders in one store; the main process keeps it up to date
    as it saves, so that pruning never needs to read other runs' records again."""

    store: Store
    run: str
    complete: set[int] = field(default_factory=set)
    partial: set[int] = field(default_factory=set)
    others: dict[int, str | None] = field(default_factory=dict)  # step: the run it holds

    @classmethod
    def of(cls, store: Store, run: str, found: list[Found]) -> "Ledger":
        ledger = cls(store, run)
        for item in found:
            if item.run != run:
                ledger.others[item.step] = item.run
            elif item.complete:
                ledger.complete.add(item.step)
            else:
                ledger.partial.add(item.step)
        return ledger

    def clear(self, step: int) -> None:
        """Empty the folder of ``step`` before this run writes it: a half-written
        checkpoint of this run, or another run's checkpoint of the same step (a
        ``resume: never`` run replaces those; it leaves every other step alone)."""
        if step in self.others:
            log.warning(
                "replacing checkpoint step %d of run %s with this run's",
                step,
                self.others.pop(step),
            )
        elif step not in self.complete | self.partial:
            return
        self.complete.discard(step)
        self.partial.discard(step)
        _delete(self.store, step)

    def prune(self, keep: int) -> None:
        """Keep this run's newest ``keep`` complete checkpoints; drop its older ones and
        its half-written ones older than its newest complete one (a newer one may be
        being written)."""
        if not self.complete:
            return
        newest_step = max(self.complete)
        doomed = sorted(self.complete)[:-keep] + [s for s in self.partial if s < newest_step]
        for step in sorted(doomed):
            _delete(self.store, step)
            self.complete.discard(step)
            self.partial.discard(step)
            log.info("pruned checkpoint step %d", step)


def _delete(store: Store, step: int) -> None:
    # COMPLETE goes first: a half-deleted checkpoint must never look complete.
    store.delete([f"{step_prefix(step)}/{MARKER}"])
    store.delete_tree(step_prefix(step))


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
    version, internal, gauss = state["python"]  # weights_only loads tuples as lists
    random.setstate((version, tuple(internal), gauss))
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


def state_bytes(trainer) -> int:
    """About how large the main process's checkpoint files are (a sharded run's main
    process writes its shards before them, and deletes those once uploaded)."""
    if trainer.sharded:
        return 1 << 20  # the schedule and the position
    tensors = list(trainer.trainable.state_dict().values())
    for state in trainer.optimizer.state_dict()["state"].values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    if trainer.ema is not None:
        tensors += list(trainer.ema.shadow_params)
    return sum(t.numel() * t.element_size() for t in tensors)


class OutOfSync(RuntimeError):
    """Processes hold different weights: a bug or a hardware fault, never to be saved."""


def save(trainer, position: Position, gather) -> None:
    """Write this run's checkpoint for ``position``; every process calls it.

    ``gather(obj)`` collects one object from every process. ``trainer`` provides
    ``trainable``, ``optimizer``, ``scheduler``, ``generator``, ``ema`` (None without
    EMA), ``output``, ``scratch``, ``disk`` (a Scratch), ``waiting``, ``identity`` and
    ``ledger`` (main process only). Replicas must hold identical weights; the checkpoint
    is refused if they do not.
    """
    rank = trainer.accelerator.process_index
    sharded = trainer.sharded
    if not sharded:  # shards differ by design; replicas must not
        prints = gather(fingerprint(trainer.trainable.state_dict()))
        log.info("step %d: weights fingerprint %s", position.step, prints[rank])
        if len(set(prints)) > 1:
            raise OutOfSync(f"step {position.step}: processes hold different weights: {prints}")
    prefix = step_prefix(position.step)
    target = trainer.output.child(prefix)
    main = rank == 0
    waiting = trainer.waiting

    def begin():
        trainer.ledger.clear(position.step)
        trainer.ledger.partial.add(position.step)
        target.write_bytes(identity.RECORD, trainer.identity.record(position.step))

    waiting.alone(main, "starting a checkpoint", begin)
    target.write_bytes(f"rng-{rank}.pt", _tensor_bytes(rng_state(trainer.generator)))
    if sharded:
        _upload_shards(trainer, position)
    waiting.alone(main, "uploading a checkpoint", lambda: _upload_main_files(trainer, position))
    if main:  # every process's files are up before COMPLETE
        target.write_bytes(MARKER, b"")
        trainer.ledger.partial.discard(position.step)
        trainer.ledger.complete.add(position.step)
        log.info("checkpoint complete: %s", target.uri)


def _sharded_module(trainer):
    return trainer.trainable.modules[trainer.components.family.denoiser]


def _upload_shards(trainer, position: Position) -> None:
    """Every process writes its shards (a collective) and uploads its own files."""
    prefix = step_prefix(position.step)
    local = trainer.scratch / prefix / sharding.SHARDS
    module = _sharded_module(trainer)
    size = sharding.local_bytes(module, trainer.optimizer, trainer.ema)
    with trainer.disk.writing(local, f"the shards of step {position.step}", size):
        try:
            for path in sharding.save(module, trainer.optimizer, local, trainer.ema):
                trainer.output.child(prefix).upload(path, f"{sharding.SHARDS}/{path.name}")
        finally:
            shutil.rmtree(local, ignore_errors=True)


def _upload_main_files(trainer, position: Position) -> None:
    prefix = step_prefix(position.step)
    local = trainer.scratch / prefix
    what = f"the checkpoint of step {position.step}"
    sharded = trainer.sharded
    with trainer.disk.writing(local, what, state_bytes(trainer)):
        local.mkdir(parents=True, exist_ok=True)
        if not sharded:  # a sharded run's weights and optimiser are in its shards
            save_file(
                {k: v.contiguous().cpu() for k, v in trainer.trainable.state_dict().items()},
                local / WEIGHTS,
            )
            torch.save(trainer.optimizer.state_dict(), local / "optimizer.pt")
        torch.save(trainer.scheduler.state_dict(), local / "scheduler.pt")
        (local / "position.json").write_text(json.dumps(asdict(position)))
        if trainer.ema is not None and not sharded:  # a sharded EMA is in the shards
            torch.save(trainer.ema.state_dict(), local / EMA)
    try:
        trainer.output.child(prefix).upload_tree(local, "")
    finally:
        shutil.rmtree(local, ignore_errors=True)  # scratch keeps no uploaded copy


def load(trainer, step: int) -> Position:
    """Restore the complete checkpoint of ``step`` into ``trainer``."""
    rank = trainer.accelerator.process_index
    prefix = step_prefix(step)
    local = trainer.scratch / "resume" / prefix
    source = trainer.output.child(prefix)
    sharded = trainer.sharded
    names = ["scheduler.pt", "position.json", f"rng-{rank}.pt"]
    names += [] if sharded else [WEIGHTS, "optimizer.pt"]
    if trainer.ema is not None and not sharded:
        names.append(EMA)
    try:
        if sharded:  # the index, then the files that hold this process's part
            names += _shards_to_read(trainer, source, local / sharding.SHARDS)
        for name in names:
            source.download(name, local / name)
        if sharded:
            shards = local / sharding.SHARDS
            sharding.load(_sharded_module(trainer), trainer.optimizer, shards, trainer.ema)
        else:
            trainer.trainable.load_state_dict(load_file(local / WEIGHTS))
            optimizer = torch.load(local / "optimizer.pt", weights_only=True)
            trainer.optimizer.load_state_dict(optimizer)
        trainer.scheduler.load_state_dict(torch.load(local / "scheduler.pt", weights_only=True))
        restore_rng(torch.load(local / f"rng-{rank}.pt", weights_only=True), trainer.generator)
        if trainer.ema is not None and not sharded:
            trainer.ema.load_state_dict(torch.load(local / EMA, weights_only=True))
        return Position(**json.loads((local / "position.json").read_text()))
    finally:
        shutil.rmtree(trainer.scratch / "resume", ignore_errors=True)


def _shards_to_read(trainer, source: Store, folder) -> list[str]:
    """Download the shards' index into ``folder``; the shard files this process needs."""
    source.download(f"{sharding.SHARDS}/{sharding.METADATA}", folder / sharding.METADATA)
    module, optimizer = _sharded_module(trainer), trainer.optimizer
    needed = sharding.needed_files(module, optimizer, folder, trainer.ema)
    return [f"{sharding.SHARDS}/{name}" for name in sorted(needed)]


def resume(stage) -> "Position":
    """Choose the run this stage writes and restore its newest checkpoint, if any: under
    ``resume: auto`` the newest complete checkpoint, when it belongs to a run of this
    training spec (InvalidSpec otherwise); a new run from step 0 when there is none, or
    under ``resume: never``."""
    from difftrain.trainer.setup import gather_from_all

    config, accelerator = stage.config, stage.accelerator
    current = identity.training_spec(config.spec)
    job = {"namespace": config.namespace, "name": config.name, "uid": config.uid}
    found = catalog(stage.output)
    latest = newest(found) if config.spec.checkpoints.resume == "auto" else None
    if latest is not None:
        where = f"{stage.output.uri}/{step_prefix(latest.step)}"
        identity.check_resumable(latest.record, current, where)
        run_id = latest.run
    else:  # one id for all processes: the main process's
        earlier = stage.run.run_id
        run_id = gather_from_all(accelerator, earlier or identity.new_run_id())[0]
    stage.identity = identity.RunIdentity(run_id, current, job)
    if accelerator.is_main_process:
        stage.ledger = Ledger.of(stage.output, run_id, found)
        if latest is None and any(f.run != run_id for f in found):
            log.warning(
                "%s holds checkpoints of earlier runs; they are left as they are, "
                "except any at a step this run saves too",
                stage.output.uri,
            )
    if latest is None:
        return Position()
    return load(stage, latest.step)
