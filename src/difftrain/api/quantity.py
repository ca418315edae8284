"""Kubernetes resource quantities ("16Gi", "500m", 4) as numbers, for the few places the
operator computes with them."""

import re
from decimal import Decimal

_SUFFIXES = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
}
_FORM = re.compile(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+|[KMGTPE]i|[numkMGTPE]|)$")


def parse_quantity(value: int | str) -> Decimal:
    """The quantity's value in base units (bytes, cores)."""
    match = _FORM.match(str(value))
    if not match:
        raise ValueError(f"not a quantity: {value!r}")
    number, suffix = match.groups()
    if suffix[:1] in ("e", "E") and len(suffix) > 1:
        return Decimal(number) * Decimal(10) ** int(suffix[1:])
    return Decimal(number) * Decimal(_SUFFIXES[suffix])


def format_bytes(value: Decimal) -> str:
    """Bytes as the largest whole binary unit (Mi at least), e.g. "8Gi"."""
    for suffix in ("Ti", "Gi", "Mi"):
        unit = _SUFFIXES[suffix]
        if value >= unit and value % unit == 0:
            return f"{int(value // unit)}{suffix}"
    return f"{int(value // _SUFFIXES['Mi'])}Mi"
