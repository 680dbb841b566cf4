"""Byte sizes written by people: "5GiB", "512MB", "1.5" (GB, as LMCache counts them)."""

from __future__ import annotations

import math
import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")

#: A bare number is a size in GB the way LMCache counts it (``max_local_cpu_size: 5``
#: means 5 * 2**30 bytes there), so an LMCache config keeps its meaning here.
BARE_NUMBER_UNIT = 1024**3
#: No size worth configuring is larger (1 EiB); larger numbers are typos or ``1e999``.
MAX_SIZE = 1 << 60


def parse_size(value: object, *, what: str = "size") -> int:
    """Return ``value`` as a number of bytes.

    Accepts ints and floats (GB, as LMCache), and strings with a unit: B, KB,
    MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024). A
    string without a unit is GB, like a bare number.
    """
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a size such as 5GiB or 512MB, not a boolean")
    if isinstance(value, (int, float)):
        number, unit = float(value), BARE_NUMBER_UNIT
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if not m:
            raise ValueError(
                f"{what}={value!r} is not a size; write e.g. 5GiB, 512MB, 4096B or 1.5 (GB)"
            )
        number = float(m.group(1))
        suffix = m.group(2).lower()
        if suffix == "":
            unit = BARE_NUMBER_UNIT
        elif suffix in _UNITS:
            unit = _UNITS[suffix]
        else:
            raise ValueError(
                f"{what}={value!r} has an unknown unit {m.group(2)!r}; "
                "use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB"
            )
    else:
        raise ValueError(f"{what} must be a size such as 5GiB or 512MB, not {type(value).__name__}")
    if not math.isfinite(number):
        raise ValueError(f"{what}={value!r} is not a finite size; write e.g. 5GiB or 512MB")
    if number < 0:
        raise ValueError(f"{what}={value!r} is negative; sizes must be >= 0")
    size = number * unit
    if size >= MAX_SIZE:
        raise ValueError(f"{what}={value!r} is more than any machine holds (at most 1 EiB)")
    return int(size)


def format_size(nbytes: int) -> str:
    """Render bytes with a binary unit, e.g. 33554432 -> '32.0 MiB'."""
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
