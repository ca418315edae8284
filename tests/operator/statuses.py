"""Whole DiffusionTrainingJobs as the operator publishes them, one per phase and failure
reason of the status tests' table (test_status.CASES), and the health each should show:
Argo CD's (health/diffusiontrainingjob.lua) and kstatus's (Flux, kubectl wait)."""

from difftrain.api.status import DiffusionTrainingJobStatus
from difftrain.api.validation import load_job
from difftrain.operator.status import next_status, observe, published, set_condition
from tests.builders import job
from tests.operator.test_status import CASES, NOW

# The phase's health in Argo CD and in kstatus.
ARGO = {
    "Pending": "Progressing",
    "Running": "Progressing",
    "Restarting": "Progressing",
    "Suspended": "Suspended",
    "Succeeded": "Healthy",
    "Failed": "Degraded",
}
KSTATUS = {"Succeeded": "Current", "Failed": "Failed"}  # the rest: InProgress


def _manifest(status: dict | None, generation: int = 1) -> dict:
    manifest = job({"metadata": {"generation": generation, "namespace": "ml"}})
    if status is not None:
        manifest["status"] = status
    return manifest


def published_jobs() -> list[tuple[str, dict, str, str]]:
    """(case id, the job with its status, Argo CD health, kstatus status)."""
    spec = load_job(job({"metadata": {"generation": 1}}))
    found = []
    for name, batch, pods, restarts, _ in CASES:
        status, _ = next_status(spec, {"restarts": restarts}, observe(batch, pods, NOW), NOW)
        status = published(status, NOW, 1)
        phase = status["phase"]
        found.append((name, _manifest(status), ARGO[phase], KSTATUS.get(phase, "InProgress")))
    running = next(status for name, status, _, _ in found if name == "running")["status"]
    # What the operator publishes while the profile a job names does not exist.
    missing = "DiffusionTrainingProfile gpu does not exist: create it, or fix spec.profile"
    waiting = set_condition([], "Created", False, "ProfileNotFound", missing, NOW, 1)
    profile = published({"phase": "Pending", "conditions": waiting}, NOW, 1)
    progress = {"step": 300, "totalSteps": 1200, "percent": 25.0}
    found += [
        # What the API server returns before the operator writes a status: the defaults.
        (
            "not-seen-yet",
            _manifest(
                DiffusionTrainingJobStatus().model_dump(
                    by_alias=True, exclude_none=True, mode="json"
                )
            ),
            "Progressing",
            "InProgress",
        ),
        ("no-status", _manifest(None), "Progressing", "Current"),  # kstatus: nothing to wait for
        (
            "running-with-progress",
            _manifest({**running, "progress": progress}),
            "Progressing",
            "InProgress",
        ),
        ("a-newer-generation", _manifest(running, generation=2), "Progressing", "InProgress"),
        ("waiting-for-its-profile", _manifest(profile), "Progressing", "InProgress"),
    ]
    return found
