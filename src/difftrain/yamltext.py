"""YAML as people read it: block style, keys in insertion order, multi-line strings as
``|`` blocks, long lines unbroken (CEL rules, URIs)."""

import yaml


class _Dumper(yaml.SafeDumper):
    pass


def _string(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _string)


def dump(value) -> str:
    return yaml.dump(value, Dumper=_Dumper, sort_keys=False, width=10_000)


def dump_all(values) -> str:
    return yaml.dump_all(values, Dumper=_Dumper, sort_keys=False, width=10_000)
