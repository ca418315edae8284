"""How the operator copes with many jobs at once, on the real control plane.

    python bench/operator_scale.py [--jobs 500] [--noise 5000]

Starts the test control plane (tests/cluster/: etcd, kube-apiserver, the controllers,
the scheduler and kwok; `make cluster-binaries` builds it once), installs the chart and
runs `difftrain operator` as the chart's ServiceAccount. Each row is one fresh operator:

- baseline: the operator starts and handles nothing;
- N jobs: N DiffusionTrainingJobs created at once; the seconds until every one has its
  batch Job, and the API requests the operator made per job until then (from the API
  server's audit log);
- N jobs + M unrelated pods: the same, in a cluster that also runs M pods of other
  workloads (running on kwok's nodes), which shows what the operator's pod watch costs.

The operator's CPU seconds and peak resident memory (VmHWM) are over its whole life
(start-up, the work, a few seconds idle). The jobs are created suspended so that the cluster's own
work for their pods does not compete with the operator for this machine's CPUs.
"""

import argparse
import concurrent.futures
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.builders import job
from tests.cluster import build
from tests.cluster.control_plane import ControlPlane, fake_node
from tests.cluster.operator import Operator, wait_until

NOISE_NODES = 10  # kwok nodes for the unrelated pods, 1,000 pods each at most


def _noise(plane: ControlPlane, count: int) -> None:
    """``count`` running pods of some other workload, spread over kwok nodes of their own."""
    for index in range(NOISE_NODES):
        node = fake_node(f"noise-node-{index}")
        node["status"]["capacity"]["pods"] = node["status"]["allocatable"]["pods"] = "1000"
        plane.apply(node)
    plane.kubectl("create", "namespace", "noise")

    def create(index: int) -> None:
        plane.api(
            "POST",
            "/api/v1/namespaces/noise/pods",
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": f"web-{index}", "labels": {"app": "web", "tier": "frontend"}},
                "spec": {
                    "nodeName": f"noise-node-{index % NOISE_NODES}",
                    "containers": [{"name": "web", "image": "example.invalid/web:1"}],
                },
            },
        )

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(create, range(count)))

    def running() -> bool:  # (a list with a selector has no remainingItemCount)
        pods = plane.api("GET", "/api/v1/namespaces/noise/pods?fieldSelector=status.phase=Running")
        return len(pods["items"]) >= count

    wait_until(running, 600, every=5, what=f"{count} unrelated pods running")


def _run(plane: ControlPlane, folder: Path, jobs: int, label: str) -> dict:
    namespace = f"bench-{label}"
    plane.kubectl("create", "namespace", namespace)
    operator = Operator(
        plane, f"ops-{label}", folder / label, values=["operator.resyncSeconds=3600"]
    )
    operator.folder.mkdir(parents=True)
    operator.install().start()
    time.sleep(3)  # its first lists and watches
    before = len(operator.requests())
    manifests = [
        job(
            {"metadata": {"name": f"job-{index}"}},
            spec={"runPolicy": {"suspend": True}, "output": {"uri": f"s3://outputs/job-{index}"}},
        )
        for index in range(jobs)
    ]
    started = time.perf_counter()
    if manifests:
        plane.kubectl(
            "create",
            "-n",
            namespace,
            "-f",
            "-",
            input=yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": manifests}),
        )

    def all_created() -> bool:
        found = plane.api("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs?limit=1")
        return len(found["items"]) + found["metadata"].get("remainingItemCount", 0) >= jobs

    wait_until(all_created, 1200, every=0.5, what=f"{jobs} Jobs")
    elapsed = time.perf_counter() - started
    requests = len(operator.requests()) - before
    time.sleep(3)
    peak = _peak_rss_mib(operator.process.pid)
    operator.process.terminate()
    _, _, usage = os.wait4(operator.process.pid, 0)
    operator.process.returncode = 0  # reaped here
    operator.uninstall()
    plane.kubectl("delete", "namespace", namespace, "--timeout=600s")  # the next row starts clean
    return {
        "row": label,
        "jobs": jobs,
        "seconds": elapsed if jobs else None,
        "requestsPerJob": requests / jobs if jobs else None,
        "operatorCpuSeconds": usage.ru_utime + usage.ru_stime,
        "peakRssMiB": peak,
    }


def _peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory since it started its program (VmHWM; a fork's
    ru_maxrss would count this benchmark's own memory, shared until exec)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--noise", type=int, default=5000, help="unrelated pods")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="operator-scale-"))
    plane = ControlPlane(folder / "control-plane", build.binaries(build=False)).start()
    rows = []
    try:
        plane.install_crds()
        rows.append(_run(plane, folder, 0, "baseline"))
        rows.append(_run(plane, folder, args.jobs, "jobs"))
        started = time.perf_counter()
        _noise(plane, args.noise)
        print(
            f"({args.noise} unrelated pods running after {time.perf_counter() - started:.0f} s)",
            file=sys.stderr,
        )
        rows.append(_run(plane, folder, 0, "noise-baseline"))
        rows.append(_run(plane, folder, args.jobs, "jobs-and-noise"))
    finally:
        plane.stop()
    print(
        f"{'row':<16}{'jobs':>6}{'s to all Jobs':>15}{'requests/job':>14}"
        f"{'operator CPU s':>16}{'peak RSS MiB':>14}"
    )
    for row in rows:
        seconds = f"{row['seconds']:.1f}" if row["seconds"] is not None else "-"
        per_job = f"{row['requestsPerJob']:.1f}" if row["requestsPerJob"] is not None else "-"
        print(
            f"{row['row']:<16}{row['jobs']:>6}{seconds:>15}{per_job:>14}"
            f"{row['operatorCpuSeconds']:>16.1f}{row['peakRssMiB']:>14.0f}"
        )
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
