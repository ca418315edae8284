"""Argo CD's health of a DiffusionTrainingJob: the chart's Lua script, run by a real Lua
5.1 runtime (Argo CD's gopher-lua speaks 5.1) over every status the operator publishes."""

from pathlib import Path

import pytest
from lupa.lua51 import LuaRuntime

from tests.operator.statuses import published_jobs

SCRIPT = Path(__file__).resolve().parents[2] / "helm/difftrain/health/diffusiontrainingjob.lua"
JOBS = published_jobs()


def argo_health(manifest: dict) -> dict:
    """What Argo CD makes of ``manifest``: the script's table as a dict."""
    lua = LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(manifest, recursive=True)
    return dict(lua.execute(SCRIPT.read_text()))


@pytest.mark.parametrize(
    ("manifest", "expected"),
    [pytest.param(manifest, argo, id=name) for name, manifest, argo, _ in JOBS],
)
def test_each_published_status_has_its_phases_health(manifest, expected):
    health = argo_health(manifest)

    assert health["status"] == expected
    status = manifest.get("status")
    if status and status.get("phase") != "Running" and status.get("reason"):
        assert health["message"].startswith(status["reason"])  # the telling reason first


def test_the_message_says_what_went_wrong_and_how_far_training_is():
    by_name = {name: manifest for name, manifest, _, _ in JOBS}

    assert argo_health(by_name["dataset-error"])["message"] == (
        "DatasetError: the dataset has no images"
    )
    assert argo_health(by_name["running-with-progress"])["message"] == (
        "Training: step 300/1200 (25%)"
    )
    assert argo_health(by_name["unschedulable"])["message"] == (
        "Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    )
    assert argo_health(by_name["waiting-for-its-profile"])["message"] == (
        "ProfileNotFound: DiffusionTrainingProfile gpu does not exist: create it, or fix "
        "spec.profile"
    )
    waiting = "Waiting for the difftrain operator"
    assert argo_health(by_name["not-seen-yet"])["message"] == waiting
    assert argo_health(by_name["no-status"])["message"] == waiting
    assert argo_health(by_name["a-newer-generation"])["message"] == (
        "Waiting for the operator to see generation 2"
    )


def test_every_phase_and_argo_health_is_covered():
    phases = {m["status"]["phase"] for _, m, _, _ in JOBS if "phase" in m.get("status", {})}
    assert phases == {"Pending", "Running", "Restarting", "Suspended", "Succeeded", "Failed"}
    assert {argo for _, _, argo, _ in JOBS} == {"Progressing", "Suspended", "Healthy", "Degraded"}
