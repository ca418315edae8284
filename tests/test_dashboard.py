"""The Grafana dashboard's model: the panels users look for, laid out without overlap,
every query filtered by the namespace and job variables. Prometheus answers each query
against a live run in tests/test_monitoring.py."""

import json

from difftrain.cli import main
from difftrain.dashboard import dashboard, queries


def test_the_panels_users_look_for():
    titles = [panel["title"] for panel in dashboard()["panels"]]

    for wanted in (
        "Loss",
        "Learning rate",
        "Images per second",
        "Time left",
        "Device memory",
        "Progress",
        "Jobs by phase",
        "Restarts and preemptions",
    ):
        assert wanted in titles


def test_every_query_follows_the_variables():
    model = dashboard()
    variables = {v["name"]: v for v in model["templating"]["list"]}

    assert variables["datasource"]["query"] == "prometheus"
    assert "$namespace" in variables["job"]["query"]["query"]
    for title, expr in queries(model):
        assert 'namespace=~"$namespace"' in expr, title
        if title != "Jobs by phase":  # counted by namespace, not per job
            assert 'job=~"$job"' in expr, title
    assert all(p["datasource"]["uid"] == "${datasource}" for p in model["panels"])


def test_panels_fit_the_grid_without_overlap():
    panels = dashboard()["panels"]
    cells = [
        (p["gridPos"]["x"] + dx, p["gridPos"]["y"] + dy)
        for p in panels
        for dx in range(p["gridPos"]["w"])
        for dy in range(p["gridPos"]["h"])
    ]

    assert len(cells) == len(set(cells))
    assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in panels)
    assert len({p["id"] for p in panels}) == len(panels)


def test_the_command_prints_it(capsys):
    assert main(["dashboard", "--output", "-"]) == 0

    assert json.loads(capsys.readouterr().out) == dashboard()
