"""Issue 32, items 1, 2, 4 and 11: shared tiers are safe by default.

* 1: a shared tier (Redis/Valkey, S3, shared fs, the p2p index) refuses to start
  without a deployment secret unless the config opts out; a weak secret, or a
  secret file that is not a regular file, is refused; one others can read warns.
* 2: a reader that requires encryption treats a clear frame as a counted miss.
* 4: an instance with another secret misses, and never deletes the fleet's valid
  frames; a list of secrets rotates (the first seals, every one opens).
* 11: the chunk key is length-prefixed in the frame MAC's input (envelope v2),
  and version-1 frames are still read.

Real files and a real redis-server; the cases that fit every backend are in the
shipped hostile suite (``lmcache_core.testing.hostile_tests``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import uuid

import pytest
from lmcache_core import CacheConfig, CacheEngine, KVLayout
from lmcache_core.auth import (
    ENVELOPE_VERSION,
    SECRET_ENV,
    ForeignFrameError,
    ForgedFrameError,
    FrameSealer,
    IndexSigner,
    UnencryptedFrameError,
    derive_key,
    load_secret,
    shared_tier_problems,
)
from lmcache_core.backends.base import BackendContext
from lmcache_core.backends.fs import SharedFSBackend
from lmcache_core.backends.redis import RedisBackend
from lmcache_core.errors import ConfigError
from lmcache_core.metrics import Metrics
from lmcache_core.pool import SlotPool
from lmcache_core.serdes.compressed import ZstdSerde
from lmcache_core.serdes.naive import NaiveSerde
from lmcache_core.testing import ChunkFactory, chunk_payload, test_key
from lmcache_core.testing.paged_memory import PagedKVMemory
from lmcache_core.testing.scratch import scratch_dir
from lmcache_core.testing.servers import RedisServer

LAYOUT = KVLayout(
    kind="vllm_flash", dtype="bfloat16", num_layers=2, num_kv_heads=2, head_size=8, block_size=4
)
SECRET = "shared-tier-defaults-secret-0123456789"
OTHER = "another-deployments-secret-9876543210"


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as s:
        yield s


@pytest.fixture
def no_secret(monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)


def _frame(key: bytes, data: bytes, tokens: int = 16) -> bytes:
    return b"".join(bytes(p) for p in NaiveSerde().encode(key, tokens, memoryview(data)))


def _put(backend, f, ids, nbytes=4096):
    made = [f.make(test_key(i), nbytes) for i in ids]
    assert backend.put(made) == [True] * len(made)
    for c in made:
        c.release()


def _batch(backend, f, ids):
    out = []
    for c in backend.get([test_key(i) for i in ids], f.allocate):
        out.append(None if c is None else bytes(c.view))
        if c is not None:
            c.release()
    return out


def _redis(url, prefix, secret=None, *, encrypt=False, metrics=None) -> RedisBackend:
    if isinstance(secret, str):
        secret = secret.encode()
    sealer = FrameSealer(secret, encrypt=encrypt) if secret is not None else None
    return RedisBackend(url, key_prefix=prefix, sealer=sealer, metrics=metrics or Metrics())


# ---------------------------------------------------------------------------- item 1: refusal


@pytest.mark.parametrize(
    "values, what",
    [
        ({"remote_url": "redis://127.0.0.1:1"}, "remote_url='redis://127.0.0.1:1'"),
        ({"remote_url": "valkey://127.0.0.1:1"}, "remote_url='valkey://127.0.0.1:1'"),
        ({"remote_url": "s3://bucket/prefix"}, "remote_url='s3://bucket/prefix'"),
        ({"remote_url": "fs:///mnt/shared/kv"}, "remote_url='fs:///mnt/shared/kv'"),
        ({"enable_p2p": True, "p2p_index_url": "redis://127.0.0.1:1"}, "the p2p index"),
    ],
)
def test_every_shared_tier_needs_a_secret_or_the_explicit_opt_out(no_secret, values, what):
    config = CacheConfig.from_dict(values)
    (problem,) = shared_tier_problems(config, load_secret(config))
    assert what in problem and "has no deployment secret" in problem, problem
    assert SECRET_ENV in problem and "auth_secret_file" in problem, problem
    assert "openssl rand -hex 32" in problem, "the message says how to make one"
    assert "allow_unauthenticated_shared_tiers: true" in problem, problem
    opted_out = config.replace(allow_unauthenticated_shared_tiers=True)
    assert shared_tier_problems(opted_out, None) == []
    assert shared_tier_problems(config, load_secret(config, {SECRET_ENV: SECRET})) == []


def test_local_tiers_need_no_secret(no_secret, tmp_path):
    config = CacheConfig.from_dict(
        {"local_disk": str(tmp_path), "max_local_disk_size": "1MiB", "max_local_cpu_size": "1MiB"}
    )
    assert shared_tier_problems(config, None) == []
    CacheEngine(config, model="m", layout=LAYOUT).close()


def test_an_engine_over_a_shared_tier_refuses_to_start_without_a_secret(no_secret, redis_server):
    values = {"chunk_size": 16, "max_local_cpu_size": "1MiB", "remote_url": redis_server.url}
    with pytest.raises(ConfigError, match="has no deployment secret"):
        CacheEngine(CacheConfig.from_dict(values), model="m", layout=LAYOUT)
    fs = {**values, "remote_url": f"fs://{scratch_dir()}"}
    with pytest.raises(ConfigError, match="has no deployment secret"):
        CacheEngine(CacheConfig.from_dict(fs), model="m", layout=LAYOUT)
    p2p = {"chunk_size": 16, "max_local_cpu_size": "1MiB", "enable_p2p": True,
           "p2p_index_url": redis_server.url}  # fmt: skip
    with pytest.raises(ConfigError, match="the p2p index .* has no deployment secret"):
        CacheEngine(CacheConfig.from_dict(p2p), model="m", layout=LAYOUT)
    # The opt-out by environment variable too (what a test setup sets).
    env = {"LMCACHE_REMOTE_URL": redis_server.url, "LMCACHE_CHUNK_SIZE": "16",
           "LMCACHE_MAX_LOCAL_CPU_SIZE": "1MiB",
           "LMCACHE_ALLOW_UNAUTHENTICATED_SHARED_TIERS": "true"}  # fmt: skip
    with CacheEngine(CacheConfig.load(env), model="m", layout=LAYOUT) as engine:
        assert engine.metrics.get("lmcache:tier_authenticated", tier="redis") == 0


@pytest.mark.parametrize(
    "value, words",
    [
        ("", "is empty"),
        ("   \t ", "is whitespace only"),
        ("\n", "is whitespace only"),
        ("a" * 40, "distinct byte values"),
        ("ab" * 20, "distinct byte values"),
        ("abcabcabcabcabcabcabc", "distinct byte values"),
        ("changeme-please-0123456789", "placeholder"),
        ("${LMCACHE_AUTH_SECRET_VALUE}", "placeholder"),
        ("$(openssl rand -hex 32)", "placeholder"),
        ("short-but-mixed", "at least 16"),
        (f"{SECRET},,{OTHER}", "is empty"),
        (f"{SECRET},aaaaaaaaaaaaaaaaaaaa", "secret 2 of 2"),
    ],
)
def test_an_empty_whitespace_or_low_entropy_secret_is_refused(value, words):
    with pytest.raises(ConfigError) as e:
        load_secret(CacheConfig(), {SECRET_ENV: value})
    text = str(e.value)
    assert words in text and "openssl rand -hex 32" in text, text
    for part in value.split(","):
        if len(part.strip()) >= 8:
            assert part.strip() not in text, "a problem never quotes the secret"


def test_a_fifo_as_the_secret_file_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "secret"
    os.mkfifo(fifo, 0o600)
    result: list[BaseException | object] = []

    def load() -> None:
        try:
            result.append(load_secret(CacheConfig(auth_secret_file=str(fifo)), {}))
        except BaseException as e:  # handed to the test's thread
            result.append(e)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():  # unblock it (a writer opens the FIFO), then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(5)
        pytest.fail("reading a FIFO as the secret file hung the start")
    (err,) = result
    assert isinstance(err, ConfigError) and "is a FIFO, not a regular file" in str(err), err
    (tmp_path / "dir").mkdir()
    with pytest.raises(ConfigError, match="is a directory, not a regular file"):
        load_secret(CacheConfig(auth_secret_file=str(tmp_path / "dir")), {})
    with pytest.raises(ConfigError, match="is a character device"):
        load_secret(CacheConfig(auth_secret_file="/dev/zero"), {})


def test_a_secret_file_others_can_read_warns_and_one_per_line_rotates(tmp_path, caplog):
    path = tmp_path / "secret"
    path.write_text(f"{SECRET}\n{OTHER}\n")
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="lmcache_core.auth"):
        secret = load_secret(CacheConfig(auth_secret_file=str(path)), {})
    assert "readable" not in caplog.text
    assert secret == SECRET.encode() and secret.all == (SECRET.encode(), OTHER.encode())
    assert SECRET not in repr(secret) and SECRET not in str(secret)
    for mode, who in ((0o640, "its group"), (0o604, "others"), (0o644, "group and others")):
        caplog.clear()
        path.chmod(mode)
        with caplog.at_level(logging.WARNING, logger="lmcache_core.auth"):
            assert load_secret(CacheConfig(auth_secret_file=str(path)), {}) == secret
        assert f"readable by {who}" in caplog.text and "chmod 600" in caplog.text, caplog.text
    # The environment and the file must agree (every secret, in order).
    with pytest.raises(ConfigError, match="different secrets"):
        load_secret(CacheConfig(auth_secret_file=str(path)), {SECRET_ENV: SECRET})
    both = f"{SECRET},{OTHER}"
    assert load_secret(CacheConfig(auth_secret_file=str(path)), {SECRET_ENV: both}) == secret


# ---------------------------------------------------------------------------- item 2: encryption


def test_a_reader_that_requires_encryption_refuses_clear_frames_and_counts_them(redis_server):
    f = ChunkFactory(4096)
    prefix = f"enc-{uuid.uuid4().hex[:8]}:"
    clear_writer = _redis(redis_server.url, prefix, SECRET)  # remote_encryption off
    reader = _redis(redis_server.url, prefix, SECRET, encrypt=True)
    _put(reader, f, [1, 3])  # encrypted
    _put(clear_writer, f, [2])  # one writer without remote_encryption
    got = _batch(reader, f, [1, 2, 3])
    assert got == [chunk_payload(test_key(1), 4096), None, chunk_payload(test_key(3), 4096)]
    assert reader.metrics.get("lmcache:num_unencrypted_chunks", tier="redis") == 1
    assert reader.metrics.get("lmcache:num_forged_chunks", tier="redis") == 0
    assert reader.client.exists(reader.name_of(test_key(2))) == 0, "deleted: replaced encrypted"
    _put(reader, f, [2])
    assert _batch(reader, f, [2]) == [chunk_payload(test_key(2), 4096)]
    # A reader without the requirement reads both kinds (turning encryption on is a rollout).
    _put(clear_writer, f, [4])
    assert _batch(clear_writer, f, [1, 4]) == [
        chunk_payload(test_key(1), 4096),
        chunk_payload(test_key(4), 4096),
    ]


def test_the_sealer_with_encryption_refuses_a_clear_frame_of_its_own_secret():
    frame = _frame(b"k" * 40, b"\x01" * 64)
    clear = b"".join(bytes(p) for p in FrameSealer(SECRET.encode()).seal(b"k" * 40, [frame]))
    with pytest.raises(UnencryptedFrameError):
        FrameSealer(SECRET.encode(), encrypt=True).open(b"k" * 40, clear)
    assert bytes(FrameSealer(SECRET.encode()).open(b"k" * 40, clear)) == frame


# ---------------------------------------------------------------------------- item 4: other secrets


def test_an_instance_with_another_secret_leaves_the_fleets_frames_in_place(
    redis_server, monkeypatch
):
    """A typo, a rotation, staging sharing prod's Redis: the misconfigured instance misses;
    the correctly configured one still hits afterwards."""
    src, dst = PagedKVMemory(LAYOUT, seed=1), PagedKVMemory(LAYOUT, seed=2)
    tokens = list(range(64))
    cfg = CacheConfig.from_dict(
        {
            "chunk_size": 16,
            "max_local_cpu_size": "1MiB",
            "remote_url": redis_server.url,
            "extra_config": {"redis_key_prefix": f"fleet-{uuid.uuid4().hex[:8]}:"},
        }
    )
    monkeypatch.setenv(SECRET_ENV, SECRET)
    with CacheEngine(cfg, model="m", layout=LAYOUT) as fleet:
        assert fleet.store(tokens, src.kv(src.table(64, 0))) == 64
        assert fleet.flush(10)
        redis = fleet.tiers[1].backend
        names = [redis.name_of(k) for k in fleet.keys(fleet.spans(tokens))]
        before = [redis.client.get(n) for n in names]
    monkeypatch.setenv(SECRET_ENV, OTHER)
    with CacheEngine(cfg, model="m", layout=LAYOUT) as staging:
        for _ in range(3):
            assert staging.retrieve(tokens, dst.kv(dst.table(64, 1))) == 0
        assert staging.metrics.get("lmcache:num_foreign_chunks", tier="redis") >= 1
        assert staging.metrics.get("lmcache:num_forged_chunks", tier="redis") == 0
        assert [redis.client.get(n) for n in names] == before, "valid frames were deleted"
    monkeypatch.setenv(SECRET_ENV, SECRET)
    with CacheEngine(cfg, model="m", layout=LAYOUT) as fleet:
        t = dst.table(64, 3)
        assert fleet.retrieve(tokens, dst.kv(t)) == 64
        assert dst.tokens_kv(t, 0, 64) == src.tokens_kv(src.table(64, 0), 0, 64)


def test_a_value_that_cannot_be_any_secrets_frame_is_still_deleted(redis_server):
    """Only a value that could be a frame under another secret is left: a bad structure,
    a wrong size or another key's frame in an envelope is forged, and deleted."""
    f = ChunkFactory(4096)
    b = _redis(redis_server.url, f"cant-{uuid.uuid4().hex[:8]}:", SECRET)
    b.max_chunk_bytes = 8192  # a slot: what the engine's pool gives a tier
    other = FrameSealer(OTHER.encode())
    key = test_key(1).to_bytes()
    # A few bytes that claim a 1 MiB chunk (zeros, compressed): no slot holds it.
    big = b"".join(bytes(p) for p in ZstdSerde().encode(key, 16, memoryview(b"\x00" * (1 << 20))))
    inner = _frame(key, chunk_payload(test_key(1), 4096))
    cases = {
        "garbage body": other.seal(key, [os.urandom(len(inner))]),
        "short": other.seal(key, [inner[:-100]]),
        "another key's frame": other.seal(key, [_frame(test_key(2).to_bytes(), b"\x00" * 4096)]),
        "a chunk larger than a slot": other.seal(key, [big]),
    }
    for what, parts in cases.items():
        b.client.set(b.name_of(test_key(1)), b"".join(bytes(p) for p in parts))
        assert _batch(b, f, [1]) == [None], what
        assert b.client.exists(b.name_of(test_key(1))) == 0, f"{what} was left in place"
    assert b.metrics.get("lmcache:num_forged_chunks", tier="redis") == len(cases)
    assert b.metrics.get("lmcache:num_foreign_chunks", tier="redis") == 0


def test_rotation_the_first_secret_seals_and_every_one_opens(redis_server, tmp_path):
    f = ChunkFactory(4096)
    prefix = f"rot-{uuid.uuid4().hex[:8]}:"
    old = load_secret(CacheConfig(), {SECRET_ENV: OTHER})
    rotated = load_secret(CacheConfig(), {SECRET_ENV: f"{SECRET},{OTHER}"})
    new = load_secret(CacheConfig(), {SECRET_ENV: SECRET})
    a, b, c = (_redis(redis_server.url, prefix, s) for s in (old, rotated, new))
    _put(a, f, [1])  # an instance not rotated yet
    assert _batch(b, f, [1]) == [chunk_payload(test_key(1), 4096)]  # rotated opens the old
    _put(b, f, [2])  # ... and seals with the new
    assert _batch(c, f, [2]) == [chunk_payload(test_key(2), 4096)]
    assert _batch(a, f, [2]) == [None]  # the old one cannot open it: a miss, left alone
    assert a.client.exists(a.name_of(test_key(2))) == 1
    assert a.metrics.get("lmcache:num_foreign_chunks", tier="redis") == 1
    assert _batch(c, f, [1]) == [None]  # the old secret dropped: its frames are foreign
    assert c.client.exists(c.name_of(test_key(1))) == 1
    # The p2p index's tags rotate the same way.
    signer_old, signer_rot = IndexSigner(old), IndexSigner(rotated)
    tag = signer_old.tag(b"entry", b"k", b"owner")
    assert signer_rot.check(tag, b"entry", b"k", b"owner")
    assert not IndexSigner(new).check(tag, b"entry", b"k", b"owner")
    new_tag = signer_rot.tag(b"entry", b"k", b"owner")  # signed with the first secret
    assert not signer_old.check(new_tag, b"entry", b"k", b"owner")
    # The same rotation from a file, one secret a line (a mounted Kubernetes secret).
    path = tmp_path / "secret"
    path.write_text(f"{SECRET}\n{OTHER}\n")
    path.chmod(0o600)
    assert load_secret(CacheConfig(auth_secret_file=str(path)), {}).all == rotated.all


def test_a_shared_fs_instance_with_another_secret_deletes_nothing(tmp_path):
    f = ChunkFactory(4096)
    root = scratch_dir()
    fleet = SharedFSBackend(root, sealer=FrameSealer(SECRET.encode()), max_chunk_bytes=4096)
    staging = SharedFSBackend(root, sealer=FrameSealer(OTHER.encode()), max_chunk_bytes=4096)
    _put(fleet, f, [1, 2])
    assert _batch(staging, f, [1, 2]) == [None, None]
    assert _batch(fleet, f, [1, 2]) == [chunk_payload(test_key(i), 4096) for i in (1, 2)]


# ---------------------------------------------------------------------------- item 11: envelope v2


def _v1_sealed(secret: bytes, key: bytes, inner: bytes, *, encrypt: bool = False) -> bytes:
    """A frame as lmcache sealed it before envelope version 2 (2026-12): no key id, the
    MAC over ``fields | key | body`` with no length."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.poly1305 import Poly1305

    nonce = os.urandom(16)
    fields = b"LMCA" + bytes((1, 1 if encrypt else 0)) + nonce
    if encrypt:
        otk = hmac.new(derive_key(secret, "frame-encryption"), nonce, hashlib.sha256).digest()
        sealed = AESGCM(otk).encrypt(b"\x00" * 12, inner, fields + key)
        return fields + sealed[-16:] + sealed[:-16]
    otk = hmac.new(derive_key(secret, "frame-mac"), nonce, hashlib.sha256).digest()
    mac = Poly1305(otk)
    mac.update(fields + key + inner)
    return fields + mac.finalize() + inner


def test_the_key_is_length_prefixed_in_the_mac_input():
    """Moving the boundary between the key and the frame must break the tag: under the old
    MAC (``fields | key | body``) ``(key + b[0], b[1:])`` verified as ``(key, b)``."""
    sealer = FrameSealer(SECRET.encode())
    key = test_key(1).to_bytes()
    inner = _frame(key, b"\x05" * 256)
    value = b"".join(bytes(p) for p in sealer.seal(key, [inner]))
    assert value[4] == ENVELOPE_VERSION == 2
    assert bytes(sealer.open(key, value)) == inner
    head = len(value) - len(inner)
    shifted = value[:head] + inner[1:]
    with pytest.raises(ForgedFrameError):
        sealer.open(key + inner[:1], shifted)
    with pytest.raises(ForgedFrameError):
        sealer.open(key[:-1], value[:head] + key[-1:] + inner)
    encrypting = FrameSealer(SECRET.encode(), encrypt=True)
    sealed = b"".join(bytes(p) for p in encrypting.seal(key, [inner]))
    with pytest.raises(ForgedFrameError):
        encrypting.open(key[:-1], sealed)


@pytest.mark.parametrize("encrypt", [False, True], ids=["mac", "encrypted"])
def test_version_1_frames_are_still_read(encrypt):
    key = test_key(3).to_bytes()
    inner = _frame(key, b"\x09" * 512)
    v1 = _v1_sealed(SECRET.encode(), key, inner, encrypt=encrypt)
    assert bytes(FrameSealer(SECRET.encode(), encrypt=encrypt).open(key, v1)) == inner
    # Under any secret of a rotation, and tampered it is forged.
    rotated = FrameSealer([OTHER.encode(), SECRET.encode()], encrypt=encrypt)
    assert bytes(rotated.open(key, v1)) == inner
    # Another deployment's version-1 frame that still looks like one is left alone ...
    with pytest.raises(ForeignFrameError):
        FrameSealer(OTHER.encode(), encrypt=encrypt).open(key, v1)
    # ... and garbage in a version-1 envelope is not.
    if not encrypt:
        junk = v1[:38] + os.urandom(len(inner))
        with pytest.raises(ForgedFrameError):
            FrameSealer(OTHER.encode()).open(key, junk)


def test_a_backend_reads_version_1_frames_from_before_the_upgrade(redis_server):
    f = ChunkFactory(4096)
    b = _redis(redis_server.url, f"v1-{uuid.uuid4().hex[:8]}:", SECRET.encode())
    key = test_key(5)
    inner = _frame(key.to_bytes(), chunk_payload(key, 4096))
    b.client.set(b.name_of(key), _v1_sealed(SECRET.encode(), key.to_bytes(), inner))
    assert _batch(b, f, [5]) == [chunk_payload(key, 4096)]


def test_common_kwargs_seal_with_every_secret_of_the_context():
    pool = SlotPool.anonymous(1 << 20, 8192)
    secret = load_secret(CacheConfig(), {SECRET_ENV: f"{SECRET},{OTHER}"})
    ctx = BackendContext(layout=None, pool=pool, metrics=Metrics(), secret=secret)
    config = CacheConfig.from_dict({"remote_url": f"fs://{scratch_dir()}"})
    sealer = SharedFSBackend.common_kwargs(config, ctx)["sealer"]
    key = test_key(1).to_bytes()
    inner = _frame(key, b"\x01" * 64)
    old = b"".join(bytes(p) for p in FrameSealer(OTHER.encode()).seal(key, [inner]))
    assert bytes(sealer.open(key, old)) == inner
    assert sealer.key_id == FrameSealer(SECRET.encode()).key_id
