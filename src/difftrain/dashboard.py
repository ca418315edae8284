"""The Grafana dashboard of training jobs, as Grafana's JSON model.

``difftrain dashboard`` prints it (to import by hand); ``make generate`` writes the
chart's copy, which the chart puts in a ConfigMap for Grafana's dashboard sidecar. The
variables pick namespaces and jobs by the series' own ``namespace`` and ``job`` labels;
trainer panels read rank 0 (the whole job's view), except memory, which is per node.
"""

import json

UID = "difftrain-jobs"
DASHBOARD_PATH = "helm/difftrain/dashboards/difftrain.json"
TRAINER = 'namespace=~"$namespace", job=~"$job"'
MAIN = f'{TRAINER}, rank="0"'
WHO = "{{namespace}}/{{job}}"


def _job(name: str, legend: str = WHO) -> tuple[str, str]:
    """The job's series of trainer metric ``name`` (its main process's) and its legend."""
    return f"difftrain_{name}{{{MAIN}}}", legend


def _ranks(name: str, legend: str) -> tuple[str, str]:
    """Every process's series of ``name``."""
    return f"difftrain_{name}{{{TRAINER}}}", legend


PROGRESS = f"100 * {_job('step')[0]} / {_job('total_steps')[0]}"
PHASES = 'sum by (phase) (difftrain_operator_jobs{namespace=~"$namespace"})'
RANK = f"{WHO} rank {{{{rank}}}}"

# (title, panel type, unit, [(PromQL, legend)], width, height); rows fill 24 columns.
PANELS = [
    ("Progress", "bargauge", "percent", [(PROGRESS, WHO)], 8, 6),
    ("Time left", "stat", "s", [_job("eta_seconds")], 8, 6),
    ("Jobs by phase", "stat", "short", [(PHASES, "{{phase}}")], 8, 6),
    ("Loss", "timeseries", "short", [_job("loss"), _job("loss_average", f"{WHO} average")], 12, 8),
    ("Learning rate", "timeseries", "short", [_job("learning_rate")], 12, 8),
    ("Images per second", "timeseries", "short", [_job("images_per_second")], 12, 8),
    ("Seconds per step", "timeseries", "s", [_job("seconds_per_step")], 12, 8),
    (
        "Device memory",
        "timeseries",
        "bytes",
        [_ranks("device_memory_bytes", RANK), _ranks("device_memory_peak_bytes", f"{RANK} peak")],
        12,
        8,
    ),
    (
        "Restarts and preemptions",
        "timeseries",
        "short",
        [
            _ranks("operator_job_restarts", f"{WHO} restarts"),
            _ranks("operator_job_preemptions", f"{WHO} preemptions"),
        ],
        12,
        8,
    ),
    ("Checkpoint age", "timeseries", "s", [_job("checkpoint_age_seconds")], 8, 8),
    ("Validation samples", "timeseries", "short", [_job("samples_generated_total")], 8, 8),
    ("Dataset images skipped", "timeseries", "short", [_job("dataset_images_skipped")], 8, 8),
    ("FID (lower is better)", "timeseries", "short", [_job("eval_fid")], 8, 8),
    ("CLIP score (higher is better)", "timeseries", "short", [_job("eval_clip_score")], 8, 8),
    ("Validation loss", "timeseries", "short", [_job("validation_loss")], 8, 8),
]


def _variable(name: str, label: str, query: str) -> dict:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": name},
        "definition": query,
        "refresh": 2,  # on time range change
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def _panels() -> list[dict]:
    panels, x, y, row_height = [], 0, 0, 0
    for number, (title, kind, unit, queries, width, height) in enumerate(PANELS, 1):
        if x + width > 24:
            x, y, row_height = 0, y + row_height, 0
        panel = {
            "id": number,
            "title": title,
            "type": kind,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"x": x, "y": y, "w": width, "h": height},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
            "targets": [
                {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
                for i, (expr, legend) in enumerate(queries)
            ],
        }
        if kind in ("stat", "bargauge"):
            panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"]}}
        if kind == "bargauge":
            panel["fieldConfig"]["defaults"].update(min=0, max=100)
        panels.append(panel)
        x, row_height = x + width, max(row_height, height)
    return panels


def dashboard() -> dict:
    """The dashboard's JSON model."""
    return {
        "uid": UID,
        "title": "difftrain: training jobs",
        "tags": ["difftrain"],
        "editable": True,
        "schemaVersion": 39,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                },
                _variable("namespace", "Namespace", "label_values(difftrain_step, namespace)"),
                _variable(
                    "job", "Job", 'label_values(difftrain_step{namespace=~"$namespace"}, job)'
                ),
            ]
        },
        "panels": _panels(),
    }


def queries(model: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target of a dashboard model."""
    return [(p["title"], t["expr"]) for p in model["panels"] for t in p["targets"]]


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"
