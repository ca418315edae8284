"""URI fields: which schemes each field accepts, and their checks.

One table serves both the Python check (with a message that names the fix) and the
CRD ``pattern`` (so ``kubectl apply`` rejects the same strings).
"""

import re
from typing import Annotated

from pydantic import AfterValidator, WithJsonSchema

PRESETS = ("tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux")
BUILTIN_DATASETS = ("shapes", "shapes-large")

# scheme -> (regular expression for the whole URI, an example to show in errors).
# The expressions use only syntax that Go's regexp (the API server) and Python's re agree on.
_SCHEMES: dict[str, tuple[str, str]] = {
    "s3": (r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?", "s3://my-bucket/path/to/prefix"),
    "hf": (r"hf://[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*", "hf://org/model-name"),
    "file": (r"file://.+", "file:///data/my-dataset"),
    "http": (r"http://[^/\s]+(/\S*)?", "http://mlflow.mlflow.svc:5000"),
    "https": (r"https://[^/\s]+(/\S*)?", "https://mlflow.example.com"),
    "preset": ("preset:(" + "|".join(PRESETS) + ")", "preset:tiny-sd"),
    "builtin": ("builtin:(" + "|".join(BUILTIN_DATASETS) + ")", "builtin:shapes"),
}
_OPAQUE = {"preset", "builtin"}  # written scheme:name, without "//"
MAX_URI_LENGTH = 1024


def _prefix(scheme: str) -> str:
    return f"{scheme}:" if scheme in _OPAQUE else f"{scheme}://"


def uri_pattern(schemes: tuple[str, ...]) -> str:
    """The anchored regular expression accepting any URI of ``schemes``."""
    return "^(" + "|".join(_SCHEMES[s][0] for s in schemes) + ")$"


def check_uri(value: str, schemes: tuple[str, ...]) -> str:
    """Return ``value`` if it is a well-formed URI of one of ``schemes``; else raise ValueError."""
    if len(value) > MAX_URI_LENGTH:
        raise ValueError(f"must be at most {MAX_URI_LENGTH} characters")
    scheme = value.split(":", 1)[0] if ":" in value else ""
    if scheme not in schemes:
        allowed = ", ".join(_prefix(s) for s in schemes)
        got = f"scheme '{scheme}'" if scheme else "no scheme"
        raise ValueError(f"{got} is not supported here; use one of {allowed} (got '{value}')")
    expression, example = _SCHEMES[scheme]
    if not re.fullmatch(expression, value):
        if scheme == "preset":
            raise ValueError(f"unknown preset '{value}'; known presets: {', '.join(PRESETS)}")
        if scheme == "builtin":
            names = ", ".join(BUILTIN_DATASETS)
            raise ValueError(f"unknown built-in dataset '{value}'; known: {names}")
        raise ValueError(f"'{value}' is not a valid {scheme} URI; expected e.g. {example}")
    return value


def Uri(*schemes: str):  # named like a type: it is used as one in annotations
    """A string field holding a URI of one of ``schemes``."""
    unknown = set(schemes) - set(_SCHEMES)
    assert not unknown, f"unknown URI schemes {unknown}"
    return Annotated[
        str,
        AfterValidator(lambda value: check_uri(value, schemes)),
        WithJsonSchema(
            {"type": "string", "pattern": uri_pattern(schemes), "maxLength": MAX_URI_LENGTH}
        ),
    ]
