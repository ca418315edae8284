"""examples/quickstart.yaml trained by `difftrain run` in the background.

The quickstart's training is the suite's longest piece of work (minutes on two cores),
and much of the rest of the suite leaves the CPUs idle: the control plane's tests wait on
its controllers, the preemption tests on held uploads, single-threaded trainers leave a
core free. So the run starts as soon as the tests are collected, at the lowest priority
(nice 19: it takes only what the other tests leave), and the tests that read its model run
last (conftest.py). Its result is the same: the run is deterministic whatever its pace.
"""

import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"
TIMEOUT_SECONDS = 1500  # niced under a busy suite it may take far longer than alone


@dataclass
class QuickstartRun:
    work: Path
    process: subprocess.Popen

    @property
    def output(self) -> Path:
        return self.work / "out"

    def result(self) -> Path:
        """The output folder once the run succeeded; the run's log when it did not."""
        try:
            code = self.process.wait(timeout=TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"the quickstart ran past {TIMEOUT_SECONDS} s") from None
        log = (self.work / "run.log").read_text(errors="replace")
        assert code == 0, log[-20000:]
        return self.output

    def stop(self) -> None:
        """Stop a run still going (the suite ended early): SIGTERM, as Ctrl-C would."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.work, ignore_errors=True)


def start() -> QuickstartRun:
    """examples/quickstart.yaml as it is (its output in a temporary folder), run by
    `difftrain run` on its two local nodes, niced."""
    work = Path(tempfile.mkdtemp(prefix="difftrain-quickstart-"))
    manifest = yaml.safe_load(QUICKSTART.read_text())
    manifest["spec"]["output"]["uri"] = f"file://{work}/out"
    (work / "job.yaml").write_text(yaml.safe_dump(manifest))
    command = [
        "nice",
        "-n",
        "19",
        sys.executable,
        "-m",
        "difftrain.cli",
        "run",
        str(work / "job.yaml"),
        "--workdir",
        str(work / "nodes"),
    ]
    with (work / "run.log").open("w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    return QuickstartRun(work, process)
