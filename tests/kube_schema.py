"""What the API server does with a CRD schema, for tests: defaulting and CEL rules.

The API server applies the schema's defaults, then evaluates every
``x-kubernetes-validations`` rule at its node with ``self`` bound to the value there
(and ``oldSelf`` on updates, only where the old object has that node too).
"""

import copy
from typing import Any

import cel


def apply_defaults(schema: dict, value: Any) -> Any:
    """``value`` with the schema's defaults filled in, as the API server does."""
    value = copy.deepcopy(value)
    _default(schema, value)
    return value


def _default(schema: dict, value: Any) -> None:
    if isinstance(value, dict):
        for name, child in schema.get("properties", {}).items():
            if name not in value and "default" in child:
                value[name] = copy.deepcopy(child["default"])
            if name in value:
                _default(child, value[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for item in value.values():
                _default(extra, item)
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            _default(schema["items"], item)


def failed_rules(schema: dict, new: Any, old: Any = None) -> list[str]:
    """Messages of the rules that reject ``new`` (an update from ``old`` when given)."""
    failures: list[str] = []
    _check(schema, new, old, failures)
    return failures


def _check(schema: dict, new: Any, old: Any, failures: list[str]) -> None:
    for rule in schema.get("x-kubernetes-validations", []):
        context = {"self": new}
        if "oldSelf" in rule["rule"]:
            if old is None:
                continue
            context["oldSelf"] = old
        if cel.evaluate(rule["rule"], context) is not True:
            failures.append(rule["message"])
    if isinstance(new, dict):
        for name, child in schema.get("properties", {}).items():
            if name in new:
                _check(child, new[name], old.get(name) if isinstance(old, dict) else None, failures)
    elif isinstance(new, list) and "items" in schema:
        for item in new:
            _check(schema["items"], item, None, failures)


def all_rules(schema: dict) -> list[str]:
    """Every rule expression in the schema."""
    rules = [rule["rule"] for rule in schema.get("x-kubernetes-validations", [])]
    for child in schema.get("properties", {}).values():
        rules += all_rules(child)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            rules += all_rules(schema[key])
    return rules
