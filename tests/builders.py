"""Builders for test manifests: a small valid job, changed by deep-merged patches."""

import copy
from typing import Any

DELETE = object()  # a patch value that removes the key


def merge(base: dict, patch: dict) -> dict:
    """``base`` with ``patch`` merged in, recursively; ``DELETE`` removes a key."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is DELETE:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


MINIMAL_JOB: dict[str, Any] = {
    "apiVersion": "difftrain.io/v1alpha1",
    "kind": "DiffusionTrainingJob",
    "metadata": {"name": "demo"},
    "spec": {
        "method": "lora",
        "model": {"base": "preset:tiny-sd"},
        "dataset": {"uri": "builtin:shapes", "resolution": 32},
        "training": {"steps": 10},
        "output": {"uri": "file://out/demo"},
    },
}


def job(patch: dict | None = None, *, spec: dict | None = None) -> dict:
    """A valid minimal manifest, with ``patch`` merged at the top and ``spec`` into spec."""
    manifest = merge(MINIMAL_JOB, patch or {})
    return merge(manifest, {"spec": spec}) if spec else manifest
