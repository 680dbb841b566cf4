"""Config values by kind (bool, size, list, ...), parsed with errors that say what is allowed.

YAML gives typed values, the environment gives strings; both go through the
same parser for a key's kind, so ``LMCACHE_LOCAL_CPU=off`` and
``local_cpu: false`` mean the same, and a wrong value names its key.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from lmcache_core.errors import ConfigError
from lmcache_core.sizes import parse_size


def to_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("1", "true", "yes", "on"):
            return True
        if v in ("0", "false", "no", "off"):
            return False
    raise ValueError(f"{key}={value!r} is not a boolean; use true or false")


def to_int(value: Any, key: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{key}={value!r} must be an integer, not a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ValueError(f"{key}={value!r} must be an integer")


def to_float(value: Any, key: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{key}={value!r} must be a number, not a boolean")
    number: float | None = None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            pass
    if number is None:
        raise ValueError(f"{key}={value!r} must be a number")
    if not math.isfinite(number):  # a NaN timeout never expires, a NaN backoff never ends
        raise ValueError(f"{key}={value!r} must be a finite number")
    return number


def to_size(value: Any, key: str) -> int:
    return parse_size(value.strip() if isinstance(value, str) else value, what=key)


def to_opt_str(value: Any, key: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        v = value.strip()
        return None if v.lower() in ("", "none", "null") else v
    raise ValueError(f"{key}={value!r} must be a string or null")


def to_opt_int(value: Any, key: str) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    return to_int(value, key)


def to_str(value: Any, key: str) -> str:
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise ValueError(f"{key}={value!r} must be a non-empty string")


def to_raw_str(value: Any, key: str) -> str:
    """A string kept exactly as given: separators such as ``" # # "`` live in their spaces."""
    if isinstance(value, str) and value:
        return value
    raise ValueError(f"{key}={value!r} must be a non-empty string")


def as_list(value: Any, key: str) -> list[Any]:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{key}={value!r} is not a list, e.g. [1] or 1,2 ({e})") from None
        else:
            value = [v for v in text.split(",") if v.strip()]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{key}={value!r} must be a non-empty list, e.g. [1] or 1,2")
    return list(value)


def to_int_list(value: Any, key: str) -> tuple[int, ...]:
    return tuple(to_int(v, key) for v in as_list(value, key))


def to_float_list(value: Any, key: str) -> tuple[float, ...]:
    return tuple(to_float(v, key) for v in as_list(value, key))


def to_dict(value: Any, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, str):
        try:
            parsed = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{key} must be a JSON object, e.g. '{{\"k\": 1}}' ({e})") from None
        if isinstance(parsed, dict):
            return parsed
    raise ValueError(f"{key}={value!r} must be a mapping (a JSON object in the environment)")


COERCERS: dict[str, Callable[[Any, str], Any]] = {
    "bool": to_bool,
    "int": to_int,
    "float": to_float,
    "size": to_size,
    "str": to_str,
    "raw_str": to_raw_str,
    "int_list": to_int_list,
    "float_list": to_float_list,
    "opt_str": to_opt_str,
    "opt_int": to_opt_int,
    "dict": to_dict,
}


def parse_bool(value: Any, key: str) -> bool:
    """true/false, 1/0, yes/no, on/off; anything else is a ConfigError naming ``key``."""
    try:
        return to_bool(value, key)
    except ValueError as e:
        raise ConfigError([str(e)], "cache config") from None
