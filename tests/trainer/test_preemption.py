"""Preemption as a pod sees it: two nodes under the pods' own launcher (torchrun's agent),
S3 through a link slow enough that the checkpoint upload outlasts torchrun's default
30 s shutdown timeout. Stopped by SIGTERM, or by Ctrl-C in ``difftrain run``, every node
still writes its part of the checkpoint and exits 143, and a restart ends with exactly
the weights of a run that was never interrupted."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml
from safetensors.torch import load, load_file

from tests.builders import job, merge
from tests.slow_s3 import SlowS3
from tests.trainer import runner

STEPS = 10
STOP_AT = f"step 3/{STEPS} "
# Their uploads are held for seconds on end: they run first, beside the quickstart's run.
pytestmark = pytest.mark.waits
HOLD_SECONDS = 32  # each checkpoint's weights upload: longer than torchrun's default 30 s
HELD = r"/checkpoints/step-\d+/trainable\.safetensors"
# Bitwise-equal runs need one thread per process (see test_resume.py).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
LAST = f"checkpoints/step-{STEPS:08d}"


def _spec(shapes_folder, output: str, endpoint: str | None = None, **patch) -> dict:
    spec = {
        "dataset": {"uri": f"file://{shapes_folder}", "randomFlip": True},
        "output": {"uri": output},
        "training": {"steps": STEPS, "batchSize": 4},
        "checkpoints": {"everySteps": 1000},
        "resources": {"nodes": 2},
        "lora": {"rank": 4, "dropout": 0.1},
    }
    if endpoint:
        spec["storage"] = {"endpoint": endpoint, "pathStyle": True}
    return merge(spec, patch)


class Output:
    """A process's output, read in the background (so that its pipe never fills)."""

    def __init__(self, process: subprocess.Popen):
        self.lines: list[str] = []
        self._seen = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process):
        for line in process.stdout:
            with self._seen:
                self.lines.append(line)
                self._seen.notify_all()

    def wait_for(self, marker: str, timeout: float = 180) -> None:
        with self._seen:
            if not self._seen.wait_for(lambda: any(marker in x for x in self.lines), timeout):
                raise AssertionError(f"{marker!r} not seen:\n{self.text()}")

    def text(self) -> str:
        self._thread.join(timeout=0 if self._thread.is_alive() else None)
        return "".join(self.lines)


def start_nodes(config, folder) -> list[subprocess.Popen]:
    return runner.start_nodes(config, folder, {**ONE_THREAD, "DIFFTRAIN_GRACE_SECONDS": "300"})


def finish(nodes, timeout=300) -> tuple[list[int], list[str]]:
    outputs = [Output(node) for node in nodes]
    codes = [node.wait(timeout=timeout) for node in nodes]
    return codes, [output.text() for output in outputs]


@pytest.fixture(scope="module")
def reference_weights(tmp_path_factory, shapes_folder):
    """The final weights of the same two-node run, never interrupted."""
    folder = tmp_path_factory.mktemp("reference")
    output = folder / "out"
    config = runner.write_config(folder, _spec(shapes_folder, f"file://{output}"))
    codes, logs = finish(start_nodes(config, folder))
    assert codes == [0, 0], logs
    return load_file(output / LAST / "trainable.safetensors")


@pytest.fixture
def slow_s3(s3_env):
    proxy = SlowS3(s3_env.endpoint)
    yield proxy
    proxy.close()


class Watch:
    """When the checkpoint's COMPLETE appears in S3, polled in the background."""

    def __init__(self, client, bucket: str, prefix: str):
        self.client, self.bucket, self.prefix = client, bucket, prefix
        self.seen_at: float | None = None
        self.key: str | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._done.wait(0.2):
            listing = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix)
            keys = [item["Key"] for item in listing.get("Contents", [])]
            markers = [key for key in keys if key.endswith("/COMPLETE")]
            if markers:
                self.seen_at, self.key = time.monotonic(), markers[0]
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def _weights(client, bucket: str, key: str) -> dict:
    return load(client.get_object(Bucket=bucket, Key=key)["Body"].read())


def _assert_equal(expected: dict, got: dict) -> None:
    assert expected.keys() == got.keys()
    differences = {k: float((expected[k] - got[k]).abs().max()) for k in expected}
    assert not any(differences.values()), {k: d for k, d in differences.items() if d}


def _position(client, bucket: str, marker: str) -> int:
    key = marker.rsplit("/", 1)[0] + "/position.json"
    return json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())["step"]


def test_sigterm_to_the_launchers_checkpoints_within_the_grace_period(
    tmp_path, shapes_folder, s3_env, slow_s3, bucket, reference_weights
):
    client = s3_env.client()
    spec = _spec(shapes_folder, f"s3://{bucket}/run", slow_s3.endpoint)
    config = runner.write_config(tmp_path, spec, name="preempted")
    slow_s3.hold(HELD, HOLD_SECONDS)
    nodes = start_nodes(config, tmp_path)
    outputs = [Output(node) for node in nodes]
    outputs[0].wait_for(STOP_AT)
    watch = Watch(client, bucket, "run/checkpoints/")

    stopped_at = time.monotonic()
    for node in nodes:  # the kubelet stops every pod of a preempted gang
        node.send_signal(signal.SIGTERM)
    codes = [node.wait(timeout=HOLD_SECONDS + 120) for node in nodes]
    exited_after = time.monotonic() - stopped_at
    watch.stop()
    logs = [output.text() for output in outputs]

    assert codes == [143, 143], logs
    assert watch.seen_at is not None, logs
    upload = slow_s3.delays.span()
    complete_after = watch.seen_at - stopped_at
    print(
        f"\ncheckpoint upload {upload:.1f} s; COMPLETE {complete_after:.1f} s after SIGTERM; "
        f"both nodes exited {exited_after:.1f} s after it"
    )
    assert upload > 30  # past torchrun's default, which would have killed the workers
    step = _position(client, bucket, watch.key)
    assert step >= 3

    slow_s3.hold(r"^$", 0)  # the rest at full speed
    codes, logs = finish(start_nodes(config, tmp_path))

    assert codes == [0, 0], logs
    assert f"resumed from checkpoint step {step}" in logs[0]
    _assert_equal(reference_weights, _weights(client, bucket, f"run/{LAST}/trainable.safetensors"))

    # The same output with one node: its data order and random states are per process.
    one_node = runner.write_config(
        tmp_path / "node0", merge(spec, {"resources": {"nodes": 1}}), name="preempted"
    )
    code, log = runner.run(one_node, tmp_path / "node0", tmp_path / "node0" / "cache")

    assert code == 2, log
    assert "processes (spec.resources.nodes times gpusPerNode) 2 → 1" in log


def test_ctrl_c_in_difftrain_run_checkpoints_every_node(
    tmp_path, shapes_folder, s3_env, slow_s3, bucket, reference_weights
):
    client = s3_env.client()
    manifest = job(
        {"metadata": {"name": "interrupted"}},
        spec=merge(runner.FAST_SPEC, _spec(shapes_folder, f"s3://{bucket}/run", slow_s3.endpoint)),
    )
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest))
    command = [
        sys.executable,
        "-m",
        "difftrain.cli",
        "run",
        str(path),
        "--workdir",
        str(tmp_path / "work"),
    ]
    env = {**os.environ, **ONE_THREAD, "PYTHONUNBUFFERED": "1"}
    slow_s3.hold(HELD, 5)  # the test above shows the long wait; this one, who gets the signal
    # Its own process group, as a terminal gives a foreground job: Ctrl-C goes to all of it.
    run = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output = Output(run)
    output.wait_for(STOP_AT)
    watch = Watch(client, bucket, "run/checkpoints/")

    os.killpg(run.pid, signal.SIGINT)
    code = run.wait(timeout=120)
    watch.stop()
    log = output.text()

    assert code == 143, log
    assert log.count("SIGTERM: finishing this step") == 2, log  # exactly one per node
    assert watch.seen_at is not None, log
    step = _position(client, bucket, watch.key)
    assert {"rng-0.pt", "rng-1.pt", "COMPLETE"} <= {
        item["Key"].rsplit("/", 1)[1]
        for item in client.list_objects_v2(Bucket=bucket, Prefix=watch.key.rsplit("/", 1)[0])[
            "Contents"
        ]
    }

    slow_s3.hold(r"^$", 0)
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resumed from checkpoint step {step}" in rerun.stdout
    assert "progress: step " in log + rerun.stderr  # read from node 0's /metrics
    _assert_equal(reference_weights, _weights(client, bucket, f"run/{LAST}/trainable.safetensors"))


def test_a_long_upload_by_the_main_process_outlasts_the_collective_timeout(
    tmp_path, shapes_folder, s3_env, slow_s3, bucket
):
    spec = _spec(
        shapes_folder,
        f"s3://{bucket}/run",
        slow_s3.endpoint,
        **{
            "training": {"steps": 4},
            "checkpoints": {"everySteps": 2},
            "validation": {"prompts": ["a red circle"], "everySteps": 2, "inferenceSteps": 2},
            "runPolicy": {"collectiveTimeoutSeconds": 5},
        },
    )
    config = runner.write_config(tmp_path, spec)
    slow_s3.hold(HELD, 8)

    codes, logs = finish(start_nodes(config, tmp_path))

    assert codes == [0, 0], logs
    assert min(end - start for _, start, end in slow_s3.delays.held) >= 8
    assert len(slow_s3.delays.held) == 2  # steps 2 and 4
    keys = {item["Key"] for item in s3_env.client().list_objects_v2(Bucket=bucket)["Contents"]}
    assert {"run/checkpoints/step-00000004/COMPLETE", "run/model/difftrain.json"} <= keys


def test_sigterm_while_sampling_cuts_the_samples_short_not_the_checkpoint(
    tmp_path, shapes_folder, trainer_cache
):
    output = tmp_path / "out"
    prompts = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
    config = runner.write_config(
        tmp_path,
        {
            "dataset": {"uri": f"file://{shapes_folder}"},
            "output": {"uri": f"file://{output}"},
            "training": {"steps": 6},
            "validation": {
                "prompts": prompts,
                "imagesPerPrompt": 16,
                "everySteps": 2,
                "inferenceSteps": 40,
            },
        },
    )
    process = runner.start(config, tmp_path, trainer_cache)
    output_lines = Output(process)
    output_lines.wait_for("step 2/6 ")  # samples are being taken now

    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=120)
    log = output_lines.text()

    assert code == 143, log
    # The signal may come before the first chunk of 16 images starts, or during it.
    cut = re.search(r"samples of step 2 cut short at (\d+) of 64 images: the job is stopping", log)
    assert cut and int(cut[1]) in (0, 16), log
    assert (output / "checkpoints" / "step-00000002" / "COMPLETE").exists()
    if int(cut[1]):
        made = json.loads((output / "samples" / "step-00000002" / "prompts.json").read_text())
        assert len(made) == 16
    else:
        assert not (output / "samples" / "step-00000002").exists()
