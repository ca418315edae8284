"""Training metrics for Prometheus, served by each node's first process on :9400/metrics.

Names follow DESIGN.md: ``difftrain_`` prefix, base units; labels are the job's namespace
and name only. ``DIFFTRAIN_METRICS_PORT`` moves the port (several local "nodes" on one
machine need one each); a port already taken costs the metrics, never the training.
"""

import logging
import os
import resource

from prometheus_client import CollectorRegistry, Gauge, start_http_server

log = logging.getLogger(__name__)

DEFAULT_PORT = 9400

_GAUGES = {
    "step": "Optimiser steps done",
    "total_steps": "Optimiser steps in the whole run",
    "epoch": "Current epoch",
    "loss": "Training loss averaged over the last logged steps",
    "learning_rate": "Learning rate of the first parameter group",
    "images_per_second": "Training throughput, images per second over all processes",
    "seconds_per_step": "Wall time of one optimiser step",
    "eta_seconds": "Estimated seconds until the last step",
}


class Telemetry:
    """The trainer's gauges; :meth:`update` sets them after each logged step."""

    def __init__(self, namespace: str, name: str):
        self.registry = CollectorRegistry()
        self.labels = {"namespace": namespace, "job": name}
        self.gauges = {
            key: Gauge(f"difftrain_{key}", text, list(self.labels), registry=self.registry)
            for key, text in _GAUGES.items()
        }

    def serve(self) -> int | None:
        """Start the HTTP endpoint; its port, or None if the port is taken."""
        port = int(os.environ.get("DIFFTRAIN_METRICS_PORT", DEFAULT_PORT))
        try:
            start_http_server(port, registry=self.registry)
        except OSError as error:
            log.warning("metrics not served: port %d: %s", port, error.strerror)
            return None
        return port

    def update(self, **values: float | None) -> None:
        for key, value in values.items():
            if value is not None:
                self.gauges[key].labels(**self.labels).set(value)


def memory_bytes() -> tuple[int, int]:
    """(now, peak) memory of this process: CUDA memory allocated by PyTorch when a GPU is
    in use, else resident memory (the peak since the process started)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    try:
        with open("/proc/self/statm") as handle:
            now = int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux
        now = peak
    return now, peak
