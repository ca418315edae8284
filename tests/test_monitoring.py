"""Monitoring end to end: a real Prometheus (Debian's `prometheus` package, which `make
test` installs) scrapes a live training run and the operator's metrics, and evaluates
the chart's alerts; every dashboard query and alert expression is asked of it. promtool
checks the rendered rules and runs their unit tests (tests/alerts_test.yaml)."""

import json
import math
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client import start_http_server

from difftrain.contract import COUNTERS, GAUGES
from difftrain.dashboard import queries
from difftrain.local import free_port
from difftrain.operator.metrics import OperatorMetrics
from tests import evaluators
from tests.test_chart import render
from tests.trainer import runner

ALL_ON = {
    "podMonitor": {"enabled": True},
    "serviceMonitor": {"enabled": True},
    "prometheusRule": {"enabled": True},
    "dashboard": {"enabled": True},
}


def _binary(name: str) -> str:
    found = shutil.which(name)
    assert found, f"no {name} binary: install Debian's prometheus package (`make test` does)"
    return found


def _monitoring(tmp_path: Path, **values) -> dict[str, dict]:
    """The chart's monitoring objects by kind, rendered with ``values`` under monitoring."""
    objects = render(tmp_path, {"monitoring": {**ALL_ON, **values}})
    return {o["kind"]: o for o in objects if o["kind"] != "Deployment"}


def _rules_file(tmp_path: Path, **values) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(_monitoring(tmp_path, **values)["PrometheusRule"]["spec"]))
    return path


def _alerts(rules: Path) -> dict[str, str]:
    return {
        r["alert"]: r["expr"]
        for g in yaml.safe_load(rules.read_text())["groups"]
        for r in g["rules"]
    }


def test_promtool_accepts_the_rules(tmp_path):
    done = subprocess.run(
        [_binary("promtool"), "check", "rules", str(_rules_file(tmp_path))],
        capture_output=True,
        text=True,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 4 rules found" in done.stdout


def test_the_alerts_fire_on_trouble_and_stay_silent_otherwise(tmp_path):
    _rules_file(tmp_path)
    shutil.copy(Path(__file__).parent / "alerts_test.yaml", tmp_path)

    done = subprocess.run(
        [_binary("promtool"), "test", "rules", "alerts_test.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )

    assert done.returncode == 0, done.stdout + done.stderr


def _as_bool(expr: str) -> str:
    """An alert expression whose comparisons return 0 or 1 instead of filtering: it has
    data exactly when the series and label matches behind the alert exist."""
    parts = re.split(r"(\{[^}]*\})", expr)  # leave label matchers alone
    return "".join(
        part if part.startswith("{") else re.sub(r"(==|!=|>=|<=|>|<)", r"\1 bool", part)
        for part in parts
    )


class Prometheus:
    """A Prometheus server on 127.0.0.1 with its own data folder."""

    def __init__(self, folder: Path, config: dict):
        self.port = free_port()
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.process = subprocess.Popen(
            [
                _binary("prometheus"),
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(folder / "prometheus.log").open("w"),
        )
        try:
            self.wait(lambda: self._get("/-/ready", raw=True), 60, "Prometheus to be ready")
        except AssertionError:
            self.stop()
            raise

    def _get(self, path: str, raw: bool = False, **params):
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = response.read().decode()
        except OSError:
            return None
        return body if raw else json.loads(body)

    def api(self, path: str, **params):
        answer = self._get(f"/api/v1/{path}", **params)
        assert answer and answer["status"] == "success", (path, params, answer)
        return answer["data"]

    def query(self, promql: str) -> list[dict]:
        return self.api("query", query=promql)["result"]

    def wait(self, found, seconds: float, what: str):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"Prometheus exited with {self.process.returncode}")
            if value := found():
                return value
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture
def operator_metrics():
    """The operator's metrics, served as the operator serves them, for two jobs: the
    trained one, restarted once, and one that failed."""
    metrics = OperatorMetrics()
    metrics.observe("default", "watched", {"phase": "Running", "restarts": 1})
    failed = {"type": "Failed", "status": "True", "reason": "DatasetError"}
    metrics.observe("default", "broken", {"phase": "Failed", "conditions": [failed]})
    metrics.restarts.inc()
    metrics.failures.labels(reason="DatasetError").inc()
    metrics.reconcile_seconds.observe(0.01)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
    yield port
    server.shutdown()
    thread.join(timeout=5)


def test_prometheus_scrapes_a_live_run_and_every_query_has_data(
    tmp_path, trainer_cache, shapes_folder, operator_metrics, inception, clip_folder
):
    data = tmp_path / "data"
    shutil.copytree(shapes_folder, data)
    (data / "images" / "broken.png").write_bytes(b"not a picture")
    port = free_port()
    spec = {
        "dataset": {"uri": f"file://{data}"},
        "output": {"uri": f"file://{tmp_path}/out"},
        "training": {"steps": 2000, "batchSize": 4},
        "checkpoints": {"everySteps": 3},
        "validation": {
            "prompts": ["a red circle"],
            "imagesPerPrompt": 2,
            "everySteps": 3,
            "inferenceSteps": 1,
        },
        "evaluation": evaluators.all_scores(
            shapes_folder,
            inception,
            clip_folder,
            prompts=[],  # the dataset's captions
            everySteps=3,
            numImages=2,
            inferenceSteps=1,
            validationLoss={"fraction": 0.1, "timesteps": 1},
        ),
    }
    config = runner.write_config(tmp_path, spec, name="watched")
    # The chart's rules with a short stall window, so that its `offset` finds data.
    rules = _rules_file(
        tmp_path, prometheusRule={"enabled": True, "trainingStalled": {"after": "5s"}}
    )
    dashboard = json.loads(_monitoring(tmp_path)["ConfigMap"]["data"]["difftrain.json"])
    # As the chart's PodMonitor and ServiceMonitor: honorLabels keeps the job's labels.
    prometheus = Prometheus(
        tmp_path,
        {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [
                {
                    "job_name": "trainers",
                    "honor_labels": True,
                    "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
                },
                {
                    "job_name": "operator",
                    "honor_labels": True,
                    "static_configs": [{"targets": [f"127.0.0.1:{operator_metrics}"]}],
                },
            ],
        },
    )
    process = runner.start(config, tmp_path, trainer_cache, {"DIFFTRAIN_METRICS_PORT": str(port)})
    try:
        prometheus.wait(
            lambda: prometheus.query(
                "difftrain_samples_generated_total >= 2 and on() difftrain_step >= 4"
                " and on() difftrain_last_checkpoint_step >= 3"
            ),
            180,
            "the run to step, checkpoint and sample in Prometheus",
        )
        # The operator is a target of its own, scraped on its own schedule: its metadata
        # may come a scrape after the trainer's series.
        prometheus.wait(
            lambda: "difftrain_operator_jobs" in prometheus.api("metadata"),
            60,
            "the operator's metrics in Prometheus",
        )
        series = {
            s["metric"]["__name__"]: s for s in prometheus.query('{__name__=~"difftrain_.*"}')
        }
        metadata = prometheus.api("metadata")
        panels = {}
        for title, expr in _dashboard_queries(dashboard):
            panels[title, expr] = prometheus.query(expr)
        namespaces = prometheus.api("label/namespace/values", **{"match[]": "difftrain_step"})
        jobs = prometheus.api(
            "label/job/values", **{"match[]": 'difftrain_step{namespace="default"}'}
        )
        alerts = _alerts(rules)
        for name, expr in alerts.items():  # each fails the test when it finds no data
            prometheus.wait(lambda e=expr: prometheus.query(_as_bool(e)), 30, f"data for {name}")
        prometheus.wait(
            lambda: {a["labels"]["alertname"] for a in prometheus.api("alerts")["alerts"]},
            30,
            "an alert",
        )
        groups = prometheus.api("rules")["groups"]
        firing = prometheus.api("alerts")["alerts"]
    finally:
        process.send_signal(signal.SIGTERM)
        log, _ = process.communicate(timeout=120)
        prometheus.stop()

    assert process.returncode == 143, log  # stopped, with a checkpoint
    trainer = {f"difftrain_{n}": "gauge" for n in GAUGES}
    trainer.update({f"difftrain_{n}_total": "counter" for n in COUNTERS})
    for name, kind in trainer.items():
        labels = {
            k: v for k, v in series[name]["metric"].items() if k not in ("__name__", "instance")
        }
        assert labels == {"namespace": "default", "job": "watched", "rank": "0"}, name
        family = name.removesuffix("_total") if kind == "counter" else name
        assert metadata[family][0]["type"] == kind, name
    value = {name: float(s["value"][1]) for name, s in series.items()}
    assert value["difftrain_total_steps"] == 2000 and value["difftrain_step"] >= 4
    assert value["difftrain_dataset_images_skipped"] == 1
    assert value["difftrain_last_checkpoint_step"] % 3 == 0
    assert 0 <= value["difftrain_checkpoint_age_seconds"] < 180
    assert 0 < value["difftrain_device_memory_bytes"] <= value["difftrain_device_memory_peak_bytes"]
    assert math.isfinite(value["difftrain_loss"]) and math.isfinite(value["difftrain_loss_average"])
    assert value["difftrain_learning_rate"] > 0 and value["difftrain_images_per_second"] > 0
    assert (
        value["difftrain_samples_generated_total"] % 2 == 0 and value["difftrain_eta_seconds"] > 0
    )
    assert value["difftrain_last_evaluation_step"] % 3 == 0
    assert value["difftrain_eval_fid"] > 0 and 0 <= value["difftrain_eval_clip_score"] <= 100
    assert math.isfinite(value["difftrain_validation_loss"])
    assert 0 <= time.time() - value["difftrain_last_evaluation_timestamp_seconds"] < 600
    operator = {
        "difftrain_operator_jobs": ("gauge", {"namespace", "phase"}),
        "difftrain_operator_job_restarts": ("gauge", {"namespace", "job"}),
        "difftrain_operator_job_preemptions": ("gauge", {"namespace", "job"}),
        "difftrain_operator_job_failed": ("gauge", {"namespace", "job", "reason"}),
        "difftrain_operator_reconcile_duration_seconds": ("histogram", set()),
        "difftrain_operator_restarts": ("counter", set()),
        "difftrain_operator_preemptions": ("counter", set()),
        "difftrain_operator_failures": ("counter", {"reason"}),
    }
    for name, (kind, labels) in operator.items():
        assert metadata[name][0]["type"] == kind, name
        found = series.get(name) or series.get(f"{name}_total") or series[f"{name}_count"]
        own = {k for k, v in found["metric"].items() if (k, v) != ("job", "operator")}
        assert own - {"__name__", "instance"} == labels, name  # job="operator": the target's

    assert [key for key, result in panels.items() if not result] == []
    assert "default" in namespaces and "watched" in jobs
    assert all(r["health"] == "ok" for g in groups for r in g["rules"]), groups
    # The run is healthy (TrainingStalled, with its 5-second window, may catch a pause).
    active = {(a["labels"]["alertname"], a["labels"]["job"], a["state"]) for a in firing}
    assert ("JobFailed", "broken", "firing") in active
    assert {name for name, _, _ in active} <= {"JobFailed", "TrainingStalled"}


def _dashboard_queries(model: dict) -> list[tuple[str, str]]:
    """Every panel's PromQL, with the variables set to the live job."""
    return [
        (title, expr.replace("$namespace", "default").replace("$job", "watched"))
        for title, expr in queries(model)
    ]
