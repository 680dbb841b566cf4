"""Per-request controls (``lmcache.skip_save``, ``lmcache.tag.*``): parsing and key salts.

The salt must keep tenants apart whichever way they are told apart: two
different (cache_salt, tags) pairs never give the same key salt, and a
request without tags keys exactly as before tags existed.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lmcache_core.keys import TokenChunker
from lmcache_core.request_options import (
    MAX_TAG_CHARS,
    MAX_TAGS,
    NO_OPTIONS,
    RequestOptionsError,
    epoch_salt,
    parse_request_options,
)

scalars = st.one_of(
    st.text(max_size=8),
    st.integers(-5, 5),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False, width=16),
)
tag_dicts = st.dictionaries(
    st.text(min_size=1, max_size=6).map(lambda t: "lmcache.tag." + t), scalars, max_size=3
)
salts = st.one_of(st.none(), st.text(max_size=8).filter(lambda s: "\x00" not in s))


def test_no_params_and_foreign_params_are_no_options():
    assert parse_request_options(None) is NO_OPTIONS
    assert parse_request_options({}) is NO_OPTIONS
    # Another connector's entries and blending's segments are not ours.
    assert parse_request_options({"do_remote_prefill": True, "blend_segments": []}) is NO_OPTIONS


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), (1, True), (0, False), ("true", True), (" False ", False)],
)
def test_skip_save_accepts_the_usual_spellings_of_a_flag(value, expected):
    assert parse_request_options({"lmcache.skip_save": value}).skip_save is expected


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"lmcache.skip_save": "maybe"}, "lmcache.skip_save must be true or false"),
        ({"lmcache.skip_save": 2}, "lmcache.skip_save must be true or false"),
        ({"lmcache.tag.user": {"id": 1}}, "lmcache.tag.user must be a string, number or boolean"),
        ({"lmcache.tag.user": None}, "lmcache.tag.user must be a string, number or boolean"),
        ({"lmcache.tag.": "x"}, "has no tag name"),
        ({"lmcache.tag.x": float("nan")}, "finite number"),
        ({"lmcache.tag.x": "v" * (MAX_TAG_CHARS + 1)}, "limited to"),
        ({f"lmcache.tag.t{i}": i for i in range(MAX_TAGS + 1)}, f"at most {MAX_TAGS}"),
        (["lmcache.skip_save"], "kv_transfer_params must be a JSON object"),
    ],
)
def test_malformed_controls_say_what_to_fix(params, message):
    with pytest.raises(RequestOptionsError, match=message.replace(".", r"\.")):
        parse_request_options(params)


def test_unused_controls_are_reported_not_refused():
    o = parse_request_options({"lmcache.ttl": 60, "lmcache.skip_saev": True})
    assert o.unused == ("lmcache.skip_saev", "lmcache.ttl")
    assert not o.skip_save and not o.tags


@given(salt=salts)
def test_without_tags_the_salt_is_the_cache_salt(salt):
    # Keys stored before tags existed, or by clients that send none, stay valid.
    assert parse_request_options({"lmcache.skip_save": True}).key_salt(salt) == (salt or None)


@given(a=st.tuples(salts, tag_dicts), b=st.tuples(salts, tag_dicts))
def test_salts_with_tags_are_injective(a, b):
    def canonical(request):  # a tag's value is what its JSON says: 1, 1.0, "1", true differ
        salt, tags = request
        return salt or None, {k: json.dumps(v) for k, v in tags.items()}

    sa = parse_request_options(a[1]).key_salt(a[0])
    sb = parse_request_options(b[1]).key_salt(b[0])
    assert (sa == sb) == (canonical(a) == canonical(b))


epochs = st.none() | st.text(alphabet="0123456789abcdef", min_size=1, max_size=8)


@given(a=st.tuples(salts, tag_dicts, epochs), b=st.tuples(salts, tag_dicts, epochs))
def test_salts_with_tags_and_epochs_are_injective(a, b):
    """After a cache reset (a new epoch) no key equals one from before, nor another
    request's in any epoch."""

    def canonical(request):
        salt, tags, epoch = request
        return salt or None, {k: json.dumps(v) for k, v in tags.items()}, epoch

    sa = epoch_salt(parse_request_options(a[1]).key_salt(a[0]), a[2])
    sb = epoch_salt(parse_request_options(b[1]).key_salt(b[0]), b[2])
    assert (sa == sb) == (canonical(a) == canonical(b))


def test_no_epoch_leaves_the_salt_unchanged():
    assert epoch_salt("tenant", None) == "tenant" and epoch_salt(None, "") is None


def test_tag_order_and_value_types_are_canonical():
    a = parse_request_options({"lmcache.tag.a": "1", "lmcache.tag.b": 2}).key_salt("s")
    b = parse_request_options({"lmcache.tag.b": 2, "lmcache.tag.a": "1"}).key_salt("s")
    c = parse_request_options({"lmcache.tag.a": 1, "lmcache.tag.b": 2}).key_salt("s")
    assert a == b != c


def test_no_cache_salt_equals_a_tagged_salt():
    tagged = parse_request_options({"lmcache.tag.user": "alice"}).key_salt(None)
    # A client cannot send that salt: salts with NUL are refused.
    with pytest.raises(RequestOptionsError, match="NUL"):
        NO_OPTIONS.key_salt(tagged)


def test_tags_change_every_chunk_key():
    chunker = TokenChunker(16)
    tokens = list(range(40))
    plain = chunker.chunk(tokens, cache_salt="s").digests
    tagged = chunker.chunk(
        tokens, cache_salt=parse_request_options({"lmcache.tag.u": "a"}).key_salt("s")
    ).digests
    other = chunker.chunk(
        tokens, cache_salt=parse_request_options({"lmcache.tag.u": "b"}).key_salt("s")
    ).digests
    assert len(plain) == len(tagged) == 3
    assert not set(plain) & set(tagged) and not set(tagged) & set(other)


# ---------------------------------------------------------------------------- hostile clients


@pytest.mark.parametrize(
    "salt, params",
    [
        (None, {"lmcache.tag.user": "\ud800"}),  # a lone surrogate, as JSON's "\ud800" gives
        (None, {"lmcache.tag.\udfff": "alice"}),
        ("tenant-\ud83d", None),
        ("tenant-\ud83d", {"lmcache.tag.user": "alice"}),
    ],
)
def test_a_lone_surrogate_in_a_tag_or_the_salt_is_refused_once_as_malformed(salt, params):
    """Refused where the controls are parsed, so no later step (hashing a key) meets it."""
    with pytest.raises(RequestOptionsError, match="lone surrogate") as e:
        parse_request_options(params or {}).key_salt(salt)
    assert len(str(e.value)) < 400
    assert "\ud800" not in str(e.value) and "\udfff" not in str(e.value)  # loggable as UTF-8
    str(e.value).encode("utf-8")


def test_what_is_kept_of_unknown_controls_is_bounded():
    """200 requests with 100 kB unknown lmcache.<name> controls kept 19 MiB: now a request
    keeps at most MAX_UNUSED names, each cut to MAX_NAME_CHARS."""
    import tracemalloc

    from lmcache_core.request_options import MAX_NAME_CHARS, MAX_UNUSED

    kept = []
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for i in range(200):
            params = {f"lmcache.{i:03d}.{j}" + "x" * 100_000: "y" for j in range(20)}
            kept.append(parse_request_options(params))
            del params
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert grown < 1 << 20, f"{grown} bytes kept for 200 requests"
    for options in kept:
        assert len(options.unused) <= MAX_UNUSED + 1  # + "... and N more"
        assert all(len(n) <= MAX_NAME_CHARS + 30 for n in options.unused)
    assert f"... and {20 - MAX_UNUSED} more" in kept[0].unused
