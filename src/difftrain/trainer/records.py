"""What a stage records as it trains: ``metrics.jsonl``, the progress gauges, and the
window of steps since the last record (its losses, its time less the pauses for
checkpoints, samples and evaluations, which the time left adds back as they are still to come)."""

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from difftrain import contract
from difftrain.errors import InvalidSpec
from difftrain.storage import Store
from difftrain.trainer.telemetry import Telemetry


class MetricsLog:
    """``metrics.jsonl``: one line per logged step, kept locally and uploaded whole; and,
    with ``mirror`` (spec.output.metricsFile), each entry again in Katib's File metrics
    collector's JSON format (:func:`katib_line`)."""

    def __init__(self, path: Path, store: Store, resume_step: int, mirror: Path | None = None):
        self.path, self.store, self.mirror = path, store, mirror
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = []
        if resume_step and store.exists(contract.METRICS_FILE):
            lines = [
                line
                for line in store.read_bytes(contract.METRICS_FILE).decode().splitlines()
                if line and json.loads(line)["step"] <= resume_step
            ]
        path.write_text("".join(line + "\n" for line in lines))

    def evaluations(self) -> list[dict]:
        """The evaluation scores recorded so far (kept across a resume)."""
        entries = [json.loads(line) for line in self.path.read_text().splitlines() if line]
        return [entry["evaluation"] for entry in entries if "evaluation" in entry]

    def append(self, entry: dict) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")
        if self.mirror is not None:
            with self.mirror.open("a") as handle:
                handle.write(katib_line(entry) + "\n")

    def upload(self) -> None:
        self.store.upload(self.path, contract.METRICS_FILE)


# metrics.jsonl's names -> the metric names Katib's objective and MLflow use.
KATIB_NAMES = {
    "loss": "loss",
    "lr": "lr",
    "imagesPerSecond": "images_per_second",
    "fid": "fid",
    "clipScore": "clip_score",
    "validationLoss": "validation_loss",
}


def katib_line(entry: dict) -> str:
    """One metrics.jsonl entry as Katib's JSON metrics line: the step and the finite
    values as strings (Katib's parser reads only strings), and an RFC 3339 timestamp."""
    values = entry.get("evaluation") or entry
    line = {"step": str(entry["step"])}
    for key, name in KATIB_NAMES.items():
        value = values.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            line[name] = repr(float(value))
    line["timestamp"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return json.dumps(line)


def open_mirror(path: str | None) -> Path | None:
    """spec.output.metricsFile, checked writable before training; InvalidSpec if not."""
    if not path:
        return None
    mirror = Path(path)
    try:
        mirror.parent.mkdir(parents=True, exist_ok=True)
        with mirror.open("a"):
            pass
    except OSError as error:
        raise InvalidSpec(
            f"spec.output.metricsFile: cannot write {path} ({error.strerror}); it must be in "
            "a folder the pod can write (Katib's File collector mounts one at its folder)"
        ) from None
    return mirror


@dataclass
class Progress:
    """Where a stage's steps fall in the whole run, for the progress gauges: the
    autoencoder stage comes first, and the diffusion stage's steps follow it."""

    telemetry: Telemetry
    offset: int
    total: int

    def update(self, step: int, **values) -> None:
        self.telemetry.update(step=self.offset + step, total_steps=self.total, **values)

    def begin(self, stage: str) -> None:
        """A stage starts: checkpoint and sample steps count within it, as their folders
        are named (the autoencoder stage's under OUTPUT/autoencoder/)."""
        self.telemetry.update(autoencoder_stage=int(stage == contract.AUTOENCODER_STAGE))
        self.telemetry.checkpoint_saved(0)

    def checkpoint_saved(self, step: int) -> None:
        self.telemetry.checkpoint_saved(step)

    def samples_generated(self, step: int, count: int) -> None:
        self.telemetry.samples_generated(step, count)

    def evaluated(self, scores: dict) -> None:
        """An evaluation's scores, as gauges (the step counts within the stage, the time
        is when it finished)."""
        self.telemetry.update(
            **{gauge: scores.get(score) for score, gauge in contract.SCORE_GAUGES.items()},
            last_evaluation_step=scores["step"],
            last_evaluation_timestamp_seconds=datetime.fromisoformat(scores["time"]).timestamp(),
        )


@dataclass
class Window:
    """The optimiser steps since the last record."""

    losses: list = field(default_factory=list)  # one per micro-batch
    started: float = field(default_factory=time.perf_counter)
    paused: float = 0.0  # seconds of checkpoints, samples and evaluations within the window
    # The latest of each pause.
    last: dict = field(default_factory=lambda: {"save": 0.0, "sample": 0.0, "evaluate": 0.0})

    @contextlib.contextmanager
    def pause(self, kind: str):
        """Time a checkpoint (``save``), samples (``sample``) or an evaluation
        (``evaluate``): not training time."""
        started = time.perf_counter()
        yield
        self.last[kind] = time.perf_counter() - started
        self.paused += self.last[kind]

    def training_seconds(self) -> float:
        return time.perf_counter() - self.started - self.paused

    def restart(self) -> None:
        self.losses, self.started, self.paused = [], time.perf_counter(), 0.0


def pauses_left(step: int, last: int, every: int) -> int:
    """How many of the pauses taken every ``every`` steps, and once after ``last`` if it
    is not one of them, come after ``step``."""
    return last // every - step // every + (last % every != 0 and step < last)
