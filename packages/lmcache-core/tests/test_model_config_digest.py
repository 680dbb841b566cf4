"""The model-configuration digest in the key namespace: it changes with every field that
can change a KV byte, and with nothing that cannot."""

from __future__ import annotations

import copy

from hypothesis import given
from hypothesis import strategies as st
from lmcache_core.model_config_digest import IGNORED_FIELDS, model_config_digest

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "_name_or_path": "/models/llama",
    "transformers_version": "5.19.0",
    "dtype": "bfloat16",
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
    "sliding_window": None,
    "eos_token_id": [128001, 128009],
    "text_config": None,
}


def test_fields_that_change_the_kv_change_the_digest():
    base = model_config_digest(LLAMA)
    changes = {
        "rope_parameters": {  # a YaRN override for long contexts
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 32768,
            "rope_theta": 500000.0,
        },
        "sliding_window": 4096,
        "rms_norm_eps": 1e-6,
        "num_hidden_layers": 31,
        "architectures": ["MistralForCausalLM"],
    }
    seen = {base}
    for field, value in changes.items():
        cfg = {**LLAMA, field: value}
        d = model_config_digest(cfg)
        assert d not in seen, field
        seen.add(d)


def test_nested_configs_count_and_ignored_fields_are_ignored_at_any_depth():
    mm = {**LLAMA, "text_config": {**LLAMA, "text_config": None}}
    other = copy.deepcopy(mm)
    other["text_config"]["rope_parameters"] = {"rope_theta": 1.0, "rope_type": "default"}
    assert model_config_digest(mm) != model_config_digest(other)
    moved = copy.deepcopy(mm)
    moved["_name_or_path"] = moved["text_config"]["_name_or_path"] = "/elsewhere"
    moved["transformers_version"] = "4.57.0"
    moved["text_config"]["eos_token_id"] = 2
    moved["dtype"] = "float32"  # the checkpoint's; the engine keys what it runs
    assert model_config_digest(mm) == model_config_digest(moved)


class _Nested:
    def __init__(self, theta):
        self.theta = theta

    def to_dict(self):
        return {"theta": self.theta}


class _Opaque:
    pass


def test_objects_inside_a_config_digest_by_content_not_by_address():
    one = model_config_digest({"rope": _Nested(1.0)})
    assert model_config_digest({"rope": _Nested(1.0)}) == one
    assert model_config_digest({"rope": _Nested(2.0)}) != one
    # str() of a plain object names its address: two processes would never share.
    assert model_config_digest({"x": _Opaque()}) == model_config_digest({"x": _Opaque()})


keys = st.text(min_size=1, max_size=8).filter(lambda k: k not in IGNORED_FIELDS)
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=10,
)


@given(st.dictionaries(keys, values, min_size=1, max_size=6))
def test_the_digest_ignores_key_order_and_sees_every_kept_field(cfg):
    assert model_config_digest(dict(reversed(list(cfg.items())))) == model_config_digest(cfg)
    field = next(iter(cfg))
    assert model_config_digest({**cfg, field: ["changed", cfg[field]]}) != model_config_digest(cfg)
    assert model_config_digest({**cfg, "_name_or_path": "/x"}) == model_config_digest(cfg)
