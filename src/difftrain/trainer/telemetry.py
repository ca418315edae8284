"""Training metrics for Prometheus, served by each node's first process on :9400/metrics.

Names follow DESIGN.md: ``difftrain_`` prefix, base units; labels are the job's namespace
and name only. ``DIFFTRAIN_METRICS_PORT`` moves the port (several local "nodes" on one
machine need one each); a port already taken costs the metrics, never the training.
"""

import logging
import os

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
