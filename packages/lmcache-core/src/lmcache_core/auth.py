"""Authentication (and optional encryption) of what lmcache writes where others can write.

A checksum catches a flipped bit, not a forger: anyone who can write to a
shared Redis, S3 bucket, shared filesystem or the p2p index could replace
the KV of any key with a frame whose xxh3 is valid, or point an index entry
at other memory. With a *deployment secret* every such value carries a MAC
that only holders of the secret can make:

* the secret comes from ``LMCACHE_AUTH_SECRET`` or from the file named by the
  config key ``auth_secret_file`` (a mounted Kubernetes secret), never from the
  cache config in clear. Several secrets, separated by newlines or commas (one
  per line in the file), make a rotation: the first seals, every one opens.
  Each is checked (:func:`load_secret`): at least 16 bytes, at least 6
  distinct byte values, not a placeholder; the file must be a regular file;
* a shared tier and the p2p index refuse to start without a secret
  (:func:`require_secret`) unless the config opts out,
  ``allow_unauthenticated_shared_tiers: true`` (single-tenant test setups);
* frames on shared tiers (:class:`FrameSealer`) are wrapped in an envelope
  ``"LMCA", version, flags, key id(8), nonce(16), tag(16)`` before the serde's
  frame. The key id names the secret that sealed it (a PRF of the secret, so a
  reader knows whether the frame is one of its own secrets' without trying
  them). The tag is Poly1305 under a one-time key derived from the secret and
  the frame's random nonce (the construction ChaCha20-Poly1305 uses), over the
  envelope fields, the chunk's key (length-prefixed) and the whole inner
  frame. The inner xxh3 is skipped both ways while a MAC covers the frame (it
  would check the same bytes again), and a streaming tier (Redis) seals frame
  i+1 while frame i is sent, so authentication costs a few percent
  (docs/benchmarks.md). Envelope version 1 (no key id, the key not
  length-prefixed) is still read, never written;
* with ``remote_encryption`` the inner frame is encrypted with AES-256-GCM
  under a per-frame key (a reader of the store sees no KV); GCM's tag is the
  MAC then. Such a reader refuses clear frames (:class:`UnencryptedFrameError`);
* p2p index entries and peer records (:class:`IndexSigner`) carry an
  HMAC-SHA256 binding the chunk key, owner, address, size and generation.

Keys are derived per purpose from the secret (HMAC-SHA256 with a label), so a
tag of one kind is never valid as another.

What a reader does with a value that does not open (:meth:`FrameSealer.open`):
:class:`ForgedFrameError` (not sealed at all, a bad envelope, a tag that fails
under one of this instance's own secrets, or bytes that cannot be a frame
under any secret): a miss, and the value is deleted. :class:`ForeignFrameError`
(sealed under a secret this instance does not hold: another deployment's, a
typo, a rotation not rolled out yet): a miss, and the value is left alone, so a
misconfigured instance never deletes a correctly configured fleet's cache.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import stat
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcache_core.errors import ConfigError
from lmcache_core.serdes.base import HEADER_SIZE, MAC_COVERED, ChunkHeader, SerdeError

__all__ = [
    "MAC_COVERED",
    "DeploymentSecret",
    "ForeignFrameError",
    "ForgedFrameError",
    "FrameSealer",
    "IndexSigner",
    "UnencryptedFrameError",
    "load_secret",
    "require_secret",
    "secrets_of",
    "shared_tier_problems",
]

if TYPE_CHECKING:
    from lmcache_core.config import CacheConfig

logger = logging.getLogger(__name__)

SECRET_ENV = "LMCACHE_AUTH_SECRET"
#: The config key that lets shared tiers run without a secret (test setups).
OPT_OUT_KEY = "allow_unauthenticated_shared_tiers"
MIN_SECRET_BYTES = 16
#: Fewer distinct byte values than this is a guessable secret ("aaaa...", "abab...").
#: 32 random hex digits have fewer with a probability below 1e-9, 16 below 1e-4.
MIN_DISTINCT_BYTES = 6
#: A secret file larger than this is not a secret (a wrong path).
MAX_SECRET_FILE_BYTES = 64 << 10
#: Words of placeholders, not secrets (compared lower case, letters and digits only).
_PLACEHOLDER_WORDS = (
    b"changeme",
    b"replaceme",
    b"yoursecret",
    b"secrethere",
    b"placeholder",
    b"opensslrand",  # `openssl rand -hex 32` copied without running it
)
#: ... and how unexpanded templates start.
_TEMPLATE_STARTS = (b"${", b"$(", b"{{", b"<", b"`")
_HOW_TO_SET = (
    "generate one with `openssl rand -hex 32` and give the same secret to every instance, "
    f"in {SECRET_ENV} or in a file named by auth_secret_file (mode 0600)"
)

ENVELOPE_MAGIC = b"LMCA"
#: The envelope version written: 2 has the key id and a length-prefixed chunk key in
#: the MAC's input. Version 1 (before 2026-12-05) is still read.
ENVELOPE_VERSION = 2
FLAG_ENCRYPTED = 1
_ENVELOPE_V1 = struct.Struct("<4sBB16s16s")  # magic, version, flags, nonce, tag
_ENVELOPE = struct.Struct("<4sBB8s16s16s")  # magic, version, flags, key id, nonce, tag
ENVELOPE_SIZE = _ENVELOPE.size
KEY_ID_BYTES = 8
_GCM_NONCE = b"\x00" * 12  # every frame has a key of its own, so a fixed nonce is safe


# --------------------------------------------------------------------------- the secret


class DeploymentSecret(bytes):
    """The deployment secret: its bytes are the secret that seals and signs (the first);
    :attr:`all` holds every secret that opens and verifies, the first one first.

    A ``bytes`` so that every user of one secret (the MP handshake, the admin
    endpoint's token) keeps working; :func:`secrets_of` gives the whole list.
    Its ``repr`` never shows the secret.
    """

    all: tuple[bytes, ...]

    def __new__(cls, secrets: Sequence[bytes]) -> DeploymentSecret:
        if not secrets:
            raise ValueError("a deployment secret needs at least one secret")
        obj = super().__new__(cls, bytes(secrets[0]))
        obj.all = tuple(bytes(s) for s in secrets)
        return obj

    def __repr__(self) -> str:
        return f"<DeploymentSecret: {len(self.all)} secret(s)>"

    __str__ = __repr__

    def __reduce__(self) -> tuple[Any, ...]:
        return (DeploymentSecret, (self.all,))


def secrets_of(secret: bytes | Sequence[bytes]) -> tuple[bytes, ...]:
    """Every secret that opens: ``secret.all`` of a :class:`DeploymentSecret`, else the one."""
    if isinstance(secret, DeploymentSecret):
        return secret.all
    if isinstance(secret, (bytes, bytearray, memoryview)):
        return (bytes(secret),)
    if isinstance(secret, str):  # would iterate its characters
        raise TypeError("a secret is bytes (load_secret gives it), not str")
    out = tuple(bytes(s) for s in secret)
    if not out:
        raise ValueError("no secret given")
    return out


def load_secret(
    config: CacheConfig | None = None, environ: dict[str, str] | None = None
) -> DeploymentSecret | None:
    """The deployment secret (None when none is configured), checked.

    ``LMCACHE_AUTH_SECRET`` (set, even empty) or ``auth_secret_file``; with both
    they must hold the same secrets. Several secrets are separated by newlines or
    commas: the first seals, every one opens (a rotation). Each must be at least
    :data:`MIN_SECRET_BYTES` long, have at least :data:`MIN_DISTINCT_BYTES`
    distinct bytes and not be a placeholder; the file must be a regular file (a
    FIFO would hang the start) and should be readable by its owner only (warned).
    """
    env = os.environ if environ is None else environ
    secrets: tuple[bytes, ...] | None = None
    if SECRET_ENV in env:
        secrets = _parse_secrets(env[SECRET_ENV].encode("utf-8", "surrogateescape"), SECRET_ENV)
    path = config.auth_secret_file if config is not None else None
    if path:
        source = f"auth_secret_file={path!r}"
        from_file = _parse_secrets(_read_secret_file(path), source)
        if secrets is not None and from_file != secrets:
            raise ConfigError([f"{SECRET_ENV} and {source} hold different secrets; set one"])
        secrets = from_file
    return None if secrets is None else DeploymentSecret(secrets)


def _read_secret_file(path: str) -> bytes:
    """The bytes of the secret file: a regular file, checked before it is opened (a FIFO
    would block the open, and a read), opened without blocking, read bounded."""
    p = Path(path).expanduser()
    where = f"auth_secret_file={path!r}"
    try:
        st = os.stat(p)  # follows symlinks: Kubernetes mounts secrets through them
    except OSError as e:
        raise ConfigError(
            [f"{where} cannot be read ({e.strerror}); mount the secret there"]
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(
            [f"{where} is {_file_kind(st.st_mode)}, not a regular file; point it at a file "
             "holding the secret"]
        )  # fmt: skip
    if st.st_size > MAX_SECRET_FILE_BYTES:
        raise ConfigError(
            [f"{where} is {st.st_size} bytes: not a secret file (at most "
             f"{MAX_SECRET_FILE_BYTES} bytes)"]
        )  # fmt: skip
    if st.st_mode & 0o044:
        logger.warning(
            "lmcache: %s is readable by %s (mode %03o): make it readable by this service only "
            "(chmod 600, or defaultMode: 0400 on a Kubernetes secret volume)",
            where,
            "group and others" if st.st_mode & 0o004 and st.st_mode & 0o040 else
            "others" if st.st_mode & 0o004 else "its group",
            stat.S_IMODE(st.st_mode),
        )  # fmt: skip
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(
            [f"{where} cannot be read ({e.strerror}); mount the secret there"]
        ) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced since the stat
            raise ConfigError([f"{where} is not a regular file; point it at the secret's file"])
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_SECRET_FILE_BYTES:
            data = os.read(fd, MAX_SECRET_FILE_BYTES + 1 - size)
            if not data:
                break
            chunks.append(data)
            size += len(data)
        if size > MAX_SECRET_FILE_BYTES:
            raise ConfigError([f"{where} grew past {MAX_SECRET_FILE_BYTES} bytes: not a secret"])
        return b"".join(chunks)
    except OSError as e:
        raise ConfigError([f"{where} cannot be read ({e.strerror})"]) from None
    finally:
        os.close(fd)


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _parse_secrets(raw: bytes, source: str) -> tuple[bytes, ...]:
    """The secrets in ``raw`` (newline- or comma-separated, each stripped), each checked.
    Problems never quote a secret."""
    text = raw.strip()
    if not text:
        what = "empty" if not raw else "whitespace only"
        raise ConfigError([f"{source} is {what}: {_HOW_TO_SET}"])
    parts = [p.strip() for p in re.split(rb"[,\n]", text)]
    problems = []
    for i, part in enumerate(parts):
        which = source if len(parts) == 1 else f"secret {i + 1} of {len(parts)} in {source}"
        weak = _weakness(part)
        if weak:
            problems.append(f"{which} {weak}: {_HOW_TO_SET}")
    if problems:
        raise ConfigError(problems)
    return tuple(dict.fromkeys(parts))  # a secret listed twice counts once


def _weakness(secret: bytes) -> str | None:
    """Why ``secret`` is not one (None when it will do): empty, short, few distinct bytes,
    a placeholder."""
    if not secret:
        return "is empty (two separators in a row?)"
    if len(secret) < MIN_SECRET_BYTES:
        return f"is {len(secret)} bytes; use at least {MIN_SECRET_BYTES} random bytes"
    distinct = len(set(secret))
    if distinct < MIN_DISTINCT_BYTES:
        return (
            f"has {distinct} distinct byte values (at least {MIN_DISTINCT_BYTES}): it is "
            "guessable, not random"
        )
    words = re.sub(rb"[^a-z0-9]", b"", secret.lower())
    if secret.startswith(_TEMPLATE_STARTS) or any(w in words for w in _PLACEHOLDER_WORDS):
        return "is a placeholder or an unexpanded template, not a secret"
    return None


# --------------------------------------------------------------------------- secure by default


def shared_tier_problems(config: CacheConfig, secret: bytes | None) -> list[str]:
    """What this config would refuse at start for want of a secret: its shared tiers (the
    ``remote_url`` tier when it is shared, the p2p index) when no secret is set and the
    config does not opt out. Empty when it would start."""
    if secret is not None or getattr(config, OPT_OUT_KEY, False):
        return []
    shared = []
    if getattr(config, "enable_p2p", False):
        shared.append("the p2p index (p2p_index_url)")
    url = getattr(config, "remote_url", None)
    if url:
        from lmcache_core.plugins import BACKENDS, load_plugin

        scheme = url.split("://", 1)[0].lower()
        try:
            caps = load_plugin(BACKENDS, scheme).capabilities
        except Exception:  # not installed: the config check says so
            caps = None
        if caps is not None and caps.shared:
            shared.append(f"the shared tier remote_url={url!r}")
    return [unauthenticated_message(what) for what in shared]


def unauthenticated_message(what: str) -> str:
    return (
        f"{what} has no deployment secret: anyone who can write to it could serve forged KV "
        f"to every instance, or read one tenant's KV through another's. Set it: {_HOW_TO_SET}. "
        f"For a single-tenant test setup only, {OPT_OUT_KEY}: true runs it without "
        "(docs/security.md)"
    )


def require_secret(config: CacheConfig, secret: bytes | None, what: str) -> None:
    """Refuse to build the shared tier ``what`` without a secret, unless the config opts out."""
    if secret is None and not getattr(config, OPT_OUT_KEY, False):
        raise ConfigError([unauthenticated_message(what)])


# --------------------------------------------------------------------------- frames


def derive_key(secret: bytes, purpose: str) -> bytes:
    """A 32-byte key for one purpose, so tags of one kind never verify as another."""
    return hmac.new(
        secret, b"lmcache-key-derivation\x00" + purpose.encode(), hashlib.sha256
    ).digest()


def _crypto():  # type: ignore[no-untyped-def]
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.poly1305 import Poly1305
    except ImportError:
        raise ConfigError(
            [
                "authenticated tiers (LMCACHE_AUTH_SECRET / auth_secret_file) need the "
                "cryptography package: pip install 'lmcache-core[auth]'"
            ]
        ) from None
    return Poly1305, AESGCM


class _FrameKeys:
    """One secret's frame keys: version 2's (with its key id) and version 1's."""

    __slots__ = ("enc", "enc_v1", "key_id", "mac", "mac_v1")

    def __init__(self, secret: bytes) -> None:
        self.mac = derive_key(secret, "frame-mac-v2")
        self.enc = derive_key(secret, "frame-encryption-v2")
        self.key_id = derive_key(secret, "frame-key-id-v2")[:KEY_ID_BYTES]
        self.mac_v1 = derive_key(secret, "frame-mac")
        self.enc_v1 = derive_key(secret, "frame-encryption")


def _bound_key(key: bytes) -> bytes:
    """The chunk key as the MAC reads it: length-prefixed (u32 LE), so the boundary
    between key and frame is part of what is authenticated."""
    return len(key).to_bytes(4, "little") + key


class FrameSealer:
    """Wraps serde frames in an authenticated (optionally encrypted) envelope, and unwraps them.

    ``secret``: a :class:`DeploymentSecret` (its first secret seals, all open), one
    secret, or a list of them. ``encrypt``: seal encrypted, and refuse clear frames.
    """

    def __init__(self, secret: bytes | Sequence[bytes], *, encrypt: bool = False) -> None:
        self._poly, self._gcm = _crypto()
        self._keys = [_FrameKeys(s) for s in secrets_of(secret)]
        self._by_id = {}
        for k in self._keys:
            self._by_id.setdefault(k.key_id, k)
        self.encrypt = encrypt

    @property
    def key_id(self) -> bytes:
        """The id of the secret that seals (in every envelope this sealer writes)."""
        return self._keys[0].key_id

    def _one_time_key(self, base: bytes, nonce: bytes) -> bytes:
        return hmac.new(base, nonce, hashlib.sha256).digest()

    def seal(self, key: bytes, parts: list[bytes | memoryview]) -> list[bytes | memoryview]:
        """The envelope and ``parts`` (the serde's frame) as buffers to write in order."""
        keys = self._keys[0]
        nonce = os.urandom(16)
        flags = FLAG_ENCRYPTED if self.encrypt else 0
        fields = ENVELOPE_MAGIC + bytes((ENVELOPE_VERSION, flags)) + keys.key_id + nonce
        bound = fields + _bound_key(key)
        if self.encrypt:
            inner = b"".join(bytes(p) if not isinstance(p, bytes) else p for p in parts)
            gcm = self._gcm(self._one_time_key(keys.enc, nonce))
            sealed = gcm.encrypt(_GCM_NONCE, inner, bound)
            body, tag = memoryview(sealed)[:-16], sealed[-16:]
            return [fields + tag, body]
        mac = self._poly(self._one_time_key(keys.mac, nonce))
        mac.update(bound)
        for p in parts:
            mac.update(p)
        tag = mac.finalize()
        return [fields + tag, *parts]

    def open(
        self, key: bytes, value: bytes | memoryview, *, max_raw_nbytes: int = 1 << 62
    ) -> memoryview:
        """The inner frame of ``value`` once its tag checks out.

        Raises :class:`ForgedFrameError` (delete it), :class:`ForeignFrameError`
        (sealed under a secret this sealer does not hold: leave it) or
        :class:`UnencryptedFrameError` (a clear frame of this deployment, and this
        sealer requires encryption). ``max_raw_nbytes`` bounds the chunk a frame
        of another secret could hold (a larger claim cannot be a frame at all).
        """
        view = memoryview(value).cast("B")
        if view.nbytes < 6 or bytes(view[:4]) != ENVELOPE_MAGIC:
            raise ForgedFrameError("value is not authenticated (written without the secret)")
        version = view[4]
        if version == ENVELOPE_VERSION:
            return self._open_v2(key, view, max_raw_nbytes)
        if version == 1:
            return self._open_v1(key, view, max_raw_nbytes)
        if version > ENVELOPE_VERSION:  # a later lmcache's: not this instance's to judge
            raise ForeignFrameError(f"envelope version {version} is newer than this lmcache's")
        raise ForgedFrameError(f"envelope version {version} does not exist")

    def _open_v2(self, key: bytes, view: memoryview, max_raw_nbytes: int) -> memoryview:
        if view.nbytes < ENVELOPE_SIZE:
            raise ForgedFrameError("value is shorter than an authenticated envelope")
        _, _, flags, key_id, nonce, tag = _ENVELOPE.unpack_from(view)
        if flags & ~FLAG_ENCRYPTED:
            raise ForgedFrameError(f"envelope flags {flags:#x} not supported")
        body = view[ENVELOPE_SIZE:]
        keys = self._by_id.get(key_id)
        if keys is None:
            _check_plausible(key, flags, body, max_raw_nbytes)
            raise ForeignFrameError(
                f"sealed under a secret this instance does not hold (key id {key_id.hex()})"
            )
        bound = bytes(view[: ENVELOPE_SIZE - 16]) + _bound_key(key)
        if flags & FLAG_ENCRYPTED:
            gcm = self._gcm(self._one_time_key(keys.enc, nonce))
            try:
                inner = gcm.decrypt(_GCM_NONCE, bytes(body) + tag, bound)
            except Exception:
                raise ForgedFrameError(
                    "encrypted frame fails its tag (forged or damaged)"
                ) from None
            return memoryview(inner)
        mac = self._poly(self._one_time_key(keys.mac, nonce))
        mac.update(bound)
        mac.update(body)
        try:
            mac.verify(tag)
        except Exception:
            raise ForgedFrameError("frame fails its MAC (forged or damaged)") from None
        if self.encrypt:
            raise UnencryptedFrameError("frame is not encrypted and remote_encryption requires it")
        return body

    def _open_v1(self, key: bytes, view: memoryview, max_raw_nbytes: int) -> memoryview:
        """Envelope version 1: no key id (every secret is tried), the key not
        length-prefixed in the MAC's input (the inner header's key check binds it)."""
        if view.nbytes < _ENVELOPE_V1.size:
            raise ForgedFrameError("value is shorter than an authenticated envelope")
        _, _, flags, nonce, tag = _ENVELOPE_V1.unpack_from(view)
        if flags & ~FLAG_ENCRYPTED:
            raise ForgedFrameError(f"envelope flags {flags:#x} not supported")
        fields = bytes(view[: _ENVELOPE_V1.size - 16])
        body = view[_ENVELOPE_V1.size :]
        for keys in self._keys:
            if flags & FLAG_ENCRYPTED:
                gcm = self._gcm(self._one_time_key(keys.enc_v1, nonce))
                try:
                    return memoryview(gcm.decrypt(_GCM_NONCE, bytes(body) + tag, fields + key))
                except Exception:
                    continue
            mac = self._poly(self._one_time_key(keys.mac_v1, nonce))
            mac.update(fields)
            mac.update(key)
            mac.update(body)
            try:
                mac.verify(tag)
            except Exception:
                continue
            if self.encrypt:
                raise UnencryptedFrameError(
                    "frame is not encrypted and remote_encryption requires it"
                )
            return body
        _check_plausible(key, flags, body, max_raw_nbytes)
        raise ForeignFrameError(
            "version-1 frame that no secret of this instance opens (another secret's, or damaged)"
        )


def _check_plausible(key: bytes, flags: int, body: memoryview, max_raw_nbytes: int) -> None:
    """A frame sealed under another secret must still look like one; ForgedFrameError if
    it cannot be (bad structure, wrong size): such a value is deleted."""
    if flags & FLAG_ENCRYPTED:
        if body.nbytes < HEADER_SIZE + len(key):
            raise ForgedFrameError("encrypted value is too short to hold a frame")
        return
    try:
        header = ChunkHeader.unpack(body, max_raw_nbytes=max_raw_nbytes)
    except SerdeError as e:
        raise ForgedFrameError(f"sealed value holds no frame ({e})") from None
    if header.key != key:
        raise ForgedFrameError("sealed value holds another key's frame")
    if body.nbytes != header.size + header.payload_nbytes:
        raise ForgedFrameError("sealed value's frame has the wrong size")


class ForgedFrameError(SerdeError):
    """A value on a shared tier that does not carry a valid tag under this deployment's
    secret, and cannot be another secret's frame either: deleted."""


class ForeignFrameError(SerdeError):
    """A frame sealed under a secret this instance does not hold: a miss, left in place."""


class UnencryptedFrameError(SerdeError):
    """A clear frame of this deployment read by an instance that requires encryption."""


class IndexSigner:
    """HMAC-SHA256 tags of p2p index entries and peer records (16 bytes, hex in entries).

    ``secret`` as for :class:`FrameSealer`: the first secret signs, every one verifies.
    """

    TAG_BYTES = 16

    def __init__(self, secret: bytes | Sequence[bytes]) -> None:
        self._keys = [derive_key(s, "p2p-index") for s in secrets_of(secret)]

    def _tag(self, key: bytes, kind: bytes, fields: tuple[bytes, ...]) -> bytes:
        h = hmac.new(key, kind, hashlib.sha256)
        for f in fields:
            h.update(len(f).to_bytes(4, "little"))
            h.update(f)
        return h.digest()[: self.TAG_BYTES]

    def tag(self, kind: bytes, *fields: bytes) -> bytes:
        return self._tag(self._keys[0], kind, fields)

    def check(self, tag: bytes, kind: bytes, *fields: bytes) -> bool:
        return any(hmac.compare_digest(tag, self._tag(k, kind, fields)) for k in self._keys)


def warn_unauthenticated(tier: str) -> None:
    logger.warning(
        "lmcache: the shared %s tier is NOT authenticated (%s: true): anyone who can write to "
        "it can replace the KV of any prompt (set %s or auth_secret_file on every instance)",
        tier,
        OPT_OUT_KEY,
        SECRET_ENV,
    )
