"""The operator's metrics: counts by namespace and phase, and the per-job series that
come and go with their jobs."""

from difftrain.operator.metrics import PHASES, OperatorMetrics


def _failed(reason: str) -> dict:
    return {"type": "Failed", "status": "True", "reason": reason}


def _series(metrics: OperatorMetrics, name: str) -> dict[tuple, float]:
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == name
    }


def test_jobs_are_counted_by_namespace_and_phase():
    metrics = OperatorMetrics()
    metrics.observe("a", "one", {"phase": "Running"})
    metrics.observe("a", "two", {"phase": "Running"})
    metrics.observe("b", "three", {"phase": "Pending"})
    metrics.observe("a", "two", {"phase": "Succeeded"})
    metrics.forget("b", "three")

    jobs = _series(metrics, "difftrain_operator_jobs")
    assert len(jobs) == 2 * len(PHASES)  # a namespace whose jobs are gone shows zeros
    assert jobs[("namespace", "a"), ("phase", "Running")] == 1
    assert jobs[("namespace", "a"), ("phase", "Succeeded")] == 1
    assert jobs[("namespace", "b"), ("phase", "Pending")] == 0


def test_a_failed_job_has_one_failure_series_until_it_goes():
    metrics = OperatorMetrics()
    metrics.observe(
        "a",
        "one",
        {
            "phase": "Restarting",
            "restarts": 2,
            "conditions": [{"type": "Restarting", "status": "True", "reason": "OOMKilled"}],
        },
    )
    assert _series(metrics, "difftrain_operator_job_failed") == {}
    failed = {
        "phase": "Failed",
        "restarts": 2,
        "preemptions": 5,
        "conditions": [_failed("MaxRestartsExceeded")],
    }
    metrics.observe("a", "one", failed)
    metrics.observe("a", "one", failed)  # every reconcile of a finished job observes it

    labels = (("job", "one"), ("namespace", "a"))
    assert _series(metrics, "difftrain_operator_job_restarts") == {labels: 2}
    assert _series(metrics, "difftrain_operator_job_preemptions") == {labels: 5}
    assert _series(metrics, "difftrain_operator_job_failed") == {
        (*labels, ("reason", "MaxRestartsExceeded")): 1
    }
    metrics.forget("a", "one")
    assert _series(metrics, "difftrain_operator_job_failed") == {}
    assert _series(metrics, "difftrain_operator_job_restarts") == {}
    assert _series(metrics, "difftrain_operator_job_preemptions") == {}
    metrics.forget("a", "one")  # a second delete event is harmless
