"""Training metrics for Prometheus on :9400/metrics, one endpoint per node (pod).

The first process of each node (local rank 0) serves its own view: its step, loss,
memory and checkpoints. The label ``rank`` is that process's global rank, so the whole
job's series are those with ``rank="0"``. The names are the contract's (contract.py):
``difftrain_`` prefix, base units, ``_total`` for counters; the other labels are the
job's namespace and name.
``DIFFTRAIN_METRICS_PORT`` moves the port (several local "nodes" on one machine need one
each); a port already taken costs the metrics, never the training.
"""

import logging
import math
import os
import resource
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from difftrain.contract import COUNTERS, GAUGES, METRIC_PREFIX, METRICS_PORT, METRICS_PORT_ENV

log = logging.getLogger(__name__)

# Weight of the newest loss in loss_average (an exponential moving average).
AVERAGE_WEIGHT = 0.1


class Telemetry:
    """The trainer's metrics; :meth:`update` sets gauges, the other methods the rest."""

    def __init__(self, namespace: str, name: str, rank: int = 0, clock=time.monotonic):
        self.registry = CollectorRegistry()
        self.labels = {"namespace": namespace, "job": name, "rank": str(rank)}
        names = list(self.labels)
        self.gauges = {
            key: Gauge(f"{METRIC_PREFIX}{key}", text, names, registry=self.registry)
            for key, text in GAUGES.items()
        }
        self.counters = {
            key: Counter(f"{METRIC_PREFIX}{key}", text, names, registry=self.registry)
            for key, text in COUNTERS.items()
        }
        for counter in self.counters.values():
            counter.labels(**self.labels)  # counters are exposed from 0, not from their first use
        self.clock = clock
        self._saved_at = clock()
        self.gauges["checkpoint_age_seconds"].labels(**self.labels).set_function(
            lambda: self.clock() - self._saved_at
        )
        self._average = math.nan

    def serve(self) -> int | None:
        """Start the HTTP endpoint; its port, or None if the port is taken."""
        port = int(os.environ.get(METRICS_PORT_ENV, METRICS_PORT))
        try:
            start_http_server(port, registry=self.registry)
        except OSError as error:
            log.warning("metrics not served: port %d: %s", port, error.strerror)
            return None
        return port

    def update(self, **values: float | None) -> None:
        """Set gauges by name; ``loss`` also moves ``loss_average``."""
        loss = values.get("loss")
        if loss is not None:
            if math.isnan(self._average) or not math.isfinite(loss):
                self._average = loss
            else:
                self._average += AVERAGE_WEIGHT * (loss - self._average)
            values = {**values, "loss_average": self._average}
        for key, value in values.items():
            if value is not None:
                self.gauges[key].labels(**self.labels).set(value)

    def checkpoint_saved(self, step: int) -> None:
        self._saved_at = self.clock()
        self.update(last_checkpoint_step=step)

    def samples_generated(self, step: int, count: int) -> None:
        self.counters["samples_generated"].labels(**self.labels).inc(count)
        self.update(last_samples_step=step)


def serves_metrics() -> bool:
    """Whether this process serves its node's metrics: the node's first process."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


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
    return now, max(now, peak)  # the kernel updates the high-water mark lazily
