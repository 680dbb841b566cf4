"""Per-request cache controls that an API client sends with a request.

Upstream LMCache reads them from the ``lmcache.*`` entries of vLLM's
``kv_transfer_params`` (a field of every OpenAI-compatible request, and
``SamplingParams.extra_args["kv_transfer_params"]`` offline); a client that
used them there keeps working here:

* ``lmcache.skip_save: true``: this request's KV is not stored (it may still
  load what is cached). For text that must not outlive the request, or that
  will never come back (one-off documents), so it does not evict what will.
* ``lmcache.tag.<name>: <value>``: part of the request's cache identity, like
  vLLM's ``cache_salt``: the same tokens under other tags (or none) never
  share KV. Values are strings, numbers or booleans; ``1`` and ``"1"`` are
  different tags.
* ``lmcache.ttl``: accepted for compatibility and not used (chunks live until
  evicted); the adapter says so once in its log.

Malformed controls raise :class:`RequestOptionsError` with what to fix. An
engine adapter cannot fail one request from its scheduler, so it logs that
message and serves the request without the cache: neither loading (a tag
meant to isolate it may be the malformed one) nor storing. Text that is not
Unicode a key can hash (a lone surrogate, which JSON's ``"\ud800"`` escape
makes) is malformed too, in a tag's name or value and in ``cache_salt``:
checked here, once, so that no later step meets it.

Whatever a client sends, what this module keeps and says is bounded: a
message quotes at most :data:`SHOWN_CHARS` characters of a name or value,
and at most :data:`MAX_UNUSED` unknown names of a request are kept, each cut
to :data:`MAX_NAME_CHARS` (200 requests with 100 kB names were 19 MiB of logs
kept in memory).

Engine-agnostic (no vLLM here) so that another engine's adapter parses the
same controls the same way.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lmcache_core.errors import LMCacheError

PREFIX = "lmcache."
TAG_PREFIX = "lmcache.tag."
SKIP_SAVE = "lmcache.skip_save"
#: Understood by upstream LMCache; accepted and not used here.
IGNORED = frozenset({"lmcache.ttl"})
#: Bounds on what a client can make every lookup hash.
MAX_TAGS = 32
MAX_TAG_CHARS = 1024
#: Bounds on what is kept and logged of a request's controls.
SHOWN_CHARS = 80
MAX_UNUSED = 8
MAX_NAME_CHARS = 64

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class RequestOptionsError(LMCacheError, ValueError):
    """A request's ``lmcache.*`` controls are malformed; the message says which and how."""


def shown(text: Any, limit: int = SHOWN_CHARS) -> str:
    """``repr(text)`` (which escapes lone surrogates and control characters), cut to
    ``limit`` characters: what a message may quote of what a client sent."""
    r = repr(text)
    return r if len(r) <= limit else f"{r[: limit - 24]}...({len(r)} characters)"


def _label(name: str) -> str:
    """A control's name in a message: as it is when short and printable, else :func:`shown`."""
    if len(name) <= SHOWN_CHARS and name.isprintable() and name.isascii():
        return name
    return shown(name)


def short_name(name: str) -> str:
    """A control's name as kept: at most :data:`MAX_NAME_CHARS` characters."""
    if len(name) <= MAX_NAME_CHARS:
        return name
    return f"{name[: MAX_NAME_CHARS - 20]}...({len(name)} characters)"


def _unicode(what: str, text: str) -> None:
    """A key hashes its salt and tags as UTF-8: a lone surrogate cannot be."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestOptionsError(
            f"{what} is not valid Unicode text (it holds a lone surrogate, such as JSON's "
            "\\ud800 escape); lmcache does not cache such requests"
        ) from None


@dataclass(frozen=True)
class RequestOptions:
    """What a request's ``lmcache.*`` controls ask for.

    ``tags`` are ``(name, value as canonical JSON)`` pairs, sorted by name;
    ``unused`` the ``lmcache.*`` names that were accepted but have no effect
    (compatibility, or unknown: a typo of a real one, which the adapter logs).
    """

    skip_save: bool = False
    tags: tuple[tuple[str, str], ...] = ()
    unused: tuple[str, ...] = ()

    def key_salt(self, cache_salt: str | None) -> str | None:
        """The salt the chunk keys use: the request's ``cache_salt`` with its tags.

        Without tags it is the ``cache_salt`` itself, so keys stored before
        tags existed (or by clients that send none) stay valid. With tags it
        is a NUL byte and then the canonical JSON of ``[cache_salt, tags]``.
        A salt with a NUL byte in it is refused (:class:`RequestOptionsError`),
        so no ``cache_salt`` a client can send equals another's salt and
        tags: the map from (salt, tags) to key salts is injective, and tenants
        stay apart whichever of the two they use.
        """
        salt = cache_salt or None
        if salt is not None and not isinstance(salt, str):
            raise RequestOptionsError(f"cache_salt must be text, got {type(salt).__name__}")
        if salt is not None and "\x00" in salt:
            raise RequestOptionsError(
                "cache_salt contains a NUL character; lmcache does not cache such requests "
                "(use printable text)"
            )
        if salt is not None:
            _unicode("cache_salt", salt)
        if not self.tags:
            return salt
        body = json.dumps([salt, [list(t) for t in self.tags]], ensure_ascii=False)
        return "\x00" + body


NO_OPTIONS = RequestOptions()


def epoch_salt(key_salt: str | None, epoch: str | None) -> str | None:
    """``key_salt`` (from :meth:`RequestOptions.key_salt`) within a cache *epoch*.

    An adapter starts a new epoch when its engine resets the connector's cache
    (vLLM's ``reset_prefix_cache(reset_connector=True)``, which
    ``pause_generation(clear_cache=True)`` calls around a weight update): KV
    stored before, in any tier, shared ones too, was computed by other weights
    and must never load again, and no tier can be emptied for every instance
    at once. The epoch is a random name folded into every key.

    Without an epoch the salt is unchanged. With one it is a NUL byte and the
    canonical JSON of an *object* (tagged salts are a NUL and an *array*, and
    clients cannot send a NUL), so salts stay injective across all three.
    """
    if not epoch:
        return key_salt
    return "\x00" + json.dumps({"epoch": epoch, "salt": key_salt}, ensure_ascii=False)


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise RequestOptionsError(f"{name} must be true or false, got {shown(value)}")


def _tag(name: str, value: Any) -> tuple[str, str]:
    tag = name[len(TAG_PREFIX) :]
    if not tag:
        raise RequestOptionsError(f"{name!r} has no tag name: use 'lmcache.tag.<name>'")
    if len(tag) > MAX_TAG_CHARS:
        raise RequestOptionsError(
            f"{_label(name)}: tag names and values are limited to {MAX_TAG_CHARS} characters"
        )
    _unicode(f"the tag name {_label(name)}", tag)
    if value is None or not isinstance(value, (str, int, float, bool)):
        raise RequestOptionsError(
            f"{_label(name)} must be a string, number or boolean, got {type(value).__name__}"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise RequestOptionsError(f"{_label(name)} must be a finite number, got {value!r}")
    if isinstance(value, str):
        if len(value) > MAX_TAG_CHARS:
            raise RequestOptionsError(
                f"{_label(name)}: tag names and values are limited to {MAX_TAG_CHARS} characters"
            )
        _unicode(f"the value of {_label(name)}", value)
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 3000:
        raise RequestOptionsError(
            f"{_label(name)}: tag names and values are limited to {MAX_TAG_CHARS} characters"
        )
    encoded = json.dumps(value, ensure_ascii=False)
    if len(encoded) > MAX_TAG_CHARS:
        raise RequestOptionsError(
            f"{_label(name)}: tag names and values are limited to {MAX_TAG_CHARS} characters"
        )
    return tag, encoded


def parse_request_options(params: Any) -> RequestOptions:
    """The ``lmcache.*`` controls in ``params`` (vLLM's ``kv_transfer_params``, or None).

    Other entries (another connector's, blending's ``blend_segments``) are
    not ours and are left alone.
    """
    if params is None:
        return NO_OPTIONS
    if not isinstance(params, Mapping):
        raise RequestOptionsError(
            f"kv_transfer_params must be a JSON object, got {type(params).__name__}"
        )
    skip_save = False
    tags: list[tuple[str, str]] = []
    unused: list[str] = []
    more = 0
    for name, value in params.items():
        if not isinstance(name, str) or not name.startswith(PREFIX):
            continue
        if name == SKIP_SAVE:
            skip_save = _flag(name, value)
        elif name.startswith(TAG_PREFIX):
            if len(tags) >= MAX_TAGS:
                raise RequestOptionsError(f"at most {MAX_TAGS} lmcache.tag.* entries per request")
            tags.append(_tag(name, value))
        elif len(unused) < MAX_UNUSED:
            unused.append(short_name(name))  # kept for a log line: bounded
        else:
            more += 1
    if more:
        unused.append(f"... and {more} more")
    if not (skip_save or tags or unused):
        return NO_OPTIONS
    return RequestOptions(skip_save, tuple(sorted(tags)), tuple(sorted(unused)))


def tenant_id(cache_salt: str | None) -> str:
    """The tenant a request's stores count against on an ``lmcache server`` (its quota):
    a digest of the engine's ``cache_salt`` (empty without one), so salts never cross
    the wire. The server digests the salts of its ``tenant_quotas`` the same way."""
    if not cache_salt:
        return ""
    raw = cache_salt.encode("utf-8", "surrogatepass")
    return hashlib.sha256(b"lmcache-tenant\0" + raw).hexdigest()[:32]
