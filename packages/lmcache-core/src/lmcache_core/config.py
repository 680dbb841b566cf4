"""``CacheConfig``: one engine-agnostic cache configuration.

The same config serves every engine adapter: switching vLLM for SGLang changes
no cache setting. Key names are LMCache's wherever LMCache has one, so an
LMCache user brings their YAML file or ``LMCACHE_*`` variables unchanged.

Sources, lowest precedence first:

1. the defaults below;
2. a YAML (or JSON) file named by ``LMCACHE_CONFIG_FILE``;
3. ``LMCACHE_<KEY>`` environment variables, which override the file (LMCache
   ignores the environment when a file is given; we think an operator who sets
   a variable means it).

Validation happens once, at start, and reports every problem in one
:class:`~lmcache_core.errors.ConfigError`: an unknown key names the closest
valid key, a bad value says what is allowed.

Beside this module: ``config_values`` parses a value by its kind,
``config_sources`` reads the file and the environment (and knows upstream's
key names), ``config_checks`` holds the checks that span keys, and
``config_extra`` checks ``extra_config`` against the keys the plugins in use
declare.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lmcache_core.config_checks import config_problems, upstream_fallbacks
from lmcache_core.config_extra import check_extra_config
from lmcache_core.config_sources import (
    CONFIG_FILE_ENV,
    LMCACHE_COMPAT_KEYS,
    LMCACHE_RENAMED_KEYS,
    SECRET_KEYS,
    env_values,
    read_config_file,
    unknown_key_message,
)
from lmcache_core.config_values import COERCERS, parse_bool, to_float, to_int
from lmcache_core.errors import ConfigError
from lmcache_core.sizes import format_size

logger = logging.getLogger(__name__)


def _opt(kind: str, default: Any, doc: str) -> Any:
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"kind": kind, "doc": doc})
    return field(default=default, metadata={"kind": kind, "doc": doc})


# --------------------------------------------------------------------------- the config


@dataclass(frozen=True)
class CacheConfig:
    """The cache configuration. Sizes are bytes; times are seconds."""

    chunk_size: int = _opt("int", 256, "tokens per chunk; a chunk is the unit of storage")
    local_cpu: bool = _opt("bool", True, "keep chunks in the CPU DRAM tier")
    max_local_cpu_size: int = _opt(
        "size", 5 * 1024**3, "size of the CPU arena (e.g. 5GiB; a bare number is GB)"
    )
    local_cpu_prefault: bool = _opt(
        "bool",
        True,
        "make the DRAM tier resident at start: no page faults under a store, and a machine "
        "that cannot hold max_local_cpu_size fails at start, not while serving",
    )
    local_disk: str | None = _opt("opt_str", None, "local disk tier, file:///path/")
    max_local_disk_size: int = _opt("size", 0, "size bound of the disk tier")
    remote_url: str | None = _opt("opt_str", None, "shared tier, e.g. redis://host:6379")
    remote_serde: str = _opt("str", "naive", "serde for remote tiers (an lmcache.serdes plugin)")
    save_unfull_chunk: bool = _opt("bool", True, "also store the trailing partial chunk")
    save_decode_cache: bool = _opt("bool", False, "also store KV produced while decoding")
    max_chunk_aliases: int = _opt(
        "int",
        131072,
        "keys of stored chunks' block-multiple prefixes kept, so that a prompt sharing a "
        "chunk's first blocks only loads them (about 300 bytes each; 0 turns this off)",
    )
    use_layerwise: bool = _opt(
        "bool",
        False,
        "move KV layer by layer around the engine's attention (vLLM's wait_for_layer_load / "
        "save_kv_layer): on GPUs, loads of layer i+1 and saves of layer i run under compute",
    )
    cache_policy: str = _opt("str", "LRU", "eviction policy (an lmcache.eviction_policies plugin)")
    hash_algorithm: str = _opt("str", "sha256", "chunk key hash: sha256, blake3 or xxh3_128")
    pin_timeout: float = _opt("float", 60.0, "seconds before a pin left behind expires")
    blocking_timeout_secs: float = _opt("float", 10.0, "timeout of blocking tier operations")
    local_cpu_checksums: bool = _opt(
        "bool", False, "checksum chunks in DRAM and verify them on every read"
    )
    write_behind_queue_size: int = _opt(
        "size",
        0,
        "bytes of chunks waiting to be written to lower tiers before new writes are dropped "
        "(0: a quarter of max_local_cpu_size, at most 1 GiB)",
    )
    demote_on_evict: bool = _opt(
        "bool", True, "write a chunk evicted from DRAM to the local disk tier if it is not there"
    )
    tier_retry_backoff: float = _opt(
        "float", 0.5, "seconds before a failed tier is tried again (doubles on each failure)"
    )
    tier_retry_max_backoff: float = _opt(
        "float", 30.0, "longest wait between tries of a failed tier, seconds"
    )
    enable_p2p: bool = _opt(
        "bool", False, "pull chunks from other instances' DRAM on a local miss (p2p tier)"
    )
    p2p_index_url: str | None = _opt(
        "opt_str", None, "index of who holds which chunk, e.g. redis://index-host:6379"
    )
    p2p_transport: str = _opt("str", "nixl", "transport of the p2p tier (lmcache.transports)")
    p2p_peer_ttl: float = _opt(
        "float", 10.0, "seconds a silent peer stays in the index (it heartbeats at a third)"
    )
    p2p_verify_checksums: bool = _opt(
        "bool",
        False,
        "also hash every chunk pulled from a peer (xxh3; costs both sides a pass over the "
        "bytes); slot reuse is caught without it by the slot's generation",
    )
    auth_secret_file: str | None = _opt(
        "opt_str",
        None,
        "file holding the deployment secret that authenticates shared tiers and the p2p index "
        "(or set LMCACHE_AUTH_SECRET; never the secret itself in the config); one secret per "
        "line: the first seals, every one opens (rotation)",
    )
    allow_unauthenticated_shared_tiers: bool = _opt(
        "bool",
        False,
        "run shared tiers (Redis/Valkey, S3, shared fs) and the p2p index without a deployment "
        "secret, which they otherwise refuse: single-tenant test setups only (anyone who can "
        "write to the store can then serve forged KV)",
    )
    remote_encryption: bool = _opt(
        "bool",
        False,
        "encrypt frames on shared tiers (AES-256-GCM) so a reader of the store sees no KV; "
        "needs the secret",
    )
    enable_blending: bool = _opt(
        "bool",
        False,
        "reuse the KV of repeated segments at any position (CacheBlend); see docs/blending.md",
    )
    blend_special_str: str = _opt(
        "raw_str", " # # ", "text that separates a prompt's segments (spaces are part of it)"
    )
    blend_check_layers: tuple[int, ...] = _opt(
        "int_list", (1,), "layers where the tokens to recompute are chosen, e.g. [1]"
    )
    blend_recompute_ratios: tuple[float, ...] = _opt(
        "float_list",
        (0.4,),
        "fraction of the reused tokens recomputed after each check layer, e.g. [0.4] "
        "(upstream's default is 0.15; docs/blending.md says why lmcache's is higher)",
    )
    blend_min_tokens: int = _opt(
        "int", 256, "fewest reused tokens for which a request is blended (else computed)"
    )
    blend_selection: str = _opt(
        "str",
        "k_deviation+segment_starts",
        "how the tokens to recompute are ranked: k_deviation, v_deviation, kv_deviation, "
        "segment_starts, question_attention, random, or several joined by '+'",
    )
    blend_budget: str = _opt(
        "str",
        "fixed",
        "fixed: recompute blend_recompute_ratios of the reused tokens; adaptive: as many as "
        "leave at most blend_deviation_target of deviation, within the adaptive min and max",
    )
    blend_deviation_target: float = _opt(
        "float",
        1e-4,
        "adaptive budget: K deviation (relative to K's energy, at the check layer) a blend "
        "may leave in the tokens it reuses",
    )
    blend_adaptive_min_ratio: float = _opt(
        "float", 0.0, "adaptive budget: fewest reused tokens recomputed (a ratio)"
    )
    blend_adaptive_max_ratio: float = _opt(
        "float", 1.0, "adaptive budget: most reused tokens recomputed (a ratio)"
    )
    blend_max_deviation: float = _opt(
        "float",
        0.0,
        "guard: a blend whose reused tokens keep more K deviation than this is recomputed "
        "in full (0 turns it off)",
    )
    server_url: str | None = _opt(
        "opt_str",
        None,
        "this host's lmcache server (MP mode): unix:///run/lmcache/lmcache.sock, or upstream's "
        "tcp://localhost:5555; unset: the cache lives in each engine's process",
    )
    server_timeout: float = _opt(
        "float",
        5.0,
        "seconds an engine waits for its lmcache server before treating the call as a miss "
        "(and reconnecting)",
    )
    server_slot_size: int = _opt(
        "size",
        0,
        "lmcache server only: bytes per DRAM slot (0: the first engine's chunk size); set it to "
        "the largest model's chunk to serve several models from one server",
    )
    tenant_quotas: dict[str, Any] = _opt(
        "dict",
        {},
        "lmcache server only: DRAM bytes each cache_salt may hold, e.g. {team-a: 20GiB, '*': "
        "4GiB} ('*': every other salt; '': requests without one)",
    )
    metrics_port: int | None = _opt(
        "opt_int",
        None,
        "standalone Prometheus exporter on this port (+ rank) in each worker; under vLLM "
        "the metrics are on vLLM's own /metrics without it",
    )
    metrics_host: str = _opt(
        "str", "0.0.0.0", "interface the standalone exporter binds (127.0.0.1: this host only)"
    )
    extra_config: dict[str, Any] = _opt(
        "dict",
        {},
        "settings for plugins: each key must be one a plugin in use declares "
        "(docs/configuration.md lists the built-in tiers')",
    )

    # ------------------------------------------------------------------ loading

    @property
    def write_behind_bytes(self) -> int:
        """The write-behind bound in effect (``write_behind_queue_size``, or its default)."""
        if self.write_behind_queue_size:
            return self.write_behind_queue_size
        return max(1 << 20, min(1 << 30, self.max_local_cpu_size // 4))

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(
        cls,
        values: Mapping[str, Any],
        *,
        source: str = "cache config",
        unknown_extra: Literal["error", "warn", "skip"] = "error",
    ) -> CacheConfig:
        """Build and validate a config from a mapping of key -> value.

        Unknown keys are errors (with the closest valid key); LMCache keys that
        lmcache does not use are accepted and logged. ``extra_config`` keys
        that no plugin in use declares are errors too, or warnings with
        ``unknown_extra="warn"`` (they came from ``LMCACHE_EXTRA_CONFIG``), or
        not checked with ``"skip"`` (checked already); see :mod:`config_extra`.
        """
        if not isinstance(values, Mapping):
            raise ConfigError(
                [f"expected a mapping of config keys, got {type(values).__name__}"], source
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        problems: list[str] = []
        kwargs: dict[str, Any] = {}
        ignored: list[str] = []
        for raw_key, value in values.items():
            key = str(raw_key)
            if key in LMCACHE_RENAMED_KEYS and LMCACHE_RENAMED_KEYS[key] not in values:
                key = LMCACHE_RENAMED_KEYS[key]
            if key == "remote_serde" and value is None:
                continue  # upstream writes null for "the default" (with no remote_url)
            if key in fields:
                try:
                    kwargs[key] = COERCERS[fields[key].metadata["kind"]](value, key)
                except ValueError as e:
                    problems.append(str(e))
            elif key in LMCACHE_COMPAT_KEYS:
                ignored.append(key)
            elif key in SECRET_KEYS:
                problems.append(
                    f"{key}: never put the secret in the cache config; set LMCACHE_AUTH_SECRET "
                    "or auth_secret_file (a file only this service can read)"
                )
            else:
                problems.append(unknown_key_message(key, list(fields)))
        if ignored:
            logger.warning(
                "%s: upstream LMCache keys that have no effect here (accepted): %s",
                source,
                ", ".join(sorted(ignored)),
            )
        fallbacks = upstream_fallbacks(kwargs)  # upstream warns on these: so do we
        for fallback in fallbacks:
            logger.warning("%s: %s", source, fallback)
        upstream = None
        if fallbacks or ignored:
            upstream = "an upstream LMCache config: " + ", ".join(
                [*sorted(ignored)[:3], *(["a backend lmcache has not"] if fallbacks else [])]
            )
        if (
            kwargs.get("enable_p2p")
            and not kwargs.get("p2p_index_url")
            and "enable_controller" in ignored
        ):
            # Upstream's p2p goes through its controller, which lmcache does not run.
            logger.warning(
                "%s: enable_p2p with upstream's controller (enable_controller) is not lmcache's "
                "p2p; p2p stays off until p2p_index_url names an index (e.g. redis://host:6379)",
                source,
            )
            kwargs["enable_p2p"] = False
        # Every problem at once, in one round: the values that did parse are checked too
        # (the others at their defaults, so nothing is said twice about a bad key), and
        # extra_config with them.
        failed = set(fields) - set(kwargs)
        config = cls(**kwargs)
        checked = config._problems()
        problems += [p for p in checked if not any(k in p for k in failed & set(values))]
        if unknown_extra != "skip" and "extra_config" not in failed & set(values):
            strict = unknown_extra == "error"
            problems += check_extra_config(
                config, strict=strict, source=source, upstream_config=upstream
            )
        if not problems:
            return config
        raise ConfigError(problems, source)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> CacheConfig:
        return cls.from_dict(read_config_file(Path(path)), source=str(path))

    @classmethod
    def load(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        overrides: Mapping[str, Any] | None = None,
    ) -> CacheConfig:
        """The config a deployment means: file, then environment, then ``overrides``."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        sources: list[str] = []
        file_name = env.get(CONFIG_FILE_ENV)
        if file_name:
            values.update(read_config_file(Path(file_name)))
            sources.append(file_name)
        from_env = env_values(env, cls.keys())
        if from_env:
            values.update(from_env)
            sources.append("LMCACHE_* environment")
        if overrides:
            values.update(overrides)
            sources.append("overrides")
        # extra_config is one value: the last source that sets it gives all of it. From
        # LMCACHE_EXTRA_CONFIG its unknown keys are warnings, as unknown LMCACHE_* names.
        from_environment = "extra_config" in from_env and "extra_config" not in (overrides or {})
        return cls.from_dict(
            values,
            source=" + ".join(sources) or "defaults",
            unknown_extra="warn" if from_environment else "error",
        )

    # ------------------------------------------------------------------ validation

    def _problems(self) -> list[str]:
        return config_problems(self)

    # ------------------------------------------------------------------ views

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """Human-readable YAML of the resolved config (sizes with units)."""
        d = self.to_dict()
        for k in ("max_local_cpu_size", "max_local_disk_size", "write_behind_queue_size"):
            d[k] = format_size(d[k]).replace(" ", "")
        return yaml.safe_dump(d, sort_keys=False)

    def replace(self, **changes: Any) -> CacheConfig:
        """A copy with ``changes`` applied and validated like any other input."""
        current = self.to_dict()
        for f in dataclasses.fields(self):
            if f.metadata.get("kind") == "size" and f.name not in changes:
                current[f.name] = f"{current[f.name]}B"  # bytes, not a bare number of GB
        merged = {**current, **changes}
        # extra_config was checked when this config was made, unless it is replaced now.
        check = "error" if "extra_config" in changes else "skip"
        return CacheConfig.from_dict(merged, source="CacheConfig.replace", unknown_extra=check)


def extra_number(
    config: CacheConfig,
    key: str,
    default: float | None,
    *,
    integer: bool = False,
    minimum: float = 0.0,
    inclusive: bool = False,
) -> Any:
    """A number from ``extra_config`` (a plugin's setting), checked like any config key.

    Missing or null gives ``default``. A value that is not a finite number, or not
    above ``minimum`` (at or above it with ``inclusive``), is a :class:`ConfigError`
    that names ``extra_config.<key>``, raised when the tier is built.
    """
    raw = config.extra_config.get(key)
    if raw is None:
        return default
    name = f"extra_config.{key}"
    try:
        value = to_int(raw, name) if integer else to_float(raw, name)
    except ValueError as e:
        raise ConfigError([str(e)], "cache config") from None
    if value < minimum or (value == minimum and not inclusive):
        bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
        raise ConfigError([f"{name}={raw!r} must be {bound}"], "cache config")
    return value


def extra_bool(config: CacheConfig, key: str, default: bool = False) -> bool:
    """A yes/no from ``extra_config``, checked like any key (errors name ``extra_config.<key>``)."""
    raw = config.extra_config.get(key)
    if raw is None:
        return default
    return parse_bool(raw, f"extra_config.{key}")
