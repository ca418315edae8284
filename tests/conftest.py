import pytest
import yaml


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
