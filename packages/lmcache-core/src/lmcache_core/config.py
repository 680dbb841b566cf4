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
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmcache_core.errors import ConfigError
from lmcache_core.sizes import format_size, parse_size

logger = logging.getLogger(__name__)

ENV_PREFIX = "LMCACHE_"
CONFIG_FILE_ENV = "LMCACHE_CONFIG_FILE"

#: Hash algorithms for chunk keys. sha256 and blake3 are cryptographic, so no
#: one can craft a collision to read or poison another tenant's KV; xxh3_128
#: is faster and only for deployments where every prompt is trusted.
HASH_ALGORITHMS = ("sha256", "blake3", "xxh3_128")

#: LMCache keys that lmcache accepts so an LMCache config loads unchanged, but
#: that have no effect here (yet). They are logged once at start.
LMCACHE_COMPAT_KEYS = frozenset(
    {
        "pre_caching_hash_algorithm",
        "py_enable_gc",
        "numa_mode",
        "external_lookup_client",
        "priority_limit",
        "enable_lazy_memory_allocator",
        "lazy_memory_initial_ratio",
        "lazy_memory_expand_trigger_ratio",
        "lazy_memory_step_ratio",
        "lazy_memory_safe_size",
        "reserve_local_cpu_size",
        "blend_thresholds",
        "lookup_url",
        "distributed_url",
        "enable_controller",
        "lmcache_instance_id",
        "controller_url",
        "lmcache_worker_port",
        "enable_pd",
        "transfer_channel",
        "pd_role",
        "pd_buffer_size",
        "pd_buffer_device",
        "nixl_backends",
        "pd_peer_host",
        "pd_peer_init_port",
        "pd_peer_alloc_port",
        "pd_proxy_host",
        "pd_proxy_port",
        "weka_path",
        "gds_path",
        "cufile_buffer_size",
        "internal_api_server_enabled",
        "internal_api_server_host",
        "internal_api_server_port_start",
        "internal_api_server_include_index_list",
        "internal_api_server_socket_path_prefix",
        "plugin_locations",
        "audit_actual_remote_url",
        "local_device",
        "use_experimental",
        # The rest of upstream LMCache's keys (its v1 config, ~109 keys): features
        # lmcache does differently or not at all.
        *"""app_id chunk_statistics_auto_exit_target_unique_chunks
        chunk_statistics_auto_exit_timeout_hours chunk_statistics_auto_start_statistics
        chunk_statistics_strategy controller_pull_url controller_reply_url cost_aware_ewma_alpha
        cost_aware_half_life_seconds enable_async_loading enable_chunk_statistics
        enable_hidden_state_cache enable_kv_events enable_scheduler_bypass_lookup enable_xpyd
        external_backends gds_backend gds_buffer_size gds_path_sharding hidden_state_layers
        hidden_states_retrieve_mode hit_miss_ratio lmcache_worker_heartbeat_delay_time
        lmcache_worker_heartbeat_time lmcache_worker_ids lmcache_worker_ports
        local_cpu_use_hugepages local_disk_path_sharding lookup_server_worker_ids
        lookup_timeout_ms maru_path maru_pool_size max_hidden_state_cpu_size min_retrieve_tokens
        mp_host mp_port nixl_buffer_device nixl_buffer_size nixl_peer_alloc_port nixl_peer_host
        nixl_peer_init_port nixl_peer_port nixl_proxy_host nixl_proxy_port nixl_role p2p_host
        p2p_init_ports p2p_lookup_ports pd_allocation_timeout_sec pd_backend_mode
        pd_bidirectional pd_condition_poll_interval_sec pd_max_prefill_len pd_peer_query_port
        pd_shutdown_timeout_sec pd_skip_proxy_notification pin_check_interval_sec
        remote_config_url remote_storage_plugins retrieve_locations runtime_plugin_locations
        script_allowed_imports storage_plugins store_location use_gds
        use_gpu_connector_v3""".split(),
    }
)

#: Upstream LMCache's names for keys lmcache has under another name (same meaning).
LMCACHE_RENAMED_KEYS = {"pin_timeout_sec": "pin_timeout"}

#: ``LMCACHE_*`` variables that are not config keys and must not be reported.
_NON_KEY_ENV = frozenset(
    {
        CONFIG_FILE_ENV,
        "LMCACHE_LOG_LEVEL",
        "LMCACHE_USE_EXPERIMENTAL",
        "LMCACHE_REDIS_PASSWORD",
        "LMCACHE_REDIS_USERNAME",
        "LMCACHE_AUTH_SECRET",
    }
)


#: Keys someone might write the deployment secret under; refused with the fix.
_SECRET_KEYS = frozenset({"auth_secret", "secret", "lmcache_auth_secret"})


# --------------------------------------------------------------------------- coercion


def _to_bool(value: Any, key: str) -> bool:
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
    raise ValueError(f"{key}={value!r} is not a boolean; use true or false")


def _to_int(value: Any, key: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{key}={value!r} must be an integer, not a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ValueError(f"{key}={value!r} must be an integer")


def _to_float(value: Any, key: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{key}={value!r} must be a number, not a boolean")
    number: float | None = None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            pass
    if number is None:
        raise ValueError(f"{key}={value!r} must be a number")
    if not math.isfinite(number):  # a NaN timeout never expires, a NaN backoff never ends
        raise ValueError(f"{key}={value!r} must be a finite number")
    return number


def _to_size(value: Any, key: str) -> int:
    return parse_size(value.strip() if isinstance(value, str) else value, what=key)


def _to_opt_str(value: Any, key: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        v = value.strip()
        return None if v.lower() in ("", "none", "null") else v
    raise ValueError(f"{key}={value!r} must be a string or null")


def _to_opt_int(value: Any, key: str) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    return _to_int(value, key)


def _to_str(value: Any, key: str) -> str:
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise ValueError(f"{key}={value!r} must be a non-empty string")


def _to_raw_str(value: Any, key: str) -> str:
    """A string kept exactly as given: separators such as ``" # # "`` live in their spaces."""
    if isinstance(value, str) and value:
        return value
    raise ValueError(f"{key}={value!r} must be a non-empty string")


def _as_list(value: Any, key: str) -> list[Any]:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{key}={value!r} is not a list, e.g. [1] or 1,2 ({e})") from None
        else:
            value = [v for v in text.split(",") if v.strip()]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{key}={value!r} must be a non-empty list, e.g. [1] or 1,2")
    return list(value)


def _to_int_list(value: Any, key: str) -> tuple[int, ...]:
    return tuple(_to_int(v, key) for v in _as_list(value, key))


def _to_float_list(value: Any, key: str) -> tuple[float, ...]:
    return tuple(_to_float(v, key) for v in _as_list(value, key))


def _to_dict(value: Any, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, str):
        try:
            parsed = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{key} must be a JSON object, e.g. '{{\"k\": 1}}' ({e})") from None
        if isinstance(parsed, dict):
            return parsed
    raise ValueError(f"{key}={value!r} must be a mapping (a JSON object in the environment)")


_COERCE: dict[str, Callable[[Any, str], Any]] = {
    "bool": _to_bool,
    "int": _to_int,
    "float": _to_float,
    "size": _to_size,
    "str": _to_str,
    "raw_str": _to_raw_str,
    "int_list": _to_int_list,
    "float_list": _to_float_list,
    "opt_str": _to_opt_str,
    "opt_int": _to_opt_int,
    "dict": _to_dict,
}


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
        "(or set LMCACHE_AUTH_SECRET; never the secret itself in the config)",
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
        (0.15,),
        "fraction of the reused tokens recomputed after each check layer, e.g. [0.15]",
    )
    blend_min_tokens: int = _opt(
        "int", 256, "fewest reused tokens for which a request is blended (else computed)"
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
    extra_config: dict[str, Any] = _opt("dict", {}, "free-form settings for plugins")

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
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "cache config") -> CacheConfig:
        """Build and validate a config from a mapping of key -> value.

        Unknown keys are errors (with the closest valid key); LMCache keys that
        lmcache does not use are accepted and logged.
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
            if key in fields:
                try:
                    kwargs[key] = _COERCE[fields[key].metadata["kind"]](value, key)
                except ValueError as e:
                    problems.append(str(e))
            elif key in LMCACHE_COMPAT_KEYS:
                ignored.append(key)
            elif key in _SECRET_KEYS:
                problems.append(
                    f"{key}: never put the secret in the cache config; set LMCACHE_AUTH_SECRET "
                    "or auth_secret_file (a file only this service can read)"
                )
            else:
                problems.append(_unknown_key_message(key, list(fields)))
        if ignored:
            logger.warning(
                "%s: upstream LMCache keys that have no effect here (accepted): %s",
                source,
                ", ".join(sorted(ignored)),
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
        if not problems:
            config = cls(**kwargs)
            problems = config._problems()
            if not problems:
                return config
        raise ConfigError(problems, source)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> CacheConfig:
        return cls.from_dict(_read_file(Path(path)), source=str(path))

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
            values.update(_read_file(Path(file_name)))
            sources.append(file_name)
        env_values = _env_values(env)
        if env_values:
            values.update(env_values)
            sources.append("LMCACHE_* environment")
        if overrides:
            values.update(overrides)
            sources.append("overrides")
        return cls.from_dict(values, source=" + ".join(sources) or "defaults")

    # ------------------------------------------------------------------ validation

    def _problems(self) -> list[str]:
        from lmcache_core.plugins import EVICTION_POLICIES, SERDES, installed_names

        p: list[str] = []
        if not 1 <= self.chunk_size <= 1 << 20:
            p.append(f"chunk_size={self.chunk_size} must be between 1 and {1 << 20} tokens")
        if self.hash_algorithm not in HASH_ALGORITHMS:
            p.append(
                f"hash_algorithm={self.hash_algorithm!r} is not one of {', '.join(HASH_ALGORITHMS)}"
            )
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            p.append(f"metrics_port={self.metrics_port} must be a TCP port in [0, 65535]")
        if self.pin_timeout <= 0:
            p.append(f"pin_timeout={self.pin_timeout} must be > 0 seconds")
        if self.blocking_timeout_secs <= 0:
            p.append(f"blocking_timeout_secs={self.blocking_timeout_secs} must be > 0 seconds")
        if self.tier_retry_backoff <= 0:
            p.append(f"tier_retry_backoff={self.tier_retry_backoff} must be > 0 seconds")
        if self.tier_retry_max_backoff < self.tier_retry_backoff:
            p.append(
                f"tier_retry_max_backoff={self.tier_retry_max_backoff} must be >= "
                f"tier_retry_backoff={self.tier_retry_backoff}"
            )
        policies = installed_names(EVICTION_POLICIES)
        if self.cache_policy.lower() not in policies:
            p.append(
                f"cache_policy={self.cache_policy!r} is not an installed eviction policy; "
                f"installed: {', '.join(sorted(policies))}"
            )
        serdes = installed_names(SERDES)
        if self.remote_serde.lower() not in serdes:
            p.append(
                f"remote_serde={self.remote_serde!r} is not an installed serde; "
                f"installed: {', '.join(sorted(serdes))}"
            )
        if self.local_disk is not None and "://" in self.local_disk:
            if not self.local_disk.startswith("file://"):
                p.append(f"local_disk={self.local_disk!r} must be a path or a file:///path/ URL")
        if self.local_disk is not None and self.max_local_disk_size == 0:
            p.append("local_disk is set but max_local_disk_size is 0; give it a size, e.g. 20GiB")
        if self.enable_p2p and not self.p2p_index_url:
            p.append("enable_p2p is set but p2p_index_url is not; e.g. redis://index-host:6379")
        if self.p2p_peer_ttl <= 0:
            p.append(f"p2p_peer_ttl={self.p2p_peer_ttl} must be > 0 seconds")
        p.extend(self._blend_problems())
        p.extend(_remote_url_problems(self.remote_url))
        return p

    def _blend_problems(self) -> list[str]:
        p: list[str] = []
        layers, ratios = self.blend_check_layers, self.blend_recompute_ratios
        if len(layers) != len(ratios):
            p.append(
                f"blend_check_layers={list(layers)} and blend_recompute_ratios={list(ratios)} "
                "must have one ratio per check layer"
            )
        if any(b <= a for a, b in itertools.pairwise(layers)) or any(x < 0 for x in layers):
            p.append(f"blend_check_layers={list(layers)} must be increasing layer numbers >= 0")
        if any(not 0.0 <= r <= 1.0 for r in ratios):  # NaN fails this too
            p.append(f"blend_recompute_ratios={list(ratios)} must lie in [0, 1]")
        elif any(b > a for a, b in itertools.pairwise(ratios)):
            p.append(
                f"blend_recompute_ratios={list(ratios)} must not grow from one check layer "
                "to the next (each keeps a subset of the tokens before it)"
            )
        if self.blend_min_tokens < 1:
            p.append(f"blend_min_tokens={self.blend_min_tokens} must be >= 1")
        return p

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
        return CacheConfig.from_dict(merged, source="CacheConfig.replace")


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
        value = _to_int(raw, name) if integer else _to_float(raw, name)
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


def parse_bool(value: Any, key: str) -> bool:
    """true/false, 1/0, yes/no, on/off; anything else is a ConfigError naming ``key``."""
    try:
        return _to_bool(value, key)
    except ValueError as e:
        raise ConfigError([str(e)], "cache config") from None


#: Tiers that are not remote, named as a ``remote_url`` scheme: the key that means them.
_LOCAL_SCHEMES = {
    "cpu": "local_cpu",
    "disk": "local_disk",
    "file": "local_disk",
    "p2p": "enable_p2p",
}
#: Upstream LMCache's remote connectors that lmcache has no tier for.
_UPSTREAM_SCHEMES = {
    "lm": "upstream LMCache's lmcache_server, which lmcache does not serve; use redis://, "
    "s3:// or fs://",
    "resp": "upstream LMCache's RESP connector; use redis:// or valkey://",
    "redis-sentinel": "Redis Sentinel, not supported; point redis:// at the primary or use "
    "redis+cluster://",
    "infinistore": "InfiniStore, not supported",
    "mooncakestore": "Mooncake Store, not supported",
    "blackhole": "upstream LMCache's test connector; leave remote_url unset",
}


def _remote_url_problems(url: str | None) -> list[str]:
    from lmcache_core.plugins import BACKENDS, KNOWN_PLUGINS, installed_names

    if url is None:
        return []
    if "://" not in url:
        return [f"remote_url={url!r} must be a URL such as redis://host:6379 or s3://bucket/prefix"]
    scheme = url.split("://", 1)[0].lower()
    if scheme in _LOCAL_SCHEMES:
        return [
            f"remote_url={url!r}: {scheme} is not a remote tier; set {_LOCAL_SCHEMES[scheme]} "
            "for it and remote_url for a shared store (redis://, s3://, fs://)"
        ]
    installed = installed_names(BACKENDS)
    if scheme in installed:
        return []
    if scheme in _UPSTREAM_SCHEMES:
        why = f"{scheme}:// is {_UPSTREAM_SCHEMES[scheme]}"
    elif scheme in KNOWN_PLUGINS[BACKENDS]:
        why = f"the {scheme} tier is not installed: {KNOWN_PLUGINS[BACKENDS][scheme]}"
    else:
        why = f"no installed tier serves {scheme}://"
    remote = [s for s in installed if s not in _LOCAL_SCHEMES]
    return [f"remote_url={url!r}: {why} (installed: {', '.join(remote)})"]


def _unknown_key_message(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid + sorted(LMCACHE_COMPAT_KEYS), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key {key!r}{hint} (valid keys: {', '.join(valid)})"


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without aliases: ``*a`` nested a few levels deep expands to billions of
    nodes for whoever walks the result (the "billion laughs"); a cache config has no
    use for them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(
                f"YAML aliases (*name) are not allowed in a cache config (line {mark.line + 1}); "
                "write the value out"
            )
        return super().compose_node(parent, index)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(
            [f"cannot read config file {path} ({e.strerror}); check {CONFIG_FILE_ENV}"], str(path)
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            [f"not UTF-8 text (byte {e.start}): save the config file as UTF-8"], str(path)
        ) from None
    try:
        data = yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader: plain data only
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {e}"], str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            [f"expected a mapping of keys at the top, got {type(data).__name__}"], str(path)
        )
    return data


def _env_values(env: Mapping[str, str]) -> dict[str, str]:
    keys = CacheConfig.keys()
    out: dict[str, str] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in _NON_KEY_ENV:
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key in keys or key in LMCACHE_COMPAT_KEYS or key in LMCACHE_RENAMED_KEYS:
            out[key] = value
        else:
            # Environments are shared with other tools, so a stray LMCACHE_*
            # variable is a warning, not a failed start.
            close = difflib.get_close_matches(key, list(keys), n=1, cutoff=0.6)
            hint = f"; did you mean {ENV_PREFIX}{close[0].upper()}?" if close else ""
            logger.warning("ignoring %s: not a cache config key%s", name, hint)
    return out
