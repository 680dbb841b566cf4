"""Where a config comes from: a YAML file, ``LMCACHE_*`` variables, upstream key names.

An LMCache user brings their file or variables unchanged: upstream keys that
lmcache does not use are accepted (and logged), renamed ones are mapped, and
an unknown key is refused with the closest valid one.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from lmcache_core.errors import ConfigError

logger = logging.getLogger(__name__)

ENV_PREFIX = "LMCACHE_"
CONFIG_FILE_ENV = "LMCACHE_CONFIG_FILE"

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
        # Keys of upstream's examples and docs its v1 config does not define (it warns).
        "run_script_api_enabled",
        "pd_backends",
        "eic_instance_id",
        "eic_flag_file",
        "async_loading",
    }
)

#: Keys someone might write the deployment secret under (at the top or in
#: ``extra_config``): refused wherever they come from, with the real way to set it.
SECRET_KEYS = frozenset({"auth_secret", "secret", "lmcache_auth_secret"})

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
        # MP mode: where local sockets named by port live (lmcache_core.mp.address).
        "LMCACHE_SOCKET_DIR",
        # vLLM reads these for its in-tree LMCacheMPConnector.
        "LMCACHE_USE_UPSTREAM_MP",
        "LMCACHE_MP_TRANSFER_MODE",
        "LMCACHE_TRACK_USAGE",
    }
)


def unknown_key_message(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid + sorted(LMCACHE_COMPAT_KEYS), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key {key!r}{hint} (valid keys: {', '.join(valid)})"


#: Deepest nesting of a config file: top-level keys, extra_config, a plugin's mapping.
MAX_YAML_DEPTH = 16
#: An integer written with more characters than this is kept as text, so the key's own
#: parser refuses it by name (Python refuses to convert more than 4300 digits at all).
_LONG_NUMBER = 64


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without aliases: ``*a`` nested a few levels deep expands to billions of
    nodes for whoever walks the result (the "billion laughs"); a cache config has no
    use for them. Nor for nesting deeper than :data:`MAX_YAML_DEPTH` (a file of
    100000 ``[`` would exhaust the recursion of the loader)."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(
                f"YAML aliases (*name) are not allowed in a cache config (line {mark.line + 1}); "
                "write the value out"
            )
        if self._depth >= MAX_YAML_DEPTH:
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(
                f"nested more than {MAX_YAML_DEPTH} levels deep (line {mark.line + 1}); a cache "
                "config is a mapping of keys with flat values"
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node: Any) -> Any:
        if len(str(node.value)) > _LONG_NUMBER:
            return str(node.value)  # refused by the key's parser, with the key's name
        return super().construct_yaml_int(node)


_NoAliasLoader.add_constructor("tag:yaml.org,2002:int", _NoAliasLoader.construct_yaml_int)


def read_config_file(path: Path) -> dict[str, Any]:
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
    except (ValueError, OverflowError, RecursionError) as e:  # what a constructor met
        raise ConfigError([f"not a usable YAML value: {str(e)[:200]}"], str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            [f"expected a mapping of keys at the top, got {type(data).__name__}"], str(path)
        )
    return data


def env_values(env: Mapping[str, str], keys: Iterable[str]) -> dict[str, str]:
    """The ``LMCACHE_<KEY>`` variables that name config keys (``keys``) or upstream ones."""
    keys = tuple(keys)
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
