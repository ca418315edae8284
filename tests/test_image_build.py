"""`make images` (tests/images/build.py) on a machine without its tools: one line naming
what is missing and how to get it, before anything is built."""

import pytest

from tests.images import build


def test_missing_tools_are_named_before_anything_is_built(monkeypatch):
    monkeypatch.setenv("PATH", "")

    with pytest.raises(build.BuildError) as refused:
        build.images()

    assert str(refused.value) == (
        "no buildah: `make images` installs Debian's buildah, podman, debootstrap and runc"
    )
