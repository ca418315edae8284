"""How the operator copes with many jobs at once.

    python bench/operator_scale.py [--jobs 100 500]

For each N: start an emulated API server (kmock, the same one the tests use) and the
real `difftrain operator` process, create N DiffusionTrainingJobs at once, and report
the seconds until every job has its batch Job, the API requests the operator made per
job (until then), the operator's CPU time and its peak resident memory. The baseline
row is the same run with the operator handling nothing but start-up (N = 0).

The emulator shares this machine and slows down as its request log grows (it keeps
every request and object version): at a few hundred jobs the wall time is mostly its
own, so read the operator's CPU seconds for the operator's cost.
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kmock import Server
from tests.builders import job
from tests.kube_emulator import ApiServer

from difftrain.local import free_port

JOBS = "/apis/difftrain.io/v1alpha1/namespaces/bench/diffusiontrainingjobs"


async def _one_run(count: int) -> dict:
    async with ApiServer() as k8s, Server(k8s, host="127.0.0.1"):
        url = str(k8s.url).rstrip("/")
        folder = Path(tempfile.mkdtemp())
        (folder / "kubeconfig").write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "b",
            "clusters": [{"name": "b", "cluster": {"server": url}}],
            "contexts": [{"name": "b", "context": {"cluster": "b", "user": "b"}}],
            "users": [{"name": "b", "user": {"token": "t"}}],
        }))  # fmt: skip
        operator = subprocess.Popen(
            [sys.executable, "-m", "difftrain.cli", "operator", "--resync-seconds", "3600",
             "--metrics-port", str(free_port()), "--health-port", str(free_port())],
            env={**os.environ, "KUBECONFIG": str(folder / "kubeconfig")},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        await asyncio.sleep(3)  # the operator's start-up and first watches
        before = len(list(k8s))
        started = time.perf_counter()
        async with aiohttp.ClientSession(url) as session:

            async def create(index: int) -> None:
                body = job({"metadata": {"name": f"job-{index}"}})
                async with session.post(
                    JOBS, data=json.dumps(body), headers={"Content-Type": "application/json"}
                ) as r:
                    assert r.status == 201, await r.text()

            await asyncio.gather(*(create(i) for i in range(count)))
        jobs = k8s.resource("batch/v1/jobs")
        while sum(1 for key, o in k8s.objects.items() if key[0] == jobs and not o.deleted) < count:
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - started
        requests = len(list(k8s)) - before - count  # the benchmark's own creates excluded
        operator.terminate()
        _, _, usage = await asyncio.to_thread(os.wait4, operator.pid, 0)
        return {
            "jobs": count,
            "seconds": elapsed,
            "requestsPerJob": requests / count if count else None,
            "peakRssMiB": usage.ru_maxrss / 1024,
            "operatorCpuSeconds": usage.ru_utime + usage.ru_stime,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[100, 500])
    args = parser.parse_args()
    rows = [asyncio.run(_one_run(count)) for count in [0, *args.jobs]]
    print(f"{'jobs':>6}{'seconds to all Jobs':>21}{'requests/job':>14}{'operator CPU s':>16}"
          f"{'peak RSS MiB':>14}")  # fmt: skip
    for row in rows:
        per_job = f"{row['requestsPerJob']:.1f}" if row["requestsPerJob"] else "-"
        print(f"{row['jobs']:>6}{row['seconds']:>21.1f}{per_job:>14}"
              f"{row['operatorCpuSeconds']:>16.1f}{row['peakRssMiB']:>14.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
