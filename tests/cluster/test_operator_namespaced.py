"""The operator installed for chosen namespaces (``watchNamespaces``) on the real control
plane: it runs jobs in its namespace with exactly the rights the chart grants there, and
leaves every other namespace alone. (The cluster-wide operator of test_operator.py is
stopped by then: its fixture ends with its module.)"""

import time

from tests.builders import job
from tests.cluster.operator import (
    Cluster,
    Operator,
    refused,
    tour,
    unused_rights,
    used_rights,
)


def test_a_namespaced_operator_works_in_its_namespace_only(control_plane, namespace, tmp_path):
    other = f"{namespace}-other"
    control_plane.kubectl("create", "namespace", other)
    operator = Operator(
        control_plane, f"{namespace}-ops", tmp_path, values=[f"watchNamespaces={{{namespace}}}"]
    )
    try:
        operator.install().start()
        mine, theirs = (
            Cluster(control_plane, namespace, operator),
            Cluster(control_plane, other, operator),
        )
        theirs.apply(job({"metadata": {"name": "theirs"}}))

        tour(mine)

        time.sleep(1.5)  # resyncs too
        assert theirs.job("theirs-a1") is None
        assert theirs.dtj("theirs")["status"]["observedGeneration"] == 0  # never seen
        requests, granted = operator.requests(), operator.granted()
    finally:
        operator.stop()
        operator.uninstall()
        control_plane.kubectl(
            "delete", "namespace", other, f"{namespace}-ops", "--wait=false", check=False
        )

    assert refused(requests) == [], "requests the chart's RBAC refused"
    # Its jobs' rights in its namespace; cluster-wide, to watch Namespaces and CRDs and to
    # read profiles alone.
    assert set(granted) == {"", namespace}
    assert {rule[1] for rule in granted[""]} == {
        "namespaces",
        "customresourcedefinitions",
        "diffusiontrainingprofiles",
    }
    assert unused_rights(used_rights(requests), granted) == set(), "rights never used"
