"""``FrameStore``: the base of tiers that keep each chunk as one opaque value under a name.

Redis, S3 and the shared filesystem differ only in how they move named
values; everything else is here, once: the name of a key, encoding with the
configured serde, and the careful way back: a value is checked (header, key,
sizes, checksum) before one byte of it reaches a chunk, a value that fails is
a miss, counted, and deleted, and a value written by another serde (another
instance's ``remote_serde``) is decoded by that serde.

Every byte read back is hostile until checked: ``_read`` is told the largest
value that can be a frame and must not read more (an oversized value is a
counted miss and is deleted, never a tier failure or a 64 MiB allocation for a
2 KiB chunk). A value of another kind under a chunk's name (a Redis LIST, a
directory) is ``Unusable``: a counted miss for that chunk alone, deleted, never
a failure of the batch it was read in.

A shared tier needs a deployment secret (:mod:`lmcache_core.auth`) and refuses
to start without one unless the config opts out
(``allow_unauthenticated_shared_tiers``). With it every frame is sealed in an
authenticated envelope, optionally encrypted: a value without a valid tag is a
miss, counted as forged, and deleted; a frame sealed under a secret this
instance does not hold (another deployment's) is a miss, counted as foreign,
and left in place; a clear frame read by an instance that requires encryption
is a miss, counted as unencrypted, and deleted (an encrypted copy replaces it).

A third party's tier for another store subclasses this and writes five
methods and one property: ``_read(names, limit)``, ``_write``, ``_exists``,
``_delete``, ``_names`` and ``capacity_bytes``, plus ``from_config``, which
takes the arguments every frame store shares from :meth:`FrameStore.common_kwargs`
and adds its own. It sets ``api_version`` (the plugin API it is written for,
:mod:`lmcache_core.plugin_api`) and ``extra_config_keys`` (the ``extra_config``
keys it reads).

Plugin API 1 (before 2026-12-01) had ``_read(names)``, which read every value
whole. A store still written that way keeps working: ``_read`` is called with
the names only, each value's size is checked after it is read (a larger one is
a counted miss and is deleted, as always), and a ``DeprecationWarning`` and a
logged warning say that its reads are unbounded and what to change. Any other
``_read`` signature is refused when the class is made.
"""

from __future__ import annotations

import functools
import inspect
import logging
import warnings
from abc import abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict

from lmcache_core.auth import (
    ENVELOPE_MAGIC,
    ForeignFrameError,
    ForgedFrameError,
    FrameSealer,
    UnencryptedFrameError,
    require_secret,
    warn_unauthenticated,
)
from lmcache_core.backends.base import BackendContext, ChunkAllocator, StorageBackend
from lmcache_core.errors import ConfigError, PluginAPIError
from lmcache_core.keys import CacheKey
from lmcache_core.metrics import Metrics
from lmcache_core.plugin_api import PLUGIN_API_VERSION, declared_api_version, describe
from lmcache_core.plugins import SERDES, installed_names, load_plugin
from lmcache_core.serdes.base import MAC_COVERED, ChunkHeader, Serde, SerdeError
from lmcache_core.serdes.naive import NaiveSerde

if TYPE_CHECKING:
    from lmcache_core.config import CacheConfig
    from lmcache_core.pool import Chunk

logger = logging.getLogger(__name__)

#: A frame to write, as buffers to send in order.
FrameParts = list["bytes | memoryview"]


class Oversized:
    """What ``_read`` returns for a value larger than the limit it was given (not read)."""

    __slots__ = ("nbytes",)

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def __repr__(self) -> str:
        return f"Oversized({self.nbytes})"


class Unusable:
    """What ``_read`` returns where a name holds something that cannot be a value at all
    (a Redis LIST, a directory): a miss for that name alone, counted, and deleted."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"Unusable({self.reason!r})"


#: Room for the header, key and envelope around a chunk's bytes, and for a
#: compressor's worst case on incompressible data (zstd and lz4 add < 1/128).
_FRAME_SLACK = 4096


class SerdeUnavailable(SerdeError):
    """A frame written by a serde this instance cannot run (not installed, or its library
    missing: zstd or lz4 on one host of a mixed fleet): a miss, left in place (it is
    valid for the instances that can read it)."""


@functools.cache
def serde_for_id(serde_id: int) -> Serde | None:
    """The installed serde that writes frames with ``serde_id`` (None if none is installed).

    Raises :class:`SerdeUnavailable` when that serde is installed but cannot be made here
    (its compression library is missing)."""
    for name in installed_names(SERDES):
        try:
            cls = load_plugin(SERDES, name)
        except Exception:  # a broken third-party plugin must not break reads
            continue
        if getattr(cls, "serde_id", None) == serde_id:
            try:
                return cls()
            except Exception as e:  # its library is missing on this host
                raise SerdeUnavailable(f"serde {name!r} cannot run here ({e})") from None
    return None


class FrameStoreArgs(TypedDict):
    """The constructor arguments every frame store takes from the config (``common_kwargs``)."""

    serde: Serde
    metrics: Metrics
    max_chunk_bytes: int
    sealer: FrameSealer | None


class FrameStore(StorageBackend):
    """Chunks as named frames in some store. Subclasses move the frames."""

    #: A store whose ``_write`` sends each frame as it gets it sets this; ``_write``
    #: then receives an iterator that encodes (checksum or MAC) a frame when asked,
    #: so the next frame is encoded while the previous one is on its way.
    streams_writes: ClassVar[bool] = False
    #: ``_read`` takes the limit (plugin API 2). False for a store written for plugin
    #: API 1 (``_read(names)``): its values are read whole and their size checked after.
    _read_takes_limit: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._read_takes_limit = _reads_with_limit(cls)
        if not cls._read_takes_limit:
            warnings.warn(_unbounded_reads_message(cls), DeprecationWarning, stacklevel=2)

    @classmethod
    def common_kwargs(cls, config: CacheConfig, context: BackendContext) -> FrameStoreArgs:
        """What every frame store's constructor takes from the config and the engine.

        The serde (``remote_serde``), the metrics, the largest chunk (the pool's
        slot: no larger value is read) and the sealer (the deployment secret; a
        tier without one warns and says so in ``lmcache:tier_authenticated``). A
        subclass's ``from_config`` is then ``cls(<its own>, **cls.common_kwargs(config,
        context))``.
        """
        return FrameStoreArgs(
            serde=check_serde_name(config.remote_serde),
            metrics=context.metrics,
            max_chunk_bytes=context.pool.slot_bytes,
            sealer=sealer_for(config, context, cls.name),
        )

    def __init__(
        self,
        *,
        serde: Serde | None = None,
        metrics: Metrics | None = None,
        max_chunk_bytes: int = 1 << 31,
        name_prefix: str = "lmcache:",
        sealer: FrameSealer | None = None,
    ) -> None:
        self.serde = serde if serde is not None else NaiveSerde()
        self.metrics = metrics if metrics is not None else Metrics()
        self.max_chunk_bytes = max_chunk_bytes
        self.name_prefix = name_prefix
        self.sealer = sealer
        self._written = 0
        self._warned_sealed = False
        self._warned_foreign = False
        self._warned_serde = False
        if not self._read_takes_limit:
            _log_unbounded_reads(type(self))

    @property
    def max_value_bytes(self) -> int:
        """The largest value that can be a frame of this store: no more is ever read."""
        return self.max_chunk_bytes + self.max_chunk_bytes // 64 + _FRAME_SLACK

    # ------------------------------------------------------------------ what subclasses write

    @abstractmethod
    def _read(
        self, names: list[str], limit: int
    ) -> list[bytes | memoryview | Oversized | Unusable | None]:
        """The values stored under ``names`` (None where missing).

        A value larger than ``limit`` bytes is not read: return ``Oversized``
        for it (check the size first: STRLEN, stat, a bounded read). A name
        that holds something else than a value (another type) is ``Unusable``:
        an error of one name must never fail the others.
        """

    @abstractmethod
    def _write(self, items: Iterable[tuple[str, FrameParts]]) -> list[bool]:
        """Store each value unless its name exists already; True where stored afterwards."""

    @abstractmethod
    def _exists(self, names: list[str]) -> list[bool]:
        """Which names hold a value."""

    @abstractmethod
    def _delete(self, names: list[str]) -> int:
        """Delete ``names``; how many existed."""

    @abstractmethod
    def _names(self) -> Iterator[str]:
        """Every name under ``name_prefix``."""

    # ------------------------------------------------------------------ names

    def name_of(self, key: CacheKey) -> str:
        return f"{self.name_prefix}{key.hex()}"

    def key_of(self, name: str) -> CacheKey | None:
        if not name.startswith(self.name_prefix):
            return None
        try:
            return CacheKey.from_hex(name[len(self.name_prefix) :])
        except ValueError:
            return None

    # ------------------------------------------------------------------ the protocol

    def contains(self, keys: Sequence[CacheKey]) -> list[bool]:
        if not keys:
            return []
        return self._exists([self.name_of(k) for k in keys])

    def get(self, keys: Sequence[CacheKey], allocator: ChunkAllocator) -> list[Chunk | None]:
        if not keys:
            return []
        names = [self.name_of(k) for k in keys]
        values = self._read_bounded(names)
        out: list[Chunk | None] = []
        bad: list[str] = []
        nbytes = 0
        for key, name, value in zip(keys, names, values):
            chunk = None
            if isinstance(value, Oversized):
                logger.warning(
                    "%s tier: value %s is %d bytes, more than a frame can be; deleted",
                    self.name,
                    name,
                    value.nbytes,
                )
                self.metrics.inc("lmcache:num_corrupt_chunks", tier=self.name)
                bad.append(name)
            elif isinstance(value, Unusable):
                logger.warning(
                    "%s tier: %s holds no value (%s); deleted", self.name, name, value.reason
                )
                self.metrics.inc("lmcache:num_corrupt_chunks", tier=self.name)
                bad.append(name)
            elif value is not None:
                try:
                    chunk = self._decode(key, value, allocator)
                except ForgedFrameError as e:
                    logger.warning(
                        "%s tier: value %s is not authentic (%s); deleted", self.name, name, e
                    )
                    self.metrics.inc("lmcache:num_forged_chunks", tier=self.name)
                    bad.append(name)
                except (ForeignFrameError, SerdeUnavailable) as e:
                    self._foreign(name, e)
                except UnencryptedFrameError as e:
                    logger.warning("%s tier: value %s is refused (%s); deleted", self.name, name, e)
                    self.metrics.inc("lmcache:num_unencrypted_chunks", tier=self.name)
                    bad.append(name)
                except SerdeError as e:
                    if self.sealer is None and _is_sealed(value):
                        self._sealed_without_secret()
                    else:
                        logger.warning(
                            "%s tier: value %s is unusable (%s); deleted", self.name, name, e
                        )
                        self.metrics.inc("lmcache:num_corrupt_chunks", tier=self.name)
                        bad.append(name)
            if chunk is not None:
                nbytes += chunk.nbytes
            out.append(chunk)
        if bad:
            try:
                self._delete(bad)
            except Exception:
                logger.warning("%s tier: deleting bad values failed", self.name, exc_info=True)
        if nbytes:
            self.metrics.inc("lmcache:retrieved_bytes", nbytes, tier=self.name)
        return out

    def _read_bounded(
        self, names: list[str]
    ) -> list[bytes | memoryview | Oversized | Unusable | None]:
        """``_read`` with the limit; a plugin API 1 store's values are checked after the read."""
        limit = self.max_value_bytes
        if self._read_takes_limit:
            return self._read(names, limit)
        values = self._read(names)  # type: ignore[call-arg]  # plugin API 1
        return [
            Oversized(memoryview(v).nbytes)
            if v is not None
            and not isinstance(v, (Oversized, Unusable))
            and memoryview(v).nbytes > limit
            else v
            for v in values
        ]

    def _foreign(self, name: str, err: ForeignFrameError | SerdeUnavailable) -> None:
        """A frame sealed under a secret this instance does not hold, or written by a serde
        it cannot run: a miss, left alone (it may be a correctly configured fleet's, and
        this instance the misconfigured one)."""
        if isinstance(err, SerdeUnavailable):
            self.metrics.inc("lmcache:num_failures", tier=self.name, op="serde_unavailable")
            if not self._warned_serde:
                self._warned_serde = True
                logger.warning(
                    "%s tier: value %s: %s: a miss, left in place. Another instance writes "
                    "with remote_serde that this one cannot read: install the same extras "
                    "(lmcache-core[compression]) on every instance; warned once",
                    self.name,
                    name,
                    err,
                )
            return
        self.metrics.inc("lmcache:num_foreign_chunks", tier=self.name)
        if not self._warned_foreign:
            self._warned_foreign = True
            logger.warning(
                "%s tier: value %s is %s: a miss, left in place. Another deployment shares "
                "this store, or the secrets differ between instances (a typo, a rotation not "
                "rolled out: list the old secret after the new one); warned once",
                self.name,
                name,
                err,
            )

    def _sealed_without_secret(self) -> None:
        """An authenticated frame and no secret here: a miss, and the frame is left alone."""
        self.metrics.inc("lmcache:num_failures", tier=self.name, op="no_secret")
        if not self._warned_sealed:
            self._warned_sealed = True
            logger.warning(
                "%s tier holds authenticated frames but this instance has no secret: "
                "every read is a miss (set LMCACHE_AUTH_SECRET or auth_secret_file)",
                self.name,
            )

    def _decode(
        self, key: CacheKey, value: bytes | memoryview, allocator: ChunkAllocator
    ) -> Chunk | None:
        kb = key.to_bytes()
        covered = None
        if self.sealer is not None:
            value = self.sealer.open(kb, value, max_raw_nbytes=self.max_chunk_bytes)
            covered = MAC_COVERED.set(True)
        try:
            return self._decode_frame(kb, key, value, allocator)
        finally:
            if covered is not None:
                MAC_COVERED.reset(covered)

    def _decode_frame(
        self, kb: bytes, key: CacheKey, value: bytes | memoryview, allocator: ChunkAllocator
    ) -> Chunk | None:
        header = ChunkHeader.unpack(value, max_raw_nbytes=self.max_chunk_bytes)
        if header.key != kb:
            raise SerdeError("value was stored under another key")
        serde = self.serde if header.serde_id == self.serde.serde_id else None
        if serde is None:
            serde = serde_for_id(header.serde_id)
            if serde is None:
                raise SerdeUnavailable(
                    f"no installed serde writes frames with id {header.serde_id}"
                )
        chunk = allocator(key, header.num_tokens, header.raw_nbytes)
        if chunk is None:
            return None  # no memory to read into: a miss, not corruption
        try:
            serde.decode(value, kb, chunk.view)
        except BaseException:
            chunk.release()
            raise
        return chunk

    def put(self, chunks: Sequence[Chunk]) -> list[bool]:
        if not chunks:
            return []
        lazy = ((self.name_of(c.key), self._encode(c)) for c in chunks)
        ok = self._write(lazy if self.streams_writes else list(lazy))
        stored = sum(c.nbytes for c, good in zip(chunks, ok) if good)
        self._written += stored
        if stored:
            self.metrics.inc("lmcache:stored_bytes", stored, tier=self.name)
        return ok

    def _encode(self, chunk: Chunk) -> FrameParts:
        kb = chunk.key.to_bytes()
        if self.sealer is None:
            return self.serde.encode(kb, chunk.num_tokens, chunk.view)
        covered = MAC_COVERED.set(True)  # the envelope's MAC replaces the serde's checksum
        try:
            parts = self.serde.encode(kb, chunk.num_tokens, chunk.view)
        finally:
            MAC_COVERED.reset(covered)
        return self.sealer.seal(kb, parts)

    def remove(self, keys: Sequence[CacheKey]) -> int:
        if not keys:
            return 0
        return self._delete([self.name_of(k) for k in keys])

    def keys(self) -> Iterator[CacheKey]:
        for name in self._names():
            key = self.key_of(name)
            if key is not None:
                yield key

    @property
    def used_bytes(self) -> int:
        """Bytes this process has written (the store is shared: others write too)."""
        return self._written


# --------------------------------------------------------------------------- plugin API 1


def _reads_with_limit(cls: type[FrameStore]) -> bool:
    """How ``cls._read`` is called: True ``_read(names, limit)``, False ``_read(names)``.

    Decided by the plugin API the class declares (``api_version``), else by its
    signature. A ``_read`` neither way can be called is refused here, when the
    class is made (as its plugin is loaded), not deep inside a read.
    """
    read = cls._read
    if getattr(read, "__isabstractmethod__", False):
        return True  # still abstract: a base for other stores
    declared = declared_api_version(cls)
    try:
        params = list(inspect.signature(read).parameters.values())[1:]  # after self
    except (TypeError, ValueError):  # not introspectable: trust the declaration
        return declared != 1
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [p for p in params if p.kind in kinds]
    varargs = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)
    required = sum(p.default is inspect.Parameter.empty for p in positional)
    required += sum(
        p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty
        for p in params
    )
    takes = {n for n in (1, 2) if required <= n and (varargs or len(positional) >= n)}
    signature = f"_read(self, {', '.join(p.name for p in params)})".replace(", )", ")")
    if declared == 1 and 1 in takes:
        return False
    if declared != 1 and 2 in takes:
        return True
    if declared is None and 1 in takes:
        return False  # written for plugin API 1: warned about by the caller
    if declared == PLUGIN_API_VERSION and 1 in takes:
        raise PluginAPIError(
            f"frame store {describe(cls)} declares plugin API {declared}, but its {signature} "
            "takes no limit: plugin API 2 calls _read(names, limit) and a value larger than "
            "limit must not be read (return Oversized(size) for it); add the limit, or "
            "declare api_version = 1"
        )
    raise PluginAPIError(
        f"frame store {describe(cls)}: its {signature} cannot be called as plugin API "
        f"{PLUGIN_API_VERSION}'s _read(names, limit) (the limit was added on 2026-12-01; "
        "plugin API 1's _read(names) is still served, with a warning); see lmcache-core's "
        "CHANGELOG.md"
    )


def _unbounded_reads_message(cls: type) -> str:
    return (
        f"frame store {describe(cls)} is written for plugin API 1: its _read(self, names) "
        "takes no limit, so its reads are unbounded (a value of any size is read whole, and "
        "only then refused if it is larger than a frame can be). Add the limit: "
        "_read(self, names, limit), returning Oversized(size) for a value larger than limit "
        f"without reading it, and set api_version = {PLUGIN_API_VERSION}. Plugin API 1 will "
        "stop loading in a later release (lmcache-core's CHANGELOG.md)"
    )


@functools.cache
def _log_unbounded_reads(cls: type) -> None:
    """Once per class, in the log (a DeprecationWarning is hidden outside tests)."""
    logger.warning("%s", _unbounded_reads_message(cls))


def _is_sealed(value: bytes | memoryview) -> bool:
    return bytes(memoryview(value)[: len(ENVELOPE_MAGIC)]) == ENVELOPE_MAGIC


def frame_bytes(parts: FrameParts) -> bytes | memoryview:
    """One buffer for a frame (no copy when it is one part already)."""
    if len(parts) == 1:
        return parts[0]
    return b"".join(parts)


def sealer_for(config: CacheConfig, context: BackendContext, tier: str) -> FrameSealer | None:
    """The sealer of a shared tier: authenticated with the deployment secret, else None.

    Without a secret the tier refuses to start (a ConfigError that says how to set
    one), unless the config opts out (``allow_unauthenticated_shared_tiers``): then
    it works, warns loudly at start and says so in ``lmcache:tier_authenticated``.
    """
    if context.secret is None:
        require_secret(config, None, f"the shared {tier} tier (remote_url)")
        if config.remote_encryption:
            raise ConfigError(
                ["remote_encryption needs the deployment secret: set LMCACHE_AUTH_SECRET "
                 "or auth_secret_file"]
            )  # fmt: skip
        warn_unauthenticated(tier)
        context.metrics.set("lmcache:tier_authenticated", 0, tier=tier)
        return None
    context.metrics.set("lmcache:tier_authenticated", 1, tier=tier)
    return FrameSealer(context.secret, encrypt=config.remote_encryption)


def check_serde_name(name: str) -> Serde:
    """The serde named ``name`` (``remote_serde``), built."""
    return load_plugin(SERDES, name)()
