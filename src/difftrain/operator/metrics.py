"""The operator's own Prometheus metrics (served on :8080/metrics).

Job counts are by namespace and phase, so that a dashboard can filter them by namespace.
Three gauges carry one series per job, and go when the job goes: its restarts, its
preemptions, and a 1 for a job that failed, with the reason (the JobFailed alert). The
labels ``namespace`` and ``job`` are the job's own, as on the trainer's metrics;
Prometheus keeps them with ``honorLabels`` (the chart's monitors set it), as it does for
kube-state-metrics.
"""

import contextlib
from collections import Counter as Tally

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PHASES = ("Pending", "Running", "Restarting", "Succeeded", "Failed", "Suspended")


class OperatorMetrics:
    """Jobs by phase, each job's restarts, preemptions and failure, reconcile durations,
    and totals of restarts, preemptions and failures by reason."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.jobs = Gauge(
            "difftrain_operator_jobs",
            "DiffusionTrainingJobs by namespace and phase",
            ["namespace", "phase"],
            registry=self.registry,
        )
        self.job_restarts = Gauge(
            "difftrain_operator_job_restarts",
            "Gang restarts of each job (status.restarts)",
            ["namespace", "job"],
            registry=self.registry,
        )
        self.job_preemptions = Gauge(
            "difftrain_operator_job_preemptions",
            "Gang restarts of each job after a preemption (status.preemptions)",
            ["namespace", "job"],
            registry=self.registry,
        )
        self.job_failed = Gauge(
            "difftrain_operator_job_failed",
            "1 for each job that failed, with its reason",
            ["namespace", "job", "reason"],
            registry=self.registry,
        )
        self.reconcile_seconds = Histogram(
            "difftrain_operator_reconcile_duration_seconds",
            "Time to reconcile one job",
            registry=self.registry,
        )
        self.restarts = Counter(
            "difftrain_operator_restarts", "Gang restarts", registry=self.registry
        )
        self.preemptions = Counter(
            "difftrain_operator_preemptions",
            "Gang restarts after a preemption",
            registry=self.registry,
        )
        self.failures = Counter(
            "difftrain_operator_failures",
            "Jobs that failed, by reason",
            ["reason"],
            registry=self.registry,
        )
        self._phases: dict[tuple[str, str], str] = {}
        self._failed: dict[tuple[str, str], str] = {}
        self._namespaces: set[str] = set()

    def observe(self, namespace: str, name: str, status: dict) -> None:
        """Record a job's status as it now is (phase, restarts, failure)."""
        key = (namespace, name)
        if status.get("phase"):
            self._phases[key] = status["phase"]
        self.job_restarts.labels(namespace=namespace, job=name).set(status.get("restarts", 0))
        self.job_preemptions.labels(namespace=namespace, job=name).set(status.get("preemptions", 0))
        failed = next(
            (
                c
                for c in status.get("conditions", ())
                if c["type"] == "Failed" and c["status"] == "True"
            ),
            None,
        )
        reason = failed and failed.get("reason", "")
        if self._failed.get(key) != reason:
            self._forget_failure(key)
            if reason is not None:
                self._failed[key] = reason
                self.job_failed.labels(namespace=namespace, job=name, reason=reason).set(1)
        self._refresh()

    def forget(self, namespace: str, name: str) -> None:
        """Drop a deleted job's series."""
        key = (namespace, name)
        self._phases.pop(key, None)
        self._forget_failure(key)
        for gauge in (self.job_restarts, self.job_preemptions):
            with contextlib.suppress(KeyError):  # never observed
                gauge.remove(namespace, name)
        self._refresh()

    def _forget_failure(self, key: tuple[str, str]) -> None:
        reason = self._failed.pop(key, None)
        if reason is not None:
            self.job_failed.remove(*key, reason)

    def _refresh(self) -> None:
        counts = Tally((namespace, phase) for (namespace, _), phase in self._phases.items())
        self._namespaces |= {namespace for namespace, _ in self._phases}
        for namespace in self._namespaces:
            for phase in PHASES:
                self.jobs.labels(namespace=namespace, phase=phase).set(counts[namespace, phase])
