import hashlib
import os
from pathlib import Path

import pytest
import yaml

from difftrain.storage import S3Settings, open_store
from tests import quickstart_run
from tests.s3server import start_s3_server

QUICKSTART = pytest.StashKey[quickstart_run.QuickstartRun]()


@pytest.fixture
def write_manifest(tmp_path):
    """Write a manifest (a dict, a list of dicts, or raw YAML text) and return its path."""

    def write(content, name="job.yaml"):
        path = tmp_path / name
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            text = yaml.safe_dump_all(content, sort_keys=False)
        else:
            text = yaml.safe_dump(content, sort_keys=False)
        path.write_text(text)
        return path

    return write


@pytest.fixture(scope="session", autouse=True)
def _no_cloud_metadata():
    """boto3 must never look for instance credentials off this machine."""
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    os.environ.setdefault("AWS_CONFIG_FILE", os.devnull)
    os.environ.setdefault("AWS_SHARED_CREDENTIALS_FILE", os.devnull)


@pytest.fixture(scope="session")
def s3_server():
    server = start_s3_server()
    yield server
    server.process.terminate()
    server.process.wait(timeout=10)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Admin credentials and the endpoint in the environment, as the operator sets them."""
    for name, value in s3_server.admin.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    return s3_server


@pytest.fixture
def bucket(s3_server, request):
    """A fresh bucket named after the test."""
    name = "t-" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:20]
    return s3_server.create_bucket(name)


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    """A store rooted at ``root/`` in a local folder, and in a bucket of the S3 server."""
    if request.param == "file":
        return open_store(f"file://{tmp_path}/root")
    server = request.getfixturevalue("s3_env")
    bucket = request.getfixturevalue("bucket")
    return open_store(f"s3://{bucket}/root", S3Settings(endpoint=server.endpoint))


@pytest.fixture(scope="session")
def trainer_cache(tmp_path_factory):
    """One node-local trainer cache for the session: presets are built once."""
    return tmp_path_factory.mktemp("trainer-cache")


@pytest.fixture(scope="session")
def shapes_folder(tmp_path_factory):
    """A small shapes dataset on disk (images/ + captions/)."""
    from difftrain.shapes import write_dataset

    return write_dataset(tmp_path_factory.mktemp("shapes"), count=32, size=32)


@pytest.fixture(scope="session")
def inception(tmp_path_factory):
    """An InceptionV3 weights file (random weights) as FID's users provide one."""
    from tests import evaluators

    return evaluators.write_inception(tmp_path_factory.mktemp("inception") / "inception.pth")


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory):
    """A tiny CLIP model folder as the CLIP score's users provide one."""
    from tests import evaluators

    return evaluators.write_clip(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="session")
def two_runs(tmp_path_factory, shapes_folder, clip_folder, trainer_cache):
    """Two finished LoRA runs on the tiny SD preset that differ in their learning rate."""
    from tests import runs

    folder = tmp_path_factory.mktemp("runs")
    first = runs.train_lora(folder / "a", shapes_folder, clip_folder, trainer_cache, 1e-3)
    second = runs.train_lora(folder / "b", shapes_folder, clip_folder, trainer_cache, 3e-3)
    return first, second


def pytest_addoption(parser):
    parser.addoption(
        "--update-golden", action="store_true", help="rewrite golden files instead of comparing"
    )


@pytest.fixture
def golden(request):
    """Compare text with tests/golden/NAME, or rewrite it with --update-golden."""
    update = request.config.getoption("--update-golden")

    def check(name: str, text: str, same=str.__eq__) -> None:
        """``same(text, recorded)`` says whether they agree (equal text by default)."""
        path = Path(__file__).parent / "golden" / name
        if update:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        assert path.exists(), f"no golden file {path}; run pytest --update-golden"
        recorded = path.read_text()
        assert same(text, recorded), (
            f"{name} changed; review, then pytest --update-golden\n"
            f"now:\n{text}recorded:\n{recorded}"
        )

    return check


def pytest_collection_modifyitems(config, items):
    """The tests of the quickstart's model run last, and its training starts now, in the
    background (tests/quickstart_run.py); the tests that mostly wait (marked ``waits``) run
    first, so that it takes the CPU they leave."""
    late = [item for item in items if "shapes_model" in item.fixturenames]
    if not late or config.option.collectonly:
        return
    early = [item for item in items if item.get_closest_marker("waits") and item not in late]
    rest = [item for item in items if item not in late and item not in early]
    items[:] = early + rest + late
    config.stash[QUICKSTART] = quickstart_run.start()


def pytest_sessionfinish(session):
    run = session.config.stash.get(QUICKSTART, None)
    if run is not None:
        run.stop()


@pytest.fixture(scope="session")
def shapes_model(request):
    """The quickstart's output folder (tests/quickstart_run.py)."""
    run = request.config.stash.get(QUICKSTART, None)
    if run is None:
        run = request.config.stash[QUICKSTART] = quickstart_run.start()
    return run.result()
