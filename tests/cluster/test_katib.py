"""Sweeps on Katib: examples/katib-sweep.yaml against Katib's own API (its OpenAPI from its
Go module, made strict, and its CRDs on the real API server), every trial its template
can make a job that validates, and the trainer's metrics file read by Katib's own File
metrics collector parser, built from its Go module."""

import copy
import json
import re
import subprocess

import jsonschema
import pytest
import yaml

from difftrain.api.validation import validate_job
from tests import examples
from tests.cluster.build import binaries
from tests.trainer import runner

SWEEP = examples.FOLDER / "katib-sweep.yaml"
TRIAL_NAME = "sd15-lora-sweep-7d9c2x"


def _documents() -> tuple[dict, dict]:
    experiment, template = [d for d in yaml.safe_load_all(SWEEP.read_text()) if d]
    return experiment, template


def _strict(schema):
    """Katib's definitions with no room for unknown fields (Katib's Go decoding would drop
    a misspelt field without a word); Kubernetes' own types, which its OpenAPI leaves
    out, as free objects."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    if out.get("type") == "object" and "properties" in out:
        out.setdefault("additionalProperties", False)
    return out


def _experiment_schema() -> dict:
    swagger = json.loads((binaries(build=False).katib_api / "swagger.json").read_text())
    definitions = _strict(swagger["definitions"])
    text = json.dumps(definitions)
    for missing in set(re.findall(r'"#/definitions/([^"]+)"', text)) - definitions.keys():
        definitions[missing] = {"type": "object"}
    return {"$ref": "#/definitions/v1beta1.Experiment", "definitions": definitions}


def test_the_experiment_is_what_katibs_api_reads():
    experiment, _ = _documents()
    schema = _experiment_schema()

    jsonschema.Draft4Validator(schema).validate(experiment)
    misspelt = copy.deepcopy(experiment)
    labels = misspelt["spec"]["trialTemplate"].pop("primaryPodLabels")
    misspelt["spec"]["trialTemplate"]["primaryPodLabel"] = labels
    with pytest.raises(jsonschema.ValidationError, match="primaryPodLabel"):
        jsonschema.Draft4Validator(schema).validate(misspelt)


def test_the_experiment_and_its_template_apply_with_katibs_crds(control_plane):
    crds = binaries(build=False).katib_api / "crds"
    for crd in ("experiment.yaml", "trial.yaml", "suggestion.yaml"):
        control_plane.kubectl("apply", "--server-side", "-f", str(crds / crd))
    control_plane.kubectl(
        "wait", "--for=condition=Established", "crd/experiments.kubeflow.org", "--timeout=60s"
    )
    control_plane.kubectl("create", "namespace", "ml-team", check=False)

    result = control_plane.kubectl("apply", "--dry-run=server", "-f", str(SWEEP), check=False)

    assert result.returncode == 0, result.stderr
    assert "experiment.kubeflow.org/sd15-lora-sweep created (server dry run)" in result.stdout


def _values(parameter: dict) -> list[str]:
    """The values a suggestion can give ``parameter``: its bounds, or each of its list."""
    space = parameter["feasibleSpace"]
    return space.get("list") or [space["min"], space["max"]]


def _trial(template: str, trial_parameters: list[dict], chosen: dict[str, str]) -> dict:
    """The trial's job as Katib makes it: the template's text filled in, then read."""
    text = template
    for parameter in trial_parameters:
        reference = parameter["reference"]
        value = TRIAL_NAME if reference == "${trialSpec.Name}" else chosen[reference]
        placeholder = "${trialParameters." + parameter["name"] + "}"
        text = text.replace(placeholder, value)
    manifest = yaml.safe_load(text)
    manifest["metadata"] = {"name": TRIAL_NAME, "namespace": "ml-team"}
    return manifest


def test_every_trial_the_template_makes_is_a_valid_job():
    experiment, config_map = _documents()
    spec = experiment["spec"]
    trial_template = spec["trialTemplate"]
    template = config_map["data"][trial_template["configMap"]["templatePath"]]
    parameters = spec["parameters"]

    trials = []
    for parameter in parameters:  # each value of each parameter, the others at their first
        for value in _values(parameter):
            chosen = {p["name"]: _values(p)[0] for p in parameters}
            chosen[parameter["name"]] = value
            trials.append(_trial(template, trial_template["trialParameters"], chosen))

    assert len(trials) == 7
    for manifest in trials:
        job, problems = validate_job(manifest)
        assert problems == [], manifest
        assert job.spec.output.uri.endswith(f"/{TRIAL_NAME}")
        assert (
            job.spec.output.metrics_file
            == (spec["metricsCollectorSpec"]["source"]["fileSystemPath"]["path"])
        )
    ranks = {t["spec"]["lora"]["rank"] for t in trials}
    assert ranks == {8, 16, 32}  # numbers, as the API wants them


def _collected(path, *metrics: str) -> list[dict]:
    answer = subprocess.run(
        [str(binaries(build=False).katib_metrics), str(path), "JSON", *metrics],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert answer.returncode == 0, answer.stderr
    return json.loads(answer.stdout)["metric_logs"]


def test_katibs_collector_reads_the_trainers_metrics_file(tmp_path, trainer_cache, shapes_folder):
    metrics_file = tmp_path / "katib" / "metrics.log"
    spec = {
        "dataset": {"uri": f"file://{shapes_folder}"},
        "output": {"uri": f"file://{tmp_path}/out", "metricsFile": str(metrics_file)},
        "training": {"steps": 4},
        "evaluation": {
            "everySteps": 2,
            "numImages": 1,
            "inferenceSteps": 1,
            "validationLoss": {"fraction": 0.125, "timesteps": 2},
        },
    }
    config = runner.write_config(tmp_path, spec)

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 0, log
    logs = _collected(metrics_file, "validation_loss", "loss")
    found = {}
    for entry in logs:
        found.setdefault(entry["metric"]["name"], []).append(float(entry["metric"]["value"]))
        assert entry["time_stamp"].startswith("20")  # parsed, not Katib's zero time
    assert len(found["validation_loss"]) == 2  # steps 2 and 4
    assert len(found["loss"]) == 4
    scores = [
        json.loads(line)["evaluation"]["validationLoss"]
        for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
        if "evaluation" in line
    ]
    assert found["validation_loss"] == pytest.approx(scores)


def test_a_metrics_file_the_pod_cannot_write_fails_before_training(tmp_path, trainer_cache):
    spec = {"output": {"uri": f"file://{tmp_path}/out", "metricsFile": "/proc/katib/metrics.log"}}
    config = runner.write_config(tmp_path, spec)

    code, log = runner.run(config, tmp_path, trainer_cache)

    assert code == 2, log
    said = json.loads((tmp_path / "termination-log").read_text())
    assert said["message"].startswith(
        "spec.output.metricsFile: cannot write /proc/katib/metrics.log ("
    )
    assert "step 1/" not in log
