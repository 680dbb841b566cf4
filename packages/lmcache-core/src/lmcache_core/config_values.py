"""Config values by kind (bool, size, list, ...), parsed with errors that say what is allowed.

YAML gives typed values, the environment gives strings; both go through the
same parser for a key's kind, so ``LMCACHE_LOCAL_CPU=off`` and
``local_cpu: false`` mean the same, and a wrong value names its key.

Whatever the value, a parser raises ``ValueError`` naming the key and nothing
else (no ``OverflowError`` from a 5000-digit number, no ``RecursionError``
from a deeply nested mapping), and quotes at most :data:`SHOWN_CHARS` of it.
Text is checked for characters no key can use: lone surrogates (not UTF-8,
so every later encode fails), NUL, and other control characters.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from lmcache_core.errors import ConfigError
from lmcache_core.sizes import parse_size

#: Most characters of a value quoted in a message (a 100 kB value is not echoed back).
SHOWN_CHARS = 80
#: Most digits of a number in a config (a 5000-digit integer is a typo or an attack).
MAX_DIGITS = 40
#: Deepest nesting of a mapping value (``extra_config``, ``tenant_quotas``) and most
#: entries in all: plugin settings are a flat mapping of a few dozen keys.
MAX_DEPTH = 8
MAX_ITEMS = 10_000
#: Control characters (C0, DEL, C1); ``raw_str`` keys (separators) may use tab and newlines.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_RAW = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def shown(value: Any) -> str:
    """``repr(value)``, cut to :data:`SHOWN_CHARS` characters for a message."""
    try:
        text = repr(value)
    except Exception:  # a 5000-digit int's repr raises ValueError
        text = f"<{type(value).__name__}>"
    if len(text) > SHOWN_CHARS:
        text = f"{text[: SHOWN_CHARS - 20]}...({len(text)} characters)"
    return text


def text_problem(value: str, *, raw: bool = False) -> str | None:
    """Why ``value`` cannot be a config string (None: it can)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"contains a lone surrogate (\\u{ord(value[e.start]):04x}), which is not UTF-8"
    if "\x00" in value:
        return "contains a NUL character"
    m = (_CONTROL_RAW if raw else _CONTROL).search(value)
    if m is not None:
        return f"contains the control character {m.group()!r}"
    return None


def check_text(value: str, key: str, *, raw: bool = False) -> str:
    problem = text_problem(value, raw=raw)
    if problem is not None:
        raise ValueError(f"{key}={shown(value)} {problem}; use printable text")
    return value


def check_tree(value: Any, key: str) -> Any:
    """A mapping value's nesting and text: at most :data:`MAX_DEPTH` deep and
    :data:`MAX_ITEMS` entries, no string (key or value) that :func:`text_problem` refuses
    (control characters allowed: a password may hold any printable one)."""
    count = 0
    todo: list[tuple[Any, int, str]] = [(value, 0, key)]
    while todo:
        item, depth, where = todo.pop()
        count += 1
        if count > MAX_ITEMS:
            raise ValueError(f"{key} has more than {MAX_ITEMS} entries")
        if isinstance(item, str):
            problem = text_problem(item, raw=True)
            if problem is not None:
                raise ValueError(f"{where}={shown(item)} {problem}; use printable text")
        elif isinstance(item, int) and not isinstance(item, bool):
            if item.bit_length() > 4 * MAX_DIGITS:
                raise ValueError(f"{where}: a number of more than {MAX_DIGITS} digits")
        elif isinstance(item, Mapping | list | tuple):
            if depth >= MAX_DEPTH:
                raise ValueError(f"{key} is nested more than {MAX_DEPTH} levels deep")
            if isinstance(item, Mapping):
                for k, v in item.items():
                    name = f"{where}.{shown(k) if not isinstance(k, str) else k[:SHOWN_CHARS]}"
                    todo.append((k, depth + 1, f"a key of {where}"))
                    todo.append((v, depth + 1, name))
            else:
                todo.extend((v, depth + 1, where) for v in item)
    return value


def _too_many_digits(text: str, key: str) -> None:
    digits = sum(c.isdigit() for c in text)
    if digits > MAX_DIGITS:
        raise ValueError(
            f"{key}={shown(text)} has {digits} digits; no value of a cache config needs "
            f"more than {MAX_DIGITS}"
        )


def _loads(text: str, key: str, example: str) -> Any:
    """JSON from the environment, as a ``ValueError`` naming ``key`` when it is not."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{key} is nested too deeply (at most {MAX_DEPTH} levels)") from None
    except ValueError as e:  # JSONDecodeError, or an integer over Python's digit limit
        if not isinstance(e, json.JSONDecodeError):
            raise ValueError(f"{key} holds a number of thousands of digits") from None
        raise ValueError(f"{key} must be {example} ({str(e)[:SHOWN_CHARS]})") from None


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
    raise ValueError(f"{key}={shown(value)} is not a boolean; use true or false")


def to_int(value: Any, key: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{key}={value!r} must be an integer, not a boolean")
    if isinstance(value, int):
        if value.bit_length() > 4 * MAX_DIGITS:  # ~ MAX_DIGITS decimal digits
            raise ValueError(f"{key}: an integer of more than {MAX_DIGITS} digits is out of range")
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        _too_many_digits(value, key)
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ValueError(f"{key}={shown(value)} must be an integer")


def to_float(value: Any, key: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{key}={value!r} must be a number, not a boolean")
    number: float | None = None
    if isinstance(value, int):
        if value.bit_length() > 4 * MAX_DIGITS:
            raise ValueError(f"{key}: a number of more than {MAX_DIGITS} digits is out of range")
        number = float(value)
    elif isinstance(value, float):
        number = value
    elif isinstance(value, str):
        _too_many_digits(value, key)
        try:
            number = float(value.strip())
        except ValueError:
            pass
    if number is None:
        raise ValueError(f"{key}={shown(value)} must be a number")
    if not math.isfinite(number):  # a NaN timeout never expires, a NaN backoff never ends
        raise ValueError(f"{key}={shown(value)} must be a finite number")
    return number


def to_size(value: Any, key: str) -> int:
    if isinstance(value, str):
        _too_many_digits(value, key)
        value = value.strip()
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        raise ValueError(f"{key}: a size of more than {MAX_DIGITS} digits is out of range")
    try:
        return parse_size(value, what=key)
    except ValueError as e:
        raise ValueError(_cut(str(e), key, value)) from None


def _cut(message: str, key: str, value: Any) -> str:
    """``message`` with a long value's repr cut to :func:`shown`'s."""
    full = f"{key}={value!r}"
    return message.replace(full, f"{key}={shown(value)}") if len(full) > SHOWN_CHARS else message


def to_opt_str(value: Any, key: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        v = value.strip()
        return None if v.lower() in ("", "none", "null") else check_text(v, key)
    raise ValueError(f"{key}={shown(value)} must be a string or null")


def to_opt_int(value: Any, key: str) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    return to_int(value, key)


def to_str(value: Any, key: str) -> str:
    if isinstance(value, str) and value.strip():
        return check_text(value.strip(), key)
    raise ValueError(f"{key}={shown(value)} must be a non-empty string")


def to_raw_str(value: Any, key: str) -> str:
    """A string kept exactly as given: separators such as ``" # # "`` live in their spaces
    (tabs and newlines too; other control characters are refused)."""
    if isinstance(value, str) and value:
        return check_text(value, key, raw=True)
    raise ValueError(f"{key}={shown(value)} must be a non-empty string")


#: Most items of a list value (blend check layers: one per layer at most).
MAX_LIST = 1024


def as_list(value: Any, key: str) -> list[Any]:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = _loads(text, key, "a list, e.g. [1] or 1,2")
        else:
            value = [v for v in text.split(",") if v.strip()]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{key}={shown(value)} must be a non-empty list, e.g. [1] or 1,2")
    if len(value) > MAX_LIST:
        raise ValueError(f"{key} has {len(value)} items; at most {MAX_LIST}")
    return list(value)


def to_int_list(value: Any, key: str) -> tuple[int, ...]:
    return tuple(to_int(v, key) for v in as_list(value, key))


def to_float_list(value: Any, key: str) -> tuple[float, ...]:
    return tuple(to_float(v, key) for v in as_list(value, key))


def to_dict(value: Any, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return check_tree(dict(value), key)
    if isinstance(value, str):
        parsed = _loads(value, key, "a JSON object, e.g. '{\"k\": 1}'") if value.strip() else {}
        if isinstance(parsed, dict):
            return check_tree(parsed, key)
    raise ValueError(f"{key}={shown(value)} must be a mapping (a JSON object in the environment)")


def _only_value_errors(parse: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    """Whatever ``parse`` meets, a ``ValueError`` that names the key (never a raw
    ``OverflowError``, ``TypeError`` or ``RecursionError`` out of a config load)."""

    @functools.wraps(parse)
    def parsed(value: Any, key: str) -> Any:
        try:
            return parse(value, key)
        except ValueError:
            raise
        except RecursionError:
            raise ValueError(f"{key} is nested too deeply (at most {MAX_DEPTH} levels)") from None
        except (OverflowError, TypeError, ArithmeticError) as e:
            raise ValueError(f"{key}={shown(value)} is out of range ({e})") from None

    return parsed


COERCERS: dict[str, Callable[[Any, str], Any]] = {
    kind: _only_value_errors(parse)
    for kind, parse in {
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
    }.items()
}


def parse_bool(value: Any, key: str) -> bool:
    """true/false, 1/0, yes/no, on/off; anything else is a ConfigError naming ``key``."""
    try:
        return to_bool(value, key)
    except ValueError as e:
        raise ConfigError([str(e)], "cache config") from None
