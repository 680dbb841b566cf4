"""Authentication (and optional encryption) of what lmcache writes where others can write.

A checksum catches a flipped bit, not a forger: anyone who can write to a
shared Redis, S3 bucket, shared filesystem or the p2p index could replace
the KV of any key with a frame whose xxh3 is valid, or point an index entry
at other memory. With a *deployment secret* every such value carries a MAC
that only holders of the secret can make:

* the secret comes from ``LMCACHE_AUTH_SECRET`` or from the file named by the
  config key ``auth_secret_file`` (a mounted Kubernetes secret), never from the
  cache config in clear; at least 16 bytes;
* frames on shared tiers (:class:`FrameSealer`) are wrapped in an envelope
  ``"LMCA", version, flags, nonce(16), tag(16)`` before the serde's frame. The
  tag is Poly1305 under a one-time key derived from the secret and the frame's
  random nonce (the construction ChaCha20-Poly1305 uses), over the envelope
  fields, the chunk's key and the whole inner frame. The inner xxh3 is
  skipped both ways while a MAC covers the frame (it would check the same
  bytes again), and a streaming tier (Redis) seals frame i+1 while frame i is
  sent, so authentication costs a few percent (docs/benchmarks.md);
* with ``remote_encryption`` the inner frame is encrypted with AES-256-GCM
  under a per-frame key (a reader of the store sees no KV); GCM's tag is the
  MAC then;
* p2p index entries and peer records (:class:`IndexSigner`) carry an
  HMAC-SHA256 binding the chunk key, owner, address, size and generation.

Keys are derived per purpose from the secret (HMAC-SHA256 with a label), so a
tag of one kind is never valid as another.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from lmcache_core.errors import ConfigError
from lmcache_core.serdes.base import MAC_COVERED, SerdeError

__all__ = ["MAC_COVERED", "ForgedFrameError", "FrameSealer", "IndexSigner", "load_secret"]

if TYPE_CHECKING:
    from lmcache_core.config import CacheConfig

logger = logging.getLogger(__name__)

SECRET_ENV = "LMCACHE_AUTH_SECRET"
MIN_SECRET_BYTES = 16

ENVELOPE_MAGIC = b"LMCA"
ENVELOPE_VERSION = 1
FLAG_ENCRYPTED = 1
_ENVELOPE = struct.Struct("<4sBB16s16s")  # magic, version, flags, nonce, tag
ENVELOPE_SIZE = _ENVELOPE.size
_GCM_NONCE = b"\x00" * 12  # every frame has a key of its own, so a fixed nonce is safe


def load_secret(
    config: CacheConfig | None = None, environ: dict[str, str] | None = None
) -> bytes | None:
    """The deployment secret (None when none is configured), checked."""
    env = os.environ if environ is None else environ
    raw: bytes | None = None
    source = ""
    if env.get(SECRET_ENV):
        raw, source = env[SECRET_ENV].encode(), SECRET_ENV
    path = config.auth_secret_file if config is not None else None
    if path:
        try:
            from_file = Path(path).expanduser().read_bytes().strip()
        except OSError as e:
            raise ConfigError(
                [f"auth_secret_file={path!r} cannot be read ({e.strerror}); mount the secret there"]
            ) from None
        if raw is not None and from_file != raw:
            raise ConfigError(
                [f"{SECRET_ENV} and auth_secret_file={path!r} hold different secrets; set one"]
            )
        raw, source = from_file, f"auth_secret_file={path!r}"
    if raw is None:
        return None
    if len(raw) < MIN_SECRET_BYTES:
        raise ConfigError(
            [
                f"the secret in {source} is {len(raw)} bytes; use at least {MIN_SECRET_BYTES} "
                "random bytes (e.g. `openssl rand -hex 32`)"
            ]
        )
    return raw


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


class FrameSealer:
    """Wraps serde frames in an authenticated (optionally encrypted) envelope, and unwraps them."""

    def __init__(self, secret: bytes, *, encrypt: bool = False) -> None:
        self._poly, self._gcm = _crypto()
        self._mac_key = derive_key(secret, "frame-mac")
        self._enc_key = derive_key(secret, "frame-encryption")
        self.encrypt = encrypt

    def _one_time_key(self, base: bytes, nonce: bytes) -> bytes:
        return hmac.new(base, nonce, hashlib.sha256).digest()

    def seal(self, key: bytes, parts: list[bytes | memoryview]) -> list[bytes | memoryview]:
        """The envelope and ``parts`` (the serde's frame) as buffers to write in order."""
        nonce = os.urandom(16)
        flags = FLAG_ENCRYPTED if self.encrypt else 0
        fields = ENVELOPE_MAGIC + bytes((ENVELOPE_VERSION, flags)) + nonce
        if self.encrypt:
            inner = b"".join(bytes(p) if not isinstance(p, bytes) else p for p in parts)
            gcm = self._gcm(self._one_time_key(self._enc_key, nonce))
            sealed = gcm.encrypt(_GCM_NONCE, inner, fields + key)
            body, tag = memoryview(sealed)[:-16], sealed[-16:]
            return [fields + tag, body]
        mac = self._poly(self._one_time_key(self._mac_key, nonce))
        mac.update(fields)
        mac.update(key)
        for p in parts:
            mac.update(p)
        tag = mac.finalize()
        return [fields + tag, *parts]

    def open(self, key: bytes, value: bytes | memoryview) -> memoryview:
        """The inner frame of ``value`` once its tag checks out; SerdeError otherwise."""
        view = memoryview(value).cast("B")
        if view.nbytes < ENVELOPE_SIZE:
            raise ForgedFrameError("value is shorter than an authenticated envelope")
        magic, version, flags, nonce, tag = _ENVELOPE.unpack_from(view)
        if magic != ENVELOPE_MAGIC:
            raise ForgedFrameError("value is not authenticated (written without the secret)")
        if version != ENVELOPE_VERSION or flags & ~FLAG_ENCRYPTED:
            raise ForgedFrameError(f"envelope version {version} flags {flags:#x} not supported")
        fields = view[: ENVELOPE_SIZE - 16]
        body = view[ENVELOPE_SIZE:]
        if flags & FLAG_ENCRYPTED:
            gcm = self._gcm(self._one_time_key(self._enc_key, nonce))
            try:
                inner = gcm.decrypt(_GCM_NONCE, bytes(body) + tag, bytes(fields) + key)
            except Exception:
                raise ForgedFrameError(
                    "encrypted frame fails its tag (forged or damaged)"
                ) from None
            return memoryview(inner)
        mac = self._poly(self._one_time_key(self._mac_key, nonce))
        mac.update(fields)
        mac.update(key)
        mac.update(body)
        try:
            mac.verify(tag)
        except Exception:
            raise ForgedFrameError(
                "frame fails its MAC (forged, damaged or another secret's)"
            ) from None
        return body


class ForgedFrameError(SerdeError):
    """A value on a shared tier that does not carry a valid tag under this deployment's secret."""


class IndexSigner:
    """HMAC-SHA256 tags of p2p index entries and peer records (16 bytes, hex in entries)."""

    TAG_BYTES = 16

    def __init__(self, secret: bytes) -> None:
        self._key = derive_key(secret, "p2p-index")

    def tag(self, kind: bytes, *fields: bytes) -> bytes:
        h = hmac.new(self._key, kind, hashlib.sha256)
        for f in fields:
            h.update(len(f).to_bytes(4, "little"))
            h.update(f)
        return h.digest()[: self.TAG_BYTES]

    def check(self, tag: bytes, kind: bytes, *fields: bytes) -> bool:
        return hmac.compare_digest(tag, self.tag(kind, *fields))


def warn_unauthenticated(tier: str) -> None:
    logger.warning(
        "lmcache: the shared %s tier is NOT authenticated: anyone who can write to it can "
        "replace the KV of any prompt (set %s or auth_secret_file on every instance)",
        tier,
        SECRET_ENV,
    )
