"""Keys of vLLM's real ``Request`` objects: adapters, multimodal items, salts, prompt embeddings.

The same tokens under two adapters, or with two images behind identical
placeholder tokens, must give different lmcache keys (vLLM's own prefix cache
separates them too); the same inputs must give the same keys.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from lmcache_vllm import lookup  # noqa: E402
from lmcache_vllm.connector import SchedulerSide  # noqa: E402
from lmcache_vllm.request_keys import namespace_extra, request_identity  # noqa: E402
from vllm.lora.request import LoRARequest  # noqa: E402
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.request import Request  # noqa: E402

PLACEHOLDER = 151655  # an image token id; identical for every image
TOKENS = list(range(100)) + [PLACEHOLDER] * 300 + list(range(200, 300))


def _request(
    rid, *, image=None, lora=None, salt=None, embeds=None, tokens=TOKENS, params=None, sp=None
):
    mm = None
    if image is not None:
        mm = [
            MultiModalFeatureSpec(
                data=None,
                modality="image",
                identifier=image,
                mm_position=PlaceholderRange(offset=100, length=300),
                mm_hash=image,
            )
        ]
    return Request(
        rid,
        tokens,
        sp
        or SamplingParams(
            max_tokens=1, extra_args={"kv_transfer_params": params} if params else None
        ),
        None,
        mm_features=mm,
        lora_request=lora,
        cache_salt=salt,
        prompt_embeds=embeds,
    )


@pytest.fixture
def scheduler():
    seen: list[list[bytes]] = []

    def fake_rank(chunk_size, num_tokens, digests, owner):
        seen.append(list(digests))
        return 0

    lookup._LOCAL[("keys-test", 0)] = (fake_rank, lambda o: None)
    cfg = SimpleNamespace(
        kv_transfer_config=SimpleNamespace(
            kv_connector_extra_config={"chunk_size": 64}, kv_role="kv_both", engine_id="keys-test"
        ),
        cache_config=SimpleNamespace(block_size=16),
        parallel_config=SimpleNamespace(pipeline_parallel_size=1, tensor_parallel_size=1),
    )
    side = SchedulerSide(cfg, None)
    yield side, seen
    lookup._LOCAL.pop(("keys-test", 0), None)


def _digests(side, seen, request):
    side.get_num_new_matched_tokens(request, 0)
    return seen[-1]


def test_images_behind_identical_placeholders_get_different_keys(scheduler):
    side, seen = scheduler
    a = _digests(side, seen, _request("a", image="sha-image-a"))
    b = _digests(side, seen, _request("b", image="sha-image-b"))
    a2 = _digests(side, seen, _request("a2", image="sha-image-a"))
    text = _digests(side, seen, _request("t"))
    assert a == a2, "the same image gives the same keys"
    # Chunk 0 (tokens 0-63) holds no image token: shared. From chunk 1 (where the image
    # starts, token 100) on, every key differs.
    assert a[0] == b[0] == text[0]
    assert all(x != y for x, y in zip(a[1:], b[1:])) and len(a) == len(b) > 2
    assert all(x != y for x, y in zip(a[1:], text[1:]))


def test_adapters_and_salts_get_keys_of_their_own(scheduler):
    side, seen = scheduler
    lora_a = LoRARequest("sql", 1, "/adapters/sql")
    lora_b = LoRARequest("chat", 2, "/adapters/chat")
    repointed = LoRARequest("sql", 1, "/adapters/sql-v2")
    keys = {
        "none": _digests(side, seen, _request("n")),
        "a": _digests(side, seen, _request("la", lora=lora_a)),
        "b": _digests(side, seen, _request("lb", lora=lora_b)),
        "a-new-path": _digests(side, seen, _request("lr", lora=repointed)),
        "salt": _digests(side, seen, _request("s", salt="tenant-1")),
    }
    flat = [d for ds in keys.values() for d in ds]
    assert len(set(flat)) == len(flat), "no key is shared between adapters, paths or salts"
    assert _digests(side, seen, _request("la2", lora=lora_a)) == keys["a"]


def test_prompt_embeddings_are_not_cached(scheduler):
    side, seen = scheduler
    req = _request("e", embeds=torch.zeros(len(TOKENS), 8))
    assert request_identity(req) is None
    before = len(seen)
    assert side.get_num_new_matched_tokens(req, 0) == 0
    assert len(seen) == before, "no lookup is made for it"


def test_engine_wide_inputs_of_the_kv_are_in_the_namespace():
    def cfg(cache_dtype, quant):
        return SimpleNamespace(
            model_config=SimpleNamespace(dtype="bfloat16", quantization=quant),
            cache_config=SimpleNamespace(cache_dtype=cache_dtype),
        )

    assert namespace_extra(cfg("auto", None)) != namespace_extra(cfg("fp8", None))
    assert namespace_extra(cfg("auto", None)) != namespace_extra(cfg("auto", "awq"))


def test_the_models_config_as_vllm_runs_it_is_in_the_namespace():
    """``--hf-overrides`` (here a YaRN rope scaling) and ``--disable-sliding-window`` change
    vLLM's ``hf_config`` and every KV byte: another namespace. A checkpoint moved to another
    path is the same model."""
    from transformers import LlamaConfig

    def cfg(**overrides):
        hf = LlamaConfig(**{"num_hidden_layers": 2, **overrides})
        return SimpleNamespace(
            model_config=SimpleNamespace(dtype="bfloat16", quantization=None, hf_config=hf),
            cache_config=SimpleNamespace(cache_dtype="auto"),
        )

    plain = namespace_extra(cfg())
    assert dict(plain)["model_config"]
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}
    assert namespace_extra(cfg(rope_parameters={**yarn, "rope_theta": 10000.0})) != plain
    assert namespace_extra(cfg(num_hidden_layers=3)) != plain
    moved = cfg()
    moved.model_config.hf_config._name_or_path = "/another/path"
    assert namespace_extra(moved) == plain


def test_a_draft_model_is_in_the_namespace_and_ngram_speculation_is_not():
    from transformers import LlamaConfig

    target = SimpleNamespace(dtype="bfloat16", quantization=None, hf_config=LlamaConfig())

    def cfg(spec):
        return SimpleNamespace(
            model_config=target,
            cache_config=SimpleNamespace(cache_dtype="auto"),
            speculative_config=spec,
        )

    def draft(name, layers):
        hf = LlamaConfig(num_hidden_layers=layers)
        return SimpleNamespace(
            method="eagle", draft_model_config=SimpleNamespace(model=name, hf_config=hf)
        )

    plain = namespace_extra(cfg(None))
    ngram = SimpleNamespace(method="ngram", draft_model_config=target)
    assert namespace_extra(cfg(ngram)) == plain, "n-gram speculation stores no KV of its own"
    d1, d2 = namespace_extra(cfg(draft("d1", 1))), namespace_extra(cfg(draft("d2", 1)))
    assert len({plain, d1, d2, namespace_extra(cfg(draft("d1", 2)))}) == 4


def test_tags_are_part_of_the_key_like_a_salt(scheduler):
    side, seen = scheduler
    keys = {
        "plain": _digests(side, seen, _request("p")),
        "alice": _digests(side, seen, _request("a", params={"lmcache.tag.user": "alice"})),
        "bob": _digests(side, seen, _request("b", params={"lmcache.tag.user": "bob"})),
        "salted": _digests(side, seen, _request("s", salt="t1")),
        "salted alice": _digests(
            side, seen, _request("sa", salt="t1", params={"lmcache.tag.user": "alice"})
        ),
    }
    flat = [d for ds in keys.values() for d in ds]
    assert len(set(flat)) == len(flat), "no key is shared between tags, salts or neither"
    again = _request("a2", params={"lmcache.tag.user": "alice", "do_remote_prefill": False})
    assert _digests(side, seen, again) == keys["alice"], "other connectors' params do not count"
    # Controls that do not tag leave the key as it was.
    skip = _request("k", params={"lmcache.skip_save": True, "lmcache.ttl": 60})
    assert _digests(side, seen, skip) == keys["plain"]
    assert request_identity(skip).skip_save


def test_malformed_controls_serve_the_request_without_the_cache(scheduler, caplog):
    side, seen = scheduler
    for params in ({"lmcache.tag.user": {"id": 7}}, {"lmcache.skip_save": "perhaps"}):
        req = _request("m", params=params)
        assert request_identity(req) is None
        before = len(seen)
        with caplog.at_level("WARNING", logger="lmcache_vllm.request_keys"):
            assert side.get_num_new_matched_tokens(req, 0) == 0
        assert len(seen) == before, "no lookup is made for it"
    text = caplog.text
    assert "lmcache.tag.user must be a string, number or boolean" in text
    assert "lmcache.skip_save must be true or false" in text
    # A salt no tagged request can produce: refused rather than risk sharing one.
    assert request_identity(_request("z", salt="\x00[null]")) is None


def test_skip_save_loads_but_plans_no_save(scheduler):
    side, _ = scheduler
    lookup._LOCAL[("keys-test", 0)] = (lambda cs, n, d, o: len(d), lambda o: None)
    none = SimpleNamespace(
        req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[]
    )
    plans = {}
    for rid, params in (("save", None), ("skip", {"lmcache.skip_save": True})):
        req = _request(rid, params=params, tokens=list(range(300)))
        hit = side.get_num_new_matched_tokens(req, 0)
        side.update_state_after_alloc(req, None, hit)
        new = SimpleNamespace(req_id=rid, block_ids=(list(range(1, 21)),), num_computed_tokens=hit)
        meta = side.build_connector_meta(
            SimpleNamespace(
                scheduled_new_reqs=[new],
                scheduled_cached_reqs=none,
                num_scheduled_tokens={rid: 300 - hit},
            )
        )
        plans[rid] = (hit, len(meta.loads), len(meta.saves))
    # Both load the 288 cached tokens (whole blocks below the last token); only one stores.
    assert plans == {"save": (288, 1, 1), "skip": (288, 1, 0)}
    # A P/D prefill instance's save is the transfer to the decode instance: it stays.
    side.role = "kv_producer"
    req = _request("pd", params={"lmcache.skip_save": True}, tokens=list(range(300)))
    assert side.get_num_new_matched_tokens(req, 0) == 0
    side.update_state_after_alloc(req, None, 0)
    new = SimpleNamespace(req_id="pd", block_ids=(list(range(1, 21)),), num_computed_tokens=0)
    meta = side.build_connector_meta(
        SimpleNamespace(
            scheduled_new_reqs=[new], scheduled_cached_reqs=none, num_scheduled_tokens={"pd": 300}
        )
    )
    assert len(meta.saves) == 1


def test_requests_that_must_compute_every_token_are_not_looked_up(scheduler):
    """Prompt logprobs: vLLM reads no prefix cache and drops a connector's hit, so lmcache
    neither looks up (nor pins) for them; their KV is still stored."""
    side, seen = scheduler
    req = _request("lp", sp=SamplingParams(max_tokens=1, prompt_logprobs=1))
    assert req.skip_reading_prefix_cache
    before = len(seen)
    assert side.get_num_new_matched_tokens(req, 0) == 0
    assert len(seen) == before
