"""Run the real trainer entry point (``python -m difftrain.trainer``) on a test job."""

import contextlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from difftrain.api.config import TrainerConfig
from difftrain.local import free_port
from tests.builders import job, merge
from tests.trainer import forkserver

# A LoRA job on the tiny SD preset that trains in seconds on a CPU.
FAST_SPEC = {
    "dataset": {"resolution": 32},
    "training": {"steps": 6, "batchSize": 4, "learningRate": 1e-3, "mixedPrecision": "no"},
    "checkpoints": {"everySteps": 1000},
    "resources": {"gpusPerNode": 0},
}


def write_config(folder: Path, spec: dict, name: str = "test-job", uid: str = "") -> Path:
    """job.json for ``spec`` merged over :data:`FAST_SPEC` and the minimal job."""
    manifest = job(spec=merge(FAST_SPEC, spec))
    config = TrainerConfig.model_validate({"name": name, "uid": uid, "spec": manifest["spec"]})
    path = folder / "job.json"
    path.write_text(config.to_json())
    return path


def trainer_env(config: Path, work: Path, cache: Path, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(
        DIFFTRAIN_CONFIG=str(config),
        DIFFTRAIN_SCRATCH=str(work / "scratch"),
        DIFFTRAIN_CACHE=str(cache),
        DIFFTRAIN_TERMINATION_LOG=str(work / "termination-log"),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


def start(config: Path, work: Path, cache: Path, extra: dict | None = None):
    """``python -m difftrain.trainer`` in a process of its own, forked from a warm
    interpreter (forkserver.py); a Popen-like object with its output as text."""
    return forkserver.start(trainer_env(config, work, cache, extra))


def run(config: Path, work: Path, cache: Path, extra: dict | None = None, timeout: int = 300):
    """Run the trainer to the end; returns (exit code, output)."""
    process = start(config, work, cache, extra)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()  # a trainer left running would slow every test after it
        process.communicate()
        raise
    return process.returncode, output


@contextlib.contextmanager
def running(config: Path, work: Path, cache: Path, extra: dict | None = None, timeout=300):
    """The trainer, started in the background for the block (two one-thread trainers fit
    two cores); yields a function that waits for it and returns (exit code, output). A
    trainer still running when the block ends (it failed first) is killed."""
    process = start(config, work, cache, extra)
    with ThreadPoolExecutor(1) as pool:
        output = pool.submit(process.communicate, timeout=timeout)  # drains its pipe

        def wait() -> tuple[int, str]:
            text, _ = output.result()
            return process.returncode, text

        try:
            yield wait
        finally:
            if process.poll() is None:
                process.kill()


def run_together(runs: list[tuple], timeout: int = 300) -> list[tuple[int, str]]:
    """Run several trainers at once, each given as ``run``'s (config, work, cache, extra);
    their (exit code, output) in order. For one-thread trainers, which share two cores."""
    with ThreadPoolExecutor(len(runs)) as pool:
        return list(pool.map(lambda args: run(*args, timeout=timeout), runs))


def start_nodes(
    config: Path, folder: Path, extra: dict | None = None, metrics_ports: list[int] | None = None
) -> list[subprocess.Popen]:
    """Two torchrun nodes on this machine, each started as a pod starts it: the pods'
    launcher, folders of its own, and its own metrics port."""
    port = free_port()
    metrics_ports = metrics_ports or [free_port(), free_port()]
    nodes = []
    for rank, metrics_port in enumerate(metrics_ports):
        work = folder / f"node{rank}"  # each node (pod) has its own disks
        command = [
            sys.executable,
            "-m",
            "difftrain.launch",  # the pods' entry point (torchrun)
            f"--nnodes={len(metrics_ports)}",
            "--nproc_per_node=1",
            f"--node_rank={rank}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
        ]
        own = {"DIFFTRAIN_METRICS_PORT": str(metrics_port), **(extra or {})}
        env = trainer_env(config, work, work / "cache", own)
        nodes.append(
            subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    return nodes
