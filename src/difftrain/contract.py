"""The operator-trainer contract in one place (DESIGN.md): exit codes, ports, labels, the
output layout and the metric names, for the builders, the status, the progress reader,
the local runner and the trainer alike. Importable without torch.
"""

from difftrain.errors import DatasetError, InvalidSpec, Stopped, StorageAccessDenied

# Exit codes. A permanent failure is never retried; its code says why.
PERMANENT_EXIT_CODES = {
    error.exit_code: error.reason for error in (InvalidSpec, DatasetError, StorageAccessDenied)
}
# A trainer (and the launcher) stopped by SIGTERM after checkpointing.
STOPPED_EXIT_CODE = Stopped.exit_code

# Ports of a trainer pod.
RENDEZVOUS_PORT = 29500
METRICS_PORT = 9400
METRICS_PORT_ENV = "DIFFTRAIN_METRICS_PORT"  # moves it (several local nodes on one machine)
# "1": show progress bars though stderr is no terminal (difftrain run relays it to one).
PROGRESS_ENV = "DIFFTRAIN_PROGRESS"

# The trainer pod's container (kubectl logs -c, Katib's primaryContainerName).
TRAINER_CONTAINER = "trainer"

# Label and annotation keys.
JOB_NAME_LABEL = "difftrain.io/job-name"
ATTEMPT_LABEL = "difftrain.io/attempt"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"

# The output layout: OUTPUT/{checkpoints/step-N, samples/step-N, model, metrics.jsonl};
# method full's autoencoder stage has the same layout under OUTPUT/autoencoder/.
CHECKPOINTS = "checkpoints"
SAMPLES = "samples"
MODEL = "model"
METRICS_FILE = "metrics.jsonl"
AUTOENCODER_STAGE = "autoencoder"


def step_folder(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_prefix(step: int) -> str:
    """Where the checkpoint of ``step`` lies under its stage's root."""
    return f"{CHECKPOINTS}/{step_folder(step)}"


def samples_prefix(step: int) -> str:
    """Where the validation samples of ``step`` lie under the output."""
    return f"{SAMPLES}/{step_folder(step)}"


def sample_steps(keys: list[str], holding: str | None = None) -> list[int]:
    """The steps with a samples folder among the output's ``keys`` (those holding the
    file ``holding``, when given), oldest first."""
    steps = set()
    for key in keys:
        parts = key.split("/")
        in_a_step = len(parts) == 3 and parts[0] == SAMPLES and parts[1].startswith("step-")
        if in_a_step and (holding is None or parts[2] == holding):
            steps.add(int(parts[1].removeprefix("step-")))
    return sorted(steps)


def stage_root(output_uri: str, autoencoder: bool = False) -> str:
    """The root URI of a stage's checkpoints: the output, or its autoencoder folder."""
    root = output_uri.rstrip("/")
    return f"{root}/{AUTOENCODER_STAGE}" if autoencoder else root


# Metrics: difftrain_ + name, base units, _total for counters; labels namespace, job and
# rank (the process's global rank: the job's series are those with rank="0").
METRIC_PREFIX = "difftrain_"
GAUGES = {
    "step": "Optimiser steps done",
    "total_steps": "Optimiser steps in the whole run",
    "epoch": "Current epoch",
    "loss": "Training loss averaged over the last logged steps",
    "loss_average": "Exponential moving average of the training loss",
    "learning_rate": "Learning rate of the first parameter group",
    "images_per_second": "Training throughput, images per second over all processes",
    "seconds_per_step": "Wall time of one optimiser step",
    "eta_seconds": "Estimated seconds until the last step",
    "device_memory_bytes": "GPU memory allocated by PyTorch, or resident memory on a CPU",
    "device_memory_peak_bytes": "Most device memory allocated since start (RSS peak on a CPU)",
    "autoencoder_stage": "1 while the autoencoder stage of method full trains, else 0",
    "last_checkpoint_step": "Step of the stage's newest complete checkpoint (0 before one)",
    "checkpoint_age_seconds": "Seconds since the newest checkpoint, or since start before one",
    "dataset_images_skipped": "Dataset images skipped because they cannot be read",
    "last_samples_step": "Step of the newest validation samples (0 before the first)",
    "cache_entries": "Latents and text embeddings the run serves from the cache",
    "cache_entries_to_compute": "Cache entries this process found missing and computes",
    "cache_entries_computed": "Cache entries this process has computed and stored so far",
    "eval_fid": "FID of the newest evaluation's generated images against the reference",
    "eval_clip_score": "CLIP score of the newest evaluation's images against their prompts",
    "validation_loss": "Loss on the held-out images at the newest evaluation",
    "last_evaluation_step": "Step of the newest evaluation (0 before the first)",
    "last_evaluation_timestamp_seconds": "Unix time of the newest evaluation",
}
COUNTERS = {
    "samples_generated": "Validation sample images generated",
}
# An evaluation's scores (as metrics.jsonl and status.evaluation name them) -> their gauges.
SCORE_GAUGES = {
    "fid": "eval_fid",
    "clipScore": "eval_clip_score",
    "validationLoss": "validation_loss",
}


def read_metrics(text: str, rank: str = "0") -> dict[str, float]:
    """The trainer's series of process ``rank`` in a Prometheus exposition ``text``, by
    name without the prefix (counters with their ``_total``)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        sample.name.removeprefix(METRIC_PREFIX): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith(METRIC_PREFIX) and sample.labels.get("rank", "0") == rank
    }


def human_duration(seconds: int) -> str:
    """ "1h23m", "4m05s", "12s": a time left as people read it."""
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{seconds:02d}s"
    return f"{seconds}s"


# The environment variables MLflow's client reads its credentials from; the pods get them
# from spec.output.registry.mlflow.secretRef, keys of the same names.
MLFLOW_CREDENTIALS = (
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)
