"""The training loop: set up, then train each stage from its latest checkpoint, then
export.

It reads top to bottom. :func:`run` sets up (setup.py) and trains the stages of the
job's method in order (the diffusion model; for method full, first the autoencoder).
:class:`Training` trains one stage: resume if a checkpoint exists, then optimiser steps,
each an inner loop over ``gradientAccumulationSteps`` micro-batches; after each step the
policies (policies.py) say whether to record metrics, take samples and checkpoint; a
SIGTERM checkpoints and stops. Only the main process writes shared outputs.
"""

import contextlib
import datetime
import functools
import logging
import os
import signal
import time

import torch

from difftrain import contract
from difftrain.api.config import TrainerConfig
from difftrain.errors import Stopped
from difftrain.trainer import (
    autoencoder,
    checkpoint,
    data,
    evaluation,
    export,
    features,
    methods,
    ownership,
    plots,
    policies,
    sampling,
)
from difftrain.trainer.records import MetricsLog, Progress, Window, pauses_left
from difftrain.trainer.setup import Paths, Run, gather_from_all, prepare
from difftrain.trainer.stages import BUILDERS, Stage, finished_earlier, stage_steps
from difftrain.trainer.telemetry import Telemetry, memory_bytes, serves_metrics

log = logging.getLogger(__name__)

# Threads making batches ahead of the training step (see data.prefetched).
DATA_WORKERS = min(4, os.cpu_count() or 1)


class StopFlag:
    """Set by SIGTERM or SIGINT; every stage checks it after each step."""

    requested = False

    def listen(self) -> None:
        def request_stop(number, _):
            grace = os.environ.get("DIFFTRAIN_GRACE_SECONDS", "?")
            log.warning(
                "%s: finishing this step, then writing a checkpoint (%s s of grace)",
                signal.Signals(number).name,
                grace,
            )
            self.requested = True

        # SIGINT too: torchrun's agent forwards a Ctrl-C it gets as SIGINT.
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, request_stop)


def run(config: TrainerConfig, paths: Paths | None = None) -> dict:
    """Train the job described by ``config``; raises DifftrainError subclasses on failure.
    Returns the outputs the job's status shows (on the main process, when registered)."""
    paths = paths or Paths.from_env()
    start_time = datetime.datetime.now(datetime.UTC).isoformat()
    shared = prepare(config, paths)
    try:
        _train_stages(shared, start_time)
        registered = shared.facts.get("registry")
        return {"registryVersion": registered["mlflow"]["version"]} if registered else {}
    except BaseException as error:
        if shared.accelerator.num_processes > 1 and not isinstance(error, Stopped):
            shared.waiting.abandon(f"{type(error).__name__}: {error}"[:200])
        raise
    finally:
        if shared.lease is not None:
            shared.lease.release()


def _train_stages(shared: Run, start_time: str) -> None:
    """Each stage of the method in turn, its steps counted after the earlier stages'."""
    stop = StopFlag()
    stop.listen()
    telemetry = Telemetry(
        shared.config.namespace, shared.config.name, shared.accelerator.process_index
    )
    if serves_metrics():
        telemetry.serve()
    telemetry.update(dataset_images_skipped=shared.facts["skipped"])
    names = shared.method.stages(shared.spec)
    lengths = [stage_steps(shared, name) for name in names]
    offset = 0
    for name, steps in zip(names, lengths, strict=True):
        if not finished_earlier(shared, name):
            stage = BUILDERS[name](shared)
            with features.serving(shared, stage, steps, telemetry.update):
                done = Training(stage, Progress(telemetry, offset, sum(lengths)), stop).run()
            stage.gather_final()  # a sharded model, whole on the main process
            what = "the autoencoder" if name == methods.AUTOENCODER else "the model"
            shared.waiting.alone(
                shared.main,
                f"exporting {what}",
                functools.partial(_export, stage, done, start_time),
            )
            shared.run_id = stage.identity.id
            shared.accelerator.free_memory()  # drop the stage's wrapped model and optimiser
            del stage
        if name == methods.AUTOENCODER:  # the diffusion stage learns in its latent space
            shared.components.vae = autoencoder.load(shared.output, shared.paths.scratch)
        offset += steps
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _export(stage: Stage, steps: int, start_time: str) -> None:
    if stage.name == methods.AUTOENCODER:
        autoencoder.export_stage(stage)
        return
    stage.run.facts.update(
        steps=steps,
        final_loss=stage.losses[-1] if stage.losses else None,
        start_time=start_time,
        end_time=datetime.datetime.now(datetime.UTC).isoformat(),
        image=os.environ.get("DIFFTRAIN_IMAGE"),
        evaluations=stage.evaluations,
    )
    export.export_model(stage, stage.run.facts)


class Training:
    """One stage trained to its last step from its latest checkpoint."""

    def __init__(self, stage: Stage, progress: Progress, stop: StopFlag):
        spec = stage.config.spec
        self.stage, self.progress, self.stop = stage, progress, stop
        self.label = "" if stage.name == methods.DIFFUSION else f"{stage.name} "
        self.logs = policies.logging(stage.total_steps)
        self.samples = policies.Every(
            spec.validation.every_steps, stage.total_steps, enabled=stage.samples
        )
        self.saves = policies.Every(spec.checkpoints.every_steps, stage.total_steps)
        self.evaluations = evaluation.schedule(stage, stage.name == methods.DIFFUSION)
        self.evaluator: evaluation.Evaluator | None = None
        self.window = Window()
        self.position = checkpoint.Position()
        self.metrics: MetricsLog | None = None

    def run(self) -> int:
        """Train to the last step; the steps done. Raises :class:`Stopped` after
        checkpointing when a stop was requested."""
        self.begin()
        stage, position = self.stage, self.position
        accumulation = stage.config.spec.training.gradient_accumulation_steps
        for module in stage.wrapped.values():
            module.train()
        compiling = stage.config.spec.training.compile
        every = data.batches_from(stage.dataset, stage.batches, position, DATA_WORKERS)
        with contextlib.closing(every) as batches:
            while position.step < stage.total_steps:
                started = time.monotonic()
                for micro in range(accumulation):
                    with stage.synchronising(sync=micro == accumulation - 1):
                        loss = stage.forward_backward(next(batches), accumulation)
                    self.window.losses.append(loss)
                stage.optimizer_step()
                position.step += 1
                if compiling:  # the first step compiles: its time, reported apart
                    compiling = False
                    log.info("compiling: the first step took %.1f s", time.monotonic() - started)
                self.after_step()
        if self.saves.missed(position.step):
            self.save()  # a crash while exporting resumes here instead of training again
        if self.samples.missed(position.step):
            self.sample()  # the final model's samples
        if self.evaluations.missed(position.step):
            self.evaluate()
        stage.waiting.alone(stage.run.main, "uploading the loss curve", self.upload_curve)
        return position.step

    def begin(self) -> None:
        stage = self.stage
        self.progress.begin(stage.name)
        self.position = checkpoint.resume(stage)
        step = self.position.step
        if step:
            log.info("%sresumed from checkpoint step %d", self.label, step)
            self.progress.checkpoint_saved(step)
        for policy in (self.logs, self.samples, self.saves, self.evaluations):
            policy.done(step)
        katib = stage.run.metrics_file if stage.name == methods.DIFFUSION else None
        self.metrics = MetricsLog(stage.scratch / contract.METRICS_FILE, stage.output, step, katib)
        if self.evaluations.enabled:
            self.evaluator = evaluation.Evaluator(stage, stage.run.evaluation)
            stage.evaluations = self.metrics.evaluations()  # those before a resume
            if stage.evaluations:  # the gauges show the newest again
                self.progress.evaluated(stage.evaluations[-1])
            if step and self.evaluations.due(step) and step not in evaluation.steps(stage):
                self.evaluate()  # the one a stop cut short, before the checkpoint
        self.progress.update(step)
        self.window.restart()  # throughput counts from here, not from before the resume

    def after_step(self) -> None:
        """Record, sample and checkpoint as the policies say; stop when asked."""
        step = self.position.step
        if self.logs.due(step):
            self.record()
            self.logs.done(step)
            self.window.restart()
        if self.samples.due(step):
            self.sample()
            self.samples.done(step)
        if self.evaluations.due(step):
            self.evaluate()
            self.evaluations.done(step)
        halt = self.agree_to_stop()
        if halt or self.saves.due(step):
            self.save()
            self.saves.done(step)
        if halt:
            raise Stopped(f"stopped at step {step} on a signal; checkpoint written")

    def agree_to_stop(self) -> bool:
        """Whether any process was asked to stop (all processes must checkpoint
        together); raises OutputInUse when another job took the output over (all stop
        writing)."""
        stage = self.stage
        lost = stage.lease is not None and stage.lease.lost
        flags = torch.tensor(
            [float(self.stop.requested), float(lost)], device=stage.accelerator.device
        )
        halt, taken = stage.accelerator.reduce(flags, reduction="sum").tolist()
        if taken > 0:
            raise ownership.OutputInUse(
                f"{stage.output.uri}: another job took over this output at step "
                f"{self.position.step}; this job stops without writing more to it"
            )
        return halt > 0

    def record(self) -> None:
        """Record the steps since the last record: gauges, and on the main process
        metrics.jsonl and the log line."""
        stage, window, step = self.stage, self.window, self.position.step
        spec = stage.config.spec
        elapsed = window.training_seconds()
        images = len(window.losses) * spec.training.batch_size * stage.accelerator.num_processes
        entry = {
            "step": step,
            "epoch": self.position.epoch,
            "loss": sum(window.losses) / len(window.losses),
            "lr": stage.scheduler.get_last_lr()[0],
            "imagesPerSecond": images / elapsed if elapsed else None,
        }
        entry["memoryBytes"], entry["peakMemoryBytes"] = memory_bytes()
        stage.losses.append(entry["loss"])
        per_step = elapsed / (step - self.logs.done_at)
        self.progress.update(
            step,
            epoch=self.position.epoch,
            loss=entry["loss"],
            learning_rate=entry["lr"],
            images_per_second=entry["imagesPerSecond"],
            seconds_per_step=per_step,
            eta_seconds=self.time_left(per_step),
            device_memory_bytes=entry["memoryBytes"],
            device_memory_peak_bytes=entry["peakMemoryBytes"],
        )
        if stage.run.main:  # every process keeps its node's gauges; one writes the record
            self.metrics.append(entry)
            log.info("%sstep %d/%d loss %.4f", self.label, step, stage.total_steps, entry["loss"])

    def time_left(self, per_step: float) -> float:
        """Seconds to the last step: the steps, and the checkpoints, samples and
        evaluations between."""
        step, total, progress = self.position.step, self.stage.total_steps, self.progress
        left = per_step * (progress.total - progress.offset - step)
        pauses = {"save": self.saves, "sample": self.samples, "evaluate": self.evaluations}
        for kind, policy in pauses.items():
            if policy.enabled:
                left += self.window.last[kind] * pauses_left(step, total, policy.every)
        return left

    def save(self) -> None:
        stage, step = self.stage, self.position.step
        with self.window.pause("save"):
            checkpoint.save(stage, self.position, lambda v: gather_from_all(stage.accelerator, v))
            self.progress.checkpoint_saved(step)

            def record_and_prune():
                self.upload_curve()
                stage.ledger.prune(stage.config.spec.checkpoints.keep_last)

            stage.waiting.alone(stage.run.main, "pruning checkpoints", record_and_prune)

    def sample(self) -> None:
        stage, step = self.stage, self.position.step
        validation = stage.config.spec.validation

        def take_samples(write: bool = True, stopping=lambda: self.stop.requested):
            written = sampling.validate(stage, step, stopping, write)
            if write:
                log.info("samples written to %s", written)
                count = len(validation.prompts) * validation.images_per_prompt
                self.progress.samples_generated(step, count)

        with self.window.pause("sample"):
            if stage.sharded:  # every process runs the sharded model
                take_samples(stage.run.main, stopping=None)  # all make every image
                stage.after_sampling()
                stage.waiting.barrier("samples written")
            else:
                stage.waiting.alone(stage.run.main, "taking samples", take_samples)

    def evaluate(self) -> None:
        """Every process evaluates its share; the main one records the scores."""
        with self.window.pause("evaluate"):
            scores = self.evaluator.evaluate(self.position.step, lambda: self.stop.requested)
        if scores is not None:
            self.stage.evaluations.append(scores)
            self.progress.evaluated(scores)
            if self.stage.run.main:
                self.metrics.append({"step": scores["step"], "evaluation": scores})
                log.info("%s", evaluation.summary(scores))

    def upload_curve(self) -> None:
        """Upload ``metrics.jsonl`` and its picture, ``loss.png``."""
        stage = self.stage
        self.metrics.upload()
        title = f"{stage.config.name}: {stage.name} loss"
        image = plots.write_loss_curve(self.metrics.path, stage.scratch / "loss.png", title)
        stage.output.upload(image, "loss.png")
