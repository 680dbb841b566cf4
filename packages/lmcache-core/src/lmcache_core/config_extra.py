"""``extra_config``: plugins' settings, each key declared by the plugin that reads it.

Top-level keys are the config's own and strict. ``extra_config`` holds the
settings of plugins (``redis_ttl``, ``s3_region``, a third party's tier's
own), so the config cannot list them: each reader declares the keys it reads
in a class attribute ``extra_config_keys`` (name -> one line): storage
backends, serdes, transports and eviction policies (their ABCs default to
none), and :data:`ENGINE_KEYS` holds what the engine adapters read. When a
config is loaded, each key of its ``extra_config`` is one of:

* read by a plugin in use (the tiers the config turns on, their serde,
  transport and eviction policy) or by the engine adapters: fine;
* a secret (``auth_secret``, ...): an error wherever it comes from, saying how
  the secret is set (it is never a config value);
* upstream LMCache's and not used here: accepted, with one warning naming them
  (as upstream's top-level keys);
* read by an installed plugin that this config does not use (``redis_ttl``
  without a Redis tier): accepted, with a warning naming the plugin;
* anything else (a typo, a top-level key put here): unknown, with the closest
  name. An error in a config file and in overrides; a warning in
  ``LMCACHE_EXTRA_CONFIG``, as unknown ``LMCACHE_*`` variables are (the
  environment is shared with other tools and layers of a deployment).

A plugin that cannot be loaded (not installed, or written for another plugin
API) makes the check of unknown names wait: that failure is the error.

A key may also declare what its value must be: an :class:`ExtraKey` (a string,
so a plain one-line declaration keeps working) with a kind (number, integer,
bool, text, choice) and a range. Values of the keys of plugins in use are then
checked when the config is read, every problem reported together and named
``extra_config.<key>``, from every source (a wrong value is an error even from
``LMCACHE_EXTRA_CONFIG``), instead of breaking a tier when it is built or used.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from lmcache_core.config_sources import SECRET_KEYS
from lmcache_core.config_values import shown, text_problem, to_bool, to_float, to_int
from lmcache_core.errors import PluginAPIError

if TYPE_CHECKING:
    from lmcache_core.config import CacheConfig

logger = logging.getLogger("lmcache_core.config")


class ExtraKey(str):
    """An ``extra_config_keys`` entry (its one line) that also says what a value must be.

    ``kind``: ``"number"`` (finite), ``"integer"``, ``"bool"``, ``"text"`` (no lone
    surrogate, NUL or control character; at most ``max_length`` characters) or
    ``"choice"`` (one of ``choices``); ``minimum``/``maximum`` bound numbers
    (``open_minimum``: above, not at, ``minimum``), in ``unit``. A third-party
    plugin declares its keys the same way::

        extra_config_keys = {
            "tape_speed": ExtraKey("metres per second", "number", minimum=0.1, maximum=20),
        }
    """

    kind: str
    minimum: float | None
    maximum: float | None
    open_minimum: bool
    choices: tuple[str, ...]
    max_length: int
    unit: str

    def __new__(
        cls,
        doc: str,
        kind: str = "text",
        *,
        minimum: float | None = None,
        maximum: float | None = None,
        open_minimum: bool = False,
        choices: tuple[str, ...] = (),
        max_length: int = 4096,
        unit: str = "",
    ) -> ExtraKey:
        if kind not in ("number", "integer", "bool", "text", "choice"):
            raise ValueError(f"ExtraKey kind {kind!r} is not number, integer, bool, text or choice")
        self = super().__new__(cls, doc)
        self.kind, self.minimum, self.maximum = kind, minimum, maximum
        self.open_minimum, self.choices = open_minimum, tuple(choices)
        self.max_length, self.unit = max_length, unit
        return self

    def problem(self, name: str, value: object) -> str | None:
        """Why ``value`` cannot be this key's (None: it can). ``name`` is how to call it."""
        try:
            if self.kind == "bool":
                to_bool(value, name)
                return None
            if self.kind in ("text", "choice"):
                return self._text_problem(name, value)
            number = to_int(value, name) if self.kind == "integer" else to_float(value, name)
        except ValueError as e:
            return str(e)
        low, high = self.minimum, self.maximum
        unit = f" {self.unit}" if self.unit else ""
        below = low is not None and (number <= low if self.open_minimum else number < low)
        if below or (high is not None and number > high):
            if low is not None and high is not None:
                if self.open_minimum:
                    return f"{name}={shown(value)} must be > {low:g} and at most {high:g}{unit}"
                return f"{name}={shown(value)} must be between {low:g} and {high:g}{unit}"
            if low is not None:
                op = ">" if self.open_minimum else ">="
                return f"{name}={shown(value)} must be {op} {low:g}{unit}"
            return f"{name}={shown(value)} must be at most {high:g}{unit}"
        return None

    def _text_problem(self, name: str, value: object) -> str | None:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            return f"{name}={shown(value)} must be text"
        text = str(value)
        problem = text_problem(text)
        if problem is not None:
            return f"{name}={shown(value)} {problem}; use printable text"
        if len(text) > self.max_length:
            return f"{name} is {len(text)} characters; at most {self.max_length}"
        if self.kind == "choice" and text not in self.choices:
            return f"{name}={shown(value)} must be one of {', '.join(self.choices)}"
        return None


#: ``extra_config`` keys the engine adapters read, whatever the tiers.
ENGINE_KEYS: Mapping[str, str] = {
    "model_id": ExtraKey(
        "the model's identity in cache keys, in place of the name or path the engine "
        "was given, so instances loading the same weights from different paths share their "
        "cache (read by the vLLM adapter)",
        "text",
        max_length=1024,
    ),
}

#: ``extra_config`` keys upstream LMCache reads that have no effect here (logged once).
UPSTREAM_EXTRA_KEYS = frozenset(
    """audit_backend_enabled clear_cache_timeout_ms disk_io_threads enable_nixl_storage
    kv_object_store_enable lookup_backoff_time nixl_async_put nixl_backend
    nixl_backend_params nixl_enable_prog_thread nixl_endpoint_list nixl_path nixl_pool_size
    nixl_presence_cache nixl_sync_mode nixl_use_hugepages region
    remote_enable_mla_worker_id_as0 resp_num_threads s3_enable_s3express s3_file_prefix
    s3_max_inflight_reqs s3_max_io_concurrency s3_part_size s3_prefer_http2 save_chunk_meta
    save_only_first_rank use_direct_io
    audit_calc_checksum audit_exclude_cmds audit_verify_checksum azure_account_key
    azure_account_url azure_connection_string azure_sas_token connection_timeout
    controller_packages disabled_controllers enable_sparse force_store_wait fs_base_path
    full_sync_batch_size gpu_to_numa_mapping heartbeat_url kv_msg_batch_size
    kv_msg_batch_timeout lmcache_rpc_port mooncake_prefer_local_alloc nixl_path_sharding
    nixl_presence_cache_only p2p_max_retry_count p2p_socket_recv_timeout_ms
    p2p_socket_send_timeout_ms password redis_url sagemaker_hyperpod_bucket
    sagemaker_hyperpod_use_https storage_root_dir tls_enable transfer_timeout username
    valkey_enable_ttl valkey_num_workers valkey_sync_num_workers valkey_ttl_sec""".split()
)
#: Upstream's families of ``extra_config`` keys (its dynamically loaded backends, its
#: chunk statistics, 3FS, DAX, fs connector, histogram and MP settings).
UPSTREAM_EXTRA_PREFIXES = (
    "external_backend.",
    "storage_plugin.",
    "remote_storage_plugin.",
    "chunk_statistics_",
    "hf3fs_",
    "dax.",
    "fs_connector_",
    "histogram_bucket_",
    "lmcache.mp.",
    "rust_raw_block.",
    "local_cpu.",
    "plugin.",
    "shmfs.",
)


@dataclass(frozen=True)
class Reader:
    """Something that reads ``extra_config``, and the keys it declares."""

    label: str  # "the redis tier"
    keys: Mapping[str, str]


def declared_keys(cls: object) -> Mapping[str, str]:
    """A plugin class's ``extra_config_keys`` (a plain list of names is taken too)."""
    keys = getattr(cls, "extra_config_keys", None) or {}
    if isinstance(keys, Mapping):
        return {str(k): v if isinstance(v, ExtraKey) else str(v) for k, v in keys.items()}
    if isinstance(keys, list | tuple | set | frozenset):
        return dict.fromkeys(map(str, keys), "")
    return {}


def _wanted(config: CacheConfig) -> list[tuple[str, str, str]]:
    """(entry-point group, name, label) of each plugin the config uses."""
    from lmcache_core.plugins import BACKENDS, EVICTION_POLICIES, SERDES, TRANSPORTS

    wanted: list[tuple[str, str, str]] = []
    if config.local_cpu:
        wanted.append((BACKENDS, "cpu", "the cpu tier"))
        policy = config.cache_policy
        wanted.append((EVICTION_POLICIES, policy, f"the {policy} eviction policy"))
    if config.local_disk:
        wanted.append((BACKENDS, "disk", "the disk tier"))
    if config.enable_p2p:
        wanted.append((BACKENDS, "p2p", "the p2p tier"))
        transport = config.p2p_transport
        wanted.append((TRANSPORTS, transport, f"the {transport} transport"))
    if config.remote_url and "://" in config.remote_url:
        scheme = urlparse(config.remote_url).scheme.lower()
        wanted.append((BACKENDS, scheme, f"the {scheme} tier"))
        serde = config.remote_serde
        wanted.append((SERDES, serde, f"the {serde} serde"))
    return wanted


def readers_in_use(config: CacheConfig) -> tuple[list[Reader], list[str], bool]:
    """The readers of ``extra_config`` this config uses, the problems loading them
    (a plugin written for another plugin API), and whether every one was loaded."""
    from lmcache_core.plugins import load_plugin

    readers = [Reader("the engine adapters", ENGINE_KEYS)]
    problems: list[str] = []
    complete = True
    for group, name, label in _wanted(config):
        try:
            cls = load_plugin(group, name)
        except PluginAPIError as e:
            problems.append(str(e))
            complete = False
            continue
        except Exception:  # not installed, or broken: reported by the other checks / the build
            complete = False
            continue
        readers.append(Reader(label, declared_keys(cls)))
    return readers, problems, complete


def _installed_readers() -> Iterator[Reader]:
    """Every installed plugin that declares ``extra_config`` keys (broken ones skipped)."""
    from lmcache_core.plugins import (
        BACKENDS,
        EVICTION_POLICIES,
        SERDES,
        TRANSPORTS,
        installed_names,
        load_plugin,
    )

    kinds = {
        BACKENDS: "tier",
        EVICTION_POLICIES: "eviction policy",
        SERDES: "serde",
        TRANSPORTS: "transport",
    }
    seen: set[int] = set()
    for group, kind in kinds.items():
        for name in installed_names(group):
            try:
                cls = load_plugin(group, name)
            except Exception:
                continue
            keys = declared_keys(cls)
            if keys and id(cls) not in seen:
                seen.add(id(cls))
                yield Reader(f"the {getattr(cls, 'name', name)} {kind}", keys)


def check_extra_config(
    config: CacheConfig, *, strict: bool, source: str, upstream_config: str | None = None
) -> list[str]:
    """The problems of ``config.extra_config`` (errors); warnings are logged.

    ``strict``: unknown keys are errors (a file, overrides); else warnings
    (``LMCACHE_EXTRA_CONFIG``). ``upstream_config``: why the config is upstream LMCache's (it uses
    keys or a backend lmcache does not have): its unknown keys are then warnings, as
    upstream's are, since they are read by what lmcache leaves off; values of keys lmcache
    reads are still checked. ``source`` names where the config came from.
    """
    extra = config.extra_config
    if not extra:
        return []
    where = "extra_config" if strict or upstream_config else "LMCACHE_EXTRA_CONFIG"
    readers, problems, complete = readers_in_use(config)
    known = {k: r.label for r in reversed(readers) for k in r.keys}
    problems += value_problems(extra, readers, where)
    top = list(config.keys())
    upstream: list[str] = []
    unknown: list[str] = []
    for raw in extra:
        key = str(raw)
        if key in known:
            continue
        if key in SECRET_KEYS:
            problems.append(
                f"{where}.{key}: never put the secret in the cache config; set "
                "LMCACHE_AUTH_SECRET, or the top-level key auth_secret_file (a file only this "
                "service can read)"
            )
        elif key in UPSTREAM_EXTRA_KEYS or key.startswith(UPSTREAM_EXTRA_PREFIXES):
            upstream.append(key)
        else:
            unknown.append(key)
    if upstream:
        logger.warning(
            "%s: upstream LMCache extra_config keys that have no effect here (accepted): %s",
            source,
            ", ".join(sorted(upstream)),
        )
    if not unknown:
        return problems
    others = [r for r in _installed_readers() if r.label not in {x.label for x in readers}]
    elsewhere = {k: r.label for r in reversed(others) for k in r.keys}
    in_use = ", ".join(sorted(known)) or "none"
    for key in unknown:
        if key in elsewhere and key not in top:
            logger.warning(
                "%s: %s.%s has no effect: it is read by %s, which this config does not use",
                source,
                where,
                key,
                elsewhere[key],
            )
            continue
        if key in top:
            message = (
                f"{where}.{key} is a top-level key, not a plugin setting: move it out of "
                "extra_config"
            )
        else:
            candidates = sorted(known) + sorted(set(elsewhere) - set(known)) + top
            close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
            hint = ""
            if close and close[0] in top:
                hint = f"; did you mean the top-level key {close[0]!r}?"
            elif close:
                hint = f"; did you mean {close[0]!r}?"
            message = (
                f"{where}: unknown key {key!r}{hint} (the tiers in use and the engine read: "
                f"{in_use}; a plugin declares its keys in extra_config_keys)"
            )
        if upstream_config and key not in top:  # upstream's own file: its keys are its own
            logger.warning("%s: ignoring %s (%s)", source, message, upstream_config)
        elif strict and (complete or key in top):
            problems.append(message)
        elif not strict:
            logger.warning("%s: ignoring %s", source, message)
    return problems


def value_problems(extra: Mapping[str, object], readers: list[Reader], where: str) -> list[str]:
    """The values of ``extra`` that the readers in use declare with an :class:`ExtraKey`
    and that are not what the declaration says (null means the default: not checked)."""
    specs = {k: v for r in reversed(readers) for k, v in r.keys.items() if isinstance(v, ExtraKey)}
    problems = []
    for key, value in extra.items():
        spec = specs.get(str(key))
        if spec is None or value is None:
            continue
        problem = spec.problem(f"{where}.{key}", value)
        if problem is not None:
            problems.append(problem)
    return problems
