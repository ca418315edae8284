"""``difftrain run``: a job on this machine, launched exactly as its pods would be.

The operator's builder renders the job's Job; each completion index becomes a local
process running the pod's container command with the pod's environment, resolved here:
the completion index for the node rank, this machine's environment for Secret keys,
local folders for the pod's volumes, and 127.0.0.1 with a free port for the rendezvous.
"""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from difftrain import contract
from difftrain.api.job import DiffusionTrainingJob
from difftrain.errors import InvalidSpec
from difftrain.operator.builders import COMPLETION_INDEX, Defaults, children


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def with_nodes(job: DiffusionTrainingJob, nodes: int | None) -> DiffusionTrainingJob:
    if not nodes:
        return job
    resources = job.spec.resources.model_copy(update={"nodes": nodes})
    return job.model_copy(update={"spec": job.spec.model_copy(update={"resources": resources})})


def node_environment(
    container: dict,
    index: int,
    folders: dict[str, Path],
    port: int,
    metrics_port: int = 0,
    threads: int = 0,
) -> dict:
    """The pod's environment for node ``index``, resolved for this machine; ``threads``
    CPU threads per process unless ``OMP_NUM_THREADS`` is set already."""
    mounts = {
        m["mountPath"]: folders[m["name"]]
        for m in container["volumeMounts"]
        if m["name"] in folders
    }
    env = dict(os.environ)
    for entry in container["env"]:
        name = entry["name"]
        if "value" in entry:
            env[name] = _local_path(entry["value"], mounts)
        elif entry["valueFrom"].get("fieldRef", {}).get("fieldPath") == COMPLETION_INDEX:
            env[name] = str(index)
        elif "secretKeyRef" in entry["valueFrom"]:
            ref = entry["valueFrom"]["secretKeyRef"]
            if name not in os.environ and not ref.get("optional"):
                raise InvalidSpec(
                    f"{name} is not set: in a cluster it comes from key {ref['key']} of Secret "
                    f"{ref['name']} (spec.storage.secretRef); export {name} to run here"
                )
        else:
            raise InvalidSpec(f"cannot resolve {name} outside a cluster: {entry['valueFrom']}")
    env.update(
        PET_MASTER_ADDR="127.0.0.1",
        PET_MASTER_PORT=str(port),
        DIFFTRAIN_TERMINATION_LOG=str(folders["scratch"] / "termination-log"),
    )
    if metrics_port:  # each local "node" needs its own metrics port
        env[contract.METRICS_PORT_ENV] = str(metrics_port)
    if threads and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(threads)  # local nodes share the CPUs, not oversubscribe
    return env


def threads_per_process(job: DiffusionTrainingJob) -> int:
    """This machine's CPUs shared out over every process of every local node."""
    processes = job.spec.resources.nodes * max(1, job.spec.resources.gpus_per_node)
    return max(1, (os.cpu_count() or 1) // processes)


def _local_path(value: str, mounts: dict[str, Path]) -> str:
    for mount, folder in mounts.items():
        if value == mount or value.startswith(mount + "/"):
            return str(folder) + value[len(mount) :]
    return value


def _stream(process: subprocess.Popen, prefix: str) -> None:
    """Relay a node's output, each line prefixed; a progress bar's redraws (lines ended
    by a carriage return) stay redraws."""
    relayed = io.TextIOWrapper(process.stdout, encoding="utf-8", errors="replace", newline="")
    for line in relayed:
        sys.stdout.write(f"{prefix}{line}")
        sys.stdout.flush()


def progress_line(values: dict[str, float]) -> str | None:
    """One line for people: step, percent, loss, throughput and ETA."""
    if not values.get("total_steps"):
        return None
    step, total = int(values.get("step", 0)), int(values["total_steps"])
    parts = [f"step {step}/{total} ({100 * step // total}%)"]
    if "loss" in values:
        parts.append(f"loss {values['loss']:.4f}")
    if "images_per_second" in values:
        parts.append(f"{values['images_per_second']:.1f} images/s")
    if "eta_seconds" in values:
        parts.append(f"ETA {contract.human_duration(int(values['eta_seconds']))}")
    return "progress: " + ", ".join(parts)


def _watch_progress(url: str, done: threading.Event, every: float = 0.5) -> None:
    import urllib.request

    last = None
    while not done.wait(every):
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                line = progress_line(contract.read_metrics(response.read().decode()))
        except OSError:
            continue  # not serving yet, or finished
        if line and line != last:
            print(line, file=sys.stderr, flush=True)
            last = line


def combined_exit_code(codes: list[int]) -> int:
    """One code for all nodes: a permanent failure first, then any failure."""
    for code in codes:
        if code in contract.PERMANENT_EXIT_CODES:
            return code
    return next((code for code in codes if code), 0)


def run(job: DiffusionTrainingJob, workdir: Path, port: int, metrics_port: int = 0) -> int:
    """Run ``job`` with one local process per node; the exit code of the contract. Node
    0 serves its metrics on ``metrics_port`` (a free port when 0), each other node on a
    free port; the URLs are printed first, for a local Prometheus to scrape."""
    config_map, _, trainer_job = children(job, attempt=1, defaults=Defaults())
    container = trainer_job["spec"]["template"]["spec"]["containers"][0]
    base = workdir / job.metadata.name
    (base / "config").mkdir(parents=True, exist_ok=True)
    (base / "config" / "job.json").write_text(config_map["data"]["job.json"])
    command = [sys.executable if part == "python" else part for part in container["command"]]
    processes = []
    metrics_ports = [free_port() for _ in range(job.spec.resources.nodes)]
    if metrics_port:
        metrics_ports[0] = metrics_port
    for index, served in enumerate(metrics_ports):
        print(f"node {index} metrics: http://127.0.0.1:{served}/metrics", flush=True)
    stopping = threading.Event()

    def stop(*_):  # Ctrl-C or SIGTERM: every node checkpoints, as on preemption
        if stopping.is_set():
            print("still stopping: the checkpoint is being written", file=sys.stderr)
            return
        stopping.set()
        print(
            "stopping: the trainer writes a checkpoint first; run again to resume", file=sys.stderr
        )
        for process, _, _ in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    # Installed explicitly (a shell may start this process with SIGINT ignored), and before
    # any node starts, so that no Ctrl-C leaves a node running without this process.
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    finished = threading.Event()
    try:
        for index in range(job.spec.resources.nodes):
            if stopping.is_set():
                break
            node = base / f"node{index}"
            folders = {
                "config": base / "config",
                "scratch": node / "scratch",
                "cache": base / "cache",
                "tmp": node / "tmp",
            }
            for folder in folders.values():
                folder.mkdir(parents=True, exist_ok=True)
            env = node_environment(
                container, index, folders, port, metrics_ports[index], threads_per_process(job)
            )
            # Every local job and node shares one cache of latents and text embeddings,
            # as a cluster's share the chart's trainer.cacheUri (the job's own URI wins).
            env.setdefault("DIFFTRAIN_SHARED_CACHE_URI", f"file://{workdir.resolve()}/features")
            # Node 0's progress bars (difftrain.bars) reach a terminal; the others' would
            # draw over them.
            if index > 0:
                env.pop(contract.PROGRESS_ENV, None)
            elif sys.stdout.isatty():
                env.setdefault(contract.PROGRESS_ENV, "1")
            # Each node in a process group of its own, as each pod is on its own: a
            # terminal's Ctrl-C reaches only this process, which turns it into exactly one
            # SIGTERM per node (the pods' launcher forwards it to its trainers).
            process = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                process_group=0,
            )
            reader = threading.Thread(
                target=_stream, args=(process, f"[node {index}] "), daemon=True
            )
            reader.start()
            processes.append((process, reader, folders["scratch"] / "termination-log"))
            if stopping.is_set():  # Ctrl-C while it started
                process.send_signal(signal.SIGTERM)
        watcher = threading.Thread(
            target=_watch_progress,
            args=(f"http://127.0.0.1:{metrics_ports[0]}/metrics", finished),
            daemon=True,
        )
        watcher.start()
        codes = [process.wait() for process, _, _ in processes]
    finally:
        finished.set()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for (_, reader, termination), code in zip(processes, codes, strict=True):
        reader.join(timeout=5)
        if code and termination.exists():
            reason = json.loads(termination.read_text())
            print(f"{reason['reason']}: {reason['message']}", file=sys.stderr)
    return combined_exit_code(codes)
