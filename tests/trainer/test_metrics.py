"""The moving average and checkpoint age of the trainer's metrics. A live run's metrics,
with their types and labels, are scraped by a real Prometheus in tests/test_monitoring.py."""

import math

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from difftrain.trainer.records import Progress, pauses_left
from difftrain.trainer.telemetry import Telemetry


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


def test_an_evaluation_shows_its_scores_step_and_time():
    telemetry = Telemetry("ns", "job")
    progress = Progress(telemetry, offset=500, total=1500)  # after an autoencoder stage

    progress.evaluated({"step": 300, "validationLoss": 0.5, "time": "2026-12-07T01:17:32+00:00"})

    values = _values(telemetry)
    assert (values["last_evaluation_step"], values["validation_loss"]) == (300, 0.5)
    assert values["last_evaluation_timestamp_seconds"] == 1796606252
    assert "eval_fid" not in values  # not asked for: no series at all


def test_a_non_finite_loss_shows_and_the_average_starts_again():
    telemetry = Telemetry("ns", "job")

    telemetry.update(loss=1.0)
    telemetry.update(loss=math.nan)
    broken = _values(telemetry)
    telemetry.update(loss=2.0)

    assert math.isnan(broken["loss"]) and math.isnan(broken["loss_average"])
    assert _values(telemetry)["loss_average"] == 2.0


@pytest.mark.parametrize(
    ("step", "last", "every", "left"),
    [
        (0, 10, 5, 2),  # at 5 and 10
        (5, 10, 5, 1),
        (10, 10, 5, 0),
        (0, 12, 5, 3),  # at 5, 10, and the end (12)
        (11, 12, 5, 1),  # the end
        (12, 12, 5, 0),
        (0, 3, 500, 1),  # only the end
    ],
)
def test_pauses_left_count_the_periodic_ones_and_the_end(step, last, every, left):
    assert pauses_left(step, last, every) == left
