"""docs/api.md is generated from the models and kept current."""

from pathlib import Path

from difftrain.api.crd import openapi_schema
from difftrain.api.reference import REFERENCE_PATH, render_reference
from difftrain.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_committed_reference_is_current():
    assert (ROOT / REFERENCE_PATH).read_text() == render_reference(), "run `make generate`"


def test_reference_documents_every_group_and_field():
    text = render_reference()

    def walk(node, path):
        for name, child in node.get("properties", {}).items():
            assert f"| `{name}`" in text, f"{path}.{name} missing from the reference"
            walk(child.get("items", child), f"{path}.{name}")
            if "properties" in child.get("items", child):
                assert f"## `{path}.{name}" in text

    walk(openapi_schema()["properties"]["spec"], "spec")


def test_reference_shows_types_defaults_and_rules():
    text = render_reference()

    assert "| `rank` | integer (≥ 1, ≤ 1024) | `16` | Rank of each adapter's two factors. |" in text
    assert "| `learningRate` | number (> 0, ≤ 10) | `0.0001` | Peak learning rate. |" in text
    assert "- spec.training: set exactly one of steps and epochs" in text
    assert "- spec.runPolicy.maxRestarts is immutable" in text


def test_reference_command_writes_the_file(tmp_path):
    target = tmp_path / "api.md"

    assert main(["reference", "-o", str(target)]) == 0

    assert target.read_text() == render_reference()
