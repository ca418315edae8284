"""Live progress in a running job's status, from its trainer's metrics.

The main process (global rank 0) runs in the pod of completion index 0; the operator
reads that pod's metrics endpoint (the container port named ``metrics``) on every
reconcile of a running job, the periodic resync included. :func:`read` is pure: the
exposition text and the time in, the status fields out. A scrape that fails changes
nothing, so the last progress stays, with the time it was seen.
"""

import math
from datetime import datetime, timedelta

from difftrain.operator.status import timestamp

INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
SCRAPE_TIMEOUT_SECONDS = 2.0


def main_pod_endpoint(pods: list[dict]) -> str | None:
    """The metrics URL of the running pod of completion index 0, if it has an IP."""
    for pod in pods:
        metadata, status = pod.get("metadata", {}), pod.get("status", {})
        index = (metadata.get("annotations") or {}).get(INDEX_ANNOTATION) or (
            metadata.get("labels") or {}
        ).get(INDEX_ANNOTATION)
        if index != "0" or status.get("phase") != "Running" or not status.get("podIP"):
            continue
        ports = [
            port["containerPort"]
            for container in pod.get("spec", {}).get("containers", [])
            for port in container.get("ports", [])
            if port.get("name") == "metrics"
        ]
        if ports:
            return f"http://{status['podIP']}:{ports[0]}/metrics"
    return None


def read(text: str, now: datetime, output_uri: str) -> dict:
    """Status fields (``progress``, ``lastCheckpoint``, ``outputs``) from the trainer's
    exposition ``text``: the main process's series (``rank="0"``)."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {
        sample.name.removeprefix("difftrain_"): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("difftrain_") and sample.labels.get("rank", "0") == "0"
    }
    found = {}
    step, total = values.get("step"), values.get("total_steps")
    if step is None or not total:
        return found
    progress = {
        "step": int(step),
        "totalSteps": int(total),
        "percent": round(100 * min(step, total) / total, 1),
        "lastSeenTime": timestamp(now),
    }
    if "epoch" in values:
        progress["epoch"] = int(values["epoch"])
    for key, name in (("loss", "loss"), ("images_per_second", "imagesPerSecond")):
        if math.isfinite(values.get(key, math.nan)):
            progress[name] = round(values[key], 6)
    eta = values.get("eta_seconds")
    if eta is not None and math.isfinite(eta) and eta >= 0:
        progress["etaSeconds"] = int(eta)
        progress["eta"] = human_duration(int(eta))
    found["progress"] = progress
    # Checkpoint steps count within the stage, as the folders are named.
    root = output_uri.rstrip("/") + ("/autoencoder" if values.get("autoencoder_stage") else "")
    saved = int(values.get("last_checkpoint_step", 0))
    if saved > 0:
        age = values.get("checkpoint_age_seconds", 0.0)
        found["lastCheckpoint"] = {
            "step": saved,
            "uri": f"{root}/checkpoints/step-{saved:08d}",
            "time": timestamp(now - timedelta(seconds=age)),
        }
    sampled = int(values.get("last_samples_step", 0))
    if sampled > 0:
        found["outputs"] = {"samples": [f"{output_uri.rstrip('/')}/samples/step-{sampled:08d}"]}
    return found


def human_duration(seconds: int) -> str:
    """ "1h23m", "4m05s", "12s": the ETA as people read it."""
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{seconds:02d}s"
    return f"{seconds}s"
