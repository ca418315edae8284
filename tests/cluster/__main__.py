"""``python -m tests.cluster up|down [FOLDER]``: the test control plane for a person.

``up`` starts it in the background (a supervisor process that owns every component) and
returns once the API server answers, with the kubeconfig in ``FOLDER/kubeconfig``
(default ``.cluster``); ``down`` stops it and removes the folder. ``make cluster`` and
``make cluster-down`` call these.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.cluster import build
from tests.cluster.control_plane import ControlPlane


def up(folder: Path) -> int:
    if _running(folder):
        print(f"a control plane already runs from {folder}; `make cluster-down` stops it")
        return 1
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    build.binaries()  # builds here, in the foreground, where a person sees it
    log = (folder / "supervisor.log").open("w")
    with log:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "tests.cluster", "serve", str(folder)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=build.ROOT,
        )
    while not (folder / "ready").exists():
        if supervisor.poll() is not None:
            print((folder / "supervisor.log").read_text(), file=sys.stderr)
            print(f"the control plane did not start (logs in {folder}/logs)", file=sys.stderr)
            return 1
        time.sleep(0.5)
    kubeconfig = folder / "kubeconfig"
    print(f"""A control plane runs in the background (API server, controllers, scheduler,
kwok's fake nodes), with difftrain's CRD installed. Use it with:

  export KUBECONFIG={kubeconfig}
  kubectl get nodes
  kubectl apply -f examples/quickstart.yaml
  difftrain operator            # in another terminal, with the same KUBECONFIG
  kubectl get dtj -w

`make cluster-down` stops it; its logs are in {folder}/logs.""")
    return 0


def serve(folder: Path) -> int:
    """The supervisor: start everything, say ready, stop everything on SIGTERM."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    (folder / "pid").write_text(str(os.getpid()))
    plane = ControlPlane(folder, build.binaries(build=False))
    try:
        plane.start()
        plane.install_crds()
        (folder / "ready").touch()
        while not stop.wait(1):
            plane.check_alive()
    finally:
        plane.stop()
    return 0


def down(folder: Path) -> int:
    pid = _running(folder)
    if pid:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    shutil.rmtree(folder, ignore_errors=True)
    print("the control plane is stopped" if pid else "no control plane was running")
    return 0


def _running(folder: Path) -> int | None:
    try:
        pid = int((folder / "pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster")
    parser.add_argument("command", choices=["up", "down", "serve"])
    parser.add_argument("folder", nargs="?", default=".cluster", type=Path)
    args = parser.parse_args()
    folder = args.folder.resolve()
    try:
        return {"up": up, "down": down, "serve": serve}[args.command](folder)
    except build.BuildError as error:
        print(error, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
