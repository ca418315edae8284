"""The DiffusionTrainingJob status, written by the operator only."""

from datetime import datetime
from typing import Literal

from pydantic import Field

from difftrain.api.base import StatusModel
from difftrain.api.profile import PROFILE_NAME_PATTERN, DiffusionTrainingProfileSpec

Phase = Literal["Pending", "Running", "Restarting", "Succeeded", "Failed", "Suspended"]


class Condition(StatusModel):
    """One aspect of the job's state, in the shape of metav1.Condition."""

    type: str = Field(max_length=316, description="Condition type, e.g. Running or Failed.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(
        max_length=1024,
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        description="CamelCase reason for the last transition, e.g. DatasetError.",
    )
    message: str = Field("", max_length=32768, description="Human-readable details.")
    last_transition_time: datetime = Field(description="When status last changed.")
    observed_generation: int | None = Field(
        None, ge=0, description="The metadata.generation this condition was computed from."
    )


class Progress(StatusModel):
    """Training progress, read from the trainer's metrics."""

    step: int | None = Field(None, ge=0, description="Optimiser steps done.")
    total_steps: int | None = Field(None, ge=0, description="Optimiser steps in the whole run.")
    epoch: int | None = Field(None, ge=0, description="Current epoch.")
    percent: float | None = Field(None, ge=0, le=100, description="step / totalSteps, in %.")
    loss: float | None = Field(None, description="Recent training loss.")
    images_per_second: float | None = Field(None, ge=0, description="Training throughput.")
    eta_seconds: int | None = Field(None, ge=0, description="Estimated seconds to finish.")
    eta: str | None = Field(None, description='The ETA for people, e.g. "1h23m".')
    last_seen_time: datetime | None = Field(
        None, description="When the operator last read the trainer's metrics."
    )


class CheckpointRef(StatusModel):
    """The newest complete checkpoint."""

    step: int = Field(ge=0, description="Step the checkpoint was taken at.")
    uri: str = Field(description="Where it is.")
    time: datetime = Field(description="When it completed.")


class Evaluation(StatusModel):
    """The newest evaluation's scores (spec.evaluation), read from the trainer's metrics."""

    step: int = Field(ge=0, description="Step of the stage the model was evaluated at.")
    fid: float | None = Field(
        None, description="FID against the reference images (lower is better)."
    )
    clip_score: float | None = Field(
        None, description="CLIP score of the generated images (higher is better)."
    )
    validation_loss: float | None = Field(
        None, description="Loss on the held-out images (lower is better)."
    )
    time: datetime = Field(description="When the evaluation finished.")


class Outputs(StatusModel):
    """Where the results are."""

    model: str | None = Field(None, description="URI of the exported model.")
    samples: list[str] = Field([], description="URIs of the latest validation samples.")
    registry_version: str | None = Field(
        None, description="Version of the model in spec.output.registry, once registered."
    )


class ProfileRef(StatusModel):
    """The DiffusionTrainingProfile a job was merged with, as it was then."""

    name: str = Field(max_length=253, pattern=PROFILE_NAME_PATTERN, description="Its name.")
    generation: int | None = Field(
        None, ge=1, description="Its metadata.generation when the job took it."
    )
    spec: DiffusionTrainingProfileSpec = Field(
        description="Its spec then: the job keeps it, so that later changes to the profile "
        "never change (or restart) the job."
    )


class DiffusionTrainingJobStatus(StatusModel):
    """Observed state of the job."""

    phase: Phase | None = Field(None, description="Summary of the job's state.")
    reason: str | None = Field(
        None,
        max_length=128,
        description="Why the job is in its phase, in one word: the reason of its telling "
        "condition (e.g. Training, CreateContainerConfigError, WaitingForAdmission).",
    )
    conditions: list[Condition] = Field(
        [],
        description="Created, Unschedulable, Running, Restarting, Suspended, Succeeded, "
        "Failed; and kstatus's Ready (succeeded), Reconciling (on its way) and Stalled "
        "(failed), for Flux and kubectl wait.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )
    observed_generation: int = Field(
        0,
        ge=0,
        description="The metadata.generation the status describes; 0 until the operator "
        "first sees the job.",
    )
    attempt: int | None = Field(None, ge=1, description="Current gang attempt, from 1.")
    restarts: int = Field(
        0,
        ge=0,
        description="Gang restarts after failures so far (they count against "
        "spec.runPolicy.maxRestarts).",
    )
    preemptions: int = Field(
        0,
        ge=0,
        description="Gang restarts after a preemption (a pod disrupted, the others "
        "stopped cleanly); they do not count against maxRestarts.",
    )
    start_time: datetime | None = Field(None, description="When the first attempt started.")
    completion_time: datetime | None = Field(None, description="When the job finished.")
    progress: Progress | None = Field(None, description="Training progress.")
    last_checkpoint: CheckpointRef | None = Field(None, description="Newest complete checkpoint.")
    evaluation: Evaluation | None = Field(None, description="The newest evaluation's scores.")
    outputs: Outputs | None = Field(None, description="Where the results are.")
    profile: ProfileRef | None = Field(
        None, description="The profile (spec.profile) the job's spec was merged with."
    )
