"""The operator under Kopf against an emulated API server, for what a real cluster cannot
show: a job the CRD's rules never checked (an API server with an older CRD). The operator's
work on real controllers is tested in tests/cluster/test_operator.py; the emulator's helpers
here also serve the progress tests, which need a pod whose IP this machine can reach."""

import json

import aiohttp
import pytest

from tests.builders import job, merge
from tests.operator.conftest import eventually

NS = "ml"
DTJ = "difftrain.io/v1alpha1/diffusiontrainingjobs"
JOBS = f"/apis/{DTJ.rsplit('/', 1)[0]}/namespaces/{NS}/diffusiontrainingjobs"
pytestmark = pytest.mark.asyncio


def _get(k8s, resource: str, name: str, namespace: str = NS) -> dict | None:
    key = (k8s.resource(resource), namespace, name)
    if key not in k8s.objects or k8s.objects[key].deleted:
        return None
    return k8s.objects[key].raw


async def _send(k8s, method: str, path: str, body=None, content_type="application/json"):
    async with aiohttp.ClientSession(str(k8s.url)) as session:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type}
        async with session.request(method, path, data=data, headers=headers) as response:
            assert response.status < 300, await response.text()
            return await response.json()


async def create(k8s, name="demo", spec=None, patch=None, namespace=NS):
    """A job with an output of its own in S3 (a cluster refuses a file:// output)."""
    own = {"output": {"uri": f"s3://outputs/{namespace}/{name}"}}
    manifest = job({"metadata": {"name": name, **(patch or {})}}, spec=merge(own, spec or {}))
    return await _send(k8s, "POST", JOBS.replace(f"/{NS}/", f"/{namespace}/"), manifest)


def phase_of(k8s, name="demo"):
    return (_get(k8s, DTJ, name) or {}).get("status", {}).get("phase")


def condition(k8s, kind: str, name="demo") -> dict:
    conditions = (_get(k8s, DTJ, name) or {}).get("status", {}).get("conditions", [])
    return next((c for c in conditions if c["type"] == kind), {})


async def test_invalid_spec_fails_without_children(k8s, operator):
    # The CRD's schema would refuse this; an API server without the CRD's rules would not.
    await create(k8s, spec={"training": {"learningRate": 0}})

    await eventually(lambda: phase_of(k8s) == "Failed")
    assert condition(k8s, "Failed")["reason"] == "InvalidSpec"
    assert condition(k8s, "Failed")["message"] == "spec.training.learningRate: must be > 0 (got 0)"
    assert _get(k8s, "batch/v1/jobs", "demo-a1") is None
    assert _get(k8s, "v1/configmaps", "demo-config") is None
