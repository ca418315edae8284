"""How the job runs on the cluster: pods, placement and the run policy."""

import re
from typing import Annotated, Any, Literal

from pydantic import Field, PlainValidator, WithJsonSchema, model_validator

from difftrain.api.base import ApiModel, ShortStr, immutable_rule, raise_problems, with_rules

MAX_NODES = 512
MAX_GPUS_PER_NODE = 16
MAX_RESTARTS = 99
# Attempts (restarts and preemptions together) are numbered in pod hostnames; a job that
# reaches this many fails (TooManyAttempts).
MAX_ATTEMPTS = 999
GPU_RESOURCE = "nvidia.com/gpu"

# Kubernetes' resource.Quantity syntax: a number with an optional binary, decimal or
# exponent suffix ("4", "500m", "16Gi", "1e3").
_QUANTITY = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"  # noqa: E501


def _check_quantity(value: Any) -> int | str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"must be a quantity such as 4, 500m or 16Gi (got {value!r})")
    if isinstance(value, str) and not re.fullmatch(_QUANTITY, value):
        raise ValueError(f"'{value}' is not a quantity; write e.g. 4, 500m or 16Gi")
    return value


Quantity = Annotated[
    int | str,
    PlainValidator(_check_quantity),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": _QUANTITY,
            "x-kubernetes-int-or-string": True,
        }
    ),
]
LabelMap = dict[str, Annotated[str, Field(max_length=63)]]


class Toleration(ApiModel):
    """A core/v1 Toleration for the trainer pods."""

    key: ShortStr | None = Field(None, description="Taint key; empty with Exists matches all.")
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists or Equal.")
    value: ShortStr | None = Field(None, description="Taint value (operator Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate; all effects when absent."
    )
    toleration_seconds: int | None = Field(
        None, ge=0, description="NoExecute: how long the pod stays after the taint appears."
    )


# Where the trainer container already mounts something of its own.
RESERVED_MOUNTS = ("/etc/difftrain", "/dev/shm", "/scratch", "/cache", "/tmp")
_RESERVED_CEL = "[" + ", ".join(f"'{m}'" for m in RESERVED_MOUNTS) + "]"


class Volume(ApiModel):
    """A PersistentVolumeClaim mounted in every trainer pod: file:// models, datasets and
    outputs under its mountPath are then legal in a cluster."""

    model_config = with_rules(
        {
            "rule": f"!{_RESERVED_CEL}.exists(m, self.mountPath == m || "
            "self.mountPath.startsWith(m + '/'))",
            "message": "must not be, or be inside, one of the trainer's own mounts "
            f"({', '.join(RESERVED_MOUNTS)})",
            "fieldPath": ".mountPath",
        }
    )

    name: str = Field(
        max_length=57,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="Volume name (a DNS label; the pod's volume is claim-<name>).",
    )
    claim_name: ShortStr = Field(description="The PersistentVolumeClaim, in the job's namespace.")
    mount_path: str = Field(
        max_length=1024,
        pattern=r"^/[^:]*[^/:]$",
        description="Absolute path in the trainer container, e.g. /mnt/data.",
    )
    read_only: bool = Field(False, description="Mount it read-only (models and datasets only).")

    @model_validator(mode="after")
    def _not_reserved(self):
        for mount in RESERVED_MOUNTS:
            if self.mount_path == mount or self.mount_path.startswith(mount + "/"):
                raise_problems(
                    [
                        (
                            ("mountPath",),
                            f"must not be, or be inside, one of the trainer's own "
                            f"mounts ({', '.join(RESERVED_MOUNTS)}); got "
                            f"{self.mount_path}",
                        )
                    ]
                )
        return self


class ResourcesSpec(ApiModel):
    """Pods, devices and placement. Each node is one pod running torchrun."""

    model_config = with_rules(
        {
            "rule": "!has(self.limits) || !('nvidia.com/gpu' in self.limits)",
            "message": "set GPUs with spec.resources.gpusPerNode, not limits",
            "fieldPath": ".limits",
        },
        {
            "rule": "!has(self.requests) || !('nvidia.com/gpu' in self.requests)",
            "message": "set GPUs with spec.resources.gpusPerNode, not requests",
            "fieldPath": ".requests",
        },
        {
            "rule": "!has(self.volumes) || self.volumes.all(v, "
            "self.volumes.exists_one(w, w.mountPath == v.mountPath))",
            "message": "each mountPath may be used once",
            "fieldPath": ".volumes",
        },
    )

    nodes: int = Field(1, ge=1, le=MAX_NODES, description="Pods (torchrun nodes) in the gang.")
    gpus_per_node: int = Field(
        1,
        ge=0,
        le=MAX_GPUS_PER_NODE,
        description="GPUs per pod, one training process each; 0 trains on CPU in one process.",
    )
    image: str | None = Field(
        None, max_length=1024, description="Trainer image; the operator's default when absent."
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        None, description="Image pull policy; the operator's default when absent."
    )
    requests: dict[str, Quantity] = Field(
        {}, max_length=32, description="Container resource requests (cpu, memory, ...)."
    )
    limits: dict[str, Quantity] = Field(
        {}, max_length=32, description="Container resource limits (cpu, memory, ...)."
    )
    shared_memory: Quantity | None = Field(
        None,
        description="Size limit of the memory-backed /dev/shm; half the memory limit or "
        "8Gi when absent.",
    )
    scratch_size: Quantity | None = Field(
        None,
        description="Size limit of each pod's scratch disk (checkpoint and export staging); "
        "when absent, estimated from the model and method (see docs/trainer.md).",
    )
    node_selector: LabelMap = Field(
        {}, max_length=64, description="Node labels the pods must match."
    )
    tolerations: list[Toleration] = Field([], max_length=64, description="Tolerations of the pods.")
    priority_class_name: ShortStr | None = Field(None, description="PriorityClass of the pods.")
    service_account_name: ShortStr | None = Field(
        None, description="ServiceAccount of the pods (e.g. for IRSA)."
    )
    volumes: list[Volume] = Field(
        [],
        max_length=16,
        description="PersistentVolumeClaims mounted in every trainer pod.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )

    @model_validator(mode="after")
    def _gpus_via_gpus_per_node(self):
        problems = [
            ((field,), f"set GPUs with spec.resources.gpusPerNode, not {field}")
            for field, values in (("requests", self.requests), ("limits", self.limits))
            if GPU_RESOURCE in values
        ]
        for key, field in (("name", "name"), ("mount_path", "mountPath")):
            values = [getattr(volume, key) for volume in self.volumes]
            twice = sorted({value for value in values if values.count(value) > 1})
            if twice:
                problems.append(
                    (
                        ("volumes",),
                        f"each {field} may be used once; used more than once: {', '.join(twice)}",
                    )
                )
        raise_problems(problems)
        return self


class RunPolicySpec(ApiModel):
    """Restarts, deadlines, clean-up and queueing. suspend and ttlSecondsAfterFinished may
    change after creation; the rest is fixed."""

    model_config = with_rules(
        *(
            immutable_rule(field, f"spec.runPolicy.{field} is immutable")
            for field in (
                "maxRestarts",
                "activeDeadlineSeconds",
                "queueName",
                "terminationGracePeriodSeconds",
                "collectiveTimeoutSeconds",
            )
        )
    )

    max_restarts: int = Field(
        3,
        ge=0,
        le=MAX_RESTARTS,
        description="Gang restarts after retryable failures before the job fails.",
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="Fail an attempt that runs longer than this."
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete the finished job (and its children) after this long."
    )
    suspend: bool = Field(False, description="Stop the pods (checkpointing first); resume later.")
    clean_pod_policy: Literal["Running", "All", "None"] = Field(
        "Running",
        description="Pods removed when the job ends: Running (pods still running or "
        "starting; finished pods stay for their logs), All (every pod, with the attempt's "
        "Job), None (nothing; the pods hold their resources until deleted).",
    )
    termination_grace_period_seconds: int = Field(
        300,
        ge=30,
        le=86_400,
        description="Seconds a stopping pod (preemption, drain, suspend) has to finish its "
        "step and write a checkpoint before it is killed.",
    )
    collective_timeout_seconds: int = Field(
        1800,
        ge=1,
        le=86_400,
        description="How long a process waits in a collective (all-reduce, gather) for the "
        "others before the run fails; work done by the main process alone (checkpoint "
        "uploads, samples, export) is waited for without this limit.",
    )
    queue_name: str | None = Field(
        None,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Kueue LocalQueue to submit to; the job then waits for admission.",
    )
