import hashlib

import pytest

from tests.cluster import build
from tests.cluster.control_plane import ControlPlane


@pytest.fixture(scope="package")
def control_plane(tmp_path_factory):
    """The real control plane (tests/cluster/control_plane.py), with difftrain's CRD
    installed as a platform team installs it; one for the tests of this folder, stopped
    after them (idle, it would still take CPU from the tests that follow)."""
    plane = ControlPlane(tmp_path_factory.mktemp("control-plane"), build.binaries(build=False))
    plane.start()
    try:
        plane.install_crds()
        yield plane
    finally:
        plane.stop()


@pytest.fixture
def namespace(control_plane, request):
    """A fresh namespace for the test, deleted after it (without waiting)."""
    name = "t-" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:12]
    control_plane.kubectl("create", "namespace", name)
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)
