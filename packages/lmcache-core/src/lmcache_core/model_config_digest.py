"""A digest of a model's configuration for the key namespace: KV computed under another
configuration of the same model is another KV.

Why the model's name (and revision) is not enough: engines let a deployment
change the model's configuration at start. vLLM's ``--hf-overrides`` is how
long-context deployments switch on YaRN rope scaling (Qwen's model cards say
to), which changes the rotation of every K; ``--disable-sliding-window``
changes what every layer above the first attends to, so every K and V beyond
the window. Two deployments of "the same model" that share a tier (Redis, S3,
a peer, a shared disk) would otherwise load each other's KV: wrong answers,
no error.

What is left out are the fields that cannot change a KV byte (paths,
library versions, special-token ids, label maps, output flags, the name of the
attention implementation), so instances that load the same weights from
different paths still share their cache. The runtime dtype is keyed
separately by the engine adapter (it is what the engine runs, not what the
checkpoint says). Everything else is in: an unknown field changes the
digest, which costs hits, never correctness.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

#: Configuration fields that do not change the KV, at any depth of the config.
IGNORED_FIELDS = frozenset(
    {
        "_name_or_path",
        "name_or_path",
        "_commit_hash",
        "transformers_version",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "_attn_implementation_internal",
        "attn_implementation",
        "_experts_implementation",
        "dtype",  # the checkpoint's; the adapter keys the dtype the engine runs
        "torch_dtype",
        "use_cache",
        "return_dict",
        "output_hidden_states",
        "output_attentions",
        "torchscript",
        "id2label",
        "label2id",
        "problem_type",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        "tokenizer_class",
        "task_specific_params",
    }
)

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _canonical(value: Any) -> Any:
    """``value`` as plain JSON data, the same in every process that loaded the same config."""
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items() if str(k) not in IGNORED_FIELDS}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):  # a nested config object
        return _canonical(to_dict())
    # Anything else by its text, without a memory address (which differs per process).
    return _ADDRESS.sub("", str(value))


def model_config_digest(config: Mapping[str, Any]) -> str:
    """A short hex digest of ``config`` (a model's configuration as a dict, e.g. a
    transformers ``PretrainedConfig.to_dict()``), independent of key order and of the
    fields in :data:`IGNORED_FIELDS`."""
    text = json.dumps(_canonical(config), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]
