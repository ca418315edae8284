"""kstatus (sigs.k8s.io/cli-utils), the library Flux's health checks and `kubectl wait`'s
conventions come from, built from its Go module, on every status the operator publishes:
Current once the job succeeded, Failed once it failed, InProgress on the way."""

import json
import subprocess

from tests.cluster.build import binaries
from tests.operator.statuses import published_jobs


def test_kstatus_reads_each_published_status_as_its_phase_means():
    jobs = published_jobs()
    answer = subprocess.run(
        [str(binaries(build=False).kstatus)],
        input=json.dumps([manifest for _, manifest, _, _ in jobs]),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    verdicts = json.loads(answer.stdout)

    got = {name: verdict["status"] for (name, *_), verdict in zip(jobs, verdicts, strict=True)}
    assert got == {name: expected for name, _, _, expected in jobs}
    said = {name: verdict["message"] for (name, *_), verdict in zip(jobs, verdicts, strict=True)}
    assert said["dataset-error"] == "the dataset has no images"  # Stalled's message


def test_a_job_the_operator_has_not_seen_is_in_progress_not_current(control_plane):
    """The API server gives a new job the status defaults (observedGeneration 0) until
    the operator writes one; kstatus reads that as in progress."""
    from tests.builders import job

    manifest = job({"metadata": {"name": "unseen", "namespace": "default"}})
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    stored = json.loads(
        control_plane.kubectl("get", "dtj", "unseen", "-n", "default", "-o", "json").stdout
    )
    control_plane.kubectl("delete", "dtj", "unseen", "-n", "default")

    assert stored["status"]["observedGeneration"] == 0
    assert stored["metadata"]["generation"] == 1
    answer = subprocess.run(
        [str(binaries(build=False).kstatus)],
        input=json.dumps([stored]),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert json.loads(answer.stdout)[0]["status"] == "InProgress"
