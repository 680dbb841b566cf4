"""The cache config as the vLLM adapter sees it.

The same :class:`~lmcache_core.config.CacheConfig` as every engine: the
``LMCACHE_CONFIG_FILE`` file and ``LMCACHE_*`` variables, then the keys of
``kv_connector_extra_config`` in ``--kv-transfer-config`` (which win).
"""

from __future__ import annotations

import logging
from typing import Any

from lmcache_core.adapter_kit import config_overrides
from lmcache_core.config import CacheConfig, parse_bool
from lmcache_core.errors import ConfigError

logger = logging.getLogger("vllm.lmcache")

#: Keys of ``kv_connector_extra_config`` that are the adapter's, not cache config keys.
ADAPTER_KEYS = frozenset({"model_id", "async_saves"})
#: Keys upstream LMCache's vLLM adapter reads from ``kv_connector_extra_config`` that
#: have no effect here: accepted with a warning, so upstream deployments start.
UPSTREAM_IGNORED_KEYS = {
    "lmcache_rpc_port": "lookups go over a Unix socket per engine (LMCACHE_SOCKET_DIR)",
    "skip_last_n_tokens": "the last block is always recomputed, as vLLM's prefix cache does",
    "use_native": "there is one connector implementation",
    "lmcache_instance_id": "instances are told apart by their engine id",
}


def load_cache_config(extra: dict[str, Any] | None) -> CacheConfig:
    """The cache config, with ``kv_connector_extra_config`` keys applied.

    As upstream's adapter does, ``lmcache.<key>`` sets config key ``<key>``;
    ``discard_partial_chunks: true`` is ``save_unfull_chunk: false``; the
    other upstream adapter keys are ignored with a warning naming them.
    """
    overrides = config_overrides(
        extra,
        adapter_keys=ADAPTER_KEYS,
        ignored=UPSTREAM_IGNORED_KEYS,
        translate={"discard_partial_chunks": _keep_partial_chunks},
        where="kv_connector_extra_config",
    )
    return CacheConfig.load(overrides=overrides)


def _keep_partial_chunks(value: Any) -> tuple[str, Any]:
    return "save_unfull_chunk", not parse_bool(value, "discard_partial_chunks")


def check_chunk_size(config: CacheConfig, block_size: int) -> None:
    """Chunks map to whole vLLM blocks: refuse, at start, a size that would split one."""
    if config.chunk_size % block_size:
        suggestion = max(1, round(config.chunk_size / block_size)) * block_size
        raise ConfigError(
            [
                f"chunk_size={config.chunk_size} is not a multiple of vLLM's block size "
                f"{block_size}; set chunk_size to a multiple of {block_size} "
                f"(e.g. LMCACHE_CHUNK_SIZE={suggestion}) or change vLLM's --block-size"
            ],
            "lmcache-vllm",
        )


def async_saves(vllm_config: Any) -> bool:
    """Do saves finish after the step (GPU), holding a finished request's blocks until then?

    ``kv_connector_extra_config.async_saves``: ``auto`` (the default: on GPUs,
    where copies are kernels on a side stream; off on the CPU backend, whose
    copies are synchronous), ``true`` or ``false``. The scheduler side and
    every worker read the same value: they must agree on which requests'
    blocks vLLM keeps until the workers report their saves done.
    """
    extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
    value = extra.get("async_saves", "auto")
    if isinstance(value, str) and value.strip().lower() == "auto":
        device = getattr(getattr(vllm_config, "device_config", None), "device_type", "cpu")
        return device == "cuda"
    return parse_bool(value, "kv_connector_extra_config.async_saves")


def model_id(vllm_config: Any, config: CacheConfig, extra: dict[str, Any] | None) -> str:
    """The model's identity in cache keys.

    ``model_id`` (in ``kv_connector_extra_config`` or the config's
    ``extra_config``) names it explicitly, so instances that load the same
    weights from different paths share their cache; otherwise it is the model
    name or path vLLM was given, with its revision.
    """
    explicit = (extra or {}).get("model_id") or config.extra_config.get("model_id")
    if explicit:
        return str(explicit)
    mc = vllm_config.model_config
    revision = getattr(mc, "revision", None)
    return f"{mc.model}@{revision}" if revision else str(mc.model)


def checked_kv_spec(kv_cache_config: Any, config: CacheConfig) -> Any:
    """The model's one KV cache spec, refused at start unless lmcache handles it.

    vLLM gives a connector without hybrid-allocator support (``SupportsHMA``)
    one KV cache group, allocating a model that mixes sliding-window and full
    layers (gpt-oss, Gemma 3) as full attention. A model whose every layer
    slides keeps a ``SlidingWindowSpec``: vLLM then frees the blocks that
    leave the window and puts its null block in their place, so the
    scheduler never loads into or saves from those (``NULL_BLOCK``). That is
    sound only if a chunk is complete before any of its blocks can leave the
    window, hence ``chunk_size <= sliding_window``. Other specs (chunked local
    attention, gaps freed mid-sequence, state-space layers) are refused.
    """
    from vllm.v1.kv_cache_interface import FullAttentionSpec, RSWASpec, SlidingWindowSpec

    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(
            f"lmcache supports one KV cache group (a dense attention model); this model has "
            f"{len(groups)}"
        )
    spec = groups[0].kv_cache_spec
    if isinstance(spec, SlidingWindowSpec):
        if spec.sliding_window < config.chunk_size:
            raise ConfigError(
                [
                    f"the model's sliding window ({spec.sliding_window} tokens) is shorter than "
                    f"chunk_size={config.chunk_size}, and vLLM drops KV that leaves the window "
                    "before such a chunk is complete; set chunk_size to at most "
                    f"{spec.sliding_window} (a multiple of vLLM's block size)"
                ],
                "lmcache-vllm",
            )
    elif not isinstance(spec, FullAttentionSpec) or isinstance(spec, RSWASpec):
        raise ValueError(
            "lmcache supports full-attention and sliding-window KV caches; this model's is "
            f"{type(spec).__name__}"
        )
    if getattr(spec, "non_causal", False):
        # vLLM switches its own prefix cache off for these, for the same reason.
        raise ValueError(
            "this model has non-causal attention layers (prefix LM): a prefix's KV depends on "
            "the text after it, so no cache can reuse it; serve it without lmcache (vLLM "
            "disables its own prefix caching for it too)"
        )
    if getattr(spec, "tokens_per_state", 1) != 1:
        raise ValueError(
            f"this model's KV cache stores {spec.tokens_per_state} tokens per state "
            "(compressed or pooled); lmcache stores one state per token"
        )
    quant = getattr(spec, "kv_quant_mode", None)
    if quant is not None and quant.name not in ("NONE", "FP8_PER_TENSOR"):
        # Per-token scales and packed formats live outside the rows lmcache copies, or
        # inside them in ways it does not know: their KV would load without its scales.
        raise ConfigError(
            [
                f"kv_cache_dtype with {quant.name.lower()} quantization is not supported by "
                "lmcache yet; use --kv-cache-dtype auto or fp8 (per-tensor scales)"
            ],
            "lmcache-vllm",
        )
    return spec


def check_parallelism(vllm_config: Any) -> None:
    """Refuse, at start, the parallel layouts in which a rank does not hold every token's KV
    for its heads (lmcache maps a request's tokens to its block table one to one)."""
    pc = vllm_config.parallel_config
    if getattr(pc, "pipeline_parallel_size", 1) > 1:
        raise ValueError("lmcache-vllm does not support pipeline parallelism yet")
    for name, flag in (
        ("decode_context_parallel_size", "--decode-context-parallel-size"),
        ("prefill_context_parallel_size", "--prefill-context-parallel-size"),
    ):
        if getattr(pc, name, 1) > 1:
            raise ValueError(
                f"lmcache-vllm does not support context parallelism yet ({flag} "
                f"{getattr(pc, name)} splits each request's tokens across ranks); "
                "use tensor parallelism"
            )
