"""The trainer's Prometheus metrics: every metric, with its type and labels, scraped from
a live run; and the moving average and checkpoint age they derive."""

import math
import shutil
import signal
import time
import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from difftrain.local import free_port
from difftrain.trainer.telemetry import COUNTERS, GAUGES, Telemetry
from tests.trainer import runner


def _scrape(port: int) -> dict | None:
    """{name: (type, labels, value)} of every difftrain_ metric, or None when unreachable."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    return {
        sample.name.removeprefix("difftrain_"): (family.type, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        if family.name.startswith("difftrain_")
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


def test_a_live_run_serves_every_metric(tmp_path, trainer_cache, shapes_folder):
    data = tmp_path / "data"
    shutil.copytree(shapes_folder, data)
    (data / "images" / "broken.png").write_bytes(b"not a picture")
    port = free_port()
    spec = {
        "dataset": {"uri": f"file://{data}"},
        "output": {"uri": f"file://{tmp_path}/out"},
        "training": {"steps": 200, "batchSize": 4},
        "checkpoints": {"everySteps": 3},
        "validation": {"prompts": ["a red circle"], "imagesPerPrompt": 2, "everySteps": 3,
                       "inferenceSteps": 1},
    }  # fmt: skip
    config = runner.write_config(tmp_path, spec, name="watched")
    process = runner.start(config, tmp_path, trainer_cache, {"DIFFTRAIN_METRICS_PORT": str(port)})
    try:
        deadline, seen = time.monotonic() + 120, None
        while time.monotonic() < deadline and process.poll() is None:
            seen = _scrape(port) or seen
            done = seen and seen["samples_generated_total"][2] >= 2 and seen.get("step")
            if done and seen["step"][2] >= 4 and "last_checkpoint_step" in seen:
                break
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGTERM)
        log, _ = process.communicate(timeout=120)

    assert process.returncode == 143, log  # stopped, with a checkpoint
    assert seen is not None, log
    expected = {name: "gauge" for name in GAUGES}
    expected.update({f"{name}_total": "counter" for name in COUNTERS})
    assert {name: kind for name, (kind, _, _) in seen.items()} == expected
    labels = {"namespace": "default", "job": "watched", "rank": "0"}
    assert all(found_labels == labels for _, found_labels, _ in seen.values())
    value = {name: v for name, (_, _, v) in seen.items()}
    assert value["total_steps"] == 200 and 4 <= value["step"] < 200
    assert value["dataset_images_skipped"] == 1
    assert value["last_checkpoint_step"] % 3 == 0 and value["last_checkpoint_step"] >= 3
    assert 0 <= value["checkpoint_age_seconds"] < 120
    assert 0 < value["device_memory_bytes"] <= value["device_memory_peak_bytes"]
    assert math.isfinite(value["loss"]) and math.isfinite(value["loss_average"])
    assert value["learning_rate"] > 0 and value["images_per_second"] > 0
    assert value["samples_generated_total"] % 2 == 0 and value["eta_seconds"] > 0


def _values(telemetry: Telemetry) -> dict[str, float]:
    text = generate_latest(telemetry.registry).decode()
    return {
        sample.name.removeprefix("difftrain_"): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_loss_average_and_checkpoint_age():
    now = [100.0]
    telemetry = Telemetry("ns", "job", rank=1, clock=lambda: now[0])

    for loss in (1.0, 0.0, 0.0):
        telemetry.update(loss=loss)
    now[0] = 130.0
    first = _values(telemetry)
    telemetry.checkpoint_saved(500)
    now[0] = 135.0
    second = _values(telemetry)

    assert first["loss_average"] == pytest.approx(0.81)  # 1, then 0.9, then 0.81
    assert first["checkpoint_age_seconds"] == 30  # since start: no checkpoint yet
    assert (second["last_checkpoint_step"], second["checkpoint_age_seconds"]) == (500, 5)


def test_a_non_finite_loss_shows_and_the_average_starts_again():
    telemetry = Telemetry("ns", "job")

    telemetry.update(loss=1.0)
    telemetry.update(loss=math.nan)
    broken = _values(telemetry)
    telemetry.update(loss=2.0)

    assert math.isnan(broken["loss"]) and math.isnan(broken["loss_average"])
    assert _values(telemetry)["loss_average"] == 2.0
