"""The operator's own Prometheus metrics (served on :8080/metrics)."""

from collections import Counter as Tally

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PHASES = ("Pending", "Running", "Restarting", "Succeeded", "Failed", "Suspended")


class OperatorMetrics:
    """Jobs by phase, reconcile durations, restarts and failures by reason."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.jobs = Gauge(
            "difftrain_operator_jobs", "DiffusionTrainingJobs by phase", ["phase"],
            registry=self.registry,
        )  # fmt: skip
        self.reconcile_seconds = Histogram(
            "difftrain_operator_reconcile_duration_seconds", "Time to reconcile one job",
            registry=self.registry,
        )  # fmt: skip
        self.restarts = Counter(
            "difftrain_operator_restarts", "Gang restarts", registry=self.registry
        )
        self.failures = Counter(
            "difftrain_operator_failures", "Jobs that failed, by reason", ["reason"],
            registry=self.registry,
        )  # fmt: skip
        self._phases: dict[tuple[str, str], str] = {}

    def set_phase(self, namespace: str, name: str, phase: str | None) -> None:
        if phase:
            self._phases[namespace, name] = phase
        self._refresh()

    def forget(self, namespace: str, name: str) -> None:
        self._phases.pop((namespace, name), None)
        self._refresh()

    def _refresh(self) -> None:
        counts = Tally(self._phases.values())
        for phase in PHASES:
            self.jobs.labels(phase=phase).set(counts.get(phase, 0))
