"""MP mode's wire format and addresses: round trips, and hostile bytes rejected by name."""

from __future__ import annotations

import os
import socket
import stat
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lmcache_core.config import CacheConfig
from lmcache_core.errors import ConfigError
from lmcache_core.mp import wire
from lmcache_core.mp.address import (
    check_socket_dir,
    local_socket_for_port,
    make_socket_dir,
    parse_server_url,
)
from lmcache_core.mp.wire import ProtocolError, Reader, Writer

digests = st.lists(st.binary(min_size=1, max_size=wire.MAX_DIGEST), max_size=40)


@settings(max_examples=200, deadline=None)
@given(
    a=st.integers(0, 2**32 - 1),
    b=st.integers(0, 2**64 - 1),
    ds=digests,
    text=st.text(max_size=200),
    nums=st.lists(st.integers(0, 2**64 - 1), max_size=50),
    blob=st.binary(max_size=500),
)
def test_every_field_reads_back_as_written(a, b, ds, text, nums, blob):
    body = Writer().u32(a).u64(b).digests(ds).string(text).u64s(nums).blob(blob).body()
    r = Reader(body)
    assert (r.u32(), r.u64(), r.digests(), r.string(), r.u64s(), r.blob()) == (
        a, b, ds, text, nums, blob,
    )  # fmt: skip
    r.end()


@settings(max_examples=200, deadline=None)
@given(ds=digests.filter(bool), cut=st.integers(0, 10_000))
def test_a_truncated_body_is_a_protocol_error_never_a_short_read(ds, cut):
    body = Writer().digests(ds).u64s([1, 2, 3]).body()
    cut = cut % len(body)
    r = Reader(body[:cut])
    with pytest.raises(ProtocolError):
        r.digests()
        r.u64s()
        r.end()


@settings(max_examples=100, deadline=None)
@given(junk=st.binary(max_size=300))
def test_random_bytes_never_escape_as_anything_but_a_protocol_error(junk):
    r = Reader(junk)
    try:
        r.string()
        r.digests()
        r.records(wire.CHUNK_RECORD)
        r.blob(100)
        r.end()
    except ProtocolError:
        pass


def test_lengths_are_checked_before_anything_is_allocated():
    huge_count = struct.pack("<I", 2**31)
    with pytest.raises(ProtocolError, match="longer than"):
        Reader(huge_count).u64s()
    with pytest.raises(ProtocolError, match="longer than"):
        Reader(huge_count).blob(1024)
    a, b = socket.socketpair()
    try:
        a.sendall(struct.pack("<IBI", 2**31, 1, 0))
        with pytest.raises(ProtocolError, match="frame of"):
            wire.read_frame(b)
    finally:
        a.close()
        b.close()
    with pytest.raises(ProtocolError):
        Writer().digest(b"")
    with pytest.raises(ProtocolError):
        Writer().string("x" * (wire.MAX_STRING + 1))


def test_a_string_that_is_not_utf8_is_refused_by_name():
    body = struct.pack("<H", 2) + b"\xff\xfe"
    with pytest.raises(ProtocolError, match="UTF-8"):
        Reader(body).string()


@pytest.mark.parametrize(
    "url, path, tcp",
    [
        ("unix:///run/lmcache/lmcache.sock", "/run/lmcache/lmcache.sock", None),
        ("/run/x.sock", "/run/x.sock", None),
        ("tcp://10.1.2.3:6000", None, ("10.1.2.3", 6000)),
        ("tcp://lmcache.node.svc:5555", None, ("lmcache.node.svc", 5555)),
    ],
)
def test_server_urls_parse(url, path, tcp):
    a = parse_server_url(url)
    assert a.path == path
    if tcp:
        assert (a.host, a.port) == tcp


def test_upstreams_loopback_tcp_means_the_servers_local_socket(monkeypatch, tmp_path):
    monkeypatch.setenv("LMCACHE_SOCKET_DIR", str(tmp_path))
    for url in ("tcp://localhost:5555", "tcp://127.0.0.1:5555", "tcp://[::1]:5555"):
        a = parse_server_url(url)
        assert a.path == str(tmp_path / "lmcache-5555.sock") == local_socket_for_port(5555)


@pytest.mark.parametrize("bad", ["", "http://x:1", "unix://relative.sock", "tcp://:0", "a\0b"])
def test_bad_server_urls_are_refused_with_what_to_write(bad):
    with pytest.raises(ValueError):
        parse_server_url(bad)
    if bad:  # an empty value means "no server" in a config
        with pytest.raises(ConfigError, match="server_url"):
            CacheConfig.from_dict({"server_url": bad})


def test_a_socket_directory_others_can_write_to_is_refused(tmp_path):
    d = tmp_path / "sockets"
    make_socket_dir(str(d))
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    os.chmod(d, 0o777)
    with pytest.raises(PermissionError, match="writable by other users"):
        check_socket_dir(str(d))
    os.chmod(d, 0o1777)  # /tmp's mode: anyone may create the socket name first
    with pytest.raises(PermissionError):
        check_socket_dir(str(d))
