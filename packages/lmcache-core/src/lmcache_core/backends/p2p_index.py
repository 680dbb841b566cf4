"""The p2p tier's cluster-wide index on Redis/Valkey: who holds which chunk, and where.

Everything read from it is hostile until checked: an entry is parsed field by
field (UTF-8 owner, integers in range) and, with the deployment secret,
carries an HMAC-SHA256 binding the chunk key, owner, address, size and
generation (:class:`~lmcache_core.auth.IndexSigner`); a peer record carries
one binding the peer's name to its transport metadata. A value that fails is
treated as absent and counted (``rejected``), never as an error.

Every read is bounded before a byte is fetched: an entry is read with
``GETRANGE 0 MAX_ENTRY_BYTES`` (a record with ``MAX_RECORD_BYTES``), so a 64 MiB
value under a chunk's name costs a few KiB, and a value larger than its bound,
or of another type (a LIST), is deleted and counted (``removed``), for that
name alone: the lookup script keeps answering for every other name.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from lmcache_core.auth import IndexSigner
from lmcache_core.errors import ConfigError
from lmcache_core.keys import CacheKey

logger = logging.getLogger(__name__)

#: The largest index entry read (owner, numbers, checksum and tag take ~250 bytes).
MAX_ENTRY_BYTES = 4096
#: The largest peer record read (a transport's metadata: NIXL's is ~0.5 KiB on one host).
MAX_RECORD_BYTES = 1 << 20


class Entry:
    """Where a chunk lives: owner, address in its arena, sizes, its slot's generation word.

    ``checksum`` is the xxh3 of the bytes when the owner runs with
    ``p2p_verify_checksums``, else empty.
    """

    __slots__ = (
        "address",
        "checksum",
        "generation",
        "generation_address",
        "nbytes",
        "num_tokens",
        "peer",
    )

    def __init__(
        self,
        peer: str,
        address: int,
        nbytes: int,
        num_tokens: int,
        generation_address: int,
        generation: int,
        checksum: str = "",
    ):
        self.peer, self.address, self.nbytes = peer, address, nbytes
        self.num_tokens = num_tokens
        self.generation_address, self.generation = generation_address, generation
        self.checksum = checksum

    def fields(self) -> bytes:
        return (
            f"{self.peer}|{self.address}|{self.nbytes}|{self.num_tokens}|"
            f"{self.generation_address}|{self.generation}|{self.checksum}"
        ).encode()

    def encode(self, key: CacheKey, signer: IndexSigner | None = None) -> bytes:
        """The index value; with ``signer``, a tag binding the key and every field follows."""
        body = self.fields()
        if signer is None:
            return body
        return body + b"|" + signer.tag(b"entry", key.to_bytes(), body).hex().encode()

    @classmethod
    def decode(cls, raw: bytes, key: CacheKey, signer: IndexSigner | None = None) -> Entry | None:
        """The entry, or None for bytes that are not a valid one under this deployment.

        Every field is checked (UTF-8 owner, integers in range) and, with
        ``signer``, the tag: another key's entry copied here, an address
        pointed elsewhere or a forged size all fail it.
        """
        try:
            parts = raw.split(b"|")
            if signer is not None:
                if len(parts) != 8:
                    return None
                body = raw[: raw.rindex(b"|")]
                if not signer.check(
                    bytes.fromhex(parts[7].decode()), b"entry", key.to_bytes(), body
                ):
                    return None
            elif len(parts) not in (7, 8):
                return None
            peer = parts[0].decode()
            addr, nbytes, ntok, gaddr, gen = (int(p) for p in parts[1:6])
            checksum = parts[6].decode()
        except (ValueError, UnicodeDecodeError):
            return None
        if not peer or not all(0 <= v < 1 << 64 for v in (addr, gaddr, gen)):
            return None
        if nbytes <= 0 or ntok <= 0 or addr + nbytes > 1 << 64:
            return None
        return cls(peer, addr, nbytes, ntok, gaddr, gen, checksum)


class PeerIndex:
    """The cluster-wide index, on Redis/Valkey."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "lmcache:p2p:",
        peer_ttl_s: float = 10.0,
        signer: IndexSigner | None = None,
    ):
        try:
            import redis
        except ImportError:
            raise ConfigError(
                ["p2p_index_url needs the redis client: pip install 'lmcache[redis]'"]
            ) from None
        from lmcache_core.backends.redis import client_url

        real, cluster = client_url(url)
        if cluster:
            raise ConfigError(["p2p_index_url: use one Redis/Valkey server, not a cluster"])
        self.client = redis.Redis.from_url(real, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._redis = redis
        self._script: Any = None  # the registered lookup script; False: the server refuses them
        self.prefix = prefix
        self.peer_ttl_ms = int(peer_ttl_s * 1000)
        self.signer = signer
        #: Index values that failed their checks since the last look (counted by the tier).
        self.rejected = 0
        #: Index values deleted since the last look: larger than their bound, or of
        #: another type than a string (counted by the tier).
        self.removed = 0

    def _chunk(self, key: CacheKey) -> str:
        return f"{self.prefix}chunk:{key.hex()}"

    def _peer(self, peer: str) -> str:
        return f"{self.prefix}peer:{peer}"

    def announce(self, peer: str, metadata: bytes) -> None:
        record = metadata
        if self.signer is not None:
            record = self.signer.tag(b"peer", peer.encode(), metadata) + metadata
        if len(record) > MAX_RECORD_BYTES:
            raise ValueError(
                f"p2p: this peer's record is {len(record)} bytes; readers take at most "
                f"{MAX_RECORD_BYTES}"
            )
        self.client.set(self._peer(peer), record, px=self.peer_ttl_ms)

    def _record(self, peer: str, raw: bytes | None) -> bytes | None:
        """A peer's metadata from its record (None when absent or not authentic)."""
        if raw is None or self.signer is None:
            return raw
        n = self.signer.TAG_BYTES
        if len(raw) < n or not self.signer.check(raw[:n], b"peer", peer.encode(), raw[n:]):
            self.rejected += 1
            return None
        return raw[n:]

    def _entry(self, key: CacheKey, raw: bytes | None) -> Entry | None:
        if raw is None:
            return None
        entry = Entry.decode(raw, key, self.signer)
        if entry is None:
            self.rejected += 1
        return entry

    def retire(self, peer: str) -> None:
        self.client.delete(self._peer(peer))

    def _read_bounded(self, names: list[str], limit: int) -> list[bytes | None]:
        """The values of ``names``, none read past ``limit`` + 1 bytes; a larger one, or
        one of another type, is deleted (and counted in ``removed``) and reads as None."""
        if not names:
            return []
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.getrange(name, 0, limit)
        out: list[bytes | None] = []
        bad: list[str] = []
        for name, value in zip(names, pipe.execute(raise_on_error=False)):
            if isinstance(value, Exception):
                if not str(value).startswith("WRONGTYPE"):
                    raise value  # the server's trouble, not this value's
                bad.append(name)
                value = None
            elif len(value) > limit:
                bad.append(name)
                value = None
            out.append(value or None)  # GETRANGE answers "" for a missing name
        if bad:
            self.client.delete(*bad)
            self.removed += len(bad)
        return out

    def peers(self, peers: Sequence[str]) -> dict[str, bytes | None]:
        names = list(dict.fromkeys(peers))
        if not names:
            return {}
        raws = self._read_bounded([self._peer(p) for p in names], MAX_RECORD_BYTES)
        return {p: self._record(p, r) for p, r in zip(names, raws)}

    def lookup(self, keys: Sequence[CacheKey]) -> list[Entry | None]:
        raw = self._read_bounded([self._chunk(k) for k in keys], MAX_ENTRY_BYTES)
        return [self._entry(k, r) for k, r in zip(keys, raw)]

    #: Entries of KEYS and the records of their owners, in one round trip. Every value
    #: is read bounded (ARGV[3] bytes an entry, ARGV[4] a record); one larger, or of
    #: another type (pcall: its error stays its own), is deleted and counted.
    _LOOKUP_WITH_PEERS = """
    local le, lr = tonumber(ARGV[3]), tonumber(ARGV[4])
    local removed = 0
    local function bounded(k, limit)
      local v = redis.pcall('GETRANGE', k, 0, limit)
      if type(v) ~= 'string' or #v > limit then
        redis.call('DEL', k)
        removed = removed + 1
        return false
      end
      if v == '' then return false end
      return v
    end
    local entries, names, seen = {}, {}, {}
    for i, k in ipairs(KEYS) do
      local v = bounded(k, le)
      entries[i] = v
      if v then
        local p = string.match(v, '^([^|]*)|')
        if p and p ~= ARGV[2] and not seen[p] then seen[p] = true; table.insert(names, p) end
      end
    end
    local records = {}
    for i, p in ipairs(names) do records[i] = bounded(ARGV[1] .. p, lr) end
    return {entries, names, records, removed}
    """

    def lookup_with_peers(
        self, keys: Sequence[CacheKey], *, exclude: str = ""
    ) -> tuple[list[Entry | None], dict[str, bytes | None]]:
        """``lookup``, and ``peers`` of the owners found but ``exclude``, in one round trip.

        A server that refuses scripts (some managed offerings) gets two round trips.
        """
        if not keys:
            return [], {}
        if self._script is not False:
            try:
                if self._script is None:
                    self._script = self.client.register_script(self._LOOKUP_WITH_PEERS)
                raw, names, records, removed = self._script(
                    keys=[self._chunk(k) for k in keys],
                    args=[f"{self.prefix}peer:", exclude, MAX_ENTRY_BYTES, MAX_RECORD_BYTES],
                )
                self.removed += int(removed)
                entries = [self._entry(k, r) for k, r in zip(keys, raw)]
                peers: dict[str, bytes | None] = {}
                for n, r in zip(names, records):
                    try:
                        name = n.decode()
                    except UnicodeDecodeError:
                        continue  # no valid entry names it: every one of its entries failed
                    peers[name] = self._record(name, r)
                return entries, peers
            except self._redis.exceptions.ResponseError as e:
                if _scripts_refused(e):
                    logger.warning("p2p index: scripts refused (%s); using two round trips", e)
                    self._script = False
                else:  # this lookup's trouble: the script is tried again on the next
                    logger.warning("p2p index: the lookup script failed (%s); two round trips", e)
        entries = self.lookup(keys)
        return entries, self.peers([e.peer for e in entries if e is not None and e.peer != exclude])

    def publish(self, items: Sequence[tuple[CacheKey, Entry]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key, entry in items:
            pipe.set(self._chunk(key), entry.encode(key, self.signer))
        pipe.execute()

    def unpublish(self, keys: Sequence[CacheKey], owner: str) -> int:
        """Delete entries of ``keys`` that ``owner`` still holds (not newer owners')."""
        entries = self.lookup(keys)
        mine = [self._chunk(k) for k, e in zip(keys, entries) if e is not None and e.peer == owner]
        return int(self.client.delete(*mine)) if mine else 0

    def drop(self, keys: Sequence[CacheKey]) -> None:
        if keys:
            self.client.delete(*[self._chunk(k) for k in keys])


def _scripts_refused(err: Exception) -> bool:
    """The server does not run scripts at all (a managed offering, an ACL), as opposed
    to one lookup's failure."""
    msg = str(err).lower()
    return any(
        m in msg for m in ("unknown command", "noperm", "no permissions", "not allowed", "disabled")
    )
