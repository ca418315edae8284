"""The base model every API object derives from, and the cross-field problem type."""

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel


class ApiModel(BaseModel):
    """A spec object: camelCase in YAML, unknown fields rejected, no type coercion.

    ``strict`` mirrors the API server: a string "5" is not an integer there either.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        strict=True,
    )


class StatusModel(BaseModel):
    """A status object written by the operator: camelCase, lax parsing of timestamps."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class SpecProblems(ValueError):
    """Cross-field problems found by one model's validator.

    Each problem is ``(relative_path, message)``; the path is relative to the model
    that found it (an empty tuple for the model itself), so that error reports can
    name the exact field, e.g. ``spec.training.steps``.
    """

    def __init__(self, problems: list[tuple[tuple[str, ...], str]]):
        self.problems = problems
        super().__init__("; ".join(_join(path, message) for path, message in problems))


def _join(path: tuple[str | int, ...], message: str) -> str:
    text = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path)
    return f"{text.lstrip('.')}: {message}" if path else message


def raise_problems(problems: list[tuple[tuple[str, ...], str]]) -> None:
    """Raise :class:`SpecProblems` when ``problems`` is not empty."""
    if problems:
        raise SpecProblems(problems)


def section(model: type[BaseModel], description: str):
    """A nested group that may be left out of the manifest: it then takes its defaults.

    The CRD gets ``default: {}`` so that the API server fills in the group's own defaults,
    exactly as the Python model does.
    """
    return Field(default_factory=model, description=description, json_schema_extra={"default": {}})


def with_rules(*rules: dict) -> ConfigDict:
    """An :class:`ApiModel` config carrying CEL rules for the CRD (``x-kubernetes-validations``).

    Each rule mirrors a Python validator of the same model; a test checks that both
    accept and reject the same manifests.
    """
    return ApiModel.model_config | ConfigDict(
        json_schema_extra={"x-kubernetes-validations": list(rules)}
    )


def immutable_rule(field: str, message: str) -> dict:
    """A CEL transition rule: ``field`` may not be set, changed or removed after creation."""
    return {
        "rule": f"has(self.{field}) == has(oldSelf.{field}) && "
        f"(!has(self.{field}) || self.{field} == oldSelf.{field})",
        "message": message,
    }


ShortStr = Annotated[str, StringConstraints(max_length=256)]
