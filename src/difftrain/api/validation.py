"""Turn a manifest (already parsed into Python data) into a job, or into problems.

Every problem names the field path as users write it (``spec.training.learningRate``)
and says what to do, e.g. ``must be > 0`` or ``unknown field; did you mean 'training'?``.
"""

import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from difftrain.api.base import SpecProblems
from difftrain.api.job import API_VERSION, KIND, DiffusionTrainingJob
from difftrain.api.profile import PROFILE_KIND, DiffusionTrainingProfile, merge, named
from difftrain.errors import InvalidSpec

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest."""

    loc: Loc
    message: str

    @property
    def path(self) -> str:
        """The field path, e.g. ``spec.resources.tolerations[0].effect``."""
        text = ""
        for part in self.loc:
            text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
        return text

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.loc else self.message


def validate_job(data: Any) -> tuple[DiffusionTrainingJob | None, list[Problem]]:
    """Validate one manifest; returns the job, or None and every problem found."""
    also = f"; only {KIND} and {PROFILE_KIND} manifests are checked here"
    return _validated(data, DiffusionTrainingJob, KIND, also)


def _validated(data: Any, model: type[BaseModel], kind: str, also: str = ""):
    """``data`` as a ``model`` object of ``kind``, or None and every problem found;
    ``also`` follows the message about another kind."""
    if not isinstance(data, dict):
        return None, [Problem((), f"expected a {kind} mapping, got {_describe(data)}")]
    found, api_version = data.get("kind"), data.get("apiVersion")
    if found != kind:
        return None, [Problem(("kind",), f"{found!r} is not a {kind}{also}")]
    if api_version != API_VERSION:
        return None, [Problem(("apiVersion",), f"must be {API_VERSION} (got {api_version!r})")]
    try:
        return model.model_validate(data), []
    except ValidationError as error:
        return None, problems_of(error, model)


def load_job(data: Any) -> DiffusionTrainingJob:
    """Validate one manifest or raise :class:`InvalidSpec` listing every problem."""
    job, problems = validate_job(data)
    if job is None:
        raise InvalidSpec("invalid job: " + "; ".join(str(p) for p in problems))
    return job


def problems_of(
    error: ValidationError, root: type[BaseModel] = DiffusionTrainingJob
) -> list[Problem]:
    """The problems in a pydantic error about a ``root`` object, each with its full path."""
    problems: list[Problem] = []
    for item in error.errors():
        loc = _field_loc(item["loc"])
        found = item.get("ctx", {}).get("error")
        if isinstance(found, SpecProblems):
            problems += [Problem(loc + rel, message) for rel, message in found.problems]
        else:
            problems.append(Problem(loc, _message(item, loc, root)))
    return problems


def _field_loc(loc: tuple) -> Loc:
    # Pydantic adds a step for a function validator ("function-after[...]"); drop it.
    return tuple(part for part in loc if isinstance(part, int) or "[" not in part)


def _message(item: dict, loc: Loc, root: type[BaseModel]) -> str:
    kind, ctx, value = item["type"], item.get("ctx", {}), item.get("input")
    match kind:
        case "missing":
            return "required field is missing"
        case "extra_forbidden":
            return _unknown_field(loc, root)
        case "greater_than":
            return f"must be > {_number(ctx['gt'])} (got {value!r})"
        case "greater_than_equal":
            return f"must be >= {_number(ctx['ge'])} (got {value!r})"
        case "less_than":
            return f"must be < {_number(ctx['lt'])} (got {value!r})"
        case "less_than_equal":
            return f"must be <= {_number(ctx['le'])} (got {value!r})"
        case "multiple_of":
            return f"must be a multiple of {_number(ctx['multiple_of'])} (got {value!r})"
        case "literal_error":
            return f"must be one of {ctx['expected']} (got {value!r})"
        case "string_too_short":
            return "must not be empty" if ctx["min_length"] == 1 else item["msg"].lower()
        case "string_too_long":
            return f"must be at most {ctx['max_length']} characters"
        case "string_pattern_mismatch":
            return f"{value!r} does not match the pattern {ctx['pattern']}"
        case "too_short":
            return f"must have at least {ctx['min_length']} items"
        case "too_long":
            return f"must have at most {ctx['max_length']} items"
        case "value_error":
            return str(ctx["error"])
    expected = _EXPECTED.get(kind)
    if expected:
        return f"must be {expected} (got {_describe(value)})"
    return item["msg"]


_EXPECTED = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "model_type": "a mapping of fields",
    "model_attributes_type": "a mapping of fields",
    "dict_type": "a mapping",
    "list_type": "a list",
    "datetime_type": "an RFC 3339 timestamp",
}


def _number(value: float) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _describe(value: Any) -> str:
    names = {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "list",
        dict: "mapping",
        type(None): "null",
    }
    name = names.get(type(value), type(value).__name__)
    if isinstance(value, dict | list):
        return f"a {name}"
    return f"{name} {value!r}"


def _unknown_field(loc: Loc, root: type[BaseModel]) -> str:
    allowed = _fields_at(loc[:-1], root)
    if not allowed:
        return "unknown field"
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    if close:
        return f"unknown field; did you mean '{close[0]}'?"
    return f"unknown field; allowed here: {', '.join(allowed)}"


def _fields_at(loc: Loc, root: type[BaseModel]) -> list[str]:
    """The field names (aliases) of the model found at ``loc`` in ``root``, or [] if none."""
    model: type[BaseModel] | None = root
    for part in loc:
        if model is None:
            return []
        if isinstance(part, int):
            continue
        field = next((f for name, f in model.model_fields.items() if part in (name, f.alias)), None)
        model = _model_in(field.annotation) if field else None
    if model is None:
        return []
    return [field.alias or name for name, field in model.model_fields.items()]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list, dict):
        for arg in typing.get_args(annotation):
            model = _model_in(arg)
            if model is not None:
                return model
    return None


def validate_profile(data: Any) -> tuple[DiffusionTrainingProfile | None, list[Problem]]:
    """Validate one profile manifest; returns it, or None and every problem found."""
    return _validated(data, DiffusionTrainingProfile, PROFILE_KIND)


def applied(job: dict, profile: dict, source: str | None = None) -> tuple[dict, list[Problem]]:
    """The job manifest merged with ``profile`` (a manifest), or the job unchanged and the
    problems that keep them apart: an invalid profile, or one that is not the job's.
    ``source`` names where the profile came from in the messages."""
    where = source or f"{PROFILE_KIND} {(profile.get('metadata') or {}).get('name')}"
    found, problems = validate_profile(profile)
    if found is None:
        return job, [Problem((), f"{where}: {problem}") for problem in problems]
    wanted = named(job)
    if wanted is not None and wanted != found.metadata.name:
        return job, [
            Problem(
                ("spec", "profile"),
                f"names profile '{wanted}', but {where} is profile '{found.metadata.name}'",
            )
        ]
    return merge(job, profile.get("spec") or {}), []
