"""What, besides its tokens, makes a vLLM request's KV its own: keyed, or not cached at all.

Mirrors what vLLM's own block hashes include (``generate_block_hash_extra_keys``
in ``vllm/v1/core/kv_cache_utils.py``), so a hit is never another request's
KV where vLLM's prefix cache would not share either:

* the ``cache_salt`` (a tenant), and the request's ``lmcache.tag.*``
  controls (:mod:`lmcache_core.request_options`, upstream LMCache's per-request
  tags), folded into the key's salt;
* the LoRA adapter: its name *and* path, as vLLM keys it, so re-pointing a
  name at another adapter never reuses KV computed with the old one;
* multimodal inputs: each item's content hash (``identifier``) with its
  placeholder range, so the same placeholder tokens with another image give
  other keys from the chunk the image starts in;
* prompt embeddings: not cached. Their token ids are placeholders, and keying
  on the embedding bytes would hash megabytes per request for a feature few
  deployments combine with a KV cache; such requests are computed as usual.

Per engine, not per request (:func:`namespace_extra`): the KV cache dtype, the
weights' dtype and quantization, and a digest of the model's configuration as
vLLM runs it (after ``--hf-overrides`` and ``--disable-sliding-window``), which
change every KV byte: two deployments of one model name, one with YaRN rope
scaling, never share KV through a shared tier. With speculative decoding, the
draft model's name and configuration too (its layers' KV is stored beside the
target's).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from lmcache_core.keys import MultimodalItem
from lmcache_core.model_config_digest import model_config_digest
from lmcache_core.request_options import (
    IGNORED,
    RequestOptionsError,
    parse_request_options,
    shown,
)

logger = logging.getLogger(__name__)
#: Digests of the messages logged lately (16 bytes each, the oldest forgotten first): a
#: client repeating a malformed control logs it once, and no client's text is kept.
_LOGGED: OrderedDict[bytes, None] = OrderedDict()
_MAX_LOGGED = 1024
#: Longest message logged (names and values in it are cut already; this bounds the rest).
_MAX_MESSAGE = 400
_LOGGED_LOCK = threading.Lock()


@dataclass(frozen=True)
class RequestIdentity:
    cache_salt: str | None  # the key's salt: vLLM's cache_salt with the lmcache.tag.* controls
    adapter: str | None
    mm_items: tuple[MultimodalItem, ...]
    skip_save: bool = False  # lmcache.skip_save: load, but store nothing of this request


def _log_once(message: str, level: int = logging.WARNING) -> None:
    if len(message) > _MAX_MESSAGE:
        message = f"{message[: _MAX_MESSAGE - 30]}...({len(message)} characters)"
    digest = hashlib.blake2b(message.encode("utf-8", "backslashreplace"), digest_size=16).digest()
    with _LOGGED_LOCK:
        if digest in _LOGGED:
            _LOGGED.move_to_end(digest)
            return
        _LOGGED[digest] = None
        if len(_LOGGED) > _MAX_LOGGED:
            _LOGGED.popitem(last=False)
    logger.log(level, message)


def request_identity(request: Any) -> RequestIdentity | None:
    """The key inputs of ``request`` (a ``vllm.v1.request.Request``); None: do not cache it.

    Malformed ``lmcache.*`` controls in its ``kv_transfer_params`` make it
    uncached (logged with what to fix): a scheduler cannot fail one request,
    and a tag meant to isolate it may be the malformed part.
    """
    if request.prompt_token_ids is None or getattr(request, "prompt_embeds", None) is not None:
        return None
    try:
        options = parse_request_options(getattr(request, "kv_transfer_params", None))
        salt = options.key_salt(getattr(request, "cache_salt", None) or None)
    except RequestOptionsError as e:
        _log_once(f"lmcache: request served without the cache: {e}")
        return None
    for name in options.unused:  # at most a few, each cut short (request_options)
        what = "is not used (chunks live until evicted)" if name in IGNORED else "is unknown"
        _log_once(
            f"lmcache: kv_transfer_params[{shown(name)}] {what}; lmcache reads "
            "lmcache.skip_save and lmcache.tag.<name>",
            logging.INFO if name in IGNORED else logging.WARNING,
        )
    lora = getattr(request, "lora_request", None)
    adapter = None
    if lora is not None:
        adapter = f"{lora.lora_name}\x00{getattr(lora, 'lora_path', '') or ''}"
    items = []
    for feature in getattr(request, "mm_features", None) or ():
        ident = getattr(feature, "identifier", None) or getattr(feature, "mm_hash", None)
        pos = feature.mm_position
        if ident is None:
            return None  # an item without a content hash cannot be keyed: compute it
        items.append(MultimodalItem(str(ident), int(pos.offset), int(pos.length)))
    return RequestIdentity(salt, adapter, tuple(items), options.skip_save)


def namespace_extra(vllm_config: Any) -> tuple[tuple[str, str], ...]:
    """Engine-wide inputs of the KV beyond the model and the layout, for the key namespace."""
    mc = vllm_config.model_config
    cc = vllm_config.cache_config
    extra = [
        ("kv_cache_dtype", str(getattr(cc, "cache_dtype", "auto"))),
        ("model_dtype", str(getattr(mc, "dtype", ""))),
        ("quantization", str(getattr(mc, "quantization", None))),
    ]
    hf_config = getattr(mc, "hf_config", None)
    if hf_config is not None:  # the configuration vLLM runs, overrides applied
        as_dict = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(vars(hf_config))
        extra.append(("model_config", model_config_digest(as_dict)))
    # A draft model (EAGLE, MTP, a small LM) keeps KV of its own layers beside the target's;
    # the layout counts its layers but not which draft they are.
    spec = getattr(vllm_config, "speculative_config", None)
    draft = getattr(spec, "draft_model_config", None) if spec is not None else None
    if draft is not None and draft is not mc:  # n-gram and suffix methods reuse the target's
        hf = getattr(draft, "hf_config", None)
        extra.append(("draft_model", f"{getattr(spec, 'method', None)}:{draft.model}"))
        if hf is not None and hasattr(hf, "to_dict"):
            extra.append(("draft_model_config", model_config_digest(hf.to_dict())))
    return tuple(extra)
