"""Live progress in a running job's status, from its trainer's metrics.

The main process (global rank 0) runs in the pod of completion index 0; the operator
reads that pod's metrics endpoint (the container port named ``metrics``) on every
reconcile of a running job, the periodic resync included. :func:`read` is pure: the
exposition text and the time in, the status fields out. A scrape that fails changes
nothing, so the last progress stays, with the time it was seen.
"""

import json
import math
from datetime import UTC, datetime, timedelta

from difftrain import contract
from difftrain.operator.status import timestamp

SCRAPE_TIMEOUT_SECONDS = 2.0


def main_pod_endpoint(pods: list[dict]) -> str | None:
    """The metrics URL of the running pod of completion index 0, if it has an IP."""
    for pod in pods:
        metadata, status = pod.get("metadata", {}), pod.get("status", {})
        index = (metadata.get("annotations") or {}).get(contract.COMPLETION_INDEX) or (
            metadata.get("labels") or {}
        ).get(contract.COMPLETION_INDEX)
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


def _evaluation(values: dict, step: int) -> dict:
    """``status.evaluation`` from the newest evaluation's gauges."""
    scores = {"step": step}
    for name, key in contract.SCORE_GAUGES.items():
        if math.isfinite(values.get(key, math.nan)):
            scores[name] = round(values[key], 6)
    seconds = int(values.get("last_evaluation_timestamp_seconds", 0))
    when = datetime.fromtimestamp(seconds, UTC)
    scores["time"] = timestamp(when)
    return scores


def read(text: str, now: datetime, output_uri: str) -> dict:
    """Status fields (``progress``, ``lastCheckpoint``, ``evaluation``, ``outputs``) from
    the trainer's exposition ``text``: the main process's series (``rank="0"``)."""
    values = contract.read_metrics(text)
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
        progress["eta"] = contract.human_duration(int(eta))
    found["progress"] = progress
    # Checkpoint steps count within the stage, as the folders are named.
    root = contract.stage_root(output_uri, autoencoder=bool(values.get("autoencoder_stage")))
    saved = int(values.get("last_checkpoint_step", 0))
    if saved > 0:
        age = values.get("checkpoint_age_seconds", 0.0)
        found["lastCheckpoint"] = {
            "step": saved,
            "uri": f"{root}/{contract.checkpoint_prefix(saved)}",
            "time": timestamp(now - timedelta(seconds=age)),
        }
    evaluated = int(values.get("last_evaluation_step", 0))
    if evaluated > 0:
        found["evaluation"] = _evaluation(values, evaluated)
    sampled = int(values.get("last_samples_step", 0))
    if sampled > 0:
        samples = f"{contract.stage_root(output_uri)}/{contract.samples_prefix(sampled)}"
        found["outputs"] = {"samples": [samples]}
    return found


def finished_outputs(output_uri: str, pods: list[dict]) -> dict:
    """``status.outputs`` of a job that succeeded: its model's URI, and the registered
    version that its main process wrote in its termination message."""
    found = {"model": f"{output_uri.rstrip('/')}/{contract.MODEL}"}
    for pod in pods:
        for container in pod.get("status", {}).get("containerStatuses", []) or []:
            state = (container.get("state") or {}).get("terminated") or {}
            if state.get("exitCode") != 0:
                continue
            try:
                said = json.loads(state.get("message") or "")
            except ValueError:
                continue
            outputs = said.get("outputs") if isinstance(said, dict) else None
            if isinstance(outputs, dict) and outputs.get("registryVersion"):
                found["registryVersion"] = str(outputs["registryVersion"])
    return found
