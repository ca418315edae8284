"""Spec strings never reach a shell: a hostile prompt, run as the pods run it, stays a
literal string. (Secrets are checked where they are used: test_builders for the pods and
ConfigMap, test_train_lora and test_trainer_bad_input for logs and S3 outputs.)"""

import ast
import json
from pathlib import Path

import yaml

from difftrain.cli import main
from tests.builders import job

SOURCE = Path(__file__).resolve().parents[1] / "src" / "difftrain"
# Calls that hand a string to a shell.
SHELL_CALLS = {"system", "popen", "getoutput", "getstatusoutput"}


def _shell_uses(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        name = getattr(node.func, "attr", getattr(node.func, "id", ""))
        if name in SHELL_CALLS:
            found.append(f"{path.name}:{node.lineno}: {name}()")
        for keyword in node.keywords:
            if keyword.arg == "shell" and not (
                isinstance(keyword.value, ast.Constant) and keyword.value.value is False
            ):
                found.append(f"{path.name}:{node.lineno}: shell=")
    return found


def test_no_code_hands_a_string_to_a_shell():
    found = [use for path in sorted(SOURCE.rglob("*.py")) for use in _shell_uses(path)]

    assert found == []


def test_the_check_finds_a_shell(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os, subprocess\nos.system('x')\nsubprocess.run('x', shell=True)\n")

    assert _shell_uses(bad) == ["bad.py:2: system()", "bad.py:3: shell="]


def test_a_hostile_prompt_stays_literal_through_a_run(tmp_path, shapes_folder):
    marker = tmp_path / "pwned"
    hostile = f"$(touch {marker}) `touch {marker}`; touch {marker} && echo"
    manifest = job(
        {"metadata": {"name": "hostile"}},
        spec={
            "dataset": {"uri": f"file://{shapes_folder}"},
            "training": {"steps": 1, "batchSize": 2, "mixedPrecision": "no"},
            "validation": {"prompts": [hostile], "everySteps": 1, "inferenceSteps": 1},
            "output": {"uri": f"file://{tmp_path}/out"},
            "resources": {"gpusPerNode": 0},
        },
    )
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(manifest))

    code = main(["run", str(tmp_path / "job.yaml"), "--workdir", str(tmp_path / "work")])

    assert code == 0
    assert not marker.exists()
    index = json.loads(
        (tmp_path / "out" / "samples" / "step-00000001" / "prompts.json").read_text()
    )
    assert [entry["prompt"] for entry in index] == [hostile]
